"""Progress that reaches log files, and a progress bar that counts what stops the run.

* :class:`ProgressLines`: when stdout is not a terminal (a SLURM job's log, ``nohup``, CI), where
  Rich draws nothing, one plain line every ``every_n_steps`` steps or ``every_s`` seconds,
  whichever comes first, and one at the end of training::

      progress: step 400/2000 (20%) epoch 3 | train/neg_elbo=101.2 val/neg_elbo=99.87 |
      41.3 steps/s | ETA 0:00:38          (one line)

* :class:`StepProgressBar`: Rich's bar, whose description says ``Step 1200/2000`` when
  ``trainer.max_steps`` ends the run (Lightning's says ``Epoch 7/99`` there, counting epochs that
  never come).
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

import lightning as L
from torch import Tensor

from experiments.training.callbacks import ProgressBar


def step_budget(trainer: L.Trainer) -> int | None:
    """The number of optimizer steps the run will take, None when unbounded."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if estimate != float("inf") else None


class ProgressLines(L.Callback):
    """Plain progress lines on stdout when it is not a terminal (``always=true``: also when it
    is)."""

    def __init__(self, every_n_steps: int = 100, every_s: float = 60.0,
                 always: bool = False) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"callbacks.progress_lines.every_n_steps={every_n_steps!r} is "
                             f"invalid: use an integer >= 1")
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or every_s <= 0:
            raise ValueError(f"callbacks.progress_lines.every_s={every_s!r} is invalid: use a "
                             f"number of seconds > 0")
        self.every_n_steps = every_n_steps
        self.every_s = float(every_s)
        self.always = always
        self.enabled = False
        self._start = (0.0, 0)  # (time, step) where this process started training
        self._last = (0.0, 0)  # (time, step) of the last line

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.enabled = trainer.is_global_zero and (self.always or not sys.stdout.isatty())
        now = time.monotonic()
        self._start = self._last = (now, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        now, step = time.monotonic(), trainer.global_step
        if step - self._last[1] >= self.every_n_steps or now - self._last[0] >= self.every_s:
            self._last = (now, step)
            print(self.line(trainer, now), flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and trainer.global_step != self._last[1]:
            print(self.line(trainer, time.monotonic()), flush=True)

    def line(self, trainer: L.Trainer, now: float) -> str:
        step = trainer.global_step
        total = step_budget(trainer)
        where = f"step {step}" if total is None else (
            f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)")
        metrics = " ".join(
            f"{name}={float(value):.4g}" for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith(("train/", "val/")) and isinstance(value, Tensor)
            and value.numel() == 1
        )
        rate = (step - self._start[1]) / max(now - self._start[0], 1e-9)
        eta = ""
        if total is not None and rate > 0:
            eta = f" | ETA {datetime.timedelta(seconds=round((total - step) / rate))}"
        return (f"progress: {where} epoch {trainer.current_epoch}"
                f"{' | ' + metrics if metrics else ''} | {rate:.1f} steps/s{eta}")


class StepProgressBar(ProgressBar):
    """catgrad's Rich progress bar (updated every ``every_n_steps`` batches) whose description
    counts steps when ``max_steps`` ends the run."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        description = f"Step {trainer.global_step}/{trainer.max_steps} (epoch {current_epoch})"
        return f"{description:{len(self.validation_description)}}"
