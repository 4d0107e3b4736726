"""Sweeps through a real one-node SLURM cluster (hydra/launcher=slurm, submitit): a 2-job
multirun, a job requeued mid-run (``scontrol requeue``) that continues from its checkpoint to the
result of an uninterrupted run, and a 2-task CPU DDP (gloo) job whose ranks end with the same
parameters (DDP without SLURM: tests/experiments/training/test_ddp.py).

Skipped, with the reason, only where slurm-wlm/munge are not installed (``.ci/run`` installs them
with apt-get) or the daemons cannot start here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.experiments.training.test_sweep import TINY_RUN
from tests.slurm.cluster import SlurmCluster, SlurmUnavailable, slurm_cluster

pytestmark = pytest.mark.slow

TINY = [*TINY_RUN, "logger=csv_only"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    root = tmp_path_factory.mktemp("slurm")
    try:
        with slurm_cluster(root) as running:
            yield running
    except SlurmUnavailable as error:
        pytest.skip(f"SLURM unavailable ({error}); .ci/run installs slurm-wlm and munge with "
                    f"apt-get")


def slurm_multirun(cluster: SlurmCluster, sweep_dir: Path, overrides: list[str],
                   timeout: float = 420) -> subprocess.CompletedProcess:
    """``python -m experiments.train -m hydra/launcher=slurm ...`` against ``cluster``."""
    env = {**cluster.env, "WANDB_MODE": "disabled", "PYTHONPATH": str(PROJECT_ROOT),
           "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "experiments.train", "-m", "hydra/launcher=slurm",
        f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
        f"hydra.sweep.dir={sweep_dir}", *TINY, *overrides,
    ]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True,
                               text=True, timeout=timeout)
    if completed.returncode != 0:
        logs = "\n".join(p.read_text()[-1500:] for p in sweep_dir.glob(".submitit/*/*.err"))
        pytest.fail(f"sweep failed:\n{completed.stderr[-3000:]}\n{logs}\n{cluster.logs()}")
    return completed


def test_two_job_multirun_through_the_slurm_launcher(cluster: SlurmCluster, tmp_path: Path
                                                     ) -> None:
    sweep_dir = tmp_path / "multirun"
    slurm_multirun(cluster, sweep_dir, ["trainer.max_steps=4", "callbacks=none", "seed=0,1"])
    seeds = set()
    for job in ("0", "1"):
        results = json.loads((sweep_dir / job / "results.json").read_text())
        assert results["status"] == "completed" and results["global_step"] == 4
        seeds.add(results["seed"])
    assert seeds == {0, 1}
    scripts = list(sweep_dir.glob(".submitit/*/*_submission.sh"))  # went through sbatch
    assert scripts
    script = scripts[0].read_text()
    # requeue: SIGUSR1 before the time limit (Lightning saves and requeues), SLURM requeue allowed
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script


def test_a_requeued_job_continues_from_its_checkpoint(cluster: SlurmCluster, tmp_path: Path
                                                      ) -> None:
    """``scontrol requeue`` mid-run (SIGTERM to the job, then SLURM starts it again in the same
    run directory): the job resumes from checkpoints/last.ckpt and ends with the test metrics and
    weights of an uninterrupted run."""
    import torch

    from tests.experiments.training.test_entry_point import run_cli

    job = [*TINY, "trainer.max_steps=40", "callbacks.last_checkpoint.every_n_train_steps=5",
           "~callbacks.progress_bar", "+callbacks.slow._target_=tests.fault_injection.SlowSteps",
           "+callbacks.slow.seconds=0.25", "seed=0"]
    reference = tmp_path / "reference"
    # One thread, as the SLURM job has: CPU kernels split their sums by thread count, so runs
    # with 1 and 2 threads differ in the last bits of the weights.
    completed = run_cli([*job, f"hydra.run.dir={reference}"], cwd=tmp_path,
                        extra_env={"OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]

    sweep_dir = tmp_path / "multirun"
    env = {**cluster.env, "WANDB_MODE": "disabled", "PYTHONPATH": str(PROJECT_ROOT),
           "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "-m", "hydra/launcher=slurm",
         f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.mem_gb=2",
         "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
         f"hydra.sweep.dir={sweep_dir}", *job],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.5)
    assert checkpoint.is_file(), cluster.logs()
    (job_id,) = cluster.run("squeue", "--noheader", "--format=%A").stdout.split()
    cluster.run("scontrol", "requeue", job_id)
    # SLURM holds a requeued job back (BeginTime about two minutes ahead); make it eligible now.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = cluster.run("squeue", "--noheader", "--format=%T", "--jobs", job_id).stdout
        if "PENDING" in state:
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            break
        time.sleep(0.5)
    try:
        stdout, stderr = launcher.communicate(timeout=360)
    finally:
        launcher.kill()
    logs = "\n".join(p.read_text()[-1500:] for p in sweep_dir.glob(".submitit/*/*.err"))
    assert launcher.returncode == 0, f"{stderr[-3000:]}\n{logs}\n{cluster.logs()}"
    results = json.loads((sweep_dir / "0" / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert results["resumes"] >= 1, logs
    for key in ("test/neg_elbo", "test/nll_iwae", "global_step"):
        assert results[key] == expected[key], key
    final = torch.load(checkpoint, weights_only=True)["state_dict"]
    segments = (sweep_dir / "0" / ".catgrad" / "segments.jsonl").read_text()
    for name, tensor in torch.load(reference / "checkpoints" / "last.ckpt",
                                   weights_only=True)["state_dict"].items():
        gap = (final[name] - tensor).abs().max().item()
        assert torch.equal(final[name], tensor), f"{name} differs by {gap}\n{segments}\n{logs}"


def test_two_task_cpu_ddp_job_through_slurm(cluster: SlurmCluster, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    slurm_multirun(cluster, sweep_dir, [
        "trainer=ddp", "trainer.accelerator=cpu", "hydra.launcher.tasks_per_node=2",
        "trainer.max_steps=6", "callbacks=none",
        "+callbacks.rank_digest._target_=tests.slurm.rank_digest.RankDigest", "seed=0",
    ])
    ranks = [json.loads((sweep_dir / "0" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank and record["world_size"] == 2
        assert record["cluster"] == "SLURMEnvironment" and record["global_step"] == 6
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]  # the ranks agree
    assert ranks[0]["first_batch_sum"] != ranks[1]["first_batch_sum"]  # on different shards
    assert (sweep_dir / "0" / "results.json").exists()
