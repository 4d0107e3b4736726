"""A multirun whose seeds overlap through ``replicas`` stops before any job, with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.training.sweep_checks import overlapping_replica_seeds, swept_values
from tests.conftest import PROJECT_ROOT


@pytest.mark.parametrize(("seeds", "replicas", "clash"), [
    ([0, 1], [5], "seed=0,1 with replicas=5: the job of seed 0 trains seeds 0..4, which include "
                  "seed 1"),
    ([0, 5, 10], [5], None),  # 0..4, 5..9, 10..14
    ([0, 5], [3, 6], "replicas=6"),  # the largest count decides
    ([3, 3], [5], None),  # one seed twice is one job's business, not an overlap
    ([0, 1, 2], [1], None),
])
def test_overlapping_replica_seeds(seeds, replicas, clash) -> None:
    problem = overlapping_replica_seeds(seeds, replicas)
    assert (problem is None) == (clash is None)
    if clash is not None:
        assert clash in problem


def test_swept_values_follow_the_command_line_over_the_sweeper(compose_config) -> None:
    cfg = compose_config(["experiment=compare_estimators"])
    assert swept_values(cfg, "replicas") == ["5"] and swept_values(cfg, "seed") == ["0"]
    plain = OmegaConf.create({"seed": 0, "replicas": 1, "hydra": {
        "sweeper": {"params": {"replicas": "4"}},
        "overrides": {"task": ["seed=range(0,10,5)", "replicas=2,3"]}}})
    assert swept_values(plain, "seed") == ["0", "5"]
    assert swept_values(plain, "replicas") == ["2", "3"]
    del plain.hydra.overrides.task[1]  # the sweeper's entry when the command line has none
    assert swept_values(plain, "replicas") == ["4"]


def test_an_overlapping_sweep_stops_before_any_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.train", "-m", "seed=0,1", "replicas=5",
         "datamodule=synthetic", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "WANDB_MODE": "disabled"},
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines()[-1].startswith(
        "error: seed=0,1 with replicas=5: the job of seed 0 trains seeds 0..4")
    assert not sweep.exists()
