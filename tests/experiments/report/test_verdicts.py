"""The verdict, statistics columns and exports of the report on fabricated sweeps with known
effects: a clear winner, an exact tie, unpaired seeds, one seed only, a failed job; and the
comparison at equal wall time."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from experiments.report import sweep_report
from experiments.report.sweep_report import build_report, main
from tests.experiments.report.test_sweep_report import write_job

SEED_EFFECT = [0.0, 1.5, -1.0, 2.5, -0.5]  # what a seed does to every variant (paired design)


def write_sweep(root: Path, values: dict[str, dict[int, float | None]]) -> Path:
    """A sweep folder of ``{variant: {seed: test/nll_iwae, None: the job crashed}}``."""
    root.mkdir(parents=True)
    number = 0
    for variant, seeds in values.items():
        for seed, nll in seeds.items():
            write_job(root, number, variant, seed, nll)
            number += 1
    return root


def clear_winner() -> dict[str, dict[int, float | None]]:
    # A seed spread of ~1.4 nats would hide a 0.8-nat gap from an unpaired test; the pairs show
    # it: per-seed noise 0.05, so the paired t statistic is ~0.8 / (0.07 / sqrt 5) ~ 25.
    noise = np.random.default_rng(0).normal(0.0, 0.05, size=(3, 5))
    return {
        name: {s: 24.0 + shift + SEED_EFFECT[s] + float(noise[i, s]) for s in range(5)}
        for i, (name, shift) in enumerate((("a", 0.0), ("b", 0.8), ("c", 3.0)))
    }


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing (matplotlib is ~90 % of a report's time) where a test reads only tables;
    the figures are tested in test_sweep_report.py and by the equal-time test here."""
    monkeypatch.setattr(sweep_report, "curve_figures", lambda *args: {})
    monkeypatch.setattr(sweep_report.plots, "test_metrics_figure", lambda *args: None)
    monkeypatch.setattr(sweep_report.plots, "variance_cost_figure", lambda *args: None)


def run_cli(sweep: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main([str(sweep), *extra]) == 0
    return capsys.readouterr().out


def test_a_clear_winner_is_named(tmp_path: Path, capsys) -> None:
    sweep = write_sweep(tmp_path / "sweep", clear_winner())
    printed = run_cli(sweep, capsys, "--out", str(tmp_path / "out"))
    assert "verdict: Winner: a on test/nll_iwae (lower is better): better than all 2" in printed
    report = build_report([sweep])
    assert report.verdict is not None and report.verdict.resolved
    assert [report.verdict.mark(v) for v in "abc"] == ["best", "worse", "worse"]
    b = report.verdict.versus["b"]
    assert b.method == "paired t" and b.n == 5 and b.p_holm is not None and b.p_holm < 1e-4
    assert b.ci is not None and b.ci[0] < 0.8 < b.ci[1]
    text = report.markdown_path.read_text()
    assert "Winner: a" in text and "≤ 5" in text and "| worse |" in text
    assert (tmp_path / "out" / "report.tex").is_file() and (sweep / "summary.csv").is_file()


def test_an_exact_tie_is_not_resolved(tmp_path: Path, no_figures: None) -> None:
    same = {s: 24.0 + SEED_EFFECT[s] for s in range(5)}
    sweep = write_sweep(tmp_path / "sweep", {"a": same, "b": dict(same),
                                             "c": {s: v + 3.0 + 0.1 * s for s, v in same.items()}})
    report = build_report([sweep])
    assert report.verdict_line().startswith(
        "Not resolved: a has the best mean test/nll_iwae (lower is better), but 1 variant(s) "
        "are tied with it at the 5 % level (Holm): b; it is better than the other 1.")
    assert report.verdict is not None and report.verdict.versus["b"].p_holm == 1.0
    assert "| tied with best | – |" in report.markdown_path.read_text()  # no seeds would do


def test_unpaired_seeds_fall_back_to_welch(tmp_path: Path, no_figures: None) -> None:
    sweep = write_sweep(tmp_path / "sweep", {"a": {0: 20.0, 1: 20.5, 2: 21.0},
                                             "b": {3: 24.0, 4: 24.6, 5: 25.0}})
    report = build_report([sweep])
    assert report.verdict_line().startswith("Winner: a")
    assert "Unpaired (Welch) for b" in report.verdict_line()
    assert "(Welch)" in report.summary_markdown()  # the p-value cell says which test


def test_one_seed_only_tests_nothing(tmp_path: Path, no_figures: None) -> None:
    sweep = write_sweep(tmp_path / "sweep", {"a": {0: 20.0}, "b": {0: 30.0}})
    assert build_report([sweep]).verdict_line() == (
        "Not resolved: a has the best mean test/nll_iwae (lower is better), but one seed per "
        "variant, so nothing can be tested; run at least 2 seeds per variant.")


def test_a_failed_job_drops_only_its_seed_from_the_pairs(tmp_path: Path, capsys,
                                                         no_figures: None) -> None:
    values = clear_winner()
    values["b"][4] = None  # crashed: no results.json
    sweep = write_sweep(tmp_path / "sweep", values)
    printed = run_cli(sweep, capsys)
    assert "verdict: Winner: a" in printed and "(4 pairs)" in printed
    assert "1 of 15 jobs failed or never started" in printed


def test_tex_and_csv_carry_the_table(tmp_path: Path, no_figures: None) -> None:
    values = clear_winner()
    # d_x: a plus differences of mean +0.01 and std 0.19 (t = 0.12): tied with a
    noise = [0.2, -0.25, 0.1, -0.1, 0.1]
    values["d_x"] = {s: v + noise[s] for s, v in values["a"].items()}  # type: ignore[operator]
    report = build_report([write_sweep(tmp_path / "sweep", values)])
    tex = report.exports["tex"].read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "$\\mathbf{" in tex and "d\\_x$^\\dagger$" in tex  # best bold, tie marked, escaped
    rows = list(csv.DictReader(report.exports["csv"].open()))
    assert [r["variant"] for r in rows] == [s.variant for s in report.summaries]
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["a"]["vs_best"] == "best" and by_variant["d_x"]["vs_best"] == "tied with best"
    assert float(by_variant["c"]["difference"]) == pytest.approx(3.0, abs=0.2)
    assert float(by_variant["b"]["test/nll_iwae ci95_low"]) < float(
        by_variant["b"]["test/nll_iwae mean"]) < float(by_variant["b"]["test/nll_iwae ci95_high"])
    assert by_variant["b"]["test"] == "paired t" and float(by_variant["b"]["p_holm"]) < 1e-4


def slow_down(job: Path, factor: float, val_shift: float) -> None:
    """Make the job ``factor`` times slower per step and shift its validation curve."""
    results = json.loads((job / "results.json").read_text())
    results["wall_time_s"] *= factor
    (job / "results.json").write_text(json.dumps(results))
    rows = (job / "csv" / "metrics.csv").read_text().splitlines()
    shifted = [rows[0]]
    for row in rows[1:]:
        cells = row.split(",")
        if cells[-1]:
            cells[-1] = str(float(cells[-1]) + val_shift)
        shifted.append(",".join(cells))
    (job / "csv" / "metrics.csv").write_text("\n".join(shifted) + "\n")


def test_equal_wall_time_reads_the_curves_at_the_fastest_finish(tmp_path: Path) -> None:
    # write_job: 20 steps, val/neg_elbo = 40 - step / 2 at steps 4, 9, 14, 19, 10 s per run.
    # "slow" takes 4x longer per step but ends 2 nats lower: at the end it wins; at the 10 s
    # the fast variant needed (0.5 s per step), slow is at step 5: its last validation is step 4,
    # 38 - 2 = 36 (+ seed shift), fast's 30.5 (+ seed shift): fast wins at equal time.
    rng = np.random.default_rng(3)
    sweep = tmp_path / "sweep"
    values: dict[str, dict[int, float | None]] = {
        "fast": {s: 25.0 + SEED_EFFECT[s] for s in range(5)},
        "slow": {s: 23.0 + SEED_EFFECT[s] for s in range(5)},
    }
    write_sweep(sweep, values)
    for number in range(10):
        shift = SEED_EFFECT[number % 5] + float(rng.normal(0.0, 0.05))
        slow_down(sweep / str(number), 4.0 if number >= 5 else 1.0,
                  shift - (2.0 if number >= 5 else 0.0))
    report = build_report([sweep])
    assert report.verdict is not None and report.verdict.best == "slow"
    equal = report.equal_time
    assert equal is not None and equal.budget == pytest.approx(10.0)
    assert equal.verdict.best == "fast" and equal.verdict.resolved
    assert equal.values["slow"][0] == pytest.approx(36.0, abs=0.2)
    assert "val/neg_elbo at 10 s" in report.markdown_path.read_text()
    assert "variance_cost.png" in report.figures
    budget = build_report([sweep], tmp_path / "budget", budget_s=40.0).equal_time
    assert budget is not None and budget.verdict.best == "slow"  # both finished by 40 s


def test_bad_options_fail_before_any_work(tmp_path: Path, capsys, no_figures: None) -> None:
    sweep = write_sweep(tmp_path / "sweep", {"a": {0: 20.0, 1: 21.0}})
    assert main([str(sweep), "--budget-s", "-3"]) == 2
    assert capsys.readouterr().err.startswith("error: --budget-s=-3.0: give a positive number")
    assert main([str(sweep), "--rank-by", "test/nll"]) == 2
    assert "error: --rank-by test/nll: no job has this metric; choose one of" in (
        capsys.readouterr().err)
    assert main([str(sweep), "--wandb", "no-slash"]) == 2
    assert "ENTITY/PROJECT" in capsys.readouterr().err
    assert not (sweep / "report.md").exists()


def log_f_evaluations(job: Path, per_step: float, val_shift: float) -> None:
    """Add a ``train/f_evaluations`` column (f evaluations per example in a step) to the job's
    metrics and shift its validation curve."""
    rows = (job / "csv" / "metrics.csv").read_text().splitlines()
    out = [rows[0] + ",train/f_evaluations"]
    for row in rows[1:]:
        cells = row.split(",")
        if cells[-1]:
            cells[-1] = str(float(cells[-1]) + val_shift)
        out.append(",".join([*cells, str(per_step)]))
    (job / "csv" / "metrics.csv").write_text("\n".join(out) + "\n")


def test_equal_f_evaluations_where_estimators_log_them(tmp_path: Path, no_figures: None) -> None:
    # "cheap" evaluates f 4 times per example and step, "costly" 16 times and ends 2 nats lower.
    # Budget: cheap's whole run, 20 steps x 4 = 80 evaluations; costly reaches step 5 there and
    # its last validation (step 4) reads 38 - 2 = 36 against cheap's 30.5 (+ seed shifts).
    rng = np.random.default_rng(4)
    sweep = tmp_path / "sweep"
    write_sweep(sweep, {"cheap": {s: 25.0 + SEED_EFFECT[s] for s in range(5)},
                        "costly": {s: 23.0 + SEED_EFFECT[s] for s in range(5)}})
    for number in range(10):
        costly = number >= 5
        log_f_evaluations(sweep / str(number), 16.0 if costly else 4.0,
                          SEED_EFFECT[number % 5] + float(rng.normal(0.0, 0.05))
                          - (2.0 if costly else 0.0))
    report = build_report([sweep])
    evaluations = report.equal_evaluations
    assert evaluations is not None and evaluations.budget == pytest.approx(80.0)
    assert evaluations.values["costly"][0] == pytest.approx(36.0, abs=0.2)
    assert evaluations.verdict.best == "cheap" and evaluations.verdict.resolved
    assert "Equal f evaluations: val/neg_elbo at 80 f evaluations" in (
        report.markdown_path.read_text())
