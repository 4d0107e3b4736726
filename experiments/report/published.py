"""Our numbers beside the published ones, from run directories:
``python -m experiments.report.published <run or sweep dir> [...] [--project-to STEPS] [--curves]``.

Finds every run directory under the paths given (a folder with ``.hydra/config.yaml``), reads its
``results.json`` (missing for a run that was stopped: its validation curve is still used and the
row says so), ``csv/metrics.csv`` and ``.hydra/overrides.yaml``, and prints a Markdown table:

* one row per setup (M2: experiment and label count; VAE: latent shape) and variant (estimator
  arm) after the selection the papers made: among the settings of a sweep (learning rate,
  annealing, alpha, ...; every override except ``seed`` and the trainer's) the one with the best
  validation metric (lowest ``val/neg_elbo``; highest ``val/accuracy`` for M2), its seeds
  aggregated as mean ± std;
* the paper's number for that table and estimator (docs/results.md), ours,
  steps, wall time and the exact command of the job (of the first seed);
* with ``--project-to N``: a least-squares fit of ``val(t) = a + b * t^(-c)`` to the validation
  curve (``c`` on a grid, points after the first 1,000 steps) evaluated at step N, and ``a``, the
  curve's asymptote. An extrapolation of a short run, labelled as such, never a result.

``--at 5000,10000`` adds the validation metric at those steps, the mean over the seeds that
reached them (equal-step comparisons of runs that stopped at different steps). ``--curves``
also prints each run's validation curve (step: value).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.report.runs import Job, find_jobs, variant_of

MISSING = object()  # a config key the run does not have

# Published numbers: Jang et al. 2017 Table 1 (negative ELBO, nats) and Table 2
# (M2, 100 labels: accuracy %), Kingma et al. 2014 (M2, Table 1: accuracy = 100 - test error %),
# Pyro's SS-VAE tutorial (accuracy % by number of labels).
TABLE1 = {
    "categorical": {"score_function": 110.6, "straight_through": 110.9,
                    "annealed_straight_through": 107.8, "gumbel_softmax": 101.5,
                    "st_gumbel_softmax": 107.8},
    "bernoulli": {"score_function": 112.2, "straight_through": 116.0,
                  "annealed_straight_through": 111.5, "gumbel_softmax": 105.0,
                  "st_gumbel_softmax": 111.5},
}
TABLE2_ACCURACY = {"marginalization": 92.6, "gumbel_softmax": 92.4, "st_gumbel_softmax": 93.6}
KINGMA_ACCURACY = {100: 100 - 11.97, 600: 100 - 4.94, 1000: 100 - 3.60, 3000: 100 - 3.92}
PYRO_ACCURACY = {100: 93.2, 600: 94.4, 1000: 94.9, 3000: 95.8}


class Row:
    """What the published-numbers table reads of one job (:class:`~experiments.report.runs.Job`)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.path = job.directory
        self.config = job.plain_config
        self.overrides = job.overrides
        self.results = job.results or None
        self.choices = job.choices
        self.variant = variant_of(job)
        # Validation curves as (steps done, value): the step column counts from 0.
        self.curve = {
            column: [(int(step) + 1, value) for step, value in zip(*series, strict=True)]
            for column, series in job.curves.items() if column.startswith("val/")
        }

    @property
    def m2(self) -> bool:
        return str(self.select("model._target_", "")).endswith("M2")

    def select(self, key: str, default: object = None) -> Any:
        return self.job.select(key, default)

    @property
    def setup(self) -> str:
        """The published setup the run belongs to; selection never picks across setups.

        M2: the experiment and the number of labels (each label count is its own row of the
        papers' tables); VAE: the latent shape (Table 1's categorical 20x10, Bernoulli 200x2)."""
        if self.m2:
            experiment = self.choices.get("experiment", "m2")
            return f"{experiment}, {self.select('datamodule.n_labels')} labels"
        return f"{self.select('model.num_variables')}×{self.select('model.num_classes')} latents"

    @property
    def metric(self) -> tuple[str, bool]:
        """The validation metric of the selection and whether higher is better."""
        return ("val/accuracy", True) if self.m2 else ("val/neg_elbo", False)

    def best_val(self) -> tuple[int, float] | None:
        name, higher = self.metric
        points = self.curve.get(name, [])
        if not points:
            return None
        return (max if higher else min)(points, key=lambda point: point[1])

    @functools.cached_property
    def setting_overrides(self) -> dict[str, str]:
        """The overrides that define the setting, as key -> value (everything but the seed and
        run plumbing; a deletion ``~key`` has the value ``""``)."""
        plumbing = ("seed=", "hydra.", "logger", "~callbacks", "trainer=", "trainer.",
                    "++trainer.", "+trainer.")
        pairs = (o.split("=", 1) for o in self.overrides if not o.startswith(plumbing))
        return {pair[0].lstrip("+~"): pair[1] if len(pair) > 1 else "" for pair in pairs}

    def resolved(self, key: str) -> str:
        """What this run used for an overridable ``key``, whether or not it overrode it: the
        config group's choice, else the config's value, else the override's text ("" if none)."""
        if key in self.choices:
            return self.choices[key]
        value = self.select(key, default=MISSING)
        if value is not MISSING:
            return json.dumps(value, sort_keys=True)
        return self.setting_overrides.get(key, "")

    @property
    def end_step(self) -> int:
        """The step the run stopped at."""
        if self.results and "global_step" in self.results:
            return int(self.results["global_step"])
        return self.job.last_step

    def command(self) -> str:
        return "python -m experiments.train " + " ".join(shlex.quote(o) for o in self.overrides)


def fit_power_law(points: Sequence[tuple[int, float]], min_step: int = 1000
                  ) -> tuple[float, float, float] | None:
    """Least squares ``v = a + b * t^(-c)`` over a grid of ``c``: ``(a, b, c)``, or None with
    fewer than 4 points after ``min_step``."""
    data = [(t, v) for t, v in points if t >= min_step]
    if len(data) < 4:
        return None
    best = None
    for c in [0.05 * i for i in range(1, 61)]:
        xs = [t ** (-c) for t, _ in data]
        ys = [v for _, v in data]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            continue
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        a = my - b * mx
        error = sum((a + b * x - y) ** 2 for x, y in zip(xs, ys, strict=True))
        if best is None or error < best[0]:
            best = (error, a, b, c)
    return None if best is None else best[1:]


def paper_number(run: Row) -> str:
    variant = run.variant.split("/")[0]
    if run.m2:
        n = run.select("datamodule.n_labels")
        experiment = run.choices.get("experiment", "")
        if experiment.startswith("pyro") and n in PYRO_ACCURACY:
            return f"{PYRO_ACCURACY[n]} % (Pyro)"
        if experiment.startswith("kingma") and n in KINGMA_ACCURACY:
            return f"{KINGMA_ACCURACY[n]:.2f} % (Kingma)"
        if n == 100 and variant in TABLE2_ACCURACY:
            return f"{TABLE2_ACCURACY[variant]} % (Jang T2)"
        return ""
    shape = (run.select("model.num_variables"), run.select("model.num_classes"))
    table = {(20, 10): "categorical", (200, 2): "bernoulli"}.get(shape)  # type: ignore[arg-type]
    if table is None or variant not in TABLE1[table]:
        return ""
    return f"{TABLE1[table][variant]} (Jang T1 {table})"


def mean_std(values: Sequence[float | None], scale: float = 1.0, digits: int = 2) -> str:
    kept = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return "—"
    if len(kept) == 1:
        return f"{kept[0]:.{digits}f} (1 seed)"
    return (f"{statistics.fmean(kept):.{digits}f} ± {statistics.stdev(kept):.{digits}f} "
            f"({len(kept)} seeds)")


def percent(fractions: Sequence[float | None]) -> str:
    """``mean_std`` of fractions as percentages: ``"88.0 % (1 seed)"`` (``"—"`` when none)."""
    return mean_std(fractions, 100, 1).replace(" (", " % (", 1)


def select(runs: Sequence[Row]) -> list[list[Row]]:
    """Per setup and variant, the seeds of the setting with the best mean best-validation
    metric. The label count of M2 (part of the setup) is never selected on: one row each.

    A setting is what the runs used for every key that any run of the setup and variant
    overrode, so runs that differ only in how they were spelled (``datamodule.n_labels=100``
    given or left at its default of 100) are seeds of one setting."""
    rows: dict[tuple[str, str], list[Row]] = {}
    for run in runs:
        rows.setdefault((run.setup, run.variant), []).append(run)
    by_setting: dict[tuple[str, str, tuple[str, ...]], list[Row]] = {}
    for (setup, variant), members in rows.items():
        keys = sorted({key for run in members for key in run.setting_overrides})
        for run in members:
            setting = tuple(f"{key}={run.resolved(key)}" for key in keys)
            by_setting.setdefault((setup, variant, setting), []).append(run)
    chosen: dict[tuple[str, str], tuple[float, list[Row]]] = {}
    for (setup, variant, _), group in by_setting.items():
        scores = [best[1] for run in group if (best := run.best_val()) is not None]
        if not scores:
            continue
        higher = group[0].metric[1]
        score = statistics.fmean(scores) * (-1 if higher else 1)
        row = (setup, variant)
        if row not in chosen or score < chosen[row][0]:
            chosen[row] = (score, group)
    return [group for _, (_, group) in sorted(chosen.items(), key=lambda item: natural(item[0]))]


def natural(keys: tuple[str, ...]) -> list[tuple[int, str]]:
    """Sort key that orders numbers inside strings by value ("600 labels" before "1000")."""
    return [(int(part) if part.isdigit() else -1, part)
            for key in keys for part in re.split(r"(\d+)", key)]


def value_at(points: Sequence[tuple[int, float]], step: int, end: int) -> float | None:
    """The last validation value at or before ``step``; None when there is none or the run
    stopped (at step ``end``) before ``step``."""
    before = [v for t, v in points if t <= step]
    return before[-1] if before and end >= step else None


def table(runs: Sequence[Row], project_to: int | None, at: Sequence[int] = ()) -> str:
    header = ["variant", "setup", "paper", "ours: test", "test IWAE bound", "steps", "wall time",
              "best val (step)"]
    header += [f"val at {step:,}" for step in at]
    if project_to:
        header += [f"fit: val at {project_to:,} / asymptote"]
    header += ["run", "command"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for group in select(runs):
        first = group[0]
        done = [run.results for run in group
                if run.results and run.results.get("status") == "completed"]
        if first.m2:
            ours = percent([r.get("test/accuracy") for r in done]) + " acc."
            generative = [r.get("test/generative_accuracy") for r in done]
            if any(value is not None for value in generative):  # runs before it was logged
                ours += ", generative acc. " + percent(generative)
            ours += ", −ELBO " + mean_std([r.get("test/neg_elbo") for r in done])
            iwae = "—"
        else:
            ours = mean_std([r.get("test/neg_elbo") for r in done])
            iwae = mean_std([r.get("test/nll_iwae") for r in done])
        if not done:
            ours = "not finished (stopped)"
        steps = sorted({r.end_step for r in group})
        wall = [r["wall_time_s"] for r in done if "wall_time_s" in r]
        wall_text = f"{statistics.fmean(wall) / 60:.1f} min" if wall else "—"
        if any(r.get("resumed_from") and "resumes" not in r for r in done):
            wall_text += " (resumed: last part only)"  # older runs timed their last process only
        best = first.best_val()
        metric = first.metric[0]
        if best is None:
            best_text = "—"
        elif first.m2:
            best_text = f"{100 * best[1]:.1f} % ({best[0]:,})"
        else:
            best_text = f"{best[1]:.2f} ({best[0]:,})"
        row = [first.variant, first.setup, paper_number(first), ours, iwae,
               "/".join(f"{s:,}" for s in steps), wall_text, best_text]
        for step in at:  # mean over the seeds that reached the step
            reached = [value for run in group
                       if (value := value_at(run.curve.get(metric, []), step, run.end_step))
                       is not None]
            value = statistics.fmean(reached) if reached else None
            row.append("—" if value is None else
                       f"{100 * value:.1f} %" if first.m2 else f"{value:.2f}")
        if project_to:
            fit = None if first.m2 else fit_power_law(first.curve.get(metric, []))
            if fit is None:
                row.append("—")
            else:
                a, b, c = fit
                row.append(f"{a + b * project_to ** (-c):.1f} / {a:.1f} (c = {c:.2f})")
        row += [f"`{first.path}`", f"`{first.command()}`"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def curves_text(runs: Sequence[Row]) -> str:
    out = []
    for run in runs:
        metric = run.metric[0]
        points = run.curve.get(metric, [])
        shown = ", ".join(f"{t}: {v:.4g}" for t, v in points)
        out.append(f"- `{run.path}` ({run.variant}) {metric}: {shown or '—'}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--project-to", type=int, default=None,
                        help="evaluate a power-law fit of the validation curve at this step")
    parser.add_argument("--at", default="",
                        help="comma-separated steps: a column of the validation metric at each")
    parser.add_argument("--curves", action="store_true", help="print the validation curves")
    args = parser.parse_args(argv)
    runs = [Row(job) for job in find_jobs(args.paths)]
    if not runs:
        print(f"error: no run directories (with .hydra/config.yaml) under "
              f"{' '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    at = [int(step) for step in args.at.split(",") if step.strip()]
    print(table(runs, args.project_to, at))
    if args.curves:
        print()
        print(curves_text(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
