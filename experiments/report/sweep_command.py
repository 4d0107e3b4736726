"""A sweep's own command line, read back from its ``multirun.yaml``: the override lists as typed
and the one command that finishes the sweep (rerun into the same directory: finished jobs are
skipped, interrupted ones resume, missing ones run; README "Resuming and failures")."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def recorded_overrides(master: Any, key: str) -> list[str]:
    """The override list at ``key`` of ``multirun.yaml`` as typed (``${...}`` left unresolved)."""
    node = OmegaConf.select(master, key)
    if node is None:
        return []
    plain = OmegaConf.to_container(node, resolve=False)
    return [str(item) for item in plain] if isinstance(plain, list) else []


def rerun_command(sweep: Path, python: str = "python") -> str | None:
    """The command that finishes ``sweep``: its own multirun command with ``hydra.sweep.dir`` set
    to it (finished jobs are skipped, interrupted ones resume, missing ones run). None when the
    directory has no ``multirun.yaml``."""
    try:
        master = OmegaConf.load(sweep / "multirun.yaml")
    except Exception:  # noqa: BLE001 - missing or broken: no command to offer
        return None
    hydra_overrides = [o for o in recorded_overrides(master, "hydra.overrides.hydra")
                       if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    task = recorded_overrides(master, "hydra.overrides.task")
    arguments = [python, "-m", "experiments.train", "-m", *hydra_overrides, *task,
                 f"hydra.sweep.dir={sweep.resolve()}"]
    return " ".join(shlex.quote(argument) for argument in arguments)
