"""The trivial data of the toy problem (``models.toy``): batches of placeholders.

The toy objective has no data; a batch only sets how many independent copies of the problem one
training step averages. Every split yields ``(x [B, 1] zeros, y [B] = -1)``: ``steps_per_epoch``
training batches per epoch and one validation and one test batch. Like every catgrad datamodule it
declares ``image_shape`` (here one pixel, ``[1, 1]``) and ``num_labels`` (0), so configs that read
them compose with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import lightning as L
import torch
from torch import Tensor

from estimators.validation import require_int


class PlaceholderBatches:
    """``num_batches`` batches of ``(zeros [B, D], -ones [B])`` on ``device``."""

    def __init__(
        self, batch_size: int, num_batches: int, device: torch.device, input_dim: int = 1
    ) -> None:
        self.batch_size = batch_size
        self.input_dim = input_dim
        self.num_batches = num_batches
        self.device = device

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        x = torch.zeros(self.batch_size, self.input_dim, device=self.device)  # [B, D]
        y = torch.full((self.batch_size,), -1, dtype=torch.long, device=self.device)  # [B]
        for _ in range(self.num_batches):
            yield x, y


class ToyDataModule(L.LightningDataModule):
    """Placeholder batches for :class:`models.toy.ToyProblem` (``datamodule=toy``)."""

    def __init__(
        self,
        batch_size: int = 1,
        steps_per_epoch: int = 100,
        image_shape: Sequence[int] = (1, 1),
        num_labels: int = 0,
    ) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.input_dim = math.prod(self.image_shape)
        self.num_labels = num_labels
        require_int("datamodule.batch_size", batch_size)
        require_int("datamodule.steps_per_epoch", steps_per_epoch)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _batches(self, num_batches: int) -> PlaceholderBatches:
        return PlaceholderBatches(self.batch_size, num_batches, self._device(), self.input_dim)

    def train_dataloader(self) -> PlaceholderBatches:
        return self._batches(self.steps_per_epoch)

    def val_dataloader(self) -> PlaceholderBatches:
        return self._batches(1)

    def test_dataloader(self) -> PlaceholderBatches:
        return self._batches(1)
