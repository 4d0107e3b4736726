"""Per-variant statistics over seeds, ranking, and the series the report plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from experiments.report.paired import SeedValues, mean_interval
from experiments.report.runs import Job, Series

# Test metrics in the order they are shown; True: higher is better.
TEST_METRICS: dict[str, bool] = {
    "test/nll_iwae": False,
    "test/neg_elbo": False,
    "test/accuracy": True,
    "test/generative_accuracy": True,  # M2: argmin_y -L~(x, y) (models/m2.py)
}
RANK_PREFERENCE = ("test/accuracy", "test/nll_iwae", "test/neg_elbo")  # M2: accuracy first
TIMING = ("steps_per_s", "wall_time_s")
# Probe fields plotted over training: (field of probe.jsonl, axis label, log scale).
PROBE_METRICS = (
    ("log10_trace_cov", "log10 tr Cov[g]", False),
    ("snr", "SNR = |E g|² / tr Cov[g]", True),
    ("bias_norm", "bias |E g − g*|", True),
)


@dataclass
class Stat:
    """Mean, (sample) standard deviation and the 95 % Student-t confidence interval of the mean
    over the seeds that have the value (``ci`` None below 2 seeds)."""

    mean: float
    std: float
    count: int
    ci: tuple[float, float] | None = None

    def text(self, digits: int = 2) -> str:
        spread = f" ± {self.std:.{digits}f}" if self.count > 1 else ""
        return f"{self.mean:.{digits}f}{spread}"

    def ci_text(self, digits: int = 2) -> str:
        return "–" if self.ci is None else f"[{self.ci[0]:.{digits}f}, {self.ci[1]:.{digits}f}]"


@dataclass
class Summary:
    """One variant of the sweep: its jobs and their statistics."""

    variant: str
    jobs: list[Job]
    stats: dict[str, Stat] = field(default_factory=dict)
    rank: int | None = None

    @property
    def ok(self) -> list[Job]:
        return [job for job in self.jobs if job.status == "ok"]

    @property
    def failed(self) -> list[Job]:
        return [job for job in self.jobs if job.status != "ok"]


def stat(values: Sequence[float]) -> Stat | None:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return Stat(statistics.fmean(finite), std, len(finite), mean_interval(finite))


def examples_per_step(job: Job) -> float | None:
    """Training examples per step from the job's config (labelled + unlabelled for M2)."""
    if job.config is None:
        return None
    total = 0.0
    for key in ("datamodule.batch_size", "datamodule.base.batch_size",
                "datamodule.labelled_batch_size"):
        try:
            value = OmegaConf.select(job.config, key, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - an interpolation that cannot resolve offline
            value = None
        if isinstance(value, (int, float)):
            total += float(value)
    return total or None


def steps_per_second(job: Job) -> float | None:
    """Training steps/s: median of ``train/samples_per_s`` over examples per step; without
    them, global steps over the whole run's wall time (which includes validation and test)."""
    rate = job.curves.get("train/samples_per_s")
    per_step = examples_per_step(job)
    if rate and rate[1] and per_step:
        return statistics.median(rate[1]) / per_step
    steps, seconds = job.results.get("global_step"), job.results.get("wall_time_s")
    if isinstance(steps, (int, float)) and isinstance(seconds, (int, float)) and seconds > 0:
        return float(steps) / float(seconds)
    return None


def job_values(job: Job) -> dict[str, float]:
    values: dict[str, float] = {
        key: float(value) for key, value in job.results.items()
        if key.startswith("test/") and isinstance(value, (int, float))
    }
    if isinstance(job.results.get("wall_time_s"), (int, float)):
        values["wall_time_s"] = float(job.results["wall_time_s"])
    rate = steps_per_second(job)
    if rate is not None:
        values["steps_per_s"] = rate
    return values


def rank_metric(jobs: Sequence[Job], requested: str | None = None) -> str | None:
    """The metric estimators are ranked by: ``requested``, else the first one any job has.

    Raises ValueError (one line naming ``--rank-by``) when jobs have test metrics but none
    has ``requested``."""
    present = {key for job in jobs for key in job.results}
    if requested:
        known = sorted(key for key in present if key.startswith("test/"))
        if known and requested not in present:
            raise ValueError(f"--rank-by {requested}: no job has this metric; choose one of "
                             f"{', '.join(known)}")
        return requested
    return next((m for m in RANK_PREFERENCE if m in present), None)


def summarize(jobs: Sequence[Job], metric: str | None) -> list[Summary]:
    """Group jobs by variant, average over seeds, and rank (1 = best on ``metric``). Timing
    (:data:`TIMING`) is averaged over processes: the replicas of one run count once."""
    by_variant: dict[str, list[Job]] = {}
    for job in jobs:
        if job.status != "missing":
            by_variant.setdefault(job.variant, []).append(job)
    summaries = []
    for variant, members in by_variant.items():
        summary = Summary(variant, members)
        collected: dict[str, list[float]] = {}
        timed: set[Any] = set()  # processes whose timing is counted (replicas share one)
        for job in summary.ok:
            counted = job.process in timed
            timed.add(job.process)
            for key, value in job_values(job).items():
                if key not in TIMING or not counted:
                    collected.setdefault(key, []).append(value)
        summary.stats = {k: s for k, v in collected.items() if (s := stat(v)) is not None}
        summaries.append(summary)
    higher = TEST_METRICS.get(metric or "", False)

    def order(summary: Summary) -> tuple[int, float]:
        value = summary.stats.get(metric or "")
        if value is None:
            return (1, 0.0)
        return (0, -value.mean if higher else value.mean)

    summaries.sort(key=order)
    for position, summary in enumerate(summaries, start=1):
        if metric in summary.stats:
            summary.rank = position
    return summaries


def seed_values(summaries: Sequence[Summary], key: str) -> dict[str, SeedValues]:
    """``{variant: {seed: value}}`` of a :func:`job_values` key over the ok jobs. A job without
    a seed, or a second job of the same variant and seed, gets its own negative key, so that
    its variant's seeds no longer match the others' and it is compared unpaired."""
    out: dict[str, SeedValues] = {}
    for summary in summaries:
        seeds: dict[int, float] = {}
        for index, job in enumerate(summary.ok):
            value = job_values(job).get(key)
            if value is None or not math.isfinite(value):
                continue
            seeds[seed_key(job, index, seeds)] = value
        out[summary.variant] = seeds
    return out


def seed_key(job: Job, index: int, taken: Mapping[int, float]) -> int:
    """The job's seed, or ``-1 - index`` when it has none or ``taken`` has it already."""
    seed = job.seed
    return seed if seed is not None and seed not in taken else -1 - index


# ------------------------------------------------------------------------------------------------
# Series for the figures
# ------------------------------------------------------------------------------------------------
def seconds_per_step(job: Job) -> float | None:
    steps, seconds = job.results.get("global_step"), job.results.get("wall_time_s")
    if isinstance(steps, (int, float)) and steps > 0 and isinstance(seconds, (int, float)):
        return float(seconds) / float(steps)
    return None


def curve_runs(summaries: Sequence[Summary], column: str, wall_time: bool = False
               ) -> dict[str, list[Series]]:
    """``{variant: [(x, values) per ok job]}`` for a metrics-CSV column.

    With ``wall_time`` x is seconds: the CSV's ``train/elapsed_s`` where logged, else the step
    times the run's mean seconds per step (``wall_time_s / global_step``).
    """
    out: dict[str, list[Series]] = {}
    for summary in summaries:
        for job in summary.ok:
            series = job.curves.get(column)
            if not series:
                continue
            steps, values = series
            if wall_time:
                seconds = elapsed_seconds(job, steps)
                if seconds is None:
                    continue
                steps = seconds
            out.setdefault(summary.variant, []).append((list(steps), list(values)))
    return out


def elapsed_seconds(job: Job, steps: Sequence[float]) -> list[float] | None:
    """Wall-clock seconds at ``steps``: the CSV's ``train/elapsed_s`` where logged, else the
    step times the run's mean seconds per step (``wall_time_s / global_step``); None without
    either."""
    elapsed = job.curves.get("train/elapsed_s")
    if elapsed:
        return [float(v) for v in _interp(steps, *elapsed)]
    pace = seconds_per_step(job)
    return None if pace is None else [s * pace for s in steps]


def _interp(x: Sequence[float], xp: Sequence[float], fp: Sequence[float]) -> list[float]:
    import numpy as np

    return list(np.interp(np.asarray(x, float), np.asarray(xp, float), np.asarray(fp, float)))


def probe_series(summaries: Sequence[Summary]) -> dict[tuple[str, str, str], list[Series]]:
    """``{(metric, group, label): [(steps, values) per job]}`` from the probe rows.

    The training estimator's rows are labelled by the variant; rows of other estimators probed
    along the same run by ``<variant> | <estimator>``.
    """
    out: dict[tuple[str, str, str], list[Series]] = {}
    for summary in summaries:
        for job in summary.ok:
            own = job.choices.get("estimator")
            per_key: dict[tuple[str, str, str], Series] = {}
            for row in sorted(job.probe, key=lambda r: r.get("step", 0)):
                name = str(row.get("estimator"))
                label = summary.variant if name == own else f"{summary.variant} | {name}"
                for metric, _, _ in PROBE_METRICS:
                    value: Any = row.get(metric)
                    if not isinstance(value, (int, float)) or not math.isfinite(value):
                        continue
                    steps, values = per_key.setdefault((metric, str(row.get("group")), label),
                                                       ([], []))
                    steps.append(float(row["step"]))
                    values.append(float(value))
            for key, series in per_key.items():
                out.setdefault(key, []).append(series)
    return out
