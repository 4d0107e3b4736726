"""The summary table in the formats researchers paste: ``summary.csv`` (numbers, one row per
variant) and ``report.tex`` (a booktabs table: mean ± std, best in bold, tied variants marked)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from experiments.report.equal_cost import EqualCost
from experiments.report.paired import Verdict
from experiments.report.render import p_text
from experiments.report.statistics import TEST_METRICS, Stat, Summary, stat

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}"}


def number(value: float | int | None) -> str:
    """A CSV cell: the full-precision number, or empty."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def stat_cells(value: Stat | None) -> list[str]:
    if value is None:
        return ["", "", "", "", ""]
    low, high = value.ci if value.ci else (None, None)
    return [number(value.mean), number(value.std), number(low), number(high), str(value.count)]


def csv_rows(summaries: Sequence[Summary], verdict: Verdict | None,
             equal_time: EqualCost | None) -> list[list[str]]:
    """Header and one row per variant: every column of the report's table, as numbers."""
    metrics = [m for m in TEST_METRICS if any(m in s.stats for s in summaries)]
    header = ["rank", "variant", "jobs", "jobs_ok"]
    for key in [*metrics, "steps_per_s", "wall_time_s"]:
        header += [f"{key} mean", f"{key} std", f"{key} ci95_low", f"{key} ci95_high",
                   f"{key} seeds"]
    header += ["vs_best", "test", "pairs", "difference", "difference ci95_low",
               "difference ci95_high", "p_t", "p_holm", "p_wilcoxon", "seeds_needed"]
    if equal_time:
        header += [f"{equal_time.column} at {equal_time.budget:.6g} {equal_time.axis} mean",
                   "equal_time std", "equal_time seeds", "equal_time vs_best",
                   "equal_time p_holm"]
    rows = [header]
    for summary in summaries:
        row = [number(summary.rank), summary.variant, str(len(summary.jobs)),
               str(len(summary.ok))]
        for key in [*metrics, "steps_per_s", "wall_time_s"]:
            row += stat_cells(summary.stats.get(key))
        versus = verdict.versus.get(summary.variant) if verdict else None
        row.append(verdict.mark(summary.variant) if verdict else "")
        if versus is None:
            row += ["", "", "", "", "", "", "", "", ""]
        else:
            low, high = versus.ci if versus.ci else (None, None)
            row += [versus.method, str(versus.n), number(versus.difference), number(low),
                    number(high), number(versus.p_t), number(versus.p_holm),
                    number(versus.p_wilcoxon), number(versus.seeds_needed)]
        if equal_time:
            reached = stat(list(equal_time.values.get(summary.variant, {}).values()))
            other = equal_time.verdict.versus.get(summary.variant)
            row += [number(reached.mean) if reached else "", number(reached.std)
                    if reached else "", str(reached.count) if reached else "0",
                    equal_time.verdict.mark(summary.variant),
                    number(other.p_holm) if other else ""]
        rows.append(row)
    return rows


def write_csv(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    with path.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    return path


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in text)


def latex_table(summaries: Sequence[Summary], verdict: Verdict | None) -> str:
    """A booktabs table of the ranked variants (needs ``\\usepackage{booktabs}``)."""
    metric = verdict.metric if verdict else None
    metrics = [m for m in TEST_METRICS if any(m in s.stats for s in summaries)]
    if metric in metrics:
        metrics.remove(metric)
        metrics.insert(0, metric)
    header = ["variant", *[latex_escape(m) for m in metrics]]
    if verdict:
        header += [r"$\Delta$ vs best [95\,\% CI]", r"$p$ (Holm)", "seeds needed"]
    header.append("steps/s")
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(header) - 1)
             + "}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for summary in summaries:
        is_best = verdict is not None and summary.variant == verdict.best
        tied = verdict is not None and verdict.mark(summary.variant) == "tied with best"
        name = latex_escape(summary.variant) + (r"$^\dagger$" if tied else "")
        cells = [name]
        for key in metrics:
            value = summary.stats.get(key)
            text = f"${value.mean:.2f} \\pm {value.std:.2f}$" if value else "--"
            cells.append(f"$\\mathbf{{{text.strip('$')}}}$" if is_best and value else text)
        if verdict:
            versus = verdict.versus.get(summary.variant)
            if versus is None:
                cells += ["--", "--", "--"]
            else:
                ci = (f" [{versus.ci[0]:+.2f}, {versus.ci[1]:+.2f}]" if versus.ci else "")
                needed = versus.seeds_needed
                cells += [f"${versus.difference:+.2f}${ci}",
                          p_text(versus.p_holm).replace("–", "--").replace("< ", "$<$"),
                          (f"$\\le {versus.n}$" if not versus.tied else
                           "--" if needed is None else str(needed))]
        rate = summary.stats.get("steps_per_s")
        cells.append(f"{rate.mean:.0f}" if rate else "--")
        lines.append(" & ".join(cells) + r" \\")
    caption = "Mean $\\pm$ std over seeds; best in bold."
    if verdict and metric:
        caption += (f" Ranked by {latex_escape(metric)}; $\\dagger$: tied with the best (paired "
                    "$t$ test over seeds, Holm-corrected, 5\\,\\% level). "
                    + latex_escape(verdict.sentence()).replace("<=", r"$\le$"))
    lines += [r"\bottomrule", r"\end{tabular}", f"\\caption{{{caption}}}",
              r"\label{tab:estimators}", r"\end{table}", ""]
    return "\n".join(lines)
