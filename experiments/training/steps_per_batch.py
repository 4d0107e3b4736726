"""``steps_per_batch=K``: K optimizer steps per Lightning batch, to amortise Lightning's per-batch
host work (hooks, loop bookkeeping, logging checks) over K steps where a step is host-bound.

The training loader yields groups of K consecutive batches
(:class:`~datamodules.tensor_data.BatchGroups`) and ``EstimatorModel.training_steps`` runs one
optimizer step per batch of a group under manual optimization, each exactly as one step per batch
would: the same batches, reseeding, estimator step, finite checks, learning rates, logged rows
and ``trainer.max_steps``; the weights after N steps are bitwise those of ``K=1``. Checkpoints
fall between groups. A top-level key, like ``replicas``: it concerns the data, the model and the
callbacks together, is not a ``lightning.Trainer`` argument, and does not change results.

Settings that count Lightning batches (an integer ``trainer.val_check_interval`` or
``trainer.limit_train_batches``) or that manual optimization lacks (gradient clipping, gradient
accumulation), replicas and the gradient probe are refused with one line when ``K > 1``.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from experiments.training.errors import ConfigurationError


def steps_per_batch(cfg: DictConfig) -> int:
    """The run's ``steps_per_batch`` (1 when absent), validated against the rest of ``cfg``;
    a one-line :class:`ConfigurationError` names the key, its value and the fix."""
    steps = cfg.get("steps_per_batch", 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigurationError(
            f"steps_per_batch={steps!r} is invalid: use an integer >= 1 (1: one optimizer step "
            f"per Lightning batch)")
    if steps == 1:
        return 1
    trainer = cfg.get("trainer") or {}
    conflicts = [
        ("replicas", cfg.get("replicas", 1), lambda v: v not in (None, 1),
         "train replicas with steps_per_batch=1"),
        ("trainer.gradient_clip_val", trainer.get("gradient_clip_val"), lambda v: v is not None,
         "set it to null (manual optimization does not clip)"),
        ("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches"),
         lambda v: v not in (None, 1), "set it to 1"),
        ("trainer.val_check_interval", trainer.get("val_check_interval"),
         lambda v: isinstance(v, int) and not isinstance(v, bool),
         "it counts Lightning batches: give a fraction of an epoch (e.g. 0.5) or use "
         "trainer.check_val_every_n_epoch"),
        ("trainer.limit_train_batches", trainer.get("limit_train_batches"),
         lambda v: isinstance(v, int) and not isinstance(v, bool),
         "it counts Lightning batches: give a fraction of an epoch or use trainer.max_steps"),
        ("callbacks.gradient_probe", (cfg.get("callbacks") or {}).get("gradient_probe"),
         lambda v: v is not None, "probe with steps_per_batch=1 (it probes between batches)"),
    ]
    for key, value, conflicting, fix in conflicts:
        if conflicting(value):
            shown = "set" if key == "callbacks.gradient_probe" else repr(value)
            raise ConfigurationError(
                f"{key}={shown} cannot be combined with steps_per_batch={steps}: {fix}, or set "
                f"steps_per_batch=1")
    return steps


def apply_steps_per_batch(steps: int, model: Any, datamodule: Any) -> None:
    """Make ``model`` train ``steps`` optimizer steps per batch of ``datamodule``'s groups."""
    if steps == 1:
        return
    for name, part, method in (("model", model, "set_steps_per_batch"),
                               ("datamodule", datamodule, "grouped")):
        if not hasattr(part, method):
            raise ConfigurationError(
                f"steps_per_batch={steps} is not supported by {name} {type(part).__name__}: "
                f"use steps_per_batch=1")
    model.set_steps_per_batch(steps)
    datamodule.steps_per_batch = steps
