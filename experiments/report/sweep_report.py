"""The comparison report of one or more sweeps: ``python -m experiments.report <dir> [<dir> ...]``.

Reads every job of every Hydra multirun directory given (``results.json``, ``csv/metrics.csv``,
the gradient probe's ``probe.jsonl``), offline, and writes into ``--out`` (default: the first
directory):

* ``report.md`` with ``plots/*.png`` beside it, and
* ``report.html``, the same report as one self-contained file (figures embedded as base64 PNG):

variants (estimator[/baseline] plus any other override that differs between jobs) ranked by a
test metric (``--rank-by``; default ``test/accuracy`` where there is one (M2), else
``test/nll_iwae``, else ``test/neg_elbo``) as mean ± std over seeds, the best highlighted;
learning curves against steps and wall time; gradient variance, SNR and bias over training;
temperature schedules; training speed; and every job, failed and never-started ones included.
It prints where the report is and the summary table.

``--log-wandb`` also logs the figures and the table to a wandb run (job_type ``report``, offline
unless ``WANDB_MODE`` says otherwise). ``--wandb ENTITY/PROJECT --group G`` instead builds a wandb
Report of the group's runs online (:mod:`experiments.report.wandb_publish`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.report import plots
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


def sections_for(
    jobs: Sequence[Job], summaries: Sequence[Summary], rank_by: str | None,
    figures: dict[str, bytes],
) -> list[Section]:
    """The report's sections, in order (figures only where there is something to show)."""
    counts = {s: sum(job.status == s for job in jobs) for s in ("ok", "failed", "missing")}
    sweeps = sorted({str(job.sweep) for job in jobs})
    best = next((s for s in summaries if s.rank == 1), None)
    direction = "higher" if TEST_METRICS.get(rank_by or "", False) else "lower"
    intro = [
        f"Sweeps: {', '.join(sweeps)}.",
        f"Jobs: {len(jobs)} ({counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['missing']} never started).",
        f"Ranked by {rank_by} ({direction} is better), mean ± std over seeds; best: "
        f"{best.variant if best else 'none'}." if rank_by else "No test metric to rank by.",
        "The -ELBO is the discrete one with hard samples (exact when K^N is small) and "
        "test/nll_iwae the importance-weighted bound, the same for every estimator. "
        "steps/s: training steps per second (median over the run).",
    ]
    probed = [job for job in jobs if job.status == "ok" and job.probe]
    sections = [
        Section("Summary", intro, summary_table(summaries), "test_metrics.png"),
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
        Section("Speed", ["Training steps per second, mean ± std over seeds."],
                figure="speed.png"),
    ]
    not_ok = [job for job in jobs if job.status != "ok"]
    if not_ok:
        sections.append(Section("Failed and missing jobs", [], jobs_table(not_ok)))
    sections.append(Section("Jobs", [], jobs_table(jobs)))
    return [s for s in sections if s.figure is None or s.figure in figures or s.table]


def build_report(
    directories: Sequence[Path], out: Path | None = None, rank_by: str | None = None,
    title: str = "catgrad estimator comparison",
) -> Report:
    """Read the sweeps and write ``report.md``, ``plots/`` and ``report.html`` into ``out``."""
    jobs = load_sweeps(directories)
    metric = rank_metric(jobs, rank_by)
    summaries = summarize(jobs, metric)
    best = next((s.variant for s in summaries if s.rank == 1), None)
    palette = plots.Palette([s.variant for s in summaries], best)
    figures = curve_figures(summaries, palette)
    test_png = plots.test_metrics_figure(summaries, list(TEST_METRICS))
    if test_png is not None:
        figures["test_metrics.png"] = test_png
    sections = sections_for(jobs, summaries, metric, figures)
    out = out or directories[0]
    (out / FIGURE_DIR).mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        (out / FIGURE_DIR / name).write_bytes(png)
    markdown_path, html_path = out / "report.md", out / "report.html"
    markdown_path.write_text(markdown(title, sections, FIGURE_DIR))
    html_path.write_text(html_page(title, sections, figures))
    return Report(markdown_path, html_path, jobs, summaries, metric, figures)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Comparison report of Hydra multirun sweeps (offline), or a wandb Report.",
    )
    parser.add_argument("directories", nargs="*", type=Path, help="multirun (or run) folders")
    parser.add_argument("--out", type=Path, help="output folder (default: the first directory)")
    parser.add_argument("--rank-by", help="test metric to rank by (default: test/accuracy, "
                        "else test/nll_iwae, else test/neg_elbo)")
    parser.add_argument("--title", default="catgrad estimator comparison")
    parser.add_argument("--log-wandb", action="store_true",
                        help="also log the figures and table to a wandb run (offline by default)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT",
                        help="build and save a wandb Report of --group's runs (needs login)")
    parser.add_argument("--group", help="wandb group (sweep_name) for --wandb / --log-wandb")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wandb:
        from experiments.report.wandb_publish import WandbReportError, publish_report

        try:
            url = publish_report(args.wandb, args.group, args.title)
        except WandbReportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"wandb report: {url}")
        return 0
    if not args.directories:
        print("error: give one or more multirun directories (or --wandb ENTITY/PROJECT)",
              file=sys.stderr)
        return 2
    try:
        report = build_report(args.directories, args.out, args.rank_by, args.title)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = sum(job.status != "ok" for job in report.jobs)
    print(f"report: {report.markdown_path}\n        {report.html_path}")
    print(report.summary_markdown())
    if failed:
        print(f"{failed} of {len(report.jobs)} jobs failed or never started: see the report")
    if args.log_wandb:
        from experiments.report.wandb_publish import log_report_run

        try:
            print(f"report logged to wandb: {log_report_run(report, args.group)}")
        except Exception as error:  # noqa: BLE001 - the report itself is written already
            print(f"warning: could not log the report to wandb: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
