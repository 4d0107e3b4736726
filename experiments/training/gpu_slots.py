"""Several sweep jobs per GPU on one machine (``hydra.launcher.jobs_per_gpu=J``).

A small model leaves a GPU mostly idle (catgrad's models are host-bound there), so a sweep runs
faster with several jobs sharing each GPU. :class:`PackingLauncher` is hydra-joblib-launcher
with one more option, ``jobs_per_gpu``:

* ``null`` (default): plain joblib, ``n_jobs`` jobs at a time (for CPU sweeps).
* ``J >= 1``: there are ``S = G x J`` *slots* for the ``G`` visible GPUs (the entries of
  ``CUDA_VISIBLE_DEVICES`` when it is set, else every GPU torch sees), ``n_jobs`` becomes ``S``
  (the configured ``n_jobs`` is ignored), and every job runs in a worker process that holds one
  slot ``k``: ``CUDA_VISIBLE_DEVICES`` is that slot's GPU (GPU ``k mod G``, so consecutive slots
  spread over the GPUs) and the job gets one CPU thread (``OMP_NUM_THREADS=1`` and
  ``torch.set_num_threads(1)``). Both are set when the job starts, before anything in the worker
  initialises CUDA; the job's log records ``gpu slot k/S: CUDA_VISIBLE_DEVICES=...``.

Slots are files ``<sweep dir>/.gpu_slots/slot_<k>.lock`` locked with ``fcntl.flock``. A worker
process takes a free slot at its first job and keeps it for its lifetime, since CUDA, once
initialised in a process, stays bound to the GPU it saw; the operating system releases the lock
when the process exits, also when it crashes or is killed, so a replacement worker finds the slot
free. A worker that finds every slot taken (an old worker still exiting) waits for one.

Invalid values (``jobs_per_gpu`` not a positive integer, or set while no GPU is visible) stop the
sweep before any job starts with one ``error:`` line naming the key, the value and the fix
(exit code 2).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SLOT_FOLDER = ".gpu_slots"


def check_jobs_per_gpu(value: Any) -> int | None:
    """``hydra.launcher.jobs_per_gpu`` as an int (None: off); anything but null or an integer
    >= 1 is a one-line ``ValueError`` naming the key, the value and the fix."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(
        f"hydra.launcher.jobs_per_gpu={value} is invalid: use an integer >= 1 (jobs sharing each "
        "GPU), or null to run hydra.launcher.n_jobs jobs without GPU slots"
    )


def visible_gpus(environ: dict[str, str] | None = None,
                 count: Callable[[], int] | None = None) -> list[str]:
    """The GPUs jobs may use, as ``CUDA_VISIBLE_DEVICES`` entries: the comma-separated entries of
    ``CUDA_VISIBLE_DEVICES`` when it is set (indices or UUIDs, kept as given; an entry ``-1``
    or an empty value means none), else ``0 .. count() - 1`` (default count: torch's
    ``torch.cuda.device_count()``)."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        entries = [entry.strip() for entry in listed.split(",")]
        if "-1" in entries:  # CUDA ignores the entries from the first invalid one on
            entries = entries[: entries.index("-1")]
        return [entry for entry in entries if entry]
    if count is None:
        import torch

        count = torch.cuda.device_count
    return [str(index) for index in range(count())]


def slot_gpu(slot: int, gpus: Sequence[str]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value of slot ``slot``: GPU ``slot mod len(gpus)``."""
    return gpus[slot % len(gpus)]


class SlotTaken(TimeoutError):
    """No slot became free within the wait."""


@dataclass
class HeldSlot:
    """A slot this process holds: its index and the open, locked slot file."""

    index: int
    handle: TextIO


def try_slot(folder: Path, index: int) -> HeldSlot | None:
    """Lock slot ``index`` in ``folder`` without waiting; None when another process holds it."""
    handle = open(folder / f"slot_{index}.lock", "a+")  # noqa: SIM115 (held until release)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # for a person looking at the folder; the lock is the truth
    handle.flush()
    return HeldSlot(index, handle)


def acquire_slot(folder: Path, slots: int, wait_s: float = 600.0, poll_s: float = 0.2
                 ) -> HeldSlot:
    """Take the lowest free slot of ``slots`` in ``folder`` (created if missing), waiting up to
    ``wait_s`` seconds for one to be released; :class:`SlotTaken` after that. The slot is this
    process's until :func:`release_slot` or the process's exit (crash included)."""
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for index in range(slots):
            held = try_slot(folder, index)
            if held is not None:
                return held
        if time.monotonic() >= deadline:
            raise SlotTaken(f"all {slots} GPU slots in {folder} stayed taken for {wait_s:.0f} s")
        time.sleep(poll_s)


def release_slot(held: HeldSlot) -> None:
    """Unlock and close a held slot."""
    fcntl.flock(held.handle, fcntl.LOCK_UN)
    held.handle.close()


_process_slot: HeldSlot | None = None  # the slot this worker process holds for its lifetime


@dataclass
class SlotJob:
    """The task function of one packed job: takes (or reuses) this process's slot, points the job
    at that slot's GPU with one CPU thread, then runs ``task_function``. Pickled to the joblib
    workers."""

    task_function: TaskFunction
    folder: str
    gpus: list[str]
    jobs_per_gpu: int

    def __call__(self, cfg: DictConfig) -> Any:
        global _process_slot
        slots = len(self.gpus) * self.jobs_per_gpu
        if _process_slot is None:
            _process_slot = acquire_slot(Path(self.folder), slots)
        gpu = slot_gpu(_process_slot.index, self.gpus)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # read when CUDA initialises, later in the job
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
        log.info("gpu slot %d/%d: CUDA_VISIBLE_DEVICES=%s, 1 CPU thread (pid %d)",
                 _process_slot.index, slots, gpu, os.getpid())
        return self.task_function(cfg)


class PackingLauncher(JoblibLauncher):
    """hydra-joblib-launcher plus ``jobs_per_gpu`` (module docstring): ``conf/hydra/launcher/
    local.yaml``. Options are validated here, before any job starts."""

    def __init__(self, jobs_per_gpu: Any = None, **joblib_options: Any) -> None:
        super().__init__(**joblib_options)
        try:
            self.jobs_per_gpu = check_jobs_per_gpu(jobs_per_gpu)
            self.gpus = visible_gpus() if self.jobs_per_gpu is not None else []
            if self.jobs_per_gpu is not None and not self.gpus:
                listed = os.environ.get("CUDA_VISIBLE_DEVICES")
                reason = ("torch sees no GPU" if listed is None
                          else f"CUDA_VISIBLE_DEVICES={listed!r} lists none")
                raise ValueError(
                    f"hydra.launcher.jobs_per_gpu={jobs_per_gpu} needs a visible GPU ({reason}): "
                    "remove it for a CPU sweep (hydra.launcher.n_jobs sets its parallelism) or "
                    "run where a GPU is visible"
                )
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        if self.jobs_per_gpu is not None:
            self.joblib["n_jobs"] = len(self.gpus) * self.jobs_per_gpu

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        if self.jobs_per_gpu is not None:
            folder = Path(str(config.hydra.sweep.dir)).absolute() / SLOT_FOLDER
            task_function = SlotJob(task_function, str(folder), self.gpus, self.jobs_per_gpu)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:
        if self.jobs_per_gpu is not None:
            log.info("%d GPU(s) x %d jobs per GPU = %d jobs at a time (CUDA_VISIBLE_DEVICES "
                     "per slot: %s)", len(self.gpus), self.jobs_per_gpu, self.joblib["n_jobs"],
                     ", ".join(self.gpus))
        return super().launch(job_overrides, initial_job_idx)
