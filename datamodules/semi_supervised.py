"""Semi-supervised wrapper around any labelled datamodule (Kingma et al. 2014, Section 4.1).

``SemiSupervisedDataModule(base, n_labels)`` loads ``base``'s splits and divides its *training*
split into

* a labelled subset of ``n_labels`` examples, balanced per class (``n_labels / K`` of each of the K
  classes, as in the paper's "100 labels = 10 per class"), drawn from ``seed``: the same seed gives
  the same subset whatever the batch size or the device;
* the unlabelled rest, whose labels are replaced by ``-1`` so that no model can read them.

The validation and test splits are ``base``'s, untouched and fully labelled (for accuracy).
Training batches come from Lightning's ``CombinedLoader`` in mode ``max_size_cycle`` over
``{"labelled": ..., "unlabelled": ...}``: an epoch is one pass over the unlabelled data and the
(smaller) labelled loader cycles, each cycle in a fresh order; both are indexed by the global
step, so resuming is exact. Both use dynamic binarization (a new
Bernoulli draw of every batch) when ``base`` does. Validation and test batches are plain
``(x [B, D], y [B])``.

Bad inputs fail before training with one line: ``n_labels`` not divisible by the number of
classes, larger than the training split (or than a class has examples), or a dataset without
labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor

from datamodules.base import BinaryImageDataModule, Splits
from datamodules.tensor_data import TensorBatches
from estimators.validation import require_int


def balanced_subset(labels: Tensor, n_labels: int, num_classes: int, seed: int) -> Tensor:
    """Indices ``[n_labels]`` (sorted) of ``n_labels / num_classes`` random examples per class.

    ``labels [M]`` in ``[0, num_classes)``. Raises a one-line ``ValueError`` when a class has too
    few examples.
    """
    per_class = n_labels // num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(num_classes):
        members = (labels == label).nonzero().squeeze(1)  # [M_c]
        if members.numel() < per_class:
            raise ValueError(
                f"datamodule.n_labels={n_labels} needs {per_class} examples of class {label} but "
                f"the training split has {members.numel()}: lower n_labels"
            )
        order = torch.randperm(members.numel(), generator=generator)[:per_class]
        chosen.append(members[order])
    return torch.cat(chosen).sort().values  # [n_labels]


class SemiSupervisedDataModule(BinaryImageDataModule):
    """``n_labels`` balanced labelled examples + the unlabelled rest of ``base``'s training split.

    Args:
        base: a labelled :class:`BinaryImageDataModule` (``digits``, ``mnist``, ``synthetic``);
            its image shape, batch sizes, binarization and splits are used unchanged. The
            unlabelled batch size is ``base.batch_size``.
        n_labels: labelled training examples, a multiple of the number of classes.
        labelled_batch_size: labelled examples per training step (at most ``n_labels``).
        seed: draws the labelled subset.
        image_shape, num_labels: optional mirrors of ``base``'s (the Hydra configs expose them so
            that models can interpolate ``${datamodule.image_shape}``); checked against ``base``.
    """

    def __init__(
        self,
        base: BinaryImageDataModule,
        n_labels: int = 100,
        labelled_batch_size: int = 100,
        seed: int = 0,
        image_shape: Sequence[int] | None = None,
        num_labels: int | None = None,
    ) -> None:
        if not isinstance(base, BinaryImageDataModule):
            raise TypeError(
                f"datamodule.base must be a catgrad BinaryImageDataModule, got "
                f"{type(base).__name__}"
            )
        if base.num_labels < 2:
            raise ValueError(
                f"datamodule.base ({type(base).__name__}) has no labels (num_labels="
                f"{base.num_labels}): semi-supervised training needs a labelled dataset such as "
                f"digits or mnist"
            )
        if image_shape is not None and tuple(int(s) for s in image_shape) != base.image_shape:
            raise ValueError(
                f"datamodule.image_shape={list(image_shape)} differs from the wrapped dataset's "
                f"{list(base.image_shape)}: set datamodule.base.image_shape instead"
            )
        if num_labels is not None and num_labels != base.num_labels:
            raise ValueError(
                f"datamodule.num_labels={num_labels} differs from the wrapped dataset's "
                f"{base.num_labels}: set datamodule.base.num_labels instead"
            )
        super().__init__(
            image_shape=base.image_shape,
            num_labels=base.num_labels,
            batch_size=base.batch_size,
            eval_batch_size=base.eval_batch_size,
            binarization=base.binarization,
            seed=base.seed,
        )
        require_int("datamodule.n_labels", n_labels)
        require_int("datamodule.labelled_batch_size", labelled_batch_size)
        if n_labels % base.num_labels != 0:
            raise ValueError(
                f"datamodule.n_labels={n_labels} is not divisible by the {base.num_labels} classes "
                f"(the labelled subset is balanced per class): use a multiple of {base.num_labels}"
            )
        self.base = base
        self.n_labels = n_labels
        self.labelled_batch_size = min(labelled_batch_size, n_labels)
        self.label_seed = seed
        self.labelled_index: Tensor | None = None  # [n_labels], rows of the training split
        self.labelled: tuple[Tensor, Tensor] | None = None  # x [n_labels, D], y [n_labels]
        self.unlabelled: tuple[Tensor, Tensor] | None = None  # x [M - n_labels, D], y = -1

    def load_splits(self) -> Splits:
        return self.base.load_splits()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.labelled is not None:
            return
        assert self.splits is not None
        x, y = self.splits.train  # [M, D], [M]
        if y.numel() and (y.min() < 0 or y.max() >= self.num_labels):
            raise ValueError(
                f"datamodule.base ({type(self.base).__name__}) has training labels outside "
                f"[0, {self.num_labels}) (-1 marks unlabelled data): semi-supervised training "
                f"needs a labelled dataset"
            )
        if self.n_labels >= x.shape[0]:
            raise ValueError(
                f"datamodule.n_labels={self.n_labels} leaves no unlabelled data in the "
                f"{x.shape[0]} training examples: use n_labels < {x.shape[0]}"
            )
        index = balanced_subset(y, self.n_labels, self.num_labels, self.label_seed)  # [n_labels]
        is_unlabelled = torch.ones(x.shape[0], dtype=torch.bool)
        is_unlabelled[index] = False
        self.labelled_index = index
        self.labelled = (x[index], y[index])
        self.unlabelled = (x[is_unlabelled], torch.full_like(y[is_unlabelled], -1))

    def _train_batches(self, data: tuple[Tensor, Tensor], batch_size: int, seed: int
                       ) -> TensorBatches:
        device = self._device()
        rank, world = self._rank_and_world()
        return TensorBatches(
            data[0].to(device),
            data[1].to(device),
            batch_size=batch_size,
            shuffle=True,
            dynamic=self.binarization == "dynamic",
            seed=seed,
            rank=rank,
            world_size=world,
            position=self._training_position(),
        )

    def train_dataloader(self) -> Any:
        """``CombinedLoader`` (``max_size_cycle``) over the labelled and unlabelled streams.

        Both streams are indexed by the global step (one labelled and one unlabelled batch per
        step; see ``datamodules.tensor_data``), so a resumed run continues both exactly. With
        ``steps_per_batch`` > 1, that loader's batches in groups (an epoch: the longer stream).
        """
        if self.labelled is None:
            self.setup("fit")
        assert self.labelled is not None and self.unlabelled is not None
        loaders = {
            # Different stream seeds: the two loaders must not share binarization noise.
            "labelled": self._train_batches(
                self.labelled, self.labelled_batch_size, self.seed + 1
            ),
            "unlabelled": self._train_batches(self.unlabelled, self.batch_size, self.seed),
        }
        epoch = max(len(loader) for loader in loaders.values())  # max_size_cycle's epoch
        return self.grouped(CombinedLoader(loaders, mode="max_size_cycle"), epoch)
