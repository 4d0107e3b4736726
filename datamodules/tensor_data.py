"""Datasets held as tensors and served as index-sliced batches (no per-sample Python work).

Every catgrad datamodule keeps its images as one float tensor ``[num_examples, D]`` with values in
[0, 1] on the training device; a batch is ``x[index]``. Binarization (the papers model binary
pixels with a Bernoulli likelihood) is one of

* ``dynamic``: a fresh Bernoulli sample of each training batch (Salakhutdinov & Murray 2008's
  "dynamic binarization"); validation and test sets are binarized once from the seed so that
  evaluation is deterministic.
* ``fixed``: every split sampled once from the seed (the "fixed binarization" of Jang et al. 2017).
* ``threshold``: ``x > 0.5``.

Batches are ``(x [B, D] float, y [B] long)``; ``y`` is ``-1`` where a dataset has no labels.
The random order and dynamic binarization noise of epoch ``e`` come from a generator seeded with
``(seed, e)``, so a data stream is a function of the seed and the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

BINARIZATIONS = ("dynamic", "fixed", "threshold")


def check_binarization(binarization: str) -> None:
    if binarization not in BINARIZATIONS:
        raise ValueError(
            f"datamodule.binarization={binarization!r} is unknown: choose one of "
            f"{', '.join(BINARIZATIONS)}"
        )


def binarize(x: Tensor, binarization: str, generator: torch.Generator) -> Tensor:
    """Binarize intensities ``x`` in [0, 1] once (``dynamic`` is treated as one fixed draw)."""
    check_binarization(binarization)
    if binarization == "threshold":
        return (x > 0.5).to(x.dtype)
    return torch.bernoulli(x, generator=generator)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on ``(seed, epoch)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


class TensorBatches:
    """An iterable of ``(x, y)`` batches sliced from in-memory tensors.

    ``shuffle`` draws a new order every epoch; ``dynamic`` resamples binary pixels per batch.
    With ``world_size > 1`` each rank takes every ``world_size``-th example of the shared order,
    so DDP ranks see disjoint data (the job of a DistributedSampler for ordinary DataLoaders).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool,
        dynamic: bool,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x = x  # [M, D]
        self.y = y  # [M]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.dynamic = dynamic
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def _num_local(self) -> int:
        return len(range(self.rank, self.x.shape[0], self.world_size))

    def __len__(self) -> int:
        count = self._num_local()
        if self.drop_last:
            return count // self.batch_size
        return -(-count // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.x.device
        generator = epoch_generator(self.seed, self.epoch, device)
        self.epoch += 1
        count = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(count, generator=generator, device=device)  # [M]
        else:
            order = torch.arange(count, device=device)  # [M]
        order = order[self.rank :: self.world_size]
        for batch_index in range(len(self)):
            index = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            x = self.x[index]  # [B, D]
            if self.dynamic:
                x = torch.bernoulli(x, generator=generator)
            yield x, self.y[index]
