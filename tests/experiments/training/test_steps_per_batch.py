"""``steps_per_batch=K``: K optimizer steps per Lightning batch train bit for bit as K=1 (weights,
logged rows, test metrics), for the VAE and M2, with epochs that K does not divide, a step count
that K does not divide, and a SIGKILLed run resumed; bad settings fail with one line."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from datamodules import SyntheticDataModule
from datamodules.tensor_data import BatchGroup
from experiments.training.errors import ConfigurationError
from experiments.training.steps_per_batch import steps_per_batch
from tests.experiments.training.test_entry_point import run_cli
from tests.experiments.training.test_resume import M2, RUN


def rows(run_dir: Path) -> dict[tuple[int, str], str]:
    """(step, column) -> value of every value in the run's metrics.csv (throughput aside: a
    wall-clock rate)."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as stream:
        return {(int(row["step"]), column): value for row in csv.DictReader(stream)
                for column, value in row.items()
                if value and column not in ("step", "train/samples_per_s")}


def assert_same_training(run_dir: Path, reference_dir: Path) -> None:
    """Same weights (bit for bit), global step, logged values, test metrics and best checkpoint."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == expected["global_step"]
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(state["state_dict"][name], tensor), name
    assert any(column.startswith("train/") for _, column in rows(reference_dir))
    assert rows(run_dir) == rows(reference_dir)
    results = json.loads((run_dir / "results.json").read_text())
    reference = json.loads((reference_dir / "results.json").read_text())
    assert {k: v for k, v in results.items() if k.startswith("test/")} == {
        k: v for k, v in reference.items() if k.startswith("test/")}
    assert results["global_step"] == reference["global_step"]
    names = [Path(r["checkpoint"]).name if r["checkpoint"] else None for r in (results, reference)]
    assert names[0] == names[1]


def train(run_dir: Path, arguments: list[str], *extra: str) -> int:
    completed = run_cli([*arguments, f"hydra.run.dir={run_dir}", *extra], cwd=run_dir.parent)
    assert completed.returncode in (0, -signal.SIGKILL), completed.stderr[-2000:]
    return completed.returncode


def test_groups_hold_the_batches_of_one_step_per_batch() -> None:
    datamodule = SyntheticDataModule(num_examples=224, batch_size=32, seed=3)  # 7 batches
    datamodule.setup()
    batches = datamodule.train_dataloader()
    single = [x for _ in range(2) for x, _ in batches]  # two epochs
    datamodule.steps_per_batch = 3
    loader = datamodule.train_dataloader()
    groups = [group for _ in range(2) for group in loader]
    assert len(loader) == 3 and [len(g) for g in groups] == [3, 3, 1, 3, 3, 1]
    assert all(isinstance(group, BatchGroup) for group in groups)
    grouped = [x for group in groups for x, _ in group]
    assert len(grouped) == len(single)
    assert all(torch.equal(a, b) for a, b in zip(grouped, single, strict=True))  # noise too


@pytest.mark.parametrize(("override", "message"), [
    ("steps_per_batch=0", "steps_per_batch=0 is invalid"),
    ("steps_per_batch=true", "steps_per_batch=True is invalid"),
    ("replicas=2", "replicas=2 cannot be combined with steps_per_batch=4"),
    ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0 cannot be combined"),
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 cannot be"),
    ("trainer.val_check_interval=100", "trainer.val_check_interval=100 cannot be combined"),
    ("trainer.limit_train_batches=10", "trainer.limit_train_batches=10 cannot be combined"),
    ("callbacks.gradient_probe.every_n_steps=10", "callbacks.gradient_probe=set cannot be"),
])
def test_bad_settings_fail_with_one_line(override: str, message: str) -> None:
    cfg = OmegaConf.from_dotlist(["steps_per_batch=4", "replicas=1", override])
    with pytest.raises(ConfigurationError, match=message) as error:
        steps_per_batch(cfg)
    assert "\n" not in str(error.value) and "steps_per_batch" in str(error.value)


def test_one_step_per_batch_is_the_default() -> None:
    assert steps_per_batch(OmegaConf.create({})) == 1
    assert steps_per_batch(OmegaConf.create({"steps_per_batch": 1, "replicas": 2})) == 1


@pytest.mark.slow
def test_vae_with_three_steps_per_batch_trains_bitwise_as_one(tmp_path: Path) -> None:
    """8 batches an epoch in groups of 3 (3, 3, 2): groups straddle no epoch but the multiples of
    3 drift from the groups after the first epoch; 22 steps end mid-group; every step logs a row
    (most of them inside a group); last.ckpt every 3 steps."""
    stop = ["trainer.max_steps=22"]
    assert train(tmp_path / "one", RUN, *stop) == 0
    assert train(tmp_path / "three", RUN, *stop, "steps_per_batch=3") == 0
    assert_same_training(tmp_path / "three", tmp_path / "one")


@pytest.mark.slow
def test_sigkilled_run_with_four_steps_per_batch_resumes_bitwise(tmp_path: Path) -> None:
    """Killed before step 12 (last.ckpt at the epoch end, step 8: every 7 steps is never reached
    by a group end in between) and rerun: equal to the uninterrupted run with K=1."""
    assert train(tmp_path / "one", RUN) == 0
    marker = tmp_path / "killed"
    killer = ["+callbacks.killer._target_=tests.fault_injection.KillAtStep",
              "+callbacks.killer.step=12", f"+callbacks.killer.once_marker={marker}",
              "steps_per_batch=4", "callbacks.last_checkpoint.every_n_train_steps=7"]
    assert train(tmp_path / "four", RUN, *killer) == -signal.SIGKILL
    assert train(tmp_path / "four", RUN, *killer) == 0
    assert json.loads((tmp_path / "four" / "results.json").read_text())["resumes"] == 1
    assert_same_training(tmp_path / "four", tmp_path / "one")


@pytest.mark.slow
def test_m2_with_three_steps_per_batch_trains_bitwise_as_one(tmp_path: Path) -> None:
    """Both data streams (the labelled one, 3 batches a cycle, restarted inside groups), 20 steps
    (not a multiple of 3), a row every step."""
    m2 = [*M2, "trainer.log_every_n_steps=1"]
    assert train(tmp_path / "one", m2) == 0
    assert train(tmp_path / "three", m2, "steps_per_batch=3") == 0
    assert_same_training(tmp_path / "three", tmp_path / "one")
