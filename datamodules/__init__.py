"""Datamodules: datasets as tensors, binarized, served as index-sliced batches."""

from datamodules.base import BinaryImageDataModule, Splits
from datamodules.digits import DigitsDataModule
from datamodules.mnist import DataNotFoundError, MNISTDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = [
    "BinaryImageDataModule",
    "DataNotFoundError",
    "DigitsDataModule",
    "MNISTDataModule",
    "Splits",
    "SyntheticDataModule",
]

from datamodules.semi_supervised import SemiSupervisedDataModule  # noqa: E402

__all__ += ["SemiSupervisedDataModule"]
