"""Progress reaches log files: plain lines when stdout is not a terminal; the progress bar
counts steps when max_steps ends the run."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from experiments.training.progress import ProgressLines, StepProgressBar
from tests.experiments.training.test_entry_point import run_cli
from tests.experiments.training.test_rerun import TINY

LINE = re.compile(r"^progress: step (\d+)/6 \(\d+%\) epoch 0 \| .*train/neg_elbo=[-\d.e+]+.* \| "
                  r"[\d.]+ steps/s \| ETA \d+:\d\d:\d\d$")


def test_a_job_whose_stdout_is_a_file_prints_progress_lines(tmp_path: Path) -> None:
    completed = run_cli([*TINY, "trainer.max_steps=6", "trainer.log_every_n_steps=1",
                         "callbacks.progress_lines.every_n_steps=2",
                         f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("progress:")]
    assert [LINE.match(line).group(1) for line in lines if LINE.match(line)] == ["2", "4", "6"], (
        lines)


@pytest.mark.parametrize("every_n_steps, every_s", [(0, 1.0), (1, 0), ("10", 1.0)])
def test_bad_progress_settings_are_refused(every_n_steps, every_s) -> None:
    with pytest.raises(ValueError, match="callbacks.progress_lines"):
        ProgressLines(every_n_steps=every_n_steps, every_s=every_s)


def test_progress_bar_counts_steps_when_max_steps_ends_the_run() -> None:
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=2000, global_step=1200, max_epochs=-1)
    assert bar._get_train_description(7).startswith("Step 1200/2000 (epoch 7)")
    bar._trainer = SimpleNamespace(max_steps=-1, global_step=10, max_epochs=100)
    assert bar._get_train_description(7).startswith("Epoch 7/99")
