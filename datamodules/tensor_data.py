"""Datasets held as tensors and served as index-sliced batches (no per-sample Python work).

Every catgrad datamodule keeps its images as one float tensor ``[num_examples, D]`` with values in
[0, 1] on the training device; a batch is ``x[index]``. Binarization (the papers model binary
pixels with a Bernoulli likelihood) is one of

* ``dynamic``: a fresh Bernoulli sample of each training batch (Salakhutdinov & Murray 2008's
  "dynamic binarization"); validation and test sets are binarized once from the seed so that
  evaluation is deterministic.
* ``fixed``: every split sampled once from the seed (the "fixed binarization" of Jang et al. 2017).
* ``threshold``: ``x > 0.5``.
* ``none``: the grey levels themselves as Bernoulli targets (a "continuous Bernoulli" without its
  normalizer, as Pyro's SS-VAE tutorial does); the bound is then not a likelihood of binary data
  and is not comparable with the binarized papers' numbers.

Batches are ``(x [B, D] float, y [B] long)``; ``y`` is ``-1`` where a dataset has no labels.

The data stream is a pure function of the seed and the position in it: the order of epoch ``e``
comes from a generator seeded with ``(seed, e)`` and the binarization noise of batch ``i`` of that
epoch from one seeded with ``(seed, e, i)``. A training loader given ``position`` (the number of
batches already consumed, i.e. the trainer's global step) starts where that position points, so a
run resumed from a mid-epoch checkpoint sees exactly the batches the uninterrupted run would have.
A stream restarted right after a complete pass continues with the next epoch instead (the
labelled stream of M2, which a ``CombinedLoader`` cycles within the unlabelled epoch: batch ``g``
of that stream is still the one of global step ``g``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

BINARIZATIONS = ("dynamic", "fixed", "threshold", "none")


def check_binarization(binarization: str) -> None:
    if binarization not in BINARIZATIONS:
        raise ValueError(
            f"datamodule.binarization={binarization!r} is unknown: choose one of "
            f"{', '.join(BINARIZATIONS)}"
        )


def binarize(x: Tensor, binarization: str, generator: torch.Generator) -> Tensor:
    """Binarize intensities ``x`` in [0, 1] once (``dynamic`` is treated as one fixed draw)."""
    check_binarization(binarization)
    if binarization == "none":
        return x
    if binarization == "threshold":
        return (x > 0.5).to(x.dtype)
    return torch.bernoulli(x, generator=generator)


def seeded_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator whose stream depends only on the integers ``keys`` (e.g. seed, epoch, batch)."""
    state = 0
    for key in keys:
        state = (state * 1_000_003 + key) % (2**63 - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(state)
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
        position: Callable[[], int] | None = None,
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
        self.position = position
        self.epoch = 0
        self._ran_to_end = False

    def _num_local(self) -> int:
        return len(range(self.rank, self.x.shape[0], self.world_size))

    def __len__(self) -> int:
        count = self._num_local()
        if self.drop_last:
            return count // self.batch_size
        return -(-count // self.batch_size)

    # Lightning saves and restores the state of "stateful" loaders in checkpoints. The position in
    # this stream is derived from the trainer's global step instead, so there is nothing to store;
    # being stateful tells Lightning that mid-epoch resumption is exact.
    def state_dict(self) -> dict[str, Any]:
        return {"position": "global_step"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        first_batch = 0
        if self.position is not None and not self._ran_to_end:
            self.epoch, first_batch = divmod(self.position(), len(self))
        # After a complete pass the next one starts the next epoch: a shorter stream that a
        # CombinedLoader restarts mid-epoch continues its own count (the global step may be
        # ahead there, by the batches Lightning prefetched).
        self._ran_to_end = False
        epoch = self.epoch
        self.epoch += 1
        device = self.x.device
        count = self.x.shape[0]
        if self.shuffle:
            generator = seeded_generator(device, self.seed, epoch)
            order = torch.randperm(count, generator=generator, device=device)  # [M]
        else:
            order = torch.arange(count, device=device)  # [M]
        order = order[self.rank :: self.world_size]
        for batch_index in range(first_batch, len(self)):
            index = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            x = self.x[index]  # [B, D]
            if self.dynamic:
                noise = seeded_generator(device, self.seed, epoch, batch_index)
                # Bernoulli(x) as u < x: on CPU 4x cheaper than torch.bernoulli (0.21 vs 0.88 ms
                # per MNIST batch on one core); x becomes 0/1 floats in place of the uniforms.
                x = torch.rand(x.shape, generator=noise, device=device, dtype=x.dtype).lt_(x)
            yield x, self.y[index]
        self._ran_to_end = True


class BatchGroup(list):  # type: ignore[type-arg]
    """Up to K consecutive training batches, trained on by one Lightning ``training_step``."""


class BatchGroups:
    """The training batches of ``loader`` in groups of ``steps_per_batch`` consecutive batches
    (``steps_per_batch=K``: one Lightning batch carries K optimizer steps).

    Groups are cut from each epoch's start, so the last group of an epoch may be shorter; batch
    ``i`` of the stream is the same batch (examples and binarization noise) as without grouping.
    ``loader`` is a ``TensorBatches`` or a ``CombinedLoader`` of them (M2's two streams); its
    epochs hold ``batches_per_epoch`` batches. The position in the stream stays the trainer's
    global step (now counting optimizer steps), so a run resumed between groups continues exactly.
    """

    def __init__(self, loader: Any, steps_per_batch: int, batches_per_epoch: int) -> None:
        self.loader = loader
        self.steps_per_batch = steps_per_batch
        self.batches_per_epoch = batches_per_epoch

    def __len__(self) -> int:
        return -(-self.batches_per_epoch // self.steps_per_batch)

    def state_dict(self) -> dict[str, Any]:  # stateful for Lightning: see TensorBatches
        return {"position": "global_step"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __iter__(self) -> Iterator[BatchGroup]:
        from lightning.pytorch.utilities import CombinedLoader

        combined = isinstance(self.loader, CombinedLoader)
        group = BatchGroup()
        for item in self.loader:
            group.append(item[0] if combined else item)  # CombinedLoader yields (batch, i, j)
            if len(group) == self.steps_per_batch:
                yield group
                group = BatchGroup()
        if group:
            yield group
