"""scikit-learn's embedded 8x8 handwritten digits (1,797 images): no download, runs in seconds."""

from __future__ import annotations

import torch

from datamodules.base import BinaryImageDataModule, Splits, split_train_val


class DigitsDataModule(BinaryImageDataModule):
    """Seeded split into ``test_size`` test, ``val_size`` validation and the rest training."""

    def __init__(self, val_size: int = 180, test_size: int = 360, **kwargs: object) -> None:
        kwargs.setdefault("image_shape", (8, 8))
        kwargs.setdefault("num_labels", 10)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.val_size = val_size
        self.test_size = test_size

    def load_splits(self) -> Splits:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64] in [0, 1]
        y = torch.as_tensor(digits.target, dtype=torch.long)  # [1797]
        rest, test = split_train_val(x, y, self.test_size, seed=self.seed + 1)
        train, val = split_train_val(*rest, self.val_size, seed=self.seed)
        return Splits(train=train, val=val, test=test)
