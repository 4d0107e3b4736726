"""``replicas: R``: one training process trains R replicas of a run (``models.replicas``), and
each replica becomes a job directory of its own for everything downstream.

* :func:`build_replicated` builds replica r exactly as a single run with ``seed + r`` builds its
  estimator and model (seeded, then instantiated), all replicas sharing the datamodule of
  ``seed``; configurations the replicated path does not support yet stop with one line.
* :func:`write_replica_jobs` writes ``replica_<r>/`` under the run directory: ``results.json``
  (``seed: seed + r``, the run's choices, ``replica``/``replicas``), ``csv/metrics.csv`` (the run's
  ``replica_<r>/...`` columns under their single-run names) and ``.hydra/`` (the run's config
  with ``seed: seed + r`` and the data seed it actually used), so that
  ``experiments.report.runs`` reads each replica as one seed.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.training.builder import build
from experiments.training.errors import ConfigurationError, checked

REPLICA_PREFIX = "replica_"


def replica_count(cfg: DictConfig) -> int:
    """``cfg.replicas`` (1 when absent), validated: an integer >= 1."""
    count = cfg.get("replicas", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigurationError(f"replicas={count!r} is invalid: use an integer >= 1")
    return count


def unsupported(cfg: DictConfig, count: int) -> str | None:
    """Why ``cfg`` cannot run with ``replicas=count`` yet (one line), or None."""
    prefix = f"replicas={count} with"
    model = str(cfg.model.get("_target_", ""))
    if not model.endswith((".CategoricalVAE", ".M2")):
        return (f"{prefix} model {model} is not supported yet: use model=vae or m2, or "
                f"replicas=1")
    if cfg.model.get("compile"):
        return f"{prefix} model.compile=true is not supported yet: use model.compile=false"
    trainer = cfg.trainer
    clip = trainer.get("gradient_clip_val")
    if clip is not None and trainer.get("gradient_clip_algorithm", "norm") != "value":
        return (f"{prefix} trainer.gradient_clip_val={clip} clips by the norm over all replicas "
                f"(it would mix them): use trainer.gradient_clip_algorithm=value or no clipping")
    devices, strategy = trainer.get("devices", 1), str(trainer.get("strategy", "auto"))
    if devices not in (1, "1") or "ddp" in strategy:
        return f"{prefix} trainer=ddp or several devices is not supported yet: use one device"
    return None


def build_replicated(cfg: DictConfig) -> tuple[Any, Any]:
    """The :class:`~models.replicas.ReplicatedModel` of ``cfg.replicas`` replicas and the
    datamodule of ``cfg.seed``. Replica 0 is what :func:`build` makes; replica r is seeded with
    ``seed + r`` before its estimator and model are instantiated, as :func:`build` does."""
    count = replica_count(cfg)
    problem = unsupported(cfg, count)
    if problem is not None:
        raise ConfigurationError(problem)
    import lightning as L
    from hydra.utils import instantiate

    from models.replicas import ReplicatedModel

    first, datamodule = build(cfg)
    models = [first]
    for replica in range(1, count):
        L.seed_everything(cfg.seed + replica, workers=True, verbose=False)
        estimator = checked("estimator", lambda: instantiate(cfg.estimator, _convert_="all"))
        models.append(checked(
            "model", lambda e=estimator: instantiate(cfg.model, estimator=e, _convert_="all")
        ))
    model = checked("replicas", lambda: ReplicatedModel(models))
    checked("model.optimizer", model.configure_optimizers)
    return model, datamodule


def replica_results(results: dict[str, Any], replica: int, count: int, seed: int
                    ) -> dict[str, Any]:
    """Replica ``replica``'s results: the run's shared entries, its own ``replica_<r>/``
    metrics under their single-run names, its seed, and ``replica``/``replicas``."""
    own = f"{REPLICA_PREFIX}{replica}/"
    shared = {k: v for k, v in results.items() if not k.startswith(REPLICA_PREFIX)}
    metrics = {k[len(own):]: v for k, v in results.items() if k.startswith(own)}
    return {**shared, **metrics, "seed": seed + replica, "replica": replica, "replicas": count}


def split_metrics(source: Path, target: Path, replica: int) -> None:
    """``target`` gets ``source``'s rows with replica ``replica``'s columns under their
    single-run names (``replica_2/train/value`` -> ``train/value``), plus ``step``, ``epoch``
    and the run-wide ``train/samples_per_s``; rows with nothing for the replica are dropped."""
    if not source.is_file():
        return
    own = f"{REPLICA_PREFIX}{replica}/"
    shared = ("step", "epoch", "train/samples_per_s")
    with open(source, newline="") as file:
        reader = csv.DictReader(file)
        columns = [c for c in reader.fieldnames or [] if c in shared or c.startswith(own)]
        rows = [
            {column.removeprefix(own): row.get(column, "") for column in columns}
            for row in reader
            if any(row.get(c) for c in columns if c not in ("step", "epoch"))
        ]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[c.removeprefix(own) for c in columns])
        writer.writeheader()
        writer.writerows(rows)


def pin_seeds(node: DictConfig, seed: int) -> None:
    """Every ``seed`` key in ``node`` and below (``datamodule.seed``, ``datamodule.base.seed``)
    set to ``seed``: the data seed every replica used, whatever ``${seed}`` becomes."""
    for key in list(node.keys()):
        if key == "seed":
            node[key] = seed
        elif isinstance(node._get_node(key), DictConfig):
            pin_seeds(node[key], seed)


def write_replica_hydra(source: Path, target: Path, replica: int, seed: int) -> None:
    """Copy the run's ``.hydra/`` with ``seed: seed + replica`` in config and overrides; the data
    seed the replica actually used (the run's) is written out as ``datamodule.seed``."""
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    hydra_file = source / "hydra.yaml"
    if hydra_file.is_file():
        shutil.copyfile(hydra_file, target / "hydra.yaml")
    config = OmegaConf.load(source / "config.yaml")
    assert isinstance(config, DictConfig)
    if isinstance(config.get("datamodule"), DictConfig):
        pin_seeds(config.datamodule, seed)
    config.seed = seed + replica
    OmegaConf.save(config, target / "config.yaml")
    overrides_file = source / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    overrides = [str(o) for o in overrides if not str(o).startswith("seed=")]
    OmegaConf.save(OmegaConf.create([*overrides, f"seed={seed + replica}"]), target /
                   "overrides.yaml")


def write_replica_jobs(output_dir: Path, cfg: DictConfig, results: dict[str, Any],
                       write_results: Any) -> list[Path]:
    """Write every ``replica_<r>/`` job directory of a finished replicated run (module
    docstring); ``write_results(directory, results)`` writes a ``results.json``."""
    count = replica_count(cfg)
    directories = []
    for replica in range(count):
        directory = output_dir / f"{REPLICA_PREFIX}{replica}"
        directory.mkdir(parents=True, exist_ok=True)
        write_replica_hydra(output_dir / ".hydra", directory / ".hydra", replica, cfg.seed)
        split_metrics(output_dir / "csv" / "metrics.csv", directory / "csv" / "metrics.csv",
                      replica)
        write_results(directory, replica_results(results, replica, count, cfg.seed))
        directories.append(directory)
    return directories
