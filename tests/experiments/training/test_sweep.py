"""A real 2x2 Hydra multirun (basic launcher, generated data, tiny budgets) with wandb offline:
one wandb run per job in the sweep's group, and a report that lists every job, including the one
that raised; plus the compare experiment's configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

from experiments.report.sweep_report import main as report_main
from tests.conftest import CONFIG_DIR, PROJECT_ROOT

GROUP = "test_sweep_group"
FAILING = ("gumbel_softmax", 1)  # (estimator, seed) of the job that raises


class RaiseAtStep(L.Callback):
    """Test-only callback: raises in the job whose seed is ``fail_seed`` and estimator is
    ``fail_estimator``, after ``step`` training steps."""

    def __init__(self, seed: int, estimator: str, fail_seed: int, fail_estimator: str,
                 step: int = 2) -> None:
        self.fail = seed == fail_seed and estimator == fail_estimator
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.fail and trainer.global_step >= self.step:
            raise RuntimeError(f"injected failure at step {trainer.global_step}")


# A few seconds per job: generated data, a tiny VAE (3^2 configurations), a validation per epoch.
TINY_RUN = [
    "datamodule=synthetic",
    "model.num_variables=2",
    "model.num_classes=3",
    "model.encoder_hidden=[16]",
    "model.decoder_hidden=[16]",
    "model.iwae_samples=8",
    "trainer.max_epochs=-1",
    "trainer.check_val_every_n_epoch=1",
]
TINY = [
    *TINY_RUN,
    "trainer.max_steps=6",
    "callbacks=probe",
    "~callbacks.progress_bar",
    "callbacks.gradient_probe.every_n_steps=3",
    "callbacks.gradient_probe.num_samples=4",
    "callbacks.gradient_probe.chunk_size=4",
]


def run_multirun(sweep_dir: Path, overrides: list[str], timeout: float = 300
                 ) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", "-m", *overrides,
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """estimator=gumbel_softmax,st_gumbel_softmax x seed=0,1; (gumbel_softmax, 1) raises."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    boom = "+callbacks.boom"
    completed = run_multirun(sweep_dir, [
        *TINY,
        "estimator=gumbel_softmax,st_gumbel_softmax",
        "seed=0,1",
        f"sweep_name={GROUP}",
        f"{boom}._target_=tests.experiments.training.test_sweep.RaiseAtStep",
        f"{boom}.seed=${{seed}}",
        f"{boom}.estimator=${{hydra:runtime.choices.estimator}}",
        f"{boom}.fail_seed={FAILING[1]}",
        f"{boom}.fail_estimator={FAILING[0]}",
    ])
    return sweep_dir, completed


def job_of(sweep_dir: Path, estimator: str, seed: int) -> Path:
    for job in sorted(p for p in sweep_dir.iterdir() if p.name.isdigit()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        if f"estimator={estimator}" in overrides and f"seed={seed}" in overrides:
            return job
    raise AssertionError(f"no job for {estimator}, seed {seed}")


@pytest.mark.slow
def test_each_job_has_its_own_wandb_run_in_the_sweep_group(sweep) -> None:
    sweep_dir, completed = sweep
    assert sweep_dir.is_dir(), completed.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.name.isdigit())
    assert len(jobs) == 4, completed.stderr[-3000:]
    run_ids = set()
    for job in jobs:
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{job}: {runs}"  # wandb.finish() per job: never a shared run
        run_ids.add(runs[0].name.rsplit("-", 1)[-1])
        record = next(runs[0].glob("run-*.wandb")).read_bytes()
        assert GROUP.encode() in record  # group = the sweep
    assert len(run_ids) == 4


@pytest.mark.slow
def test_failed_job_is_reported_and_the_others_finish(sweep, tmp_path: Path, capsys) -> None:
    sweep_dir, completed = sweep
    assert completed.returncode != 0  # Hydra re-raises the failed job's error at the end
    assert "injected failure" in completed.stderr
    failed = job_of(sweep_dir, *FAILING)
    assert not (failed / "results.json").exists()
    finished = [p for p in sweep_dir.iterdir() if (p / "results.json").is_file()]
    assert len(finished) == 3
    for job in finished:
        assert json.loads((job / "results.json").read_text())["status"] == "completed"
        assert (job / "probe.jsonl").is_file()

    assert report_main([str(sweep_dir), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "1 of 4 jobs failed" in printed
    lines = (tmp_path / "report.md").read_text().replace("**", "").splitlines()
    row = f"| {sweep_dir.name}/{failed.name} | failed | gumbel_softmax | 1 |"
    assert any(row in line and "injected failure at step 2" in line for line in lines)
    assert any("| st_gumbel_softmax | 2/2 |" in line for line in lines)
    assert any("| gumbel_softmax | 1/2 |" in line for line in lines)
    assert (tmp_path / "plots" / "probe.png").is_file()


def test_compare_experiment_covers_every_estimator() -> None:
    """Every conf/estimator option is an arm of experiment=compare_estimators, and every
    score-function baseline has its own arm."""
    arms = CONFIG_DIR / "experiment" / "compare_arms"
    chosen = set()
    for arm in arms.glob("*.yaml"):
        defaults = yaml.safe_load(arm.read_text())["defaults"]
        picks = {k.split()[-1]: v for d in defaults for k, v in d.items()}
        chosen.add((picks["/estimator"], picks.get("/estimator/baseline")))
    estimators = {p.stem for p in (CONFIG_DIR / "estimator").glob("*.yaml")}
    baselines = {p.stem for p in (CONFIG_DIR / "estimator" / "baseline").glob("*.yaml")}
    assert {e for e, _ in chosen} == estimators
    assert {b for e, b in chosen if e == "score_function"} == baselines


def test_compare_arm_composes_with_an_enumerable_latent_shape(compose_config) -> None:
    cfg = compose_config(["experiment=compare_estimators",
                          "+experiment/compare_arms=score_function_leave_one_out"])
    assert cfg.estimator.num_samples == 2 and cfg.variant == "score_function/leave_one_out"
    budget = cfg.estimator.get("max_configurations", 1024)
    assert cfg.model.num_classes ** cfg.model.num_variables <= budget
    assert cfg.hydra.sweeper.params["+experiment/compare_arms"] == "glob(*)"
    assert "gradient_probe" in cfg.callbacks


def test_an_experiment_overrides_the_primary_config(compose_config) -> None:
    """conf/config.yaml lists ``experiment`` after ``_self_``: an experiment's own values (its
    sweep name, replicas, sweep directory) win over the primary config's defaults."""
    cfg = compose_config(["experiment=compare_estimators"])
    assert cfg.replicas == 5 and cfg.sweep_name.startswith("compare_estimators_")
    assert cfg.hydra.sweep.dir.startswith("multirun/compare_estimators/")
    assert compose_config(["experiment=compare_m2"]).sweep_name.startswith("compare_m2_")
    assert compose_config([]).replicas == 1


def test_compare_m2_composes_every_arm_on_m2(compose_config) -> None:
    arms = sorted(p.stem for p in (CONFIG_DIR / "experiment" / "compare_arms").glob("*.yaml"))
    for arm in arms:
        cfg = compose_config(["experiment=compare_m2", f"+experiment/compare_arms={arm}"])
        assert cfg.model._target_ == "models.m2.M2" and cfg.datamodule.n_labels == 50
        assert set(cfg.callbacks.gradient_probe.groups) == {"classifier", "encoder", "decoder"}


@pytest.mark.slow
def test_a_configuration_error_fails_only_its_job(tmp_path: Path) -> None:
    """3^20 configurations are refused in one job (experiments.train raises instead of exiting in
    a multirun); the other job finishes, the sweep exits non-zero and the report shows the failed
    job's one-line error from its log."""
    sweep_dir = tmp_path / "multirun"
    completed = run_multirun(sweep_dir, [
        *TINY_RUN, "trainer.max_steps=3", "callbacks=none", "logger=csv_only",
        "estimator=marginalization", "model.num_variables=20,2",
    ])
    assert completed.returncode != 0
    assert not (sweep_dir / "0" / "results.json").exists()  # the first job fails...
    assert json.loads((sweep_dir / "1" / "results.json").read_text())["status"] == "completed"
    assert report_main([str(sweep_dir), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "error: model: exact enumeration needs K^N = 3^20" in text
