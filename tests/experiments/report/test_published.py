"""The published-experiment configs (docs/results.md): every one composes with every arm
of its sweep, carries the paper's settings and grids, builds its estimator, and trains for
``fast_dev_run`` through ``experiments.train.run`` on offline data (the MNIST datamodule swapped
for the embedded digits, evaluation sample counts cut) in a few seconds each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiments.training.job import run
from tests.conftest import CONFIG_DIR

EXPERIMENTS = CONFIG_DIR / "experiment"
# experiment -> folder of its sweep arms (``+experiment/<folder>: glob(*)``), or None.
PUBLISHED = {
    "jang2017_vae_categorical": "jang2017_arms",
    "jang2017_vae_bernoulli": "jang2017_arms",
    "jang2017_m2": "jang2017_m2_arms",
    "jang2017_notebook": None,
    "kingma2014_m2": None,
    "pyro_ssvae_m2": "pyro_ssvae_labels",
}
M2 = {"jang2017_m2", "kingma2014_m2", "pyro_ssvae_m2"}
# Offline and fast: digits instead of MNIST, a handful of evaluation samples.
OFFLINE_VAE = ["datamodule=digits", "model.eval_samples=4", "model.iwae_samples=4"]
OFFLINE_M2 = ["datamodule=semi_digits", "datamodule.n_labels=50"]
# Default callbacks (M2 experiments configure the checkpoint's monitor); fast_dev_run writes none.
FAST = ["trainer.fast_dev_run=true", "logger=csv_only", "~callbacks.progress_bar"]
JANG_LR_GRID = {3e-5, 1e-5, 3e-4, 1e-4, 3e-3, 1e-3}


def arms(experiment: str) -> list[str]:
    folder = PUBLISHED[experiment]
    if folder is None:
        return []
    return sorted(p.stem for p in (EXPERIMENTS / folder).glob("*.yaml"))


def arm_override(experiment: str, arm: str | None) -> list[str]:
    return [] if arm is None else [f"+experiment/{PUBLISHED[experiment]}={arm}"]


def grid(cfg, key: str) -> set[float]:
    return {float(value) for value in str(cfg.hydra.sweeper.params[key]).split(",")}


def test_every_published_experiment_is_covered() -> None:
    files = {p.stem for pattern in ("jang2017_*.yaml", "kingma2014_*.yaml", "pyro_*.yaml")
             for p in EXPERIMENTS.glob(pattern)}
    assert files == set(PUBLISHED)
    for experiment, folder in PUBLISHED.items():
        assert folder is None or arms(experiment), f"{experiment}: no arms in {folder}/"


@pytest.mark.parametrize(
    ("experiment", "arm"),
    # jang2017_vae_bernoulli shares the arms of jang2017_vae_categorical: one of them suffices.
    [(e, a) for e in PUBLISHED for a in (arms(e)[:1] if e.endswith("bernoulli") else
                                         arms(e) or [None])],
)
def test_each_arm_composes_and_builds_its_estimator(compose_config, experiment, arm) -> None:
    cfg = compose_config([f"experiment={experiment}", *arm_override(experiment, arm)])
    estimator = instantiate(cfg.estimator, _convert_="all")  # e.g. no temperature for SF
    assert estimator is not None
    if PUBLISHED[experiment] is not None:
        assert cfg.hydra.sweeper.params[f"+experiment/{PUBLISHED[experiment]}"] == "glob(*)"
    datamodule = cfg.datamodule.get("base", cfg.datamodule)
    assert datamodule._target_ == "datamodules.mnist.MNISTDataModule"


@pytest.mark.parametrize("experiment", ["jang2017_vae_categorical", "jang2017_vae_bernoulli"])
def test_jang_table1_setup_and_selection_grid(compose_config, experiment) -> None:
    cfg = compose_config([f"experiment={experiment}"])
    shape = (cfg.model.num_variables, cfg.model.num_classes)
    assert shape == ((20, 10) if experiment.endswith("categorical") else (200, 2))
    assert cfg.datamodule.binarization == "fixed"
    assert cfg.model.optimizer._target_ == "torch.optim.SGD"
    assert cfg.model.optimizer.momentum == 0.9
    assert cfg.model.eval_samples == 1000 and cfg.model.iwae_samples == 1000
    assert grid(cfg, "model.optimizer.lr") == JANG_LR_GRID
    schedules = set()
    for arm in arms(experiment):  # the arm files themselves (composition: the test above)
        arm_cfg = OmegaConf.load(EXPERIMENTS / "jang2017_arms" / f"{arm}.yaml")
        temperature = OmegaConf.select(arm_cfg, "estimator.temperature")
        if temperature is not None and "rate" in temperature:
            assert temperature.tau0 == 1.0 and temperature.tau_min == 0.5
            schedules.add((str(arm_cfg.defaults[0]), temperature.rate, temperature.interval))
    # Gumbel-Softmax, ST Gumbel-Softmax and annealed ST, each with r x N of the paper.
    assert len(schedules) == 3 * 2 * 2
    assert {(r, n) for _, r, n in schedules} == {(r, n) for r in (1e-5, 1e-4) for n in (500, 1000)}


def test_jang_table2_and_notebook_setups(compose_config) -> None:
    cfg = compose_config(["experiment=jang2017_m2", "+experiment/jang2017_m2_arms=gumbel_softmax"])
    assert cfg.datamodule.n_labels == 100 and cfg.datamodule.base.binarization == "dynamic"
    assert (cfg.estimator.temperature.rate, cfg.estimator.temperature.interval) == (3e-5, 2000)
    assert grid(cfg, "model.alpha") == {0.1, 0.2, 0.3, 0.8, 1.0}
    assert cfg.callbacks.model_checkpoint.monitor == "val/accuracy"
    assert {"marginalization", "gumbel_softmax", "st_gumbel_softmax"} <= set(arms("jang2017_m2"))

    cfg = compose_config(["experiment=jang2017_notebook"])
    assert (cfg.model.num_variables, cfg.model.num_classes) == (30, 10)
    assert list(cfg.model.encoder_hidden) == [512, 256]
    assert list(cfg.model.decoder_hidden) == [256, 512]
    assert cfg.model.optimizer.lr == 1e-3 and cfg.datamodule.batch_size == 100
    scheduler = cfg.model.lr_scheduler
    assert (scheduler.step_size, scheduler.gamma) == (1000, 0.9)
    # The cosine schedule of docs/results.md replaces it (not merged) and spans max_steps.
    cfg = compose_config(["experiment=jang2017_notebook", "model/lr_scheduler=cosine"])
    scheduler = cfg.model.lr_scheduler
    assert scheduler._target_.endswith("CosineAnnealingLR") and "step_size" not in scheduler
    assert scheduler.T_max == cfg.trainer.max_steps == 50_000
    cfg = compose_config(["experiment=jang2017_notebook"])
    assert cfg.trainer.max_steps == 50_000
    temperature = cfg.estimator.temperature
    assert (temperature.tau0, temperature.tau_min, temperature.interval) == (1.0, 0.5, 1000)


def test_pyro_alpha_is_the_auxiliary_multiplier_per_example(compose_config) -> None:
    """alpha = 46 * N_l / N_u in catgrad's unit (docs/m2.md) for 100 / 600 / 1000 / 3000 labels."""
    seen = set()
    for arm in arms("pyro_ssvae_m2"):
        arm_cfg = OmegaConf.load(EXPERIMENTS / "pyro_ssvae_labels" / f"{arm}.yaml")
        n = arm_cfg.datamodule.n_labels
        assert arm_cfg.model.alpha == pytest.approx(46 * n / (50_000 - n), abs=1e-4)
        seen.add(n)
    cfg = compose_config(["experiment=pyro_ssvae_m2", "+experiment/pyro_ssvae_labels=n600"])
    assert cfg.datamodule.n_labels == 600 and cfg.model.alpha == pytest.approx(0.5587)
    assert cfg.estimator._target_ == "estimators.marginalization.Marginalization"
    assert seen == {100, 600, 1000, 3000}


@pytest.mark.parametrize("experiment", list(PUBLISHED))
def test_published_experiment_trains_with_fast_dev_run(compose_config, experiment, tmp_path: Path
                                                       ) -> None:
    # One representative arm each (the arms' estimators are built by the composition test).
    arm = {"jang2017_arms": "st_gumbel_softmax_r1e-4_n500", "jang2017_m2_arms": "gumbel_softmax",
           "pyro_ssvae_labels": "n100"}.get(PUBLISHED[experiment] or "")
    offline = OFFLINE_M2 if experiment in M2 else OFFLINE_VAE
    overrides = [f"experiment={experiment}", *arm_override(experiment, arm), *offline, *FAST]
    results = run(compose_config(overrides, run_dir=tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "completed"
    assert math.isfinite(results["test/neg_elbo"])
    if experiment in M2:
        assert 0 <= results["test/accuracy"] <= 1


def write_run(directory: Path, config: dict, overrides: list[str], metrics: list[str],
              results: dict, choices: dict | None = None) -> None:
    """A run directory as experiments.train writes it (only what results_table reads):
    ``metrics`` are the lines of csv/metrics.csv, ``choices`` Hydra's config-group choices."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / "csv").mkdir()
    (directory / ".hydra" / "config.yaml").write_text(json.dumps(config))
    (directory / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    if choices is not None:
        hydra = {"hydra": {"runtime": {"choices": choices}}}
        (directory / ".hydra" / "hydra.yaml").write_text(json.dumps(hydra))
    (directory / "csv" / "metrics.csv").write_text("\n".join(metrics) + "\n")
    (directory / "results.json").write_text(json.dumps(results))


def fake_run(directory: Path, lr: float, val: list[float], test: float) -> None:
    """A categorical VAE run of Table 1's sweep at learning rate ``lr``."""
    config = {"model": {"_target_": "models.CategoricalVAE", "num_variables": 20,
                        "num_classes": 10}, "variant": "gumbel_softmax/r1e-4_n500"}
    overrides = ["experiment=jang2017_vae_categorical", f"model.optimizer.lr={lr}", "seed=0"]
    rows = ["epoch,step,train/loss,val/neg_elbo"]
    rows += [f"0,{1000 * (i + 1) - 1},,{v}" for i, v in enumerate(val)]
    results = {"status": "completed", "test/neg_elbo": test, "test/nll_iwae": test - 10,
               "wall_time_s": 120.0, "global_step": 1000 * len(val)}
    write_run(directory, config, overrides, rows, results)


def test_results_table_selects_on_validation_and_fits_the_curve(tmp_path: Path, capsys) -> None:
    from experiments.report.published import fit_power_law, main

    curve = [(t, 90 + 400 * t ** -0.5) for t in range(1000, 9000, 1000)]
    a, b, c = fit_power_law(curve)
    assert (a, b, c) == (pytest.approx(90, abs=1e-6), pytest.approx(400, rel=1e-6),
                         pytest.approx(0.5))
    fake_run(tmp_path / "0", 1e-3, [150, 140, 135, 130], test=128.0)
    fake_run(tmp_path / "1", 1e-4, [170, 160, 155, 150], test=149.0)  # worse on validation
    assert main([str(tmp_path), "--project-to", "50000", "--at", "2000,9000"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| gumbel_softmax")]
    assert len(rows) == 1 and "101.5 (Jang T1 categorical)" in rows[0]
    assert "128.00 (1 seed)" in rows[0] and "model.optimizer.lr=0.001" in rows[0]
    assert "| 140.00 | — |" in rows[0]  # val at 2,000; the run ended before 9,000


def fake_m2_run(directory: Path, overrides: list[str], n_labels: int, val: list[float],
                test_accuracy: float, experiment: str = "jang2017_m2") -> None:
    """An M2 run (marginalization) of ``experiment`` with ``n_labels`` labels."""
    config = {"model": {"_target_": "models.M2"}, "datamodule": {"n_labels": n_labels}}
    rows = ["epoch,step,val/accuracy"]
    rows += [f"{i},{500 * (i + 1) - 1},{v}" for i, v in enumerate(val)]
    results = {"status": "completed", "test/accuracy": test_accuracy,
               "test/generative_accuracy": 0.75, "test/neg_elbo": 101.5, "wall_time_s": 60.0,
               "global_step": 500 * len(val)}
    choices = {"experiment": experiment, "estimator": "marginalization"}
    write_run(directory, config, overrides, rows, results, choices)


def test_results_table_m2_row_shows_both_accuracies(tmp_path: Path, capsys) -> None:
    from experiments.report.published import main

    overrides = ["experiment=jang2017_m2", "+experiment/jang2017_m2_arms=gumbel_softmax"]
    fake_m2_run(tmp_path / "run", overrides, 100, [0.7, 0.8], test_accuracy=0.805)
    assert main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| marginalization"))
    assert "80.5 % (1 seed) acc., generative acc. 75.0 % (1 seed), −ELBO 101.50 (1 seed)" in row
    assert "80.0 % (1,000)" in row  # best validation accuracy (its step, counted from 1)
    assert "92.6 % (Jang T2)" in row


def test_results_table_gives_each_label_count_its_own_row(tmp_path: Path, capsys) -> None:
    # A label count is part of the setup, not a setting to select on: the 600-label run must
    # not hide the 1000-label run although its validation accuracy is higher. Seeds that ran
    # on different trainers (trainer=gpu and max_time there) are one setting.
    from experiments.report.published import main

    def pyro(n: int) -> list[str]:
        return ["experiment=pyro_ssvae_m2", f"+experiment/pyro_ssvae_labels=n{n}"]

    fake_m2_run(tmp_path / "a", [*pyro(1000), "trainer=gpu", "trainer.max_time=00:00:05:00"],
                1000, [0.90, 0.91], test_accuracy=0.92, experiment="pyro_ssvae_m2")
    fake_m2_run(tmp_path / "b", [*pyro(1000), "seed=1", "trainer.max_steps=1000"],
                1000, [0.89, 0.90], test_accuracy=0.90, experiment="pyro_ssvae_m2")
    fake_m2_run(tmp_path / "c", pyro(600), 600, [0.95, 0.96], test_accuracy=0.93,
                experiment="pyro_ssvae_m2")
    assert main([str(tmp_path), "--at", "1000"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| marginalization")]
    assert len(rows) == 2
    assert rows[1].count("| 90.5 % |") == 1  # val at 1,000: mean of the seeds' 0.91 and 0.90
    assert "| pyro_ssvae_m2, 600 labels | 94.4 % (Pyro) | 93.0 % (1 seed)" in rows[0]
    assert "| pyro_ssvae_m2, 1000 labels | 94.9 % (Pyro) | 91.0 ± 1.4 % (2 seeds)" in rows[1]


def test_results_table_seeds_spelled_differently_are_one_setting(tmp_path: Path, capsys) -> None:
    # The first seed gave the label count on the command line, the second left it at the
    # config's default of 100: the same setting, so one row of two seeds, not the better seed.
    from experiments.report.published import main

    fake_m2_run(tmp_path / "a", ["experiment=kingma2014_m2", "datamodule.n_labels=100"], 100,
                [0.70, 0.75], test_accuracy=0.75, experiment="kingma2014_m2")
    fake_m2_run(tmp_path / "b", ["experiment=kingma2014_m2", "seed=1"], 100, [0.78, 0.80],
                test_accuracy=0.80, experiment="kingma2014_m2")
    # A third run with another learning rate is another setting, worse on validation: not shown.
    fake_m2_run(tmp_path / "c", ["experiment=kingma2014_m2", "model.optimizer.lr=0.1"], 100,
                [0.50, 0.55], test_accuracy=0.55, experiment="kingma2014_m2")
    assert main([str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| marginalization")]
    assert len(rows) == 1
    assert "| 77.5 ± 3.5 % (2 seeds) acc." in rows[0]
