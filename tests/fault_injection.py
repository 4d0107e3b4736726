"""Callbacks that break runs on purpose, injected by tests through Hydra overrides."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch


class KillAtStep(L.Callback):
    """SIGKILLs its own process when training reaches ``step`` (no cleanup, like an OOM kill)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonLossAtStep(L.Callback):
    """Makes the decoder's weights NaN at ``step`` so the loss becomes non-finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.decoder.parameters()).fill_(float("nan"))
