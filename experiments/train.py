"""Train and test one model with one estimator: ``python -m experiments.train [overrides]``.

Composes ``conf/config.yaml``; builds estimator, datamodule, model, callbacks, loggers and trainer
from their config groups (``_target_``); fits; tests the best checkpoint (the last weights when no
checkpoint was written); writes ``results.json`` in the run directory:

    {"test/neg_elbo": ..., "test/nll_iwae": ..., "wall_time_s": ..., "model": "vae",
     "estimator": "st_gumbel_softmax", "datamodule": "digits", "seed": 0, ...}

Configuration mistakes stop the run before any work with one line on stderr (exit code 2).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from datamodules.mnist import DataNotFoundError


class ConfigurationError(RuntimeError):
    """A user-facing configuration problem, reported as one line."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost cause (Hydra wraps constructor errors in InstantiationException)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Instantiate and validate estimator, datamodule and model; load the data."""
    try:
        estimator = instantiate(cfg.estimator, _convert_="all")
        datamodule = instantiate(cfg.datamodule, _convert_="all")
        model = instantiate(cfg.model, estimator=estimator, _convert_="all")
        datamodule.setup("fit")
    except Exception as error:
        cause = root_cause(error)
        if isinstance(cause, (ValueError, TypeError, DataNotFoundError)):
            raise ConfigurationError(str(cause)) from error
        raise
    return model, datamodule


def choices() -> dict[str, str]:
    """The config-group options of this run (model, estimator, estimator/baseline, ...)."""
    picked = HydraConfig.get().runtime.choices
    return {
        key: str(value)
        for key, value in picked.items()
        if value is not None and not key.startswith("hydra") and not key.startswith("hydra/")
    }


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def finish_wandb() -> None:
    """End this job's wandb run so that the next Hydra multirun job starts a fresh one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and write ``results.json``; returns the results."""
    os.environ.setdefault("WANDB_MODE", "offline")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    model, datamodule = build(cfg)
    callbacks = [instantiate(callback, _convert_="all") for callback in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(logger, _convert_="all") for logger in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=output_dir
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)  # type: ignore[arg-type]

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule)
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        results: dict[str, Any] = finite_metrics(tested[0] if tested else {})
        results.update(
            {
                "wall_time_s": time.perf_counter() - start,
                "global_step": trainer.global_step,
                "seed": cfg.seed,
                "checkpoint": best or None,
                **choices(),
            }
        )
        if trainer.is_global_zero:
            (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            summary = ", ".join(
                f"{k}={v:.3f}" for k, v in results.items() if k.startswith("test/")
            )
            print(f"results: {summary} ({results['wall_time_s']:.1f} s) -> {output_dir}")
            if not all(math.isfinite(v) for k, v in results.items() if k.startswith("test/")):
                print("warning: some test metrics are not finite", file=sys.stderr)
        return results
    finally:
        finish_wandb()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    value = results.get("test/neg_elbo")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
