"""Base LightningDataModule for binary-image datasets held as tensors (see ``tensor_data``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from datamodules.tensor_data import BatchGroups, TensorBatches, binarize, check_binarization
from estimators.validation import require_int


class Splits:
    """Intensities in [0, 1] ``[M, D]`` and labels ``[M]`` for the train/val/test splits."""

    def __init__(
        self,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
    ) -> None:
        self.train = train
        self.val = val
        self.test = test


def split_train_val(
    x: Tensor, y: Tensor, val_size: int, seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Seeded split of ``(x, y)`` into ``(train, val)`` with ``val_size`` validation examples."""
    if not 0 < val_size < x.shape[0]:
        raise ValueError(
            f"datamodule.val_size={val_size} must be between 1 and {x.shape[0] - 1} "
            f"for a dataset of {x.shape[0]} examples"
        )
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    val_index, train_index = order[:val_size], order[val_size:]
    return (x[train_index], y[train_index]), (x[val_index], y[val_index])


class BinaryImageDataModule(L.LightningDataModule):
    """Loads a dataset once (``load_splits``), binarizes it and serves index-sliced batches.

    Subclasses implement :meth:`load_splits`. ``image_shape`` is the (H, W) of one image; models
    read it from the config (``${datamodule.image_shape}``) and it is checked against the data.
    ``num_labels`` is the number of classes of ``y`` (0 for unlabelled data).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_labels: int,
        batch_size: int = 100,
        eval_batch_size: int = 500,
        binarization: str = "dynamic",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_binarization(binarization)
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 2 or min(self.image_shape) < 1:
            raise ValueError(
                f"datamodule.image_shape={list(image_shape)} is invalid: give [height, width]"
            )
        self.input_dim = math.prod(self.image_shape)
        self.num_labels = num_labels
        self.batch_size = require_int("datamodule.batch_size", batch_size)
        self.eval_batch_size = require_int("datamodule.eval_batch_size", eval_batch_size)
        self.binarization = binarization
        self.seed = seed
        self.splits: Splits | None = None
        # Training batches per Lightning batch (top-level ``steps_per_batch``, set by
        # ``experiments.training.steps_per_batch``): above 1, train_dataloader yields BatchGroups.
        self.steps_per_batch = 1

    def load_splits(self) -> Splits:
        """Return the intensities and labels of each split, on the CPU."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self.load_splits()
        for name in ("train", "val", "test"):
            x, y = getattr(splits, name)
            if x.dim() != 2 or x.shape[1] != self.input_dim:
                raise ValueError(
                    f"{type(self).__name__}: the {name} images have shape {tuple(x.shape)}, "
                    f"expected [M, {self.input_dim}] for image_shape={list(self.image_shape)}"
                )
            if x.shape[0] == 0:
                raise ValueError(f"{type(self).__name__}: the {name} split is empty")
        generator = torch.Generator().manual_seed(self.seed)
        if self.binarization == "dynamic":
            # Training batches are resampled per batch; evaluation splits are sampled once.
            splits.val = (binarize(splits.val[0], "fixed", generator), splits.val[1])
            splits.test = (binarize(splits.test[0], "fixed", generator), splits.test[1])
        else:
            for name in ("train", "val", "test"):
                x, y = getattr(splits, name)
                setattr(splits, name, (binarize(x, self.binarization, generator), y))
        self.splits = splits

    # ------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _training_position(self) -> Callable[[], int] | None:
        """Batches consumed so far (the global step), so that resumed runs continue the stream."""
        trainer = self.trainer
        if trainer is None or trainer.accumulate_grad_batches != 1:
            return None
        return lambda: trainer.global_step

    def _batches(self, split: str, shuffle: bool, batch_size: int) -> TensorBatches:
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        x, y = getattr(self.splits, split)
        device = self._device()
        rank, world = self._rank_and_world()
        return TensorBatches(
            x.to(device),
            y.to(device),
            batch_size=batch_size,
            shuffle=shuffle,
            dynamic=shuffle and self.binarization == "dynamic",
            seed=self.seed,
            rank=rank,
            world_size=world,
            position=self._training_position() if shuffle else None,
        )

    def train_dataloader(self) -> TensorBatches | BatchGroups:
        return self.grouped(self._batches("train", shuffle=True, batch_size=self.batch_size))

    def grouped(self, loader: Any, batches_per_epoch: int | None = None) -> Any:
        """``loader`` itself, or with ``steps_per_batch`` > 1 its batches in groups of that many
        (:class:`~datamodules.tensor_data.BatchGroups`; ``batches_per_epoch`` defaults to
        ``len(loader)``)."""
        if self.steps_per_batch == 1:
            return loader
        length = len(loader) if batches_per_epoch is None else batches_per_epoch
        return BatchGroups(loader, self.steps_per_batch, length)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", shuffle=False, batch_size=self.eval_batch_size)
