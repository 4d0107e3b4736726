"""Checkpoint files that survive crashes, and clear errors for files that are not ours.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same directory,
  flushes it to disk and renames it over the target (``os.replace`` is atomic on POSIX), so a
  crash or a full disk during a write leaves the previous ``last.ckpt`` intact.
* :func:`resolve_resume` turns ``resume=<run dir or .ckpt>`` into a checkpoint path and
  :func:`check_checkpoint` loads it with ``weights_only=True`` and checks it is a Lightning
  checkpoint of the model about to be trained, before any work starts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a one-line reason and fix."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are write-to-temporary-then-rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's 0600 hides it from the team
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def flush_loggers(trainer: L.Trainer) -> None:
    """Write what the loggers buffered (the CSV logger keeps up to 100 steps in memory)."""
    for logger in trainer.loggers:
        logger.save()


def current_umask() -> int:
    """The process's umask (the mode bits new files do not get)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolve_resume(resume: str) -> Path:
    """``resume`` is a run directory (its ``checkpoints/last.ckpt``) or a checkpoint file."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(
            f"resume={resume!r}: no checkpoint at {path}; give a run directory that has "
            f"checkpoints/last.ckpt or the path of a .ckpt file"
        )
    return path


def check_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint at ``path`` (loaded with ``weights_only=True``); raises
    :class:`CheckpointError` unless it is a loadable checkpoint of ``model``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable bytes (torch raises many kinds)
        message = str(error).strip()
        reason = message.splitlines()[0][:160] if message else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({reason}): it is corrupt or not a "
            f"catgrad checkpoint; resume from another run or start a new one"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or "loops" not in checkpoint
        or not isinstance(checkpoint.get("global_step"), int)
    ):
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning training checkpoint (no state_dict/loops/"
            f"global_step): resume from a catgrad run's checkpoints/last.ckpt"
        )
    expected = set(model.state_dict())
    found = set(checkpoint["state_dict"])
    if expected != found:
        missing = sorted(expected - found)[:3]
        unexpected = sorted(found - expected)[:3]
        raise CheckpointError(
            f"checkpoint {path} does not match this model (missing {missing}, unexpected "
            f"{unexpected}): resume with the same model and estimator config as the run"
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, tensor in checkpoint["state_dict"].items():
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        if shape != shapes[key]:
            raise CheckpointError(
                f"checkpoint {path}: {key} has shape {shape} but the model has "
                f"{shapes[key]}: resume with the same model config as the run"
            )
    return checkpoint


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` the newest training state.

    A ``Checkpoint`` callback, so Lightning runs it after the other callbacks (and after the
    ``ModelCheckpoint`` listed before it): the state it saves already records the newest best
    checkpoint, never one that ``ModelCheckpoint`` is about to delete.

    Rewritten every ``every_n_train_steps`` optimizer steps (except at an epoch's last batch; with
    several steps per batch, after the batch that reaches or passes the multiple), at
    the end of every training epoch and after every validation (through the trainer, hence
    atomically with :class:`AtomicCheckpointIO`). The best-by-validation checkpoints are a
    separate ``ModelCheckpoint``'s job.

    A checkpoint at global step ``g`` holds everything logged at steps ``< g`` (Lightning logs a
    batch's metrics at the step it started from). The loggers are flushed at each save and again
    before the next batch (when the last batch's row has been handed to them), so those rows are
    on disk; a resumed run drops the rows at steps ``>= g`` (written by the killed process).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 200) -> None:
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ValueError(
                f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps!r} is "
                f"invalid: use an integer >= 1"
            )
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self._saved_at_step = -1
        self._batch_start_step = -1
        self._flush_pending = False

    @property
    def last_model_path(self) -> str:
        return str(self.path) if self.path.exists() else ""

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or self._saved_at_step == trainer.global_step:
            return
        flush_loggers(trainer)
        self._flush_pending = True
        # Full state (optimizer, loops, callbacks) for exact resumption; saying so explicitly also
        # keeps Lightning from logging "`weights_only` was not set" at every save.
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_at_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start_step = trainer.global_step
        if self._flush_pending:  # the row of the batch before the checkpoint is logged by now
            flush_loggers(trainer)
            self._flush_pending = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        # An epoch's last batch is saved by the epoch end (after its validation): saved here, a
        # process killed during that validation would resume past it and never run it.
        # A batch of several optimizer steps (steps_per_batch) saves when it reached or passed a
        # multiple of every_n_train_steps (checkpoints lie between batches).
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        every = self.every_n_train_steps
        if self._batch_start_step // every != trainer.global_step // every and not last_batch:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._saved_at_step = -1  # validation results changed the callback states: resave
            self._save(trainer)
