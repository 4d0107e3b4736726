"""Several jobs per GPU (``-m jobs_per_gpu=J hydra/launcher=local``): the slot allocator with
real processes (slots taken, released, freed when a holder crashes), the ``CUDA_VISIBLE_DEVICES``
each slot gets with a faked list of GPUs, the launcher's ``n_jobs`` resolver, the one-line errors
(command line, run-start check, job side), and a real packed multirun. No GPU is needed: the
GPUs are faked through ``CUDA_VISIBLE_DEVICES`` and the jobs train on the CPU."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict, read_write
from omegaconf.errors import InterpolationResolutionError

from experiments.training import gpu_slots
from experiments.training.errors import ConfigurationError
from experiments.training.gpu_slots import (
    GpuSlotCheck,
    SlotTaken,
    acquire_slot,
    check_jobs_per_gpu,
    release_slot,
    slot_gpu,
    take_gpu_slot,
    visible_gpus,
)
from tests.conftest import PROJECT_ROOT, ComposeFn
from tests.experiments.training.test_sweep import TINY_RUN, run_multirun

# A process that takes a slot of `slots` in `folder`, prints its index, then waits for a line on
# stdin (or kills itself without releasing the slot when that line is "crash").
HOLDER = """
import os, signal, sys
from pathlib import Path
from experiments.training.gpu_slots import acquire_slot
held = acquire_slot(Path(sys.argv[1]), int(sys.argv[2]), wait_s=60)
print(held.index, flush=True)
if sys.stdin.readline().strip() == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def start_holder(folder: Path, slots: int) -> tuple[subprocess.Popen[str], int]:
    """A real process holding a slot, and the slot's index."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(slots)], cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def finish(process: subprocess.Popen[str], line: str = "") -> int:
    assert process.stdin is not None
    process.stdin.write(line + "\n")
    process.stdin.flush()
    return process.wait(timeout=60)


@pytest.mark.parametrize("value", [0, -1, "abc", True, 1.5])
def test_invalid_jobs_per_gpu_is_one_line_naming_key_value_and_fix(value: Any) -> None:
    with pytest.raises(ValueError) as error:
        check_jobs_per_gpu(value)
    message = str(error.value)
    assert "\n" not in message
    assert f"jobs_per_gpu={value} is invalid" in message
    assert "integer >= 1" in message and "null" in message


def test_valid_jobs_per_gpu() -> None:
    assert check_jobs_per_gpu(None) is None
    assert check_jobs_per_gpu(3) == 3


def test_visible_gpus_from_cuda_visible_devices_or_the_count() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-ab12, GPU-cd34"}) == ["GPU-ab12",
                                                                           "GPU-cd34"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,0"}) == ["1"]  # CUDA stops at -1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, count=lambda: 3) == ["0", "1", "2"]
    assert visible_gpus({}, count=lambda: 0) == []


def test_slots_spread_over_the_gpus() -> None:
    gpus = ["4", "7"]
    assert [slot_gpu(k, gpus) for k in range(6)] == ["4", "7", "4", "7", "4", "7"]


def test_slots_are_taken_released_and_waited_for(tmp_path: Path) -> None:
    first = acquire_slot(tmp_path / "slots", 2)  # the folder is created
    second = acquire_slot(tmp_path / "slots", 2)
    assert (first.index, second.index) == (0, 1)
    with pytest.raises(SlotTaken, match="all 2 GPU slots"):
        acquire_slot(tmp_path / "slots", 2, wait_s=0.3, poll_s=0.1)
    release_slot(first)
    again = acquire_slot(tmp_path / "slots", 2, wait_s=0)
    assert again.index == 0
    release_slot(again)
    release_slot(second)


def test_concurrent_processes_get_distinct_slots_and_a_crash_frees_its_slot(
        tmp_path: Path) -> None:
    holders = [start_holder(tmp_path, 3) for _ in range(3)]
    assert sorted(index for _, index in holders) == [0, 1, 2]
    with pytest.raises(SlotTaken):  # every slot is held by a live process
        acquire_slot(tmp_path, 3, wait_s=0)
    crashed, crashed_index = holders[1]
    assert finish(crashed, "crash") == -signal.SIGKILL
    taken = acquire_slot(tmp_path, 3, wait_s=5)  # the OS released the killed holder's lock
    assert taken.index == crashed_index
    for process, _ in (holders[0], holders[2]):
        assert finish(process) == 0
    release_slot(taken)


def test_a_job_waits_for_a_slot_to_be_released(tmp_path: Path) -> None:
    holder, index = start_holder(tmp_path, 1)
    assert index == 0
    waiting = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "1"], cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    assert finish(holder) == 0
    assert waiting.stdout is not None and int(waiting.stdout.readline()) == 0
    assert finish(waiting) == 0


def packed_job(compose_config: ComposeFn, sweep_dir: Path, overrides: list[str],
               multirun: bool = True) -> DictConfig:
    """The config of a job of a multirun (or of a single run) as ``take_gpu_slot`` sees it."""
    cfg = compose_config([*overrides, f"hydra.sweep.dir={sweep_dir}"])
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_local_launcher_runs_gpus_times_jobs_per_gpu(compose_config: ComposeFn,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The stock joblib launcher, its n_jobs resolved from the top-level jobs_per_gpu."""
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")  # two faked GPUs
    cfg = compose_config(["hydra/launcher=local", "jobs_per_gpu=3"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher) is JoblibLauncher and launcher.joblib["n_jobs"] == 6
    assert compose_config(["hydra/launcher=local"]).hydra.launcher.n_jobs == 2
    assert compose_config(["hydra/launcher=local",
                           "hydra.launcher.n_jobs=3"]).hydra.launcher.n_jobs == 3


@pytest.mark.parametrize(("environment", "value", "expected"), [
    ("0", "0", "jobs_per_gpu=0 is invalid: use an integer >= 1"),
    ("0", "abc", "jobs_per_gpu=abc is invalid: use an integer >= 1"),
    ("", "2", "jobs_per_gpu=2 needs a visible GPU (CUDA_VISIBLE_DEVICES='' lists none)"),
])
def test_the_resolver_names_a_bad_value_from_a_config(
        compose_config: ComposeFn, monkeypatch: pytest.MonkeyPatch, environment: str,
        value: str, expected: str) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", environment)
    cfg = compose_config(["hydra/launcher=local", f"jobs_per_gpu={value}"])
    with pytest.raises(InterpolationResolutionError, match=re.escape(expected)):
        cfg.hydra.launcher.n_jobs  # noqa: B018 (resolving it is the test)


def test_a_job_takes_a_slot_and_its_gpu_with_one_thread(
        compose_config: ComposeFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")  # two faked GPUs
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(gpu_slots, "_worker_slot", None)
    cfg = packed_job(compose_config, tmp_path / "sweep", ["hydra/launcher=local",
                                                          "jobs_per_gpu=3"])
    threads = torch.get_num_threads()
    seen: list[tuple[str, str, int]] = []
    try:
        for _ in range(2):  # the second job of this worker process keeps its slot
            take_gpu_slot(cfg)
            seen.append((os.environ["CUDA_VISIBLE_DEVICES"], os.environ["OMP_NUM_THREADS"],
                         torch.get_num_threads()))
    finally:
        torch.set_num_threads(threads)
    assert gpu_slots._worker_slot is not None
    assert (gpu_slots._worker_slot.held.index, gpu_slots._worker_slot.slots) == (0, 6)
    release_slot(gpu_slots._worker_slot.held)
    assert seen == [("5", "1", 1), ("5", "1", 1)]
    assert (tmp_path / "sweep" / ".gpu_slots" / "slot_0.lock").is_file()


def test_a_job_without_jobs_per_gpu_keeps_its_gpus(compose_config: ComposeFn, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    monkeypatch.setattr(gpu_slots, "_worker_slot", None)
    take_gpu_slot(packed_job(compose_config, tmp_path / "sweep", ["hydra/launcher=local"]))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,6" and gpu_slots._worker_slot is None
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(("overrides", "multirun", "expected"), [
    (["jobs_per_gpu=2"], False,
     "jobs_per_gpu=2 shares GPUs among the jobs of a multirun: add -m hydra/launcher=local"),
    (["hydra/launcher=slurm", "jobs_per_gpu=2"], True,
     "jobs_per_gpu=2 needs hydra/launcher=local (this sweep uses hydra/launcher=slurm)"),
])
def test_a_job_outside_a_local_multirun_refuses_jobs_per_gpu(
        compose_config: ComposeFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        overrides: list[str], multirun: bool, expected: str) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    monkeypatch.setattr(gpu_slots, "_worker_slot", None)
    cfg = packed_job(compose_config, tmp_path / "sweep", overrides, multirun=multirun)
    with pytest.raises(ConfigurationError) as error:
        take_gpu_slot(cfg)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,6" and gpu_slots._worker_slot is None


def stopped_by_the_check(cfg: DictConfig, multirun: bool,
                         capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line with which :class:`GpuSlotCheck` stops a run (exit code 2)."""
    check = GpuSlotCheck()
    with pytest.raises(SystemExit) as stop:
        if multirun:
            check.on_multirun_start(config=cfg)
        else:
            check.on_run_start(config=cfg)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("overrides", "multirun", "expected"), [
    (["hydra/launcher=local", "jobs_per_gpu=1.5"], True, "error: jobs_per_gpu=1.5 is invalid"),
    (["jobs_per_gpu=2"], False, "error: jobs_per_gpu=2 shares GPUs among the jobs of a multirun"),
    (["jobs_per_gpu=2"], True, "error: jobs_per_gpu=2 needs hydra/launcher=local (this sweep "
                               "uses hydra/launcher=basic)"),
    (["hydra/launcher=slurm", "jobs_per_gpu=2"], True, "hydra.launcher.gres=shard:1"),
    (["hydra/launcher=local", "hydra.launcher.n_jobs=8", "jobs_per_gpu=2"], True,
     "error: hydra.launcher.n_jobs=8 and jobs_per_gpu=2 both set the jobs at a time: remove "
     "hydra.launcher.n_jobs"),
])
def test_the_check_stops_a_run_before_any_job(
        compose_config: ComposeFn, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], overrides: list[str], multirun: bool,
        expected: str) -> None:
    """Values from anywhere (config files included) are checked when the run starts."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    line = stopped_by_the_check(compose_config(overrides), multirun, capsys)
    assert expected in line and line.startswith("error: ")


def test_the_check_fixes_the_gpu_list_for_the_workers(
        compose_config: ComposeFn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    GpuSlotCheck().on_multirun_start(
        config=compose_config(["hydra/launcher=local", "jobs_per_gpu=2"]))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # monkeypatch restores it
    GpuSlotCheck().on_run_start(config=compose_config([]))  # null: nothing to check


def test_no_gpu_visible_is_an_error(compose_config: ComposeFn, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    line = stopped_by_the_check(
        compose_config(["hydra/launcher=local", "jobs_per_gpu=1"]), True, capsys)
    assert line == (
        "error: jobs_per_gpu=1 needs a visible GPU (torch sees no GPU): remove it for a CPU sweep "
        "(hydra.launcher.n_jobs sets its parallelism) or run where a GPU is visible")


@pytest.mark.parametrize(("environment", "arguments", "expected"), [
    ("0", ["-m", "jobs_per_gpu=0"], "jobs_per_gpu=0 is invalid"),
    ("0", ["-m", "jobs_per_gpu=abc"], "jobs_per_gpu=abc is invalid"),
    ("0", ["-m", "jobs_per_gpu=true"], "jobs_per_gpu=true is invalid"),
    ("", ["-m", "jobs_per_gpu=2"],
     "jobs_per_gpu=2 needs a visible GPU (CUDA_VISIBLE_DEVICES='' lists none)"),
    ("0", ["jobs_per_gpu=2"], "jobs_per_gpu=2 shares GPUs among the jobs of a multirun"),
])
def test_bad_values_stop_the_sweep_with_one_line(tmp_path: Path, environment: str,
                                                 arguments: list[str], expected: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.train", *arguments, "hydra/launcher=local",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}",
         "seed=0,1" if "-m" in arguments else "seed=0"],
        cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
                               "CUDA_VISIBLE_DEVICES": environment},
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), completed.stderr
    assert not (tmp_path / "sweep").exists()  # before any job started
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_a_packed_multirun_gives_each_job_a_slot_and_its_gpu(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Two faked GPUs x 1 job per GPU: 3 jobs on 2 slots, every job's log names its slot and
    that slot's GPU, and the jobs train (on the CPU)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    sweep_dir = tmp_path / "multirun"
    completed = run_multirun(sweep_dir, [
        *TINY_RUN, "trainer.max_steps=3", "~callbacks.progress_bar", "logger=csv_only",
        "hydra/launcher=local", "jobs_per_gpu=1", "seed=0,1,2"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "3 ok, 0 failed, 0 missing" in completed.stderr
    for job in range(3):
        lines = [line for line in (sweep_dir / str(job) / "train.log").read_text().splitlines()
                 if "gpu slot" in line]
        assert len(lines) == 1, lines
        slot = int(lines[0].split("gpu slot ")[1].split("/")[0])
        assert slot in (0, 1) and "/2:" in lines[0]
        assert f"CUDA_VISIBLE_DEVICES={slot_gpu(slot, ['0', '1'])}," in lines[0]
        assert (sweep_dir / str(job) / "results.json").is_file()


def test_slurm_gres_reaches_the_sbatch_script(compose_config: ComposeFn, tmp_path: Path) -> None:
    """``hydra.launcher.gres=shard:1`` becomes ``#SBATCH --gres=shard:1`` (the parameters go to
    submitit as hydra-submitit-launcher passes them)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.gres=shard:1"])
    options = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(options, dict)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path)
    executor.update_parameters(**{
        key if key in base else f"slurm_{key}": value for key, value in options.items()
        if key not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -c pass", "0")
    assert "#SBATCH --gres=shard:1\n" in script and "--gpus-per-node" not in script


def test_command_line_values_are_checked_before_hydra_composes() -> None:
    from experiments.train import check_jobs_per_gpu_argument as check

    assert check(["hydra/launcher=local", "jobs_per_gpu=2"]) is None
    assert check(["seed=0,1", "jobs_per_gpu=null"]) is None
    assert check(["experiment=compare_estimators", "jobs_per_gpu=2"]) is None  # it selects local
    assert check(["jobs_per_gpu=1.5"]) == (
        "jobs_per_gpu=1.5 is invalid: use an integer >= 1 (jobs sharing each GPU), or null to run "
        "hydra.launcher.n_jobs jobs without GPU slots")
    assert (check(["++jobs_per_gpu=0"]) or "").startswith("jobs_per_gpu=0 is invalid")
    assert (check(["jobs_per_gpu=1,2"]) or "").startswith(
        "jobs_per_gpu=1,2 cannot be swept: give one value")
    message = check(["hydra/launcher=slurm", "jobs_per_gpu=2"])
    assert message is not None and "\n" not in message
    assert message.startswith("jobs_per_gpu=2 needs hydra/launcher=local (this sweep uses "
                              "hydra/launcher=slurm)")
    assert "hydra.launcher.gres=shard:1" in message


def test_a_packed_job_resumes_with_another_jobs_per_gpu() -> None:
    """``jobs_per_gpu`` says how a job runs, not what it computes: an interrupted packed job
    continues under SLURM or another packing without a config mismatch."""
    from experiments.training.run_state import differing_keys

    original = {"seed": 0, "jobs_per_gpu": 4}
    assert differing_keys(original, {"seed": 0, "jobs_per_gpu": None}) == []
    assert differing_keys(original, {"seed": 1, "jobs_per_gpu": None}) == ["seed=0 (now 1)"]
