"""``RankDigest``: each DDP rank writes ``rank<r>.json`` into the run directory at the end of fit:
its rank, world size, global step, a SHA-256 of its parameters and the sum of its first training
batch. Ranks of one DDP job must agree on the parameters and see different shards of the data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class RankDigest(L.Callback):
    """Write what this rank ended with (see the module docstring)."""

    def __init__(self) -> None:
        self.first_batch_sum: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first_batch_sum is None:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.first_batch_sum = float(x.double().sum())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten().cpu() for p in pl_module.parameters()])
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "strategy": type(trainer.strategy).__name__,
            "cluster": type(trainer.strategy.cluster_environment).__name__,
            "param_sha256": hashlib.sha256(flat.double().numpy().tobytes()).hexdigest(),
            "param_sum": float(flat.double().sum()),
            "first_batch_sum": self.first_batch_sum,
        }
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))
