"""A job is idempotent in its run directory: finished -> skipped, interrupted -> resumed (see
test_resume.py for the SIGKILL cases), mismatched config -> one line naming the keys, force=true
-> started over; one process per directory (the lock)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.training.errors import ConfigurationError
from experiments.training.job import run
from experiments.training.run_lock import LOCK_FILE, RunDirectoryBusy, RunLock, this_owner
from experiments.training.run_state import SEGMENTS, differing_keys

TINY = ["datamodule=synthetic", "model.num_variables=2", "model.num_classes=3",
        "model.encoder_hidden=[8]", "model.decoder_hidden=[8]", "model.iwae_samples=4",
        "model.eval_samples=2", "trainer.max_steps=3", "trainer.max_epochs=-1",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "logger=csv_only",
        "~callbacks.progress_bar", "~callbacks.samples_per_second"]


def test_finished_job_is_skipped_and_a_different_config_is_refused(compose_config, tmp_path,
                                                                   capsys) -> None:
    run_dir = tmp_path / "job"
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text("- seed=0\n")  # what Hydra writes at the start
    first = run(compose_config(TINY, run_dir))
    assert first["status"] == "completed" and first["global_step"] == 3
    results = run_dir / "results.json"
    written = results.stat().st_mtime_ns

    (hydra_dir / "overrides.yaml").write_text("- seed=0\n- force=false\n")  # a later start's
    again = run(compose_config(TINY, run_dir))
    assert again == json.loads(results.read_text()) and results.stat().st_mtime_ns == written
    assert "skipped:" in capsys.readouterr().out
    assert (hydra_dir / "overrides.yaml").read_text() == "- seed=0\n"  # identity kept

    (hydra_dir / "overrides.yaml").write_text("- seed=1\n")
    with pytest.raises(ConfigurationError) as error:
        run(compose_config([*TINY, "seed=1", "trainer.max_steps=4"], run_dir))
    message = str(error.value)
    assert "seed=0 (now 1)" in message and "trainer.max_steps=3 (now 4)" in message
    assert "force=true" in message and "\n" not in message
    assert (hydra_dir / "overrides.yaml").read_text() == "- seed=0\n"  # a refusal changes nothing
    assert results.stat().st_mtime_ns == written
    lines = (run_dir / SEGMENTS).read_text().splitlines()
    actions = [json.loads(line)["action"] for line in lines]
    assert actions == ["start", "skip"]


def test_force_starts_over_and_keeps_the_previous_outputs(compose_config, tmp_path) -> None:
    run_dir = tmp_path / "job"
    run(compose_config(TINY, run_dir))
    previous = json.loads((run_dir / "results.json").read_text())
    again = run(compose_config([*TINY, "seed=1", "force=true"], run_dir))
    assert again["seed"] == 1 and again["resumes"] == 0
    (moved,) = (run_dir / ".replaced").iterdir()
    assert json.loads((moved / "results.json").read_text()) == previous
    assert (moved / "checkpoints" / "last.ckpt").is_file()
    # The new config is now the job's: rerunning it skips.
    assert run(compose_config([*TINY, "seed=1"], run_dir)) == again


@pytest.mark.parametrize("content", [b"\x00\x01garbage" * 100, b"plain text\n" * 20])
def test_unreadable_last_checkpoint_is_one_line_before_any_work(compose_config, tmp_path,
                                                                content) -> None:
    run_dir = tmp_path / "job"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(content)
    with pytest.raises(ConfigurationError, match="cannot be read safely") as error:
        run(compose_config(TINY, run_dir))
    assert "\n" not in str(error.value) and "last.ckpt" in str(error.value)
    assert not (run_dir / "results.json").exists()


def test_checkpoints_are_readable_by_collaborators(tmp_path) -> None:
    from experiments.training.checkpointing import AtomicCheckpointIO, current_umask

    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    mode = stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode)
    assert mode == 0o666 & ~current_umask()  # 0644 under the usual umask 022, not mkstemp's 0600
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"step": 1}


# ------------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------------
def write_lock(run_dir: Path, **owner: object) -> Path:
    path = run_dir / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**this_owner(), **owner}))
    return path


def test_a_live_owner_is_waited_for_then_refused_with_one_line(tmp_path, capsys) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=live.pid, start_ticks=None)
        with pytest.raises(RunDirectoryBusy) as error:
            RunLock(tmp_path, wait_s=0.3, poll_s=0.1).acquire()
    finally:
        live.kill()
        live.wait()
    message = str(error.value)
    assert f"pid {live.pid} on {socket.gethostname()}" in message and "\n" not in message
    assert "lock_wait_s=0.3" in message and "waiting up to" in capsys.readouterr().err
    # Once the owner is gone its lock is stale and is taken over.
    with RunLock(tmp_path, wait_s=0):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()  # released


def test_stale_locks_are_recovered(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid)
    with RunLock(tmp_path, wait_s=0):
        pass
    # Our own pid with another start time: a reused pid, not the owner.
    write_lock(tmp_path, start_ticks=1)
    with RunLock(tmp_path, wait_s=0):
        pass
    # Another host: stale once its heartbeat is older than stale_after_s.
    path = write_lock(tmp_path, host="elsewhere")
    with pytest.raises(RunDirectoryBusy, match="on elsewhere"):
        RunLock(tmp_path, wait_s=0, stale_after_s=60).acquire()
    os.utime(path, (0, 0))
    with RunLock(tmp_path, wait_s=0, stale_after_s=60):
        pass


def test_a_second_process_is_refused_while_a_job_runs(tmp_path) -> None:
    run_dir = tmp_path / "job"
    with RunLock(run_dir, wait_s=0):
        completed = subprocess.run(
            [sys.executable, "-m", "experiments.train", *TINY, f"hydra.run.dir={run_dir}",
             "lock_wait_s=0"],
            capture_output=True, text=True, timeout=240,
            env={**os.environ, "WANDB_MODE": "disabled"},
        )
    assert completed.returncode == 2
    (line,) = [x for x in completed.stderr.splitlines() if x.startswith("error:")]
    assert f"is in use by pid {os.getpid()}" in line, completed.stderr[-2000:]
    assert not (run_dir / "results.json").exists()


def test_differing_keys_ignore_how_a_job_is_run() -> None:
    before = {"seed": 0, "resume": None, "force": False, "model": {"lr": 0.1, "h": [8]}}
    after = {"seed": 0, "resume": "/x", "force": True, "model": {"lr": 0.2, "h": [8]}}
    assert differing_keys(before, after) == ["model.lr=0.1 (now 0.2)"]
    assert differing_keys(before, {**before, "extra": 1}) == ["extra=<absent> (now 1)"]
    # a job written before steps_per_batch existed ran one step per batch
    assert differing_keys(before, {**before, "steps_per_batch": 1}) == []
    assert differing_keys(before, {**before, "steps_per_batch": 4}) == [
        "steps_per_batch=1 (now 4)"]


def test_a_resumed_job_logs_to_the_same_wandb_run_and_images_as_media(compose_config, tmp_path,
                                                                       monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "job"
    overrides = [*TINY, "logger=default", "callbacks.last_checkpoint.every_n_train_steps=1"]
    run(compose_config(overrides, run_dir))
    (run_dir / "results.json").unlink()  # as if killed after its last checkpoint
    assert run(compose_config(overrides, run_dir))["resumes"] == 1
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))  # a second one in the same
    stored = (run_dir / ".catgrad" / "wandb_id").read_text().strip()  # second ends in "-1"
    assert len(runs) == 2 and all((r / f"run-{stored}.wandb").is_file() for r in runs), runs
    media = list(runs[1].glob("files/media/images/images/*.png"))
    assert {p.name.split("_")[0] for p in media} == {"reconstructions", "prior"}, media


def test_a_resume_with_another_thread_count_says_it_is_not_bitwise(compose_config, tmp_path,
                                                                   capsys) -> None:
    run_dir = tmp_path / "job"
    overrides = [*TINY, "callbacks.last_checkpoint.every_n_train_steps=1"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(compose_config(overrides, run_dir))
        (run_dir / "results.json").unlink()  # as if killed after its last checkpoint
        run(compose_config(overrides, run_dir))  # same count: no warning
        assert "CPU threads" not in capsys.readouterr().err
        (run_dir / "results.json").unlink()
        torch.set_num_threads(2)
        assert run(compose_config(overrides, run_dir))["resumes"] == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "trains with 2 CPU threads, the job's first start with 1" in err
    assert "OMP_NUM_THREADS=1" in err
    records = [json.loads(line) for line in (run_dir / SEGMENTS).read_text().splitlines()]
    assert [r["threads"] for r in records] == [1, 1, 2]
