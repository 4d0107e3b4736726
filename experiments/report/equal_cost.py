"""Comparisons at equal cost: the ranking metric's validation curve read at equal wall-clock time
or at equal numbers of ``f`` evaluations, and the gradient variance against the cost of a step.

Estimators differ in cost per step by several times (exact marginalization evaluates f on all
K^N configurations), so the end of training compares them at equal *steps*. Here each job's
validation curve (``val/<name>`` of the ranking metric ``test/<name>``, else ``val/neg_elbo``) is
read at a common budget: its last validation at or before the budget. The per-seed values are
then compared with :func:`experiments.report.paired.verdict`, exactly like the test metric.

* **Equal time**: the budget is ``--budget-s``, else the time the fastest variant finished
  training (the median over its seeds of the wall-clock time of its last logged step). A job's
  wall-clock time at a step comes from :func:`experiments.report.statistics.elapsed_seconds`.
* **Equal f evaluations**: where estimators log :data:`F_EVALUATIONS` (f evaluations per
  example in a training step, from their ``f_evaluations`` metric), step s has cost s times its
  mean; the budget is what the cheapest variant spent in its whole run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from experiments.report.paired import SeedValues, Verdict, verdict
from experiments.report.runs import Job
from experiments.report.statistics import (
    TEST_METRICS,
    Summary,
    elapsed_seconds,
    job_values,
    seed_key,
)

F_EVALUATIONS = "train/f_evaluations"
FALLBACK_VALIDATION = "val/neg_elbo"
PROBE_GROUP = "encoder"  # the variance-vs-cost plot: the encoder's gradient (where they differ)

CostAxis = Callable[[Job, Sequence[float]], "list[float] | None"]


@dataclass
class EqualCost:
    """The validation metric of every variant at one budget of one cost axis."""

    column: str  # the validation metric read, e.g. val/neg_elbo
    axis: str  # "s" (wall-clock seconds) or "f evaluations per example"
    budget: float
    chosen: str  # how the budget was chosen, for the report
    values: dict[str, SeedValues]
    verdict: Verdict

    def label(self) -> str:
        unit = "s" if self.axis == "s" else "f evaluations"
        return f"{self.column} at {self.budget:,.0f} {unit}"


def validation_column(jobs: Sequence[Job], rank_by: str | None) -> str | None:
    """``val/<name>`` for ``rank_by = test/<name>`` where logged, else ``val/neg_elbo``."""
    logged = {column for job in jobs for column in job.curves}
    if rank_by and rank_by.startswith("test/"):
        matching = "val/" + rank_by.removeprefix("test/")
        if matching in logged:
            return matching
    return FALLBACK_VALIDATION if FALLBACK_VALIDATION in logged else None


def f_evaluations(job: Job, steps: Sequence[float]) -> list[float] | None:
    """Cumulative f evaluations per example at ``steps`` (step times the logged mean)."""
    logged = job.curves.get(F_EVALUATIONS)
    if not logged or not logged[1]:
        return None
    per_step = statistics.fmean(logged[1])
    return [s * per_step for s in steps]


def total_cost(job: Job, axis: CostAxis) -> float | None:
    """The job's cost at its last logged step on ``axis``."""
    cost = axis(job, [float(job.last_step)]) if job.last_step else None
    return cost[0] if cost else None


def value_at(job: Job, column: str, axis: CostAxis, budget: float) -> float | None:
    """The last finite value of ``column`` logged at or before ``budget`` on ``axis``."""
    series = job.curves.get(column)
    if not series:
        return None
    costs = axis(job, series[0])
    if costs is None:
        return None
    reached = [v for c, v in zip(costs, series[1], strict=True) if c <= budget and math.isfinite(v)]
    return reached[-1] if reached else None


def at_budget(summaries: Sequence[Summary], column: str, axis: CostAxis, budget: float
              ) -> dict[str, SeedValues]:
    out: dict[str, SeedValues] = {}
    for summary in summaries:
        seeds: dict[int, float] = {}
        for index, job in enumerate(summary.ok):
            value = value_at(job, column, axis, budget)
            if value is not None:
                seeds[seed_key(job, index, seeds)] = value
        out[summary.variant] = seeds
    return out


def cheapest_total(summaries: Sequence[Summary], axis: CostAxis) -> tuple[float, str] | None:
    """The smallest over variants of the median total cost of its jobs, and that variant."""
    totals = []
    for summary in summaries:
        costs = [c for job in summary.ok if (c := total_cost(job, axis)) is not None]
        if costs:
            totals.append((statistics.median(costs), summary.variant))
    return min(totals) if totals else None


def equal_cost(summaries: Sequence[Summary], rank_by: str | None, axis: CostAxis,
               axis_name: str, budget: float | None = None) -> EqualCost | None:
    """The validation metric of every variant at ``budget`` (default: the cheapest variant's
    whole run) on ``axis``; None when fewer than 2 variants can be read on it."""
    jobs = [job for summary in summaries for job in summary.ok]
    column = validation_column(jobs, rank_by)
    measured = [s for s in summaries if any(total_cost(j, axis) is not None for j in s.ok)]
    if column is None or len(measured) < 2:
        return None
    if budget is None:
        cheapest = cheapest_total(measured, axis)
        if cheapest is None:
            return None
        budget, chosen = cheapest[0], f"when {cheapest[1]}, the cheapest, finished (median)"
    else:
        chosen = "the budget given (--budget-s)"
    values = at_budget(measured, column, axis, budget)
    higher = TEST_METRICS.get("test/" + column.removeprefix("val/"), False)
    return EqualCost(column, axis_name, budget, chosen, values, verdict(values, column, higher))


def at_equal_time(summaries: Sequence[Summary], rank_by: str | None,
                  budget_s: float | None = None) -> EqualCost | None:
    return equal_cost(summaries, rank_by, elapsed_seconds, "s", budget_s)


def at_equal_evaluations(summaries: Sequence[Summary], rank_by: str | None
                         ) -> EqualCost | None:
    return equal_cost(summaries, rank_by, f_evaluations, "f evaluations per example")


def variance_cost_points(summaries: Sequence[Summary], group: str = PROBE_GROUP
                         ) -> dict[str, tuple[float, float | None]]:
    """``{variant: (ms per training step, log10 tr Cov)}``: the cost from steps/s (mean over
    seeds), the variance the mean over seeds of the mean over the run's probes of the training
    estimator's gradient of ``group``; ``None`` for an exact estimator (tr Cov = 0)."""
    points: dict[str, tuple[float, float | None]] = {}
    for summary in summaries:
        rates = [r for job in summary.ok if (r := job_values(job).get("steps_per_s"))]
        logs: list[float] = []
        exact = False
        for job in summary.ok:
            own = job.choices.get("estimator")
            rows = [r for r in job.probe if r.get("estimator") == own and r.get("group") == group]
            finite = [float(r["log10_trace_cov"]) for r in rows
                      if isinstance(r.get("log10_trace_cov"), (int, float))]
            if finite:
                logs.append(statistics.fmean(finite))
            elif rows and all(r.get("trace_cov") == 0.0 for r in rows):
                exact = True
        if rates and (logs or exact):
            cost_ms = 1000.0 / statistics.fmean(rates)
            points[summary.variant] = (cost_ms, statistics.fmean(logs) if logs else None)
    return points
