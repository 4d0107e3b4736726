"""Exact resume after SIGKILL (rerunning the same command, or resume=), atomic checkpoints,
non-finite losses, bad checkpoints."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch

from tests.experiments.training.test_entry_point import run_cli

# 256 synthetic examples / batch 32 = 8 steps per epoch; 4 epochs = 32 steps. last.ckpt every 3
# steps and at epoch ends (8, 16, 24); validation every epoch. The score function with a moving
# average baseline exercises estimator state, estimator noise and dynamic binarization noise.
RUN = [
    "datamodule=synthetic",
    "estimator=score_function",
    "model.num_variables=4",
    "model.num_classes=3",
    "model.encoder_hidden=[32]",
    "model.decoder_hidden=[32]",
    "model.iwae_samples=50",
    "model.eval_samples=10",
    "trainer.max_epochs=4",
    "trainer.check_val_every_n_epoch=1",
    "callbacks.last_checkpoint.every_n_train_steps=3",
    "~callbacks.progress_bar",
    "logger=csv_only",
    "trainer.log_every_n_steps=1",
]


def train(run_dir: Path, *extra: str) -> tuple[int, str]:
    completed = run_cli([*RUN, f"hydra.run.dir={run_dir}", *extra], cwd=run_dir.parent)
    return completed.returncode, completed.stderr


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint["state_dict"]


def steps_logged_twice(metrics_csv: Path) -> list[tuple[str, str]]:
    """(step, column) pairs with more than one value in ``metrics_csv``."""
    seen: set[tuple[str, str]] = set()
    twice = []
    with metrics_csv.open(newline="") as stream:
        for row in csv.DictReader(stream):
            for column, value in row.items():
                if value and column not in ("step", "epoch"):
                    twice += [(row["step"], column)] if (row["step"], column) in seen else []
                    seen.add((row["step"], column))
    return twice


def logged_values(metrics_csv: Path) -> set[tuple[str, str]]:
    """(step, column) pairs that hold a value in ``metrics_csv`` (throughput aside: it is logged
    on a wall-clock schedule)."""
    with metrics_csv.open(newline="") as stream:
        return {(row["step"], column) for row in csv.DictReader(stream)
                for column, value in row.items()
                if value and column not in ("step", "epoch", "train/samples_per_s")}


@pytest.mark.slow
def test_sigkilled_run_resumes_to_bitwise_identical_results(tmp_path: Path) -> None:
    reference_dir = tmp_path / "uninterrupted"
    code, stderr = train(reference_dir)
    assert code == 0, stderr[-2000:]
    reference = json.loads((reference_dir / "results.json").read_text())
    # Step 13: mid-epoch, one step after the step-12 checkpoint, continued by rerunning the same
    # command. Step 17: right after the epoch-2 boundary checkpoint (16) -- the case where loops
    # restart at an epoch end -- continued with resume=<run dir>. Validation at step 24: the
    # epoch's last batch is also a checkpoint interval (24 = 8 x 3); the resumed run must still
    # validate that epoch (its row and the best checkpoint depend on it).
    cases = (("KillAtStep", 13, []), ("KillAtStep", 17, ["resume={run_dir}"]),
             ("KillInValidation", 24, []))
    for killer, kill_step, resume in cases:
        run_dir = tmp_path / f"{killer}_{kill_step}"
        command = [
            f"+callbacks.killer._target_=tests.fault_injection.{killer}",
            f"+callbacks.killer.step={kill_step}",
            f"+callbacks.killer.once_marker={tmp_path / f'killed_{kill_step}'}",
            # 4 s of the first segment: the resumed wall time must include them.
            "+callbacks.slow._target_=tests.fault_injection.SleepAtStep",
            "+callbacks.slow.step=2", "+callbacks.slow.seconds=4",
        ]
        code, _ = train(run_dir, *command)
        assert code == -signal.SIGKILL
        assert not (run_dir / "results.json").exists()
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        code, stderr = train(run_dir, *command, *(r.format(run_dir=run_dir) for r in resume))
        assert code == 0, stderr[-2000:]
        resumed = json.loads((run_dir / "results.json").read_text())
        assert Path(resumed["checkpoint"]).is_file()  # the best checkpoint tested still exists
        for key in ("test/neg_elbo", "test/nll_iwae", "global_step"):
            assert resumed[key] == reference[key], (kill_step, key, resumed[key], reference[key])
        for name, tensor in final_state(reference_dir).items():
            assert torch.equal(final_state(run_dir)[name], tensor), (kill_step, name)
        assert resumed["resumes"] == 1 and resumed["wall_time_s"] >= 4.0
        # The job keeps its identity: .hydra/ is the first start's, resume= or not.
        assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides
        metrics_csv = run_dir / "csv" / "metrics.csv"
        assert steps_logged_twice(metrics_csv) == []
        reference_logged = logged_values(reference_dir / "csv" / "metrics.csv")
        assert logged_values(metrics_csv) == reference_logged, kill_step


M2 = [
    "model=m2", "datamodule=semi_synthetic", "model.latent_dim=4", "model.classifier_hidden=[16]",
    "model.encoder_hidden=[16]", "model.decoder_hidden=[16]", "datamodule.labelled_batch_size=8",
    "trainer.max_steps=20", "trainer.max_epochs=-1",
    "callbacks.last_checkpoint.every_n_train_steps=5",
    "~callbacks.progress_bar", "logger=csv_only",
]


@pytest.mark.slow
def test_sigkilled_m2_run_resumes_bitwise_with_both_data_streams(tmp_path: Path) -> None:
    """M2's labelled stream (20 labels in batches of 8: 3 batches a cycle, restarted by the
    CombinedLoader within the unlabelled epoch) is indexed by the step like the unlabelled one:
    killed at step 12 (checkpoint 10, mid-cycle) and rerun, the run ends bitwise equal."""
    def m2(run_dir: Path, *extra: str) -> int:
        completed = run_cli([*M2, f"hydra.run.dir={run_dir}", *extra], cwd=tmp_path)
        assert completed.returncode in (0, -signal.SIGKILL), completed.stderr[-2000:]
        return completed.returncode

    assert m2(tmp_path / "reference") == 0
    marker = tmp_path / "kill_marker"
    killer = ["+callbacks.killer._target_=tests.fault_injection.KillAtStep",
              "+callbacks.killer.step=12", f"+callbacks.killer.once_marker={marker}"]
    assert m2(tmp_path / "killed", *killer) == -signal.SIGKILL
    assert m2(tmp_path / "killed", *killer) == 0
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert resumed["resumes"] == 1
    assert {k: v for k, v in resumed.items() if k.startswith("test/")} == {
        k: v for k, v in reference.items() if k.startswith("test/")}
    for name, tensor in final_state(tmp_path / "reference").items():
        assert torch.equal(final_state(tmp_path / "killed")[name], tensor), name


@pytest.mark.slow
def test_non_finite_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path) -> None:
    run_dir = tmp_path / "poisoned"
    poison = [
        "+callbacks.poison._target_=tests.fault_injection.PoisonLossAtStep",
        "+callbacks.poison.step=10",
    ]
    code, stderr = train(run_dir, *poison)
    assert code == 1
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "non-finite loss at step 10" in error_lines[0]
    assert "last.ckpt" in error_lines[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["failed_step"] == 10
    state = final_state(run_dir)
    assert all(torch.isfinite(tensor).all() for tensor in state.values())
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9


def test_atomic_checkpoint_write_keeps_previous_file_on_crash(tmp_path, monkeypatch) -> None:
    from experiments.training.checkpointing import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def crash_midway(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "cannot be read safely"),
        (bytes(range(256)) * 64, "cannot be read safely"),  # random-looking bytes
        (b"PK\x03\x04" + b"\x00" * 200, "cannot be read safely"),  # a broken zip header
        (None, "not a Lightning training checkpoint"),
        ("foreign", "does not match this model"),
    ],
)
def test_bad_checkpoints_give_one_clear_line(tmp_path, content, message) -> None:
    run_dir = tmp_path / "run"
    path = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)
    elif content == "foreign":
        torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "loops": {},
                    "global_step": 3}, path)
    else:
        path.write_bytes(content)
    completed = run_cli([*RUN, f"hydra.run.dir={run_dir}", f"resume={path}"], cwd=tmp_path)
    assert completed.returncode == 2
    lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], completed.stderr


def test_missing_resume_target_is_a_clear_error(tmp_path) -> None:
    completed = run_cli([*RUN, f"resume={tmp_path / 'nowhere'}"], cwd=tmp_path)
    assert completed.returncode == 2
    assert "no checkpoint at" in completed.stderr and "Traceback" not in completed.stderr


def test_unwritable_run_directory_is_refused_with_one_line(tmp_path) -> None:
    # Hydra creates the run directory itself before catgrad runs: the entry point checks the
    # given path before Hydra does; catgrad's own check covers directories that exist but cannot
    # be written (read-only mounts, permissions), before any work.
    from experiments.training.errors import ConfigurationError
    from experiments.training.job import check_writable

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigurationError, match=r"not writable.*hydra.run.dir") as error:
        check_writable(blocker / "run")
    assert "\n" not in str(error.value)
    for key, multirun in (("hydra.run.dir", []), ("hydra.sweep.dir", ["-m"])):
        completed = run_cli([*multirun, *RUN, f"{key}={blocker / 'run'}"], cwd=tmp_path)
        assert completed.returncode == 2 and "Traceback" not in completed.stderr
        (line,) = completed.stderr.strip().splitlines()
        assert line == (f"error: {key}={blocker / 'run'} cannot be created ({blocker} is a "
                        f"file): choose a writable directory")


def test_results_write_failure_keeps_previous_results(tmp_path, monkeypatch) -> None:
    from pathlib import Path as _Path

    from experiments.training.errors import TrainingFailed
    from experiments.training.job import write_results

    write_results(tmp_path, {"status": "completed", "test/neg_elbo": 1.0})
    real_write_text = _Path.write_text

    def disk_full(self, *args, **kwargs):
        real_write_text(self, '{"partial', encoding="utf-8")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_Path, "write_text", disk_full)
    with pytest.raises(TrainingFailed, match="No space left on device.*resume="):
        write_results(tmp_path, {"status": "completed", "test/neg_elbo": 2.0})
    monkeypatch.undo()
    assert json.loads((tmp_path / "results.json").read_text())["test/neg_elbo"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.slow
def test_a_sigterm_stops_with_its_exit_status_and_the_rerun_resumes(tmp_path: Path) -> None:
    """Lightning stops on SIGTERM with a ``SystemExit`` of status 0; the job says why it stopped
    and exits 143 (128 + SIGTERM), so a scheduler or shell does not take it for finished."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import PROJECT_ROOT

    run_dir = tmp_path / "job"
    slow = ["+callbacks.slow._target_=tests.fault_injection.SlowSteps",
            "+callbacks.slow.seconds=0.2"]
    command = [sys.executable, "-m", "experiments.train", *RUN, f"hydra.run.dir={run_dir}", *slow]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(PROJECT_ROOT)}
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert not (run_dir / "results.json").exists()
    code, stderr = train(run_dir, *slow)
    assert code == 0, stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["resumes"] == 1


@pytest.mark.slow
def test_a_sigkilled_segments_wandb_history_is_backfilled_from_metrics_csv(tmp_path: Path) -> None:
    """wandb buffers its records in a service process that a SIGKILL takes along; the resumed
    segment logs the rows of csv/metrics.csv below its checkpoint that no earlier offline run
    file holds, so the job's wandb history has every step metrics.csv has. The reader of the
    ``.wandb`` files is checked first against an uninterrupted run."""
    from experiments.training.wandb_run import WANDB_ID, recorded_steps

    offline = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    overrides = [arg for arg in RUN if arg != "logger=csv_only"] + ["logger=default"]

    def csv_steps(run_dir: Path) -> set[int]:
        with (run_dir / "csv" / "metrics.csv").open(newline="") as stream:
            return {int(row["step"]) for row in csv.DictReader(stream)}

    def wandb_steps(run_dir: Path) -> set[int]:
        return recorded_steps(run_dir, (run_dir / WANDB_ID).read_text().strip())

    whole = tmp_path / "whole"
    completed = run_cli([*overrides, f"hydra.run.dir={whole}"], cwd=tmp_path, extra_env=offline)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert wandb_steps(whole) == csv_steps(whole) and len(csv_steps(whole)) > 30

    killed = tmp_path / "killed"
    kill = ["+callbacks.killer._target_=tests.fault_injection.KillAtStep",
            "+callbacks.killer.step=13", f"+callbacks.killer.once_marker={tmp_path / 'once'}"]
    command = [*overrides, f"hydra.run.dir={killed}", *kill]
    assert run_cli(command, cwd=tmp_path, extra_env=offline).returncode == -signal.SIGKILL
    lost = csv_steps(killed) - wandb_steps(killed)
    assert {0, 11} <= lost  # the killed process's rows up to its step-12 checkpoint
    completed = run_cli(command, cwd=tmp_path, extra_env=offline)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "wandb: logged" in completed.stderr
    assert wandb_steps(killed) == csv_steps(killed) == csv_steps(whole)
