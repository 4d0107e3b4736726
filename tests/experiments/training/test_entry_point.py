"""The Hydra training entry point: every option composes and trains; bad inputs fail clearly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from experiments.training.job import run
from tests.conftest import CONFIG_DIR, PROJECT_ROOT

ESTIMATORS = sorted(p.stem for p in (CONFIG_DIR / "estimator").glob("*.yaml"))
DATAMODULES = sorted(
    p.stem for p in (CONFIG_DIR / "datamodule").glob("*.yaml") if not p.stem.startswith("semi")
)
FAST = ["trainer.fast_dev_run=true", "logger=csv_only", "callbacks=none", "model.iwae_samples=8"]
# A latent shape small enough for every estimator, including exact marginalization (3^2 = 9).
SMALL_LATENTS = ["model.num_variables=2", "model.num_classes=3"]


@pytest.mark.parametrize("datamodule", DATAMODULES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_vae_combination_composes(compose_config, estimator: str, datamodule: str) -> None:
    cfg = compose_config([f"estimator={estimator}", f"datamodule={datamodule}", "model=vae"])
    instantiate(cfg.datamodule, _convert_="all")  # constructors validate; no data is loaded
    assert cfg.model.image_shape == cfg.datamodule.image_shape


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains_the_vae_with_fast_dev_run(compose_config, estimator, tmp_path):
    overrides = [f"estimator={estimator}", "datamodule=synthetic", *FAST, *SMALL_LATENTS]
    cfg = compose_config(overrides, run_dir=tmp_path)
    results = run(cfg)
    assert math.isfinite(results["test/neg_elbo"]) and math.isfinite(results["test/nll_iwae"])
    assert json.loads((tmp_path / "results.json").read_text())["estimator"] == estimator


def test_marginalization_of_intractable_shape_is_refused(compose_config, tmp_path) -> None:
    from experiments.training.errors import ConfigurationError

    cfg = compose_config(["estimator=marginalization", "datamodule=synthetic", *FAST], tmp_path)
    with pytest.raises(ConfigurationError, match=r"K\^N = 10\^20.*budget is 1024"):
        run(cfg)
    assert not (tmp_path / "results.json").exists()


def run_cli(args: list[str], cwd: Path, timeout: float = 240,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(PROJECT_ROOT),
           **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=PROJECT_ROOT if cwd is None else cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_end_to_end_on_digits_writes_results(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    completed = run_cli(
        ["experiment=quick", f"hydra.run.dir={run_dir}", "logger=default"], cwd=PROJECT_ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test/neg_elbo", "test/nll_iwae", "wall_time_s"):
        assert math.isfinite(results[key]), key
    assert results["model"] == "vae" and results["datamodule"] == "digits" and results["seed"] == 0
    assert 0 < results["test/nll_iwae"] < 64 * math.log(2)  # better than coin flips for 8x8
    assert (run_dir / "reconstructions.png").exists() and (run_dir / "prior_samples.png").exists()
    assert (run_dir / "csv" / "metrics.csv").exists()


BAD_INPUTS = [
    (["estimator=gumbel_softmax", "estimator/temperature=constant", "estimator.temperature.tau=0"],
     "tau"),
    (["estimator=gumbel_softmax", "estimator.temperature.tau0=-1"], "tau0"),
    (["estimator=score_function", "estimator.num_samples=0"], "num_samples"),
    (["estimator=score_function", "estimator/baseline=leave_one_out"], "num_samples"),
    (["estimator=marginalization"], "max_configurations"),
    (["estimator=reinforce"], "estimator=reinforce is unknown: choose one of arsm, "),
    (["estimator=score_function", "estimator/baseline=mean"], "choose one of learned"),
    (["seed=abc"], "seed='abc'"),
    (["trainer.max_epochs=-5"], "trainer: `max_epochs`"),
    (["model.optimizer.lr=abc"], "model.optimizer.lr=abc is not a number"),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc is not a number"),
    (["trainer.max_epochs=x"], "trainer.max_epochs=x is not a number"),
    (["lock_wait_s=-1"], "lock_wait_s=-1 is invalid"),
    (["callbacks.progress_lines.every_n_steps=0"], "callbacks.progress_lines.every_n_steps=0"),
    (["datamodule.binarization=soft"], "binarization"),
    (["model.num_variables=0"], "num_variables"),
    (["model.compile=yes"], "model.compile='yes' is invalid"),
    (["experiment=m2_digits", "model.labelled_weight=-1"], "model.labelled_weight=-1"),
    (["experiment=m2_digits", "model.labelled_every_n_steps=0"], "model.labelled_every_n_steps=0"),
    (["experiment=m2_digits", "model.hidden_init_std=0"], "model.hidden_init_std=0 is invalid"),
    (["model/lr_scheduler=cosine"], "model.lr_scheduler.T_max=-1 is invalid"),
    (["model/lr_scheduler=notebook_step", "+model.lr_scheduler.T_max=5"], "model.optimizer"),
    (["datamodule=semi_digits"], "semi-supervised: use datamodule=digits"),
    (["+callbacks.extra.monitor=val/accuracy"], "callbacks.extra has settings but no _target_"),
    (["datamodule=mnist", "datamodule.download=false"], "MNIST"),
]


@pytest.mark.parametrize("overrides, key", BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_inputs_fail_fast_with_one_clear_line(tmp_path, overrides, key) -> None:
    previous = tmp_path / "previous_run"
    previous.mkdir()
    (previous / "results.json").write_text("{}")
    overrides = [*overrides, f"hydra.run.dir={tmp_path / 'new_run'}"]
    if any(o.startswith("datamodule=mnist") for o in overrides):
        overrides.append(f"datamodule.data_dir={tmp_path / 'nothing_here'}")
    completed = run_cli(overrides, cwd=tmp_path, timeout=120)
    assert completed.returncode != 0
    lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert any(key in line for line in lines), completed.stderr
    # No work started: nothing but Hydra's own files in the new run directory. (Time is not
    # asserted here -- machines are noisy -- the import of torch dominates it; see README.)
    new_run = tmp_path / "new_run"
    written = {p.name for p in new_run.iterdir()} if new_run.exists() else set()
    assert written <= {".hydra", "train.log"}, written
    assert (previous / "results.json").read_text() == "{}"
