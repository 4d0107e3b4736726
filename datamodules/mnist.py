"""MNIST through torchvision, read once into tensors.

``data_dir`` (config) defaults to the environment variable ``CATGRAD_DATA_DIR`` and holds
``MNIST/raw/*-ubyte`` as torchvision lays it out. When the files are missing and ``download`` is
on, torchvision downloads them; when that fails (offline) the run stops with one line naming the
directory and how to provide the files.
"""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

import torch

from datamodules.base import BinaryImageDataModule, Splits, split_train_val

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataNotFoundError(RuntimeError):
    """The dataset's files are not on disk and could not be downloaded."""


def mnist_files_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / name).exists() or (raw / f"{name}.gz").exists() for name in RAW_FILES)


class MNISTDataModule(BinaryImageDataModule):
    """60,000 training images split into ``60,000 - val_size`` / ``val_size``; 10,000 test."""

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        val_size: int = 10_000,
        download_timeout_s: float = 20.0,
        **kwargs: object,
    ) -> None:
        kwargs.setdefault("image_shape", (28, 28))
        kwargs.setdefault("num_labels", 10)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.val_size = val_size
        self.download_timeout_s = download_timeout_s

    def _missing(self, reason: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"MNIST files not found in {self.data_dir.resolve()}/MNIST/raw ({reason}): put the "
            f"four *-ubyte files there, or point datamodule.data_dir (or CATGRAD_DATA_DIR) at a "
            f"folder that has MNIST/raw, or run once with network access and download=true"
        )

    def prepare_data(self) -> None:
        if mnist_files_present(self.data_dir):
            return
        if not self.download:
            raise self._missing("download=false")
        from torchvision.datasets import MNIST

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(self.download_timeout_s)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
                io.StringIO()
            ):
                MNIST(str(self.data_dir), train=True, download=True)
                MNIST(str(self.data_dir), train=False, download=True)
        except Exception as error:  # any network or file error ends in the same clear message
            raise self._missing(f"download failed: {type(error).__name__}") from None
        finally:
            socket.setdefaulttimeout(previous)

    def load_splits(self) -> Splits:
        self.prepare_data()
        from torchvision.datasets import MNIST

        def read(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
            dataset = MNIST(str(self.data_dir), train=train, download=False)
            x = dataset.data.reshape(len(dataset), -1).float().div_(255.0)  # [M, 784], one copy
            return x, dataset.targets.long()

        train, val = split_train_val(*read(True), self.val_size, seed=self.seed)
        return Splits(train=train, val=val, test=read(False))
