"""Checks of a multirun as a whole, in the launching process before any job starts.

:class:`ReplicaSeedCheck`: with ``replicas=R`` a job of seed ``s`` trains seeds ``s, ..., s+R-1``
(:mod:`experiments.training.replicas`), so a sweep over seeds closer than R apart trains some
seeds twice under one label, and the report would count them as separate seeds. Such a sweep
stops with one ``error:`` line naming both keys and the fix (exit code 2).
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.training.errors import stop


def swept_values(config: DictConfig, key: str) -> list[str]:
    """The values of top-level ``key`` over the multirun's jobs: its command-line override (a sweep
    like ``seed=0,1`` or ``range(0,10,5)``, or one value), else the sweeper's ``params`` entry,
    else the config's own value; ``[]`` when none is set."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    task = list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
    given = [f"{name}={value}" for name, value in params.items() if name == key]
    given += [str(text) for text in task if str(text).split("=", 1)[0] == key]
    if not given:
        value = config.get(key)
        return [] if value is None else [str(value)]
    override = OverridesParser.create().parse_overrides([given[-1]])[0]  # the command line wins
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [str(override.value())]


def overlapping_replica_seeds(seeds: list[int], replicas: list[int]) -> str | None:
    """Why a sweep of ``seeds`` with ``replicas`` counts trains a seed twice (one line), or None."""
    distinct = sorted(set(seeds))
    for count in sorted(set(replicas), reverse=True):
        for low, high in zip(distinct, distinct[1:], strict=False):
            if high - low < count:
                listed = ",".join(str(seed) for seed in distinct)
                return (f"seed={listed} with replicas={count}: the job of seed {low} trains seeds "
                        f"{low}..{low + count - 1}, which include seed {high}; sweep seeds at "
                        f"least {count} apart (e.g. seed={low},{low + count}) or run one seed "
                        f"with replicas={count * len(distinct)}")
    return None


def integers(values: list[str]) -> list[int] | None:
    """``values`` as integers, or None when one is not (the job's own checks report it)."""
    try:
        return [int(value) for value in values]
    except ValueError:
        return None


class ReplicaSeedCheck(Callback):
    """Stops a multirun whose seeds overlap through ``replicas`` (module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        seeds = integers(swept_values(config, "seed"))
        replicas = integers(swept_values(config, "replicas"))
        if not seeds or not replicas:
            return
        problem = overlapping_replica_seeds(seeds, replicas)
        if problem is not None:
            stop(problem)
