"""One wandb run per replica of a ``replicas=R`` run, in the run's group, written after
training from each replica's job directory (its ``csv/metrics.csv`` rows at their steps, its
``results.json`` as the summary), so wandb compares replicas as it compares separate jobs.

The configured ``logger.wandb`` (project, group, job type, tags, flat ``config`` keys) is
reused; each replica's run lives in ``replica_<r>/wandb/`` (offline unless ``WANDB_MODE`` says
otherwise) and its config is the run's resolved config with ``seed: seed + r`` and ``replica``.
Nothing is done without a wandb logger or with ``WANDB_MODE=disabled``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def metric_rows(metrics_csv: Path) -> list[tuple[int, dict[str, float]]]:
    """``(step, {column: value})`` for every row with a step, empty cells left out."""
    if not metrics_csv.is_file():
        return []
    rows = []
    with open(metrics_csv, newline="") as file:
        for row in csv.DictReader(file):
            if not row.get("step"):
                continue
            values = {k: float(v) for k, v in row.items() if k not in ("step", "epoch") and v}
            rows.append((int(float(row["step"])), values))
    return rows


def publish_replica_runs(cfg: DictConfig, directories: Sequence[Path]) -> None:
    """Log replica r's job directory ``directories[r]`` as its own wandb run (module docstring).
    Call it after the training process's own wandb run has finished."""
    settings = (cfg.get("logger") or {}).get("wandb")
    if settings is None or os.environ.get("WANDB_MODE") == "disabled":
        return
    import wandb

    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    options = OmegaConf.to_container(settings, resolve=True)
    assert isinstance(options, dict)
    for replica, directory in enumerate(directories):
        results: dict[str, Any] = json.loads((directory / "results.json").read_text())
        config = {**resolved, **(options.get("config") or {}), "seed": results["seed"],
                  "replica": replica}
        run = wandb.init(
            project=options.get("project"), group=options.get("group"),
            job_type=options.get("job_type"), tags=[*(options.get("tags") or []), "replica"],
            config=config, dir=str(directory), name=f"{directory.parent.name}/{directory.name}",
            reinit="finish_previous", mode=options.get("mode"),
        )
        for step, values in metric_rows(directory / "csv" / "metrics.csv"):
            run.log(values, step=step)
        run.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float))})
        run.finish()
