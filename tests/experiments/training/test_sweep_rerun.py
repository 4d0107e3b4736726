"""A sweep is idempotent: a 4-job multirun in which one job raises and another is SIGKILLed
(taking the sweep process with it, so the last job never starts) is finished by the one command
the sweep prints, which skips the finished job, resumes the killed one from its checkpoint and
runs the others; the report then equals an uninterrupted sweep's in variants, seeds and metrics
and says which job was resumed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from experiments.report.runs import load_sweeps
from tests.conftest import PROJECT_ROOT
from tests.experiments.training.test_sweep import TINY_RUN, run_multirun

pytestmark = pytest.mark.slow

# Jobs in order: 0 gumbel_softmax/0, 1 gumbel_softmax/1 (raises at step 2, once, after the step-2
# checkpoint),
# 2 st_gumbel_softmax/0 (SIGKILLed at step 5, once, after the step-4 checkpoint), 3 never starts.
SWEEP = [
    *TINY_RUN, "trainer.max_steps=8", "logger=csv_only", "~callbacks.progress_bar",
    "callbacks.last_checkpoint.every_n_train_steps=2", "trainer.log_every_n_steps=1",
    "estimator=gumbel_softmax,st_gumbel_softmax", "seed=0,1",
]


class FaultOnce(L.Callback):
    """Raises (``raise_in``) or SIGKILLs (``kill_in``) the job named ``<estimator>/<seed>`` at
    ``step``, the first time only (a marker file in ``marker_dir`` remembers)."""

    def __init__(self, job: str, raise_in: str, kill_in: str, marker_dir: str,
                 raise_step: int = 2, kill_step: int = 5) -> None:
        self.action = {raise_in: ("raise", raise_step), kill_in: ("kill", kill_step)}.get(job)
        self.marker = Path(marker_dir) / job.replace("/", "_")

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.action is None or self.marker.exists():
            return
        kind, step = self.action
        if trainer.global_step == step:
            self.marker.touch()
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"transient failure at step {step}")


def faults(marker_dir: Path) -> list[str]:
    key = "+callbacks.fault"
    return [
        f"{key}._target_=tests.experiments.training.test_sweep_rerun.FaultOnce",
        f"{key}.job=${{hydra:runtime.choices.estimator}}/${{seed}}",
        f"{key}.raise_in=gumbel_softmax/1", f"{key}.kill_in=st_gumbel_softmax/0",
        f"{key}.marker_dir={marker_dir}",
    ]


def outcome(sweep: Path) -> list[tuple[str, int | None, dict[str, float]]]:
    """What the report reads: variant, seed and test metrics of every job."""
    return sorted(
        (job.variant, job.seed, {k: v for k, v in job.results.items() if k.startswith("test/")})
        for job in load_sweeps([sweep])
    )


def test_rerunning_a_broken_sweep_finishes_it_without_retraining(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    completed = run_multirun(reference, SWEEP)
    assert completed.returncode == 0, completed.stderr[-3000:]

    sweep = tmp_path / "sweep"
    markers = tmp_path / "markers"
    markers.mkdir()
    first = run_multirun(sweep, [*SWEEP, *faults(markers)])
    assert first.returncode == -signal.SIGKILL
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    finished = sweep / "0" / "results.json"
    finished_at = finished.stat().st_mtime_ns
    checkpoint_at = (sweep / "0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    statuses = [job.status for job in load_sweeps([sweep])]
    assert statuses == ["ok", "failed", "failed", "missing"]
    (command,) = {job.reason.split("to finish the sweep: ")[1] for job in load_sweeps([sweep])
                  if job.status != "ok"}  # the report's job list shows how to finish the sweep

    arguments = shlex.split(command)
    assert arguments[:4] == ["python", "-m", "experiments.train", "-m"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(PROJECT_ROOT),
           "OMP_NUM_THREADS": "1"}
    rerun = subprocess.run([sys.executable, *arguments[1:]], cwd=PROJECT_ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"sweep {sweep}: 4 ok, 0 failed, 0 missing (2 resumed)" in rerun.stderr
    assert "to finish the sweep" not in rerun.stderr

    assert finished.stat().st_mtime_ns == finished_at  # nothing finished was retrained
    assert (sweep / "0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == checkpoint_at
    jobs = load_sweeps([sweep])
    assert [job.resumes for job in jobs] == [0, 1, 1, 0]  # the raising job had a checkpoint too
    segments = (sweep / "2" / ".catgrad" / "segments.jsonl").read_text().splitlines()
    assert [json.loads(s)["action"] for s in segments] == ["start", "resume"]
    assert json.loads(segments[1])["step"] == 4
    assert outcome(sweep) == outcome(reference)


def test_a_sweep_with_failed_jobs_prints_how_to_finish_it(tmp_path: Path) -> None:
    """The one-line error of a job, no traceback, a summary and the command, exit code 1."""
    sweep = tmp_path / "sweep"
    completed = run_multirun(sweep, [
        *TINY_RUN, "trainer.max_steps=2", "callbacks=none", "logger=csv_only",
        "estimator=marginalization", "model.num_variables=20,2",
    ])
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    assert f"sweep {sweep}: 1 ok, 1 failed, 0 missing" in completed.stderr
    (line,) = [x for x in completed.stderr.splitlines() if x.startswith("to finish the sweep")]
    assert f"hydra.sweep.dir={sweep}" in line and "model.num_variables=20,2" in line
