"""Lightning callbacks used by the default training configuration."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch import Tensor

from datamodules.tensor_data import BatchGroup
from models.base import metrics_reach_loggers


def count_examples(batch: Any) -> int:
    """Examples in a batch.

    ``(x, y)`` tuples count ``x``; dicts (CombinedLoader) sum their parts, and groups of batches
    (``steps_per_batch``) their batches.
    """
    if isinstance(batch, BatchGroup):
        return sum(count_examples(part) for part in batch)
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return sum(count_examples(part) for part in batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return count_examples(batch[0])
    return 0


class SamplesPerSecond(L.Callback):
    """Logs ``train/samples_per_s``: the training examples per wall-clock second since the
    previous value (or the start of the epoch), on the steps whose metrics reach the loggers
    (every ``trainer.log_every_n_steps``).

    Every training step is counted in exactly one window, and nothing is logged that no logger
    would write (``self.log`` costs ~0.5 ms of host time per call). Windows of many steps keep
    the measure honest on asynchronous devices without synchronising every step.
    """

    def __init__(self) -> None:
        self._window_start: float | None = None
        self._examples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start = time.perf_counter()
        self._examples = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._examples += count_examples(batch)
        if self._window_start is None or not metrics_reach_loggers(trainer):
            return
        now = time.perf_counter()
        rate = self._examples / max(now - self._window_start, 1e-9)
        pl_module.log("train/samples_per_s", rate, on_step=True, on_epoch=False, batch_size=1)
        self._window_start, self._examples = now, 0


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; carries the step and last checkpoint."""

    def __init__(self, step: int, what: str, checkpoint: str | None) -> None:
        self.step = step
        self.checkpoint = checkpoint
        kept = f"last good checkpoint kept: {checkpoint}" if checkpoint else "no checkpoint yet"
        super().__init__(f"non-finite {what} at step {step}; training stopped ({kept})")


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint any checkpointing callback has written, if any."""
    callbacks: list[L.Callback] = getattr(trainer, "callbacks", [])
    paths = [getattr(callback, "last_model_path", "") for callback in callbacks]
    paths += [getattr(trainer.checkpoint_callback, "best_model_path", "")]
    existing = [Path(p) for p in paths if p and Path(p).exists()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


class StopOnNonFinite(L.Callback):
    """Stops training before a non-finite loss or gradient reaches the parameters.

    Both are checked in ``on_before_optimizer_step`` (after ``backward``, before gradient
    clipping and the update), so the parameters (and every checkpoint written so far) stay
    finite: the loss kept from ``on_before_backward`` and, with ``check_gradients``, every
    gradient through one fused kernel (:func:`flag_non_finite`). One host read of both flags per
    step; ``check_gradients=false`` leaves only the loss's.
    """

    def __init__(self, check_gradients: bool = True) -> None:
        self.check_gradients = check_gradients
        self._loss: Tensor | None = None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        loss, self._loss = self._loss, None
        flags: list[Tensor] = [] if loss is None else [~torch.isfinite(loss).reshape(())]
        if self.check_gradients:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                flags.append(flag_non_finite(grads))
        if not flags:
            return
        bad = torch.stack([flag.to(torch.bool) for flag in flags]).tolist()  # one host read
        if bad[0]:
            what = "loss" if loss is not None else "gradient"
            raise NonFiniteLossError(trainer.global_step, what, _last_checkpoint(trainer))
        if len(bad) > 1 and bad[1]:
            raise NonFiniteLossError(trainer.global_step, "gradient", _last_checkpoint(trainer))


def flag_non_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d float tensor on the tensors' device: 1.0 if any entry of ``tensors`` is NaN or
    infinite, else 0.0. No host synchronisation, no copies of ``tensors``.

    One fused kernel over all tensors (``GradScaler``'s own check, with a scale of 1: values
    unchanged). A per-tensor ``isfinite(g).all()`` makes a boolean copy of every gradient
    (3.8 ms per step for the 20x10 VAE on one CPU core); the fused check reads each once.
    """
    found = torch.zeros((), device=tensors[0].device)
    one = torch.ones((), device=tensors[0].device)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():  # the kernel takes one dtype per call
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
    return found


class StepSeeding(L.Callback):
    """Reseeds torch's global RNGs from ``(seed, global step)`` before every training batch and
    from ``(seed, global step, stage)`` before each validation/test epoch.

    The estimator's sampling noise then depends only on the seed and the step, so a run resumed
    from a checkpoint draws exactly the noise the uninterrupted run drew. With several optimizer
    steps per batch (``steps_per_batch``) the model calls :meth:`reseed_training` before each.
    """

    STAGES = {"train": 0, "validate": 1, "test": 2}

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._device = torch.device("cpu")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = pl_module.device
        hooks = getattr(pl_module, "step_hooks", None)
        several = getattr(pl_module, "steps_per_batch", 1) > 1
        if several and hooks is not None and self.reseed_training not in hooks:
            cast(Any, pl_module).step_hooks = (*hooks, self.reseed_training)

    def reseed_training(self, step: int) -> None:
        """Reseed for the training step ``step`` (what ``on_train_batch_start`` does)."""
        self._reseed(step, "train", self._device)

    def _reseed(self, step: int, stage: str, device: torch.device) -> None:
        seed = (self.seed * 1_000_003 + step) * 3 + self.STAGES[stage]
        if device.type == "cpu":
            # What torch.manual_seed does to the CPU generator, without its per-call probing of
            # CUDA/XPU/MTIA (NVML loads and stack captures: ~1 ms per step on a CPU-only machine).
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._reseed(trainer.global_step, "train", pl_module.device)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reseed(trainer.global_step, "validate", pl_module.device)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reseed(trainer.global_step, "test", pl_module.device)


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, its training bar and metrics updated every
    ``every_n_steps`` training batches (and at an epoch's last batch) rather than every batch.

    Rich redraws the terminal on its own clock (``refresh_rate`` times a second, Lightning's
    default 100), so at training speeds above ``every_n_steps`` batches per redraw the bar looks
    the same; an update per batch (the task update and a read of every progress-bar metric)
    costs ~0.2-1 ms of host time per step.
    """

    def __init__(self, every_n_steps: int = 10, **kwargs: Any) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or (
            every_n_steps < 1
        ):
            raise ValueError(
                f"callbacks.progress_bar.every_n_steps={every_n_steps!r} is invalid: use an "
                f"integer >= 1 (1 updates the bar at every training batch)"
            )
        super().__init__(**kwargs)
        self.every_n_steps = every_n_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        done = batch_idx + 1
        if done % self.every_n_steps == 0 or done == self.total_train_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
