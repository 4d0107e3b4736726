"""Callbacks that break runs on purpose, injected by tests through Hydra overrides."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import lightning as L
import torch


class AtStep(L.Callback):
    """Calls :meth:`act` once, before the training batch of global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def act(self, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            self.act(pl_module)


class KillAtStep(AtStep):
    """SIGKILLs its own process (no cleanup, like an OOM kill). With ``once_marker`` (a file path)
    only the first time: the file is created before the kill, and a rerun of the same command
    whose marker exists trains through."""

    def __init__(self, step: int, once_marker: str | None = None) -> None:
        super().__init__(step)
        self.once_marker = once_marker

    def act(self, pl_module: L.LightningModule) -> None:
        if self.once_marker is not None:
            if os.path.exists(self.once_marker):
                return
            open(self.once_marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


class SleepAtStep(AtStep):
    """Sleeps ``seconds`` (a slow segment, to see wall time add up over segments)."""

    def __init__(self, step: int, seconds: float) -> None:
        super().__init__(step)
        self.seconds = seconds

    def act(self, pl_module: L.LightningModule) -> None:
        time.sleep(self.seconds)


class PoisonLossAtStep(AtStep):
    """Makes the decoder's first weights NaN so the loss becomes non-finite."""

    def act(self, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            next(pl_module.decoder.parameters()).fill_(float("nan"))


class SlowSteps(L.Callback):
    """Sleeps ``seconds`` before every training batch (a run long enough to interrupt)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, *args: Any) -> None:
        time.sleep(self.seconds)


class KillInValidation(L.Callback):
    """SIGKILLs its own process when the validation at global step ``step`` starts (after the
    training batch's checkpoint, before validation's), once, like :class:`KillAtStep`."""

    def __init__(self, step: int, once_marker: str) -> None:
        self.step = step
        self.once_marker = once_marker

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step != self.step:
            return
        if os.path.exists(self.once_marker):
            return
        open(self.once_marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
