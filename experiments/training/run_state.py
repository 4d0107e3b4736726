"""What a job does in its run directory: start, resume or skip (README "Resuming and failures").

A run directory keeps, besides what the job writes for readers, catgrad's own records in
``.catgrad/``:

* ``config.yaml``: the job's config as first started (interpolations unresolved), and
  ``hydra/``: a copy of that start's ``.hydra/*.yaml``. Hydra rewrites ``.hydra/`` at every
  start; later segments (a resume, a skipped rerun, a refused one) restore it from this copy, so
  the job's identity (variant, seed, setting) is always the original one.
* ``segments.jsonl``: one line per start (``start``, ``resume`` or ``skip``) with host, pid,
  SLURM job id, the step it started from and the overrides it was given.
* ``lock`` (:mod:`experiments.training.run_lock`).

:func:`plan_job` decides from the directory alone: a finished job (``results.json``) is skipped
unless ``force=true``; an interrupted one resumes from its newest checkpoint
(``checkpoints/last.ckpt`` or a SLURM time-limit ``hpc_ckpt_<n>.ckpt``); otherwise the job
starts (and its config becomes the directory's). Resuming or skipping requires the config to
match the original (keys that do not change what is computed, :data:`IGNORED_KEYS`, may differ);
a mismatch is a one-line error naming the keys.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.training.errors import ConfigurationError

STATE_DIR = ".catgrad"
ORIGINAL_CONFIG = Path(STATE_DIR) / "config.yaml"
ORIGINAL_HYDRA = Path(STATE_DIR) / "hydra"
SEGMENTS = Path(STATE_DIR) / "segments.jsonl"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Keys that say how to run a job, not what it computes.
IGNORED_KEYS = ("resume", "force", "lock_wait_s", "jobs_per_gpu")
# Keys added to conf/config.yaml after run directories were first written, with the value that
# means what a job without the key did: such a job resumes under the new default.
ADDED_KEYS: dict[str, Any] = {"replicas": 1, "steps_per_batch": 1}
# What force=true moves aside before starting over (nothing is deleted).
JOB_OUTPUTS = ("results.json", "checkpoints", "csv", "probe.jsonl", "reconstructions.png",
               "prior_samples.png", "wandb", STATE_DIR, "hpc_ckpt_*.ckpt")


@dataclass(frozen=True)
class Plan:
    """``action`` is ``start``, ``resume`` (from ``checkpoint``) or ``skip`` (``results``)."""

    action: str
    checkpoint: Path | None = None
    results: dict[str, Any] | None = None


def task_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's own config (no ``hydra`` node), interpolations unresolved."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items() if k != "hydra"}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differing_keys(original: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key=<original> (now <current>)`` for every key whose value differs, sorted (a key of
    :data:`ADDED_KEYS` missing from either side has its old-behaviour value)."""
    before = {**ADDED_KEYS, **flatten(original)}
    after = {**ADDED_KEYS, **flatten(current)}
    missing = "<absent>"
    return [
        f"{key}={before.get(key, missing)} (now {after.get(key, missing)})"
        for key in sorted(set(before) | set(after))
        if key.split(".")[0] not in IGNORED_KEYS and before.get(key, missing) != after.get(key,
                                                                                          missing)
    ]


def check_same_config(directory: Path, cfg: DictConfig, what: str) -> None:
    """Raise a one-line :class:`ConfigurationError` unless ``cfg`` matches the original config."""
    path = directory / ORIGINAL_CONFIG
    if not path.is_file():
        return  # a run directory of an older catgrad: only the checkpoint check applies
    original: Any = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    differences = differing_keys(original if isinstance(original, dict) else {},
                                 task_config(cfg))
    if differences:
        shown = "; ".join(differences[:3])
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise ConfigurationError(
            f"{directory} holds {what} with another config ({shown}{more}): rerun with its "
            f"original overrides, choose another hydra.run.dir/hydra.sweep.dir, or force=true to "
            f"start it over"
        )


def read_results(directory: Path) -> dict[str, Any] | None:
    try:
        results = json.loads((directory / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def newest_checkpoint(directory: Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and the ``hpc_ckpt_<n>.ckpt`` that Lightning saves
    on SLURM's time-limit signal (SIGUSR1) before requeueing; None when there is none."""
    candidates = [directory / LAST_CHECKPOINT, *directory.glob("hpc_ckpt_*.ckpt")]
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime_ns) if existing else None


def plan_job(directory: Path, cfg: DictConfig) -> Plan:
    """Start, resume or skip, from what ``directory`` holds (``resume=`` and ``force`` aside,
    which :func:`experiments.training.job.run` handles first)."""
    results = read_results(directory)
    if results is not None and results.get("status") in ("completed", "failed"):
        check_same_config(directory, cfg, f"a {results['status']} job")
        return Plan("skip", results=results)
    checkpoint = newest_checkpoint(directory)
    if checkpoint is not None:
        check_same_config(directory, cfg, "an interrupted job")
        return Plan("resume", checkpoint=checkpoint)
    return Plan("start")  # nothing to continue (a job killed before its first checkpoint restarts)


def move_aside(directory: Path) -> Path | None:
    """``force=true``: move a previous job's outputs to ``.replaced/<time>/`` (kept, not
    deleted); None when there was nothing."""
    present = [path for name in JOB_OUTPUTS for path in sorted(directory.glob(name))]
    present = [p for p in present if p.name != STATE_DIR
               or any(i.name not in ("lock", "wandb_id") for i in p.iterdir())]
    if not present:
        return None
    target = directory / ".replaced" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for path in present:
        if path.name == STATE_DIR:  # the live lock and the new wandb id stay
            (target / STATE_DIR).mkdir(exist_ok=True)
            for item in path.iterdir():
                if item.name not in ("lock", "wandb_id") and not item.name.startswith("."):
                    shutil.move(str(item), target / STATE_DIR / item.name)
        else:
            shutil.move(str(path), target / path.name)
    return target


def record_original(directory: Path, cfg: DictConfig) -> None:
    """First start: keep the config and ``.hydra/`` that define the job's identity."""
    (directory / STATE_DIR).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(task_config(cfg)), directory / ORIGINAL_CONFIG)
    hydra_dir = directory / ".hydra"
    if hydra_dir.is_dir():
        shutil.copytree(hydra_dir, directory / ORIGINAL_HYDRA, dirs_exist_ok=True)


def restore_hydra(directory: Path) -> None:
    """Put back the original ``.hydra/*.yaml`` that Hydra overwrote at this start."""
    original = directory / ORIGINAL_HYDRA
    if original.is_dir():
        shutil.copytree(original, directory / ".hydra", dirs_exist_ok=True)


def original_choices(directory: Path) -> dict[str, str] | None:
    """The config-group choices of the job's first start, None if not recorded."""
    path = directory / ORIGINAL_HYDRA / "hydra.yaml"
    if not path.is_file():
        return None
    choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices") or {}
    return {str(k): str(v) for k, v in choices.items()
            if v is not None and not str(k).startswith("hydra")}


def append_segment(directory: Path, action: str, step: int, overrides: list[str]) -> int:
    """Record this start in ``segments.jsonl``; returns how many resumes the job has had."""
    import torch

    record = {
        "action": action,
        "step": step,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "overrides": overrides,
    }
    path = directory / SEGMENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream:
        stream.write(json.dumps(record) + "\n")
    return count_resumes(directory)


def count_resumes(directory: Path) -> int:
    """How many times the job in ``directory`` was resumed (``resume`` segments)."""
    try:
        lines = (directory / SEGMENTS).read_text().splitlines()
    except OSError:
        return 0
    return sum('"action": "resume"' in line for line in lines)


def thread_count_change(directory: Path) -> str | None:
    """A warning when this job's segments ran with different CPU thread counts, else None.

    CPU kernels split their sums by thread count, so a resume is bitwise equal to an
    uninterrupted run only with the first start's count (on a cluster: the same
    ``cpus_per_task`` and ``OMP_NUM_THREADS``); otherwise the runs agree to float rounding."""
    try:
        lines = (directory / SEGMENTS).read_text().splitlines()
    except OSError:
        return None
    counts = [json.loads(line).get("threads") for line in lines if line.strip()]
    trained = [count for count in counts if count is not None]
    if len(trained) < 2 or trained[-1] == trained[0]:
        return None
    return (f"warning: this segment trains with {trained[-1]} CPU threads, the job's first start "
            f"with {trained[0]}: results agree with an uninterrupted run to float rounding, not "
            f"bit for bit (set OMP_NUM_THREADS={trained[0]} for exact resumes)")
