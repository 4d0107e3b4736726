"""Lightning callbacks used by the default training configuration."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from torch import Tensor


def count_examples(batch: Any) -> int:
    """Examples in a batch: ``(x, y)`` tuples count ``x``; dicts (CombinedLoader) sum their parts."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return sum(count_examples(part) for part in batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return count_examples(batch[0])
    return 0


class SamplesPerSecond(L.Callback):
    """Logs ``train/samples_per_s`` over windows of ``every_n_steps`` training batches.

    Timing windows (not single steps) keep the measure honest on asynchronous devices without
    synchronising every step.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"callbacks.samples_per_second.every_n_steps={every_n_steps!r} is invalid: "
                f"use an integer >= 1"
            )
        self.every_n_steps = every_n_steps
        self._window_start: float | None = None
        self._examples = 0
        self._batches = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start = time.perf_counter()
        self._examples = 0
        self._batches = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._examples += count_examples(batch)
        self._batches += 1
        if self._batches < self.every_n_steps or self._window_start is None:
            return
        now = time.perf_counter()
        rate = self._examples / max(now - self._window_start, 1e-9)
        pl_module.log("train/samples_per_s", rate, on_step=True, on_epoch=False, batch_size=1)
        self._window_start, self._examples, self._batches = now, 0, 0
