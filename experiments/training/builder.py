"""Building a run's components from its Hydra config: estimator, datamodule and model
(:func:`build`), and the ``lightning.Trainer`` with its callbacks and loggers
(:func:`build_trainer`).
Every component is instantiated from its group's ``_target_``; constructor errors become one-line
:class:`~experiments.training.errors.ConfigurationError`\ s naming the key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.training.errors import ConfigurationError, checked
from experiments.training.steps_per_batch import apply_steps_per_batch, steps_per_batch


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """Instantiate and validate estimator, datamodule and model (and its optimizer); load data;
    ``steps_per_batch`` (:mod:`experiments.training.steps_per_batch`) applied to both."""
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigurationError(f"seed={cfg.seed!r} is invalid: use an integer (0 is fine)")
    steps = steps_per_batch(cfg)
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before any weight is initialised
    estimator = checked("estimator", lambda: instantiate(cfg.estimator, _convert_="all"))
    datamodule = checked("datamodule", lambda: instantiate(cfg.datamodule, _convert_="all"))
    model = checked(
        "model", lambda: instantiate(cfg.model, estimator=estimator, _convert_="all")
    )
    checked("model.optimizer", model.configure_optimizers)
    apply_steps_per_batch(steps, model, datamodule)
    checked("datamodule", lambda: model.check_datamodule(datamodule))
    checked("datamodule", lambda: datamodule.setup("fit"))
    return model, datamodule


# lightning.Trainer arguments that are numbers (or null), never text.
NUMERIC_TRAINER_ARGUMENTS = (
    "max_epochs", "min_epochs", "max_steps", "min_steps", "val_check_interval",
    "check_val_every_n_epoch", "log_every_n_steps", "accumulate_grad_batches",
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "num_sanity_val_steps",
    "gradient_clip_val", "num_nodes", "reload_dataloaders_every_n_epochs",
)


def build_trainer(cfg: DictConfig, output_dir: Path, extra_callbacks: Sequence[Any] = (),
                  wandb_id: str | None = None) -> Any:
    """The ``lightning.Trainer`` of ``cfg`` with its callbacks and loggers, ``extra_callbacks``,
    the always-on :class:`StepSeeding` and :class:`StopOnNonFinite`, and atomic checkpoint writes;
    the resolved config is logged to every logger. ``wandb_id``: the run id of every
    ``WandbLogger`` (one wandb run per job across segments). (Also used by the benchmarks.)"""
    from experiments.training.callbacks import StepSeeding, StopOnNonFinite
    from experiments.training.checkpointing import AtomicCheckpointIO

    for group in ("callbacks", "logger"):
        for name, config in (cfg.get(group) or {}).items():
            if config is not None and "_target_" not in config:
                raise ConfigurationError(
                    f"{group}.{name} has settings but no _target_ (an experiment config set keys "
                    f"of a {group} that {group}={HydraConfig.get().runtime.choices.get(group)} "
                    f"does not define): add its _target_ or remove {group}.{name}"
                )
    for name in NUMERIC_TRAINER_ARGUMENTS:
        value = (cfg.get("trainer") or {}).get(name)
        if isinstance(value, str):  # Lightning would fail later with "'<' not supported ..."
            raise ConfigurationError(
                f"trainer.{name}={value} is not a number: give a number (e.g. "
                f"trainer.{name}=1000) or null")
    callbacks = [
        checked(f"callbacks.{name}", lambda c=config: instantiate(c, _convert_="all"))
        for name, config in (cfg.get("callbacks") or {}).items()
        if config is not None  # callbacks.<name>=null removes a callback
    ]
    callbacks += [*extra_callbacks, StepSeeding(cfg.seed)]
    callbacks.append(StopOnNonFinite(cfg.get("check_finite_gradients", True)))
    loggers = [
        checked(f"logger.{name}", lambda c=config: instantiate(
            c, _convert_="all",
            **({"id": wandb_id} if wandb_id and str(c._target_).endswith("WandbLogger") else {})))
        for name, config in (cfg.get("logger") or {}).items()
        if config is not None
    ]
    trainer = checked(
        "trainer",
        lambda: instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            default_root_dir=output_dir,
            plugins=[AtomicCheckpointIO()],
        ),
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)  # type: ignore[arg-type]
    return trainer
