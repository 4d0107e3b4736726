"""Callbacks that break runs on purpose, injected by tests through Hydra overrides."""

from __future__ import annotations

import os
import signal
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
    """SIGKILLs its own process (no cleanup, like an OOM kill)."""

    def act(self, pl_module: L.LightningModule) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class PoisonLossAtStep(AtStep):
    """Makes the decoder's first weights NaN so the loss becomes non-finite."""

    def act(self, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            next(pl_module.decoder.parameters()).fill_(float("nan"))
