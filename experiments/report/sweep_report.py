"""The comparison report of one or more sweeps: ``python -m experiments.report <dir> [<dir> ...]``.

Reads every job of every Hydra multirun directory given (``results.json``, ``csv/metrics.csv``,
the gradient probe's ``probe.jsonl``), offline, and writes into ``--out`` (default: the first
directory):

* ``report.md`` with ``plots/*.png`` beside it,
* ``report.html``, the same report as one self-contained file (figures embedded as base64 PNG),
* ``report.tex`` (the summary as a booktabs table) and ``summary.csv`` (one row per variant):

variants (estimator[/baseline] plus any other override that differs between jobs) ranked by a
test metric (``--rank-by``; default ``test/accuracy`` where there is one (M2), else
``test/nll_iwae``, else ``test/neg_elbo``) as mean ± std and 95 % CI over seeds, each compared
with the best seed by seed (:mod:`experiments.report.paired`: paired t, Wilcoxon, Holm, Welch
fallback, seeds needed) and a verdict that names the winner only when it is resolved; the
validation metric at equal wall time (``--budget-s``) and f evaluations and the gradient
variance against the cost of a step (:mod:`experiments.report.equal_cost`); learning curves
against steps and wall time; gradient variance, SNR and bias over training; temperature
schedules; training speed; and every job, failed and never-started ones included. It prints
where the report is, the summary table and the verdict lines.

``--log-wandb`` also logs the figures, the table and the verdict to a wandb run (job_type
``report``, offline unless ``WANDB_MODE`` says otherwise). ``--wandb ENTITY/PROJECT --group G``
builds a wandb Report of the group's runs online, led by the verdict and table of the sweep
directories when they are given (:mod:`experiments.report.wandb_publish`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.report import exports, plots
from experiments.report.equal_cost import (
    EqualCost,
    at_equal_evaluations,
    at_equal_time,
    variance_cost_points,
)
from experiments.report.paired import Verdict, verdict
from experiments.report.render import (
    Report,
    Section,
    html_page,
    jobs_table,
    markdown,
    summary_table,
)
from experiments.report.runs import Job, load_sweeps
from experiments.report.statistics import (
    TEST_METRICS,
    Summary,
    curve_runs,
    probe_series,
    rank_metric,
    seed_values,
    summarize,
)

FIGURE_DIR = "plots"
SMOOTHING_POINTS = 40  # the training-loss curves average each point with len / 40 neighbours


def curve_figures(summaries: Sequence[Summary], palette: plots.Palette) -> dict[str, bytes]:
    """Learning curves (validation and smoothed training -ELBO, accuracy) and temperatures."""
    figures: dict[str, bytes | None] = {}
    panels = []
    for column in ("val/neg_elbo", "val/accuracy"):
        panels.append((f"{column} vs step", "training step", curve_runs(summaries, column)))
        panels.append((f"{column} vs wall time", "seconds", curve_runs(summaries, column, True)))
    training = {
        variant: plots.smoothed_runs(runs, SMOOTHING_POINTS)
        for variant, runs in curve_runs(summaries, "train/neg_elbo").items()
    }
    panels.append(("train/neg_elbo (moving average)", "training step", training))
    figures["curves.png"] = plots.curves_figure(panels, palette)
    figures["temperature.png"] = plots.curves_figure(
        [("train/temperature", "training step", curve_runs(summaries, "train/temperature"))],
        palette,
    )
    figures["probe.png"] = plots.probe_figure(probe_series(summaries), palette)
    figures["speed.png"] = plots.speed_figure(summaries)
    return {name: png for name, png in figures.items() if png is not None}


STATISTICS_NOTE = (
    "How to read it: mean ± std over seeds and the 95 % confidence interval of the mean (t). "
    "Seeds pair across variants (the same seed gives the same initial weights and batches), so "
    "each variant is compared with the best by the per-seed differences: Δ is its mean with a "
    "95 % CI, p the paired t test's p-value Holm-corrected over the variants (Welch's unpaired t "
    "where the seeds differ; Wilcoxon signed-rank beside it from 6 pairs). 'tied with best': "
    "corrected p ≥ 0.05 (or untestable); the winner is named only when nothing is tied with it. "
    "Seeds needed: the smallest n at which a paired t test at 5 % reaches power 0.8 for the "
    "observed effect d = |mean Δ| / std Δ (noncentral t; about (1.96 + 0.84)² / d² for large n); "
    "'≤ n': already resolved with n seeds. The best is picked from the same data, so with many "
    "near-equal variants a corrected p just under 0.05 is only suggestive (docs/statistics.md)."
)


def equal_cost_paragraphs(equal_time: EqualCost | None, evaluations: EqualCost | None
                          ) -> list[str]:
    if equal_time is None:
        out = ["Equal wall time: needs a validation curve and the wall time of at least two "
               "variants."]
    else:
        out = [f"Equal wall time: each job's {equal_time.column} at its last validation before "
               f"{equal_time.budget:.1f} s of training ({equal_time.chosen}); the column "
               f"'{equal_time.label()}' of the summary table, compared with the best like the "
               f"test metric. {equal_time.verdict.sentence()} Wall-clock times depend on the "
               f"machine and on what else runs on it (see the spread of steps/s): compare them "
               f"within one sweep on one quiet machine."]
    if evaluations is None:
        out.append("Equal f evaluations: no two variants log train/f_evaluations (f "
                   "evaluations per example in a step, an estimator's f_evaluations metric).")
    else:
        out.append(f"Equal f evaluations: {evaluations.label()} ({evaluations.chosen}). "
                   f"{evaluations.verdict.sentence()}")
    return out


def sections_for(
    jobs: Sequence[Job], summaries: Sequence[Summary], rank_by: str | None,
    figures: dict[str, bytes], outcome: Verdict | None = None,
    equal_time: EqualCost | None = None, evaluations: EqualCost | None = None,
) -> list[Section]:
    """The report's sections, in order (figures only where there is something to show)."""
    counts = {s: sum(job.status == s for job in jobs) for s in ("ok", "failed", "missing")}
    sweeps = sorted({str(job.sweep) for job in jobs})
    direction = "higher" if TEST_METRICS.get(rank_by or "", False) else "lower"
    intro = [
        f"Sweeps: {', '.join(sweeps)}.",
        f"Jobs: {len(jobs)} ({counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['missing']} never started).",
        f"Ranked by {rank_by} ({direction} is better). Verdict: {outcome.sentence()}"
        if rank_by and outcome else "No test metric to rank by.",
        STATISTICS_NOTE,
        "The -ELBO is the discrete one with hard samples (exact when K^N is small) and "
        "test/nll_iwae the importance-weighted bound, the same for every estimator. "
        "steps/s: training steps per second (median over the run).",
    ]
    probed = [job for job in jobs if job.status == "ok" and job.probe]
    sections = [
        Section("Summary", intro, summary_table(summaries, outcome, equal_time),
                "test_metrics.png"),
        Section("Equal cost", [
            *equal_cost_paragraphs(equal_time, evaluations),
            "Variance against cost: log10 tr Cov of the encoder's gradient (the probe's mean "
            "over training) against milliseconds per training step, one point per variant "
            "(mean over seeds); the dashed line joins the variants that no other beats on both."
            ], figure="variance_cost.png"),
        Section("Learning curves", [
            "Mean over seeds (band: ± one std). Wall time is the run's mean seconds per step "
            "times the step unless the run logged train/elapsed_s."], figure="curves.png"),
        Section("Gradient variance, SNR and bias over training", [
            f"From the gradient probe (probe.jsonl, docs/gradients.md) of {len(probed)} of "
            f"{counts['ok']} finished jobs: log10 of the trace of the gradient covariance, "
            "SNR = squared norm of the mean gradient over that trace, and the bias norm against "
            "the exact gradient where the latent space could be enumerated. An exact "
            "estimator (marginalization) has zero variance and bias, so it is absent from the "
            "log-scale panels; for unbiased estimators the bias panel shows the probe's Monte "
            "Carlo error, about sqrt(tr Cov / samples)."],
            figure="probe.png"),
        Section("Temperature schedule", ["train/temperature of the relaxed estimators."],
                figure="temperature.png"),
        Section("Speed", ["Training steps per second, mean ± std over seeds (the replicas of "
                          "one process share its clock and count once)."],
                figure="speed.png"),
    ]
    not_ok = [job for job in jobs if job.status != "ok"]
    if not_ok:
        sections.append(Section("Failed and missing jobs", [], jobs_table(not_ok)))
    sections.append(Section("Jobs", [], jobs_table(jobs)))
    return [s for s in sections if s.figure is None or s.figure in figures or s.table
            or s.title == "Equal cost"]


def build_report(
    directories: Sequence[Path], out: Path | None = None, rank_by: str | None = None,
    title: str = "catgrad estimator comparison", budget_s: float | None = None,
) -> Report:
    """Read the sweeps and write ``report.md``, ``plots/``, ``report.html``, ``report.tex`` and
    ``summary.csv`` into ``out``."""
    jobs = load_sweeps(directories)
    metric = rank_metric(jobs, rank_by)
    summaries = summarize(jobs, metric)
    outcome = None
    if metric:
        outcome = verdict(seed_values(summaries, metric), metric,
                          TEST_METRICS.get(metric, False))
    equal_time = at_equal_time(summaries, metric, budget_s)
    evaluations = at_equal_evaluations(summaries, metric)
    best = next((s.variant for s in summaries if s.rank == 1), None)
    palette = plots.Palette([s.variant for s in summaries], best)
    figures = curve_figures(summaries, palette)
    test_png = plots.test_metrics_figure(summaries, list(TEST_METRICS))
    if test_png is not None:
        figures["test_metrics.png"] = test_png
    variance_png = plots.variance_cost_figure(variance_cost_points(summaries), palette)
    if variance_png is not None:
        figures["variance_cost.png"] = variance_png
    sections = sections_for(jobs, summaries, metric, figures, outcome, equal_time, evaluations)
    out = out or directories[0]
    (out / FIGURE_DIR).mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        (out / FIGURE_DIR / name).write_bytes(png)
    markdown_path, html_path = out / "report.md", out / "report.html"
    markdown_path.write_text(markdown(title, sections, FIGURE_DIR))
    html_path.write_text(html_page(title, sections, figures))
    tex_path = out / "report.tex"
    tex_path.write_text(exports.latex_table(summaries, outcome))
    csv_path = exports.write_csv(out / "summary.csv",
                                 exports.csv_rows(summaries, outcome, equal_time))
    return Report(markdown_path, html_path, jobs, summaries, metric, figures, outcome,
                  equal_time, evaluations, {"tex": tex_path, "csv": csv_path})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Comparison report of Hydra multirun sweeps (offline), or a wandb Report.",
    )
    parser.add_argument("directories", nargs="*", type=Path, help="multirun (or run) folders")
    parser.add_argument("--out", type=Path, help="output folder (default: the first directory)")
    parser.add_argument("--rank-by", help="test metric to rank by (default: test/accuracy, "
                        "else test/nll_iwae, else test/neg_elbo)")
    parser.add_argument("--budget-s", type=float, help="read every variant's validation curve "
                        "at this many seconds of training (default: when the fastest finished)")
    parser.add_argument("--title", default="catgrad estimator comparison")
    parser.add_argument("--log-wandb", action="store_true",
                        help="also log the figures and table to a wandb run (offline by default)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT",
                        help="build and save a wandb Report of --group's runs (needs login); "
                        "with sweep directories it starts with their verdict and table")
    parser.add_argument("--group", help="wandb group (sweep_name) for --wandb / --log-wandb")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.budget_s is not None and not (args.budget_s > 0 and math.isfinite(args.budget_s)):
        print(f"error: --budget-s={args.budget_s}: give a positive number of seconds of "
              f"training, e.g. --budget-s 30", file=sys.stderr)
        return 2
    if args.wandb:
        from experiments.report.wandb_publish import WandbReportError, split_entity_project

        try:
            split_entity_project(args.wandb)
        except WandbReportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if not args.directories:
            return publish(args, None)
    if not args.directories:
        print("error: give one or more multirun directories (or --wandb ENTITY/PROJECT)",
              file=sys.stderr)
        return 2
    try:
        report = build_report(args.directories, args.out, args.rank_by, args.title,
                              args.budget_s)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = sum(job.status != "ok" for job in report.jobs)
    print(f"report: {report.markdown_path}\n        {report.html_path}")
    print(f"        {report.exports['tex']}\n        {report.exports['csv']}")
    print(report.summary_markdown())
    print(f"verdict: {report.verdict_line()}")
    if report.equal_time is not None:
        print(f"at equal wall time ({report.equal_time.label()}): "
              f"{report.equal_time.verdict.sentence()}")
    if failed:
        print(f"{failed} of {len(report.jobs)} jobs failed or never started: see the report")
    if args.log_wandb:
        from experiments.report.wandb_publish import log_report_run

        try:
            print(f"report logged to wandb: {log_report_run(report, args.group)}")
        except Exception as error:  # noqa: BLE001 - the report itself is written already
            print(f"warning: could not log the report to wandb: {error}", file=sys.stderr)
    if args.wandb:
        return publish(args, report)
    return 0


def publish(args: argparse.Namespace, report: Report | None) -> int:
    """``--wandb``: save the wandb Report of ``--group``, led by ``report``'s verdict and table
    when sweep directories were given too."""
    from experiments.report.wandb_publish import WandbReportError, publish_report

    summary = None
    if report is not None:
        summary = f"{report.verdict_line()}\n\n{report.summary_markdown()}"
    try:
        url = publish_report(args.wandb, args.group, args.title, summary)
    except WandbReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wandb report: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
