"""Several sweep jobs per GPU on one machine (``jobs_per_gpu=J hydra/launcher=local -m``).

A small model leaves a GPU mostly idle (catgrad's models are host-bound there), so a sweep runs
faster with several jobs sharing each GPU. ``jobs_per_gpu`` is a top-level key of
``conf/config.yaml``:

* ``null`` (default): the local launcher runs ``hydra.launcher.n_jobs`` jobs at a time (for CPU
  sweeps).
* ``J >= 1``: there are ``S = G x J`` *slots* for the ``G`` visible GPUs (the entries of
  ``CUDA_VISIBLE_DEVICES`` when it is set, else every GPU torch sees). The stock joblib launcher
  runs ``S`` jobs at a time: ``conf/hydra/launcher/local.yaml`` sets
  ``n_jobs: ${catgrad_n_jobs:${jobs_per_gpu},2}`` (the resolver :func:`n_jobs`, registered when
  this module is imported, as ``experiments.train`` does). Every job starts with
  :func:`take_gpu_slot`, before anything in its worker process initialises CUDA: the worker
  holds one slot ``k``, its ``CUDA_VISIBLE_DEVICES`` becomes that slot's GPU (GPU ``k mod G``,
  so consecutive slots spread over the GPUs) and the job gets one CPU thread
  (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``); the job's log records
  ``gpu slot k/S: CUDA_VISIBLE_DEVICES=...``.

Slots are files ``<sweep dir>/.gpu_slots/slot_<k>.lock`` locked with ``fcntl.flock``. A worker
process takes a free slot at its first job and keeps it for its lifetime, since CUDA, once
initialised in a process, stays bound to the GPU it saw; the operating system releases the lock
when the process exits, also when it crashes or is killed, so a replacement worker finds the slot
free. A worker that finds every slot taken (an old worker still exiting) waits for one.

Mistakes stop the run before any job starts with one ``error:`` line naming the key, the value
and the fix (exit code 2): a value that is not null or an integer >= 1, no visible GPU,
``jobs_per_gpu`` in a single run or with another launcher than ``local`` (SLURM shares GPUs with
``hydra.launcher.gres=shard:1``). The checks run on the command line
(``experiments.train.check_jobs_per_gpu_argument``) and, for values from config files too, in the
Hydra callback :class:`GpuSlotCheck` (``hydra.callbacks`` in ``conf/config.yaml``) when the run or
multirun starts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.training.errors import ConfigurationError, stop

log = logging.getLogger(__name__)

SLOT_FOLDER = ".gpu_slots"
LAUNCHER = "local"  # the hydra/launcher option whose jobs share GPUs
SLURM_FIX = ("with hydra/launcher=slurm give each job a share of a GPU with "
             "hydra.launcher.gres=shard:1 (docs/cluster.md)")


def check_jobs_per_gpu(value: Any, shown: str | None = None) -> int | None:
    """``jobs_per_gpu`` as an int (None: off); anything but null or an integer >= 1 is a
    one-line ``ValueError`` naming the key, the value (``shown``, default ``str(value)``) and the
    fix."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(
        f"jobs_per_gpu={value if shown is None else shown} is invalid: use an integer >= 1 (jobs "
        "sharing each GPU), or null to run hydra.launcher.n_jobs jobs without GPU slots"
    )


def launcher_problem(jobs_per_gpu: Any, multirun: bool, launcher: str | None) -> str | None:
    """One-line problem of a set ``jobs_per_gpu`` outside a multirun with ``hydra/launcher=local``
    (``launcher``: the selected option; None when unknown, which is not checked), else None."""
    if jobs_per_gpu is None:
        return None
    if not multirun:
        return (f"jobs_per_gpu={jobs_per_gpu} shares GPUs among the jobs of a multirun: add -m "
                f"hydra/launcher={LAUNCHER}, or remove it for a single run")
    if launcher is not None and launcher != LAUNCHER:
        return (f"jobs_per_gpu={jobs_per_gpu} needs hydra/launcher={LAUNCHER} (this sweep uses "
                f"hydra/launcher={launcher}): add hydra/launcher={LAUNCHER}, or remove it and "
                f"{SLURM_FIX}")
    return None


def visible_gpus(environ: Mapping[str, str] | None = None,
                 count: Callable[[], int] | None = None) -> list[str]:
    """The GPUs jobs may use, as ``CUDA_VISIBLE_DEVICES`` entries: the comma-separated entries of
    ``CUDA_VISIBLE_DEVICES`` when it is set (indices or UUIDs, kept as given; an entry ``-1``
    or an empty value means none), else ``0 .. count() - 1`` (default count: torch's
    ``torch.cuda.device_count()``)."""
    listed = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
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


def checked_gpus(jobs_per_gpu: int, environ: Mapping[str, str] | None = None) -> list[str]:
    """:func:`visible_gpus`; none is a one-line ``ValueError`` naming the key and the fix."""
    gpus = visible_gpus(environ)
    if not gpus:
        listed = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
        reason = ("torch sees no GPU" if listed is None
                  else f"CUDA_VISIBLE_DEVICES={listed!r} lists none")
        raise ValueError(
            f"jobs_per_gpu={jobs_per_gpu} needs a visible GPU ({reason}): remove it for a CPU "
            "sweep (hydra.launcher.n_jobs sets its parallelism) or run where a GPU is visible"
        )
    return gpus


def n_jobs(jobs_per_gpu: Any, default: Any) -> int:
    """The resolver ``catgrad_n_jobs``: jobs the local launcher runs at a time, ``default`` when
    ``jobs_per_gpu`` is null, else visible GPUs x ``jobs_per_gpu``. A bad value or no visible GPU
    is a ``ValueError`` with the one-line message of :func:`check_jobs_per_gpu` /
    :func:`checked_gpus` (OmegaConf reports it with the key being resolved)."""
    jobs = check_jobs_per_gpu(jobs_per_gpu)
    if jobs is None:
        return int(default)
    return len(checked_gpus(jobs)) * jobs


OmegaConf.register_new_resolver("catgrad_n_jobs", n_jobs, replace=True)


class GpuSlotCheck(Callback):
    """Checks ``jobs_per_gpu`` in the launching process when a run or multirun starts, before any
    job (and before the launcher resolves ``n_jobs``): a problem is one ``error:`` line and exit
    code 2. For a packed multirun it also fixes the GPU list for the workers: an unset
    ``CUDA_VISIBLE_DEVICES`` becomes the GPUs torch sees, so no worker counts GPUs itself (which
    could initialise CUDA before its slot is known)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config, multirun=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        gpus = self.check(config, multirun=True)
        if gpus:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(gpus))
            jobs = int(config.jobs_per_gpu)
            log.info("%d GPU(s) x %d jobs per GPU = %d jobs at a time (CUDA_VISIBLE_DEVICES per "
                     "slot: %s)", len(gpus), jobs, len(gpus) * jobs, ", ".join(gpus))

    def check(self, config: DictConfig, multirun: bool) -> list[str]:
        """The visible GPUs when ``jobs_per_gpu`` is set and valid here ([] when it is null);
        exits with one ``error:`` line otherwise."""
        value = config.get("jobs_per_gpu")
        launcher = OmegaConf.select(config, "hydra.runtime.choices", default={}).get(
            "hydra/launcher")
        try:
            jobs = check_jobs_per_gpu(value)
            if jobs is None:
                return []
            problem = launcher_problem(jobs, multirun, launcher)
            if problem is not None:
                raise ValueError(problem)
            options = config.hydra.launcher
            if multirun and "n_jobs" in options and not OmegaConf.is_interpolation(options,
                                                                                   "n_jobs"):
                raise ValueError(
                    f"hydra.launcher.n_jobs={options.n_jobs} and jobs_per_gpu={jobs} both set the "
                    "jobs at a time: remove hydra.launcher.n_jobs (jobs_per_gpu runs GPUs x "
                    "jobs_per_gpu)")
            return checked_gpus(jobs)
        except ValueError as error:
            stop(str(error))


@dataclass
class WorkerSlot:
    """The slot this worker process holds for its lifetime, its GPU and the number of slots."""

    held: HeldSlot
    gpu: str
    slots: int


_worker_slot: WorkerSlot | None = None


def take_gpu_slot(cfg: DictConfig) -> None:
    """The start of a job (``experiments.train``), before anything touches CUDA: with
    ``jobs_per_gpu`` set, this worker process takes a slot (or keeps the one it holds), points
    the job at that slot's GPU with one CPU thread and logs it. Nothing when ``jobs_per_gpu`` is
    null; a :class:`ConfigurationError` (one line: key, value, fix) outside a multirun with
    ``hydra/launcher=local``, for a bad value or without a visible GPU."""
    global _worker_slot
    value = cfg.get("jobs_per_gpu")
    if value is None:
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    try:
        jobs = check_jobs_per_gpu(value)
        assert jobs is not None
        problem = launcher_problem(jobs, hydra_cfg.mode == RunMode.MULTIRUN,
                                   hydra_cfg.runtime.choices.get("hydra/launcher"))
        if problem is not None:
            raise ValueError(problem)
        if _worker_slot is None:
            gpus = checked_gpus(jobs)
            slots = len(gpus) * jobs
            folder = Path(str(hydra_cfg.sweep.dir)).absolute() / SLOT_FOLDER
            held = acquire_slot(folder, slots)
            _worker_slot = WorkerSlot(held, slot_gpu(held.index, gpus), slots)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    os.environ["CUDA_VISIBLE_DEVICES"] = _worker_slot.gpu  # read when CUDA initialises
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    log.info("gpu slot %d/%d: CUDA_VISIBLE_DEVICES=%s, 1 CPU thread (pid %d)",
             _worker_slot.held.index, _worker_slot.slots, _worker_slot.gpu, os.getpid())
