"""Shared test setup: wandb never touches the network; configs are composed like the CLI does."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"

ComposeFn = Callable[..., DictConfig]


@pytest.fixture
def compose_config(tmp_path: Path) -> Iterator[ComposeFn]:
    """``compose_config(overrides)`` -> the composed config, as ``experiments.train`` would see it.

    The run directory is a fresh ``tmp_path`` and ``${hydra:...}`` interpolations resolve.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):

        def _compose(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
            cfg = compose("config", overrides=list(overrides or []), return_hydra_config=True)
            directory = run_dir or tmp_path / "run"
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(directory)
                cfg.hydra.job.num = 0
            HydraConfig.instance().set_config(cfg)
            return cfg

        yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def no_shared_wandb_service() -> Iterator[None]:
    """An in-process wandb run publishes its service process in ``os.environ["WANDB_SERVICE"]``;
    a training subprocess started later would join that service, where a resumed job's run id
    is still registered by the killed segment ("run ID … is in use"). Each test starts without."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # Under pytest-xdist every worker is a process of its own: one thread each keeps the workers
    # from competing for the cores.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // workers))
