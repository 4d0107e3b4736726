"""The gradient study entry point (experiments.probe.study) on the toy problem."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from experiments.probe.study import study
from experiments.training.errors import ConfigurationError
from experiments.training.job import run
from tests.conftest import CONFIG_DIR

TOY = ["model=toy", "datamodule=toy", "model.num_variables=2", "model.num_classes=3"]
FAST = ["probe.num_samples=16", "probe.chunk_size=8", "temperatures=[0.5,2.0]"]


@pytest.fixture
def compose_study() -> Iterator[Callable[[list[str]], DictConfig]]:
    """Compose ``conf/gradients.yaml`` as the CLI would (``${hydra:...}`` resolvable)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):

        def _compose(overrides: list[str]) -> DictConfig:
            cfg = compose("gradients", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            return cfg

        yield _compose
    GlobalHydra.instance().clear()


def test_study_of_a_fresh_toy_writes_table_and_plot(compose_study, tmp_path: Path) -> None:
    rows = study(compose_study([*TOY, *FAST]), tmp_path)
    variants = {(row["estimator"], row["tau"]) for row in rows}
    assert variants == {
        ("score_function", None),
        ("score_function_rloo", None),
        *((name, tau) for name in ("gumbel_softmax", "st_gumbel_softmax") for tau in (0.5, 2.0)),
    }
    assert {row["group"] for row in rows} == {"all", "logits"}
    assert all(
        row["bias_norm"] is not None and row["temperature"] in (None, row["tau"]) for row in rows
    )
    saved = json.loads((tmp_path / "gradients.json").read_text())
    assert saved["exact_gradient"] is True and saved["rows"] == rows
    with (tmp_path / "gradients.csv").open() as stream:
        assert len(list(csv.DictReader(stream))) == len(rows)
    assert (tmp_path / "gradients.png").stat().st_size > 10_000


def test_study_of_a_trained_run_probes_its_checkpoint(compose_config, compose_study, tmp_path):
    run_dir = tmp_path / "run"
    train = ["estimator=score_function", "datamodule.steps_per_epoch=5", "trainer.max_epochs=1"]
    run(compose_config([*TOY, *train, "logger=csv_only"], run_dir=run_dir))
    # compose_config does not write .hydra/; the CLI does. Write what a CLI run would have.
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(
        "seed: 0\nmodel: {_target_: models.toy.ToyProblem, num_variables: 2, num_classes: 3}\n"
        "estimator: {_target_: estimators.ScoreFunction, "
        "baseline: {_target_: estimators.MovingAverageBaseline}}\n"
        "datamodule: {_target_: datamodules.toy.ToyDataModule}\n"
    )
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        "hydra: {runtime: {choices: {estimator: score_function}}}\n"
    )
    rows = study(compose_study([f"run_dir={run_dir}", *FAST, "temperatures=[]"]), tmp_path / "s")
    own = [row for row in rows if row["estimator"] == "run_score_function"]
    assert len(own) == 2  # groups all and logits
    saved = json.loads((tmp_path / "s" / "gradients.json").read_text())
    assert saved["step"] == 5 and saved["checkpoint"].endswith("last.ckpt")
    with pytest.raises(ConfigurationError, match="no .hydra/config.yaml"):
        study(compose_study([f"run_dir={tmp_path}"]), tmp_path / "t")
