"""CPU DDP (2 processes, gloo) without SLURM: Lightning's ddp strategy starts rank 1 by
re-running the command line (with Hydra: the same run directory); both ranks must end with the
same parameters after training on different shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.experiments.training.test_sweep import TINY_RUN

TINY = [*TINY_RUN, "logger=csv_only"]


@pytest.mark.slow
def test_cpu_ddp_outside_slurm_re_executes_the_command_line(tmp_path: Path) -> None:
    """Lightning's ddp launches rank 1 by re-running ``python -m experiments.train ...``."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WANDB_MODE="disabled", PYTHONPATH=str(PROJECT_ROOT), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "experiments.train", *TINY, "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=6", "callbacks=none",
        "+callbacks.rank_digest._target_=tests.slurm.rank_digest.RankDigest",
        f"hydra.run.dir={run_dir}",
    ]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    assert ranks[0]["first_batch_sum"] != ranks[1]["first_batch_sum"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
