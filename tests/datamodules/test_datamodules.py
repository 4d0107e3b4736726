"""Datamodules: splits, binarization, batching, reproducibility.

Also clear errors for missing data.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from datamodules import DataNotFoundError, DigitsDataModule, MNISTDataModule, SyntheticDataModule


def first_batches(datamodule, epochs: int = 1) -> list[torch.Tensor]:
    loader = datamodule.train_dataloader()
    return [next(iter(loader))[0] for _ in range(epochs)]


def test_digits_splits_and_shapes() -> None:
    datamodule = DigitsDataModule(seed=0)
    datamodule.setup()
    splits = datamodule.splits
    sizes = [getattr(splits, name)[0].shape[0] for name in ("train", "val", "test")]
    assert sizes == [1797 - 360 - 180, 180, 360]
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (100, 64) and y.shape == (100,) and y.dtype == torch.long
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert len(datamodule.train_dataloader()) == -(-1257 // 100)


def test_dynamic_binarization_resamples_each_epoch_and_is_seeded() -> None:
    a = DigitsDataModule(seed=3)
    b = DigitsDataModule(seed=3)
    first_a, second_a = first_batches(a, epochs=2)
    (first_b,) = first_batches(b)
    assert torch.equal(first_a, first_b)  # same seed, same stream
    assert not torch.equal(first_a, second_a)  # new order and new noise per epoch


def test_fixed_and_threshold_binarization_are_constant() -> None:
    for mode in ("fixed", "threshold"):
        datamodule = DigitsDataModule(seed=0, binarization=mode)
        datamodule.setup()
        x = datamodule.splits.train[0]
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        loader = datamodule.train_dataloader()
        loader.shuffle = False
        assert torch.equal(next(iter(loader))[0], next(iter(loader))[0])


def test_no_binarization_keeps_grey_levels() -> None:
    datamodule = DigitsDataModule(seed=0, binarization="none")
    datamodule.setup()
    x = datamodule.splits.train[0]
    grey = ((x > 0) & (x < 1)).float().mean().item()
    assert grey > 0.1, f"only {grey:.3f} of the pixels are grey: the images were binarized"
    loader = datamodule.train_dataloader()
    loader.shuffle = False
    assert torch.equal(next(iter(loader))[0], next(iter(loader))[0])  # no noise per batch


def test_unknown_binarization_rejected() -> None:
    with pytest.raises(ValueError, match="binarization='soft'.*dynamic, fixed, threshold, none"):
        DigitsDataModule(binarization="soft")


def test_ranks_see_disjoint_examples() -> None:
    datamodule = SyntheticDataModule(num_examples=64, batch_size=8, binarization="threshold")
    datamodule.setup()
    from datamodules.tensor_data import TensorBatches

    x = torch.arange(64).float().unsqueeze(1)
    y = torch.arange(64)
    seen = []
    for rank in range(2):
        loader = TensorBatches(x, y, 8, shuffle=True, dynamic=False, seed=0, rank=rank,
                               world_size=2)
        seen.append(torch.cat([labels for _, labels in loader]))
    assert len(seen[0]) == len(seen[1]) == 32
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_mnist_missing_offline_is_one_clear_line(tmp_path: Path) -> None:
    datamodule = MNISTDataModule(data_dir=str(tmp_path), download=False)
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError) as error:
        datamodule.setup()
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "CATGRAD_DATA_DIR" in message


def test_mnist_failed_download_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    datamodule = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataNotFoundError, match="download failed: OSError"):
        datamodule.setup()


@pytest.mark.skipif(
    not os.environ.get("CATGRAD_DATA_DIR"), reason="real MNIST only where CATGRAD_DATA_DIR is set"
)
def test_real_mnist_loads() -> None:
    datamodule = MNISTDataModule(data_dir=os.environ["CATGRAD_DATA_DIR"], download=False)
    datamodule.setup()
    assert datamodule.splits.train[0].shape == (50_000, 784)
    assert datamodule.splits.test[0].shape == (10_000, 784)
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (100, 784) and 0 <= y.min() <= y.max() <= 9
