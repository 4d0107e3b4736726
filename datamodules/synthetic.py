"""A tiny generated dataset for tests: noisy copies of random binary prototypes, one per label."""

from __future__ import annotations

import torch

from datamodules.base import BinaryImageDataModule, Splits
from estimators.validation import require_int


class SyntheticDataModule(BinaryImageDataModule):
    """``num_examples`` images per split near ``num_labels`` random prototypes.

    Pixel intensities are ``0.1`` or ``0.9`` around each prototype's bits, so the data has real
    structure (a model can learn it) and binarization matters. Fully determined by ``seed``.
    """

    def __init__(self, num_examples: int = 256, **kwargs: object) -> None:
        kwargs.setdefault("image_shape", (8, 8))
        kwargs.setdefault("num_labels", 4)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.num_examples = require_int("datamodule.num_examples", num_examples)

    def load_splits(self) -> Splits:
        generator = torch.Generator().manual_seed(self.seed)
        prototypes = torch.bernoulli(
            torch.full((self.num_labels, self.input_dim), 0.5), generator=generator
        )  # [L, D]

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.randint(self.num_labels, (self.num_examples,), generator=generator)
            return 0.1 + 0.8 * prototypes[labels], labels  # [M, D], [M]

        return Splits(train=draw(), val=draw(), test=draw())
