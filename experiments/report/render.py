"""Rendering the report: tables as Markdown and as a self-contained HTML page.

Both documents hold the same sections; the Markdown links its figures (``plots/*.png`` beside
it), the HTML embeds them as base64 data URIs so the single file can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.report.equal_cost import EqualCost
from experiments.report.paired import SEEDS_NEEDED_CAP, Verdict, Versus
from experiments.report.runs import Job
from experiments.report.statistics import TEST_METRICS, Summary, stat


@dataclass
class Table:
    """A header row and body rows of cell text; ``highlight`` holds body row indices."""

    header: list[str]
    rows: list[list[str]]
    highlight: frozenset[int] = frozenset()


@dataclass
class Section:
    """A heading with optional paragraphs, a table and a figure (name of a PNG)."""

    title: str
    paragraphs: list[str]
    table: Table | None = None
    figure: str | None = None


def p_text(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3g}"  # 3 digits: 0.0499 is not 0.050


def seeds_needed_text(versus: Versus) -> str:
    """Seeds for power 0.8 at the observed effect; ``≤ n`` when already resolved with n."""
    if not versus.tied:
        return f"≤ {versus.n}"
    if versus.seeds_needed is None:
        return "–"
    return f"> {SEEDS_NEEDED_CAP}" if versus.seeds_needed > SEEDS_NEEDED_CAP else str(
        versus.seeds_needed)


def comparison_cells(verdict: Verdict | None, variant: str) -> list[str]:
    """Δ vs best [95 % CI], p (t, Holm), p (Wilcoxon), the mark and the seeds needed."""
    versus = verdict.versus.get(variant) if verdict else None
    mark = verdict.mark(variant) if verdict else "–"
    if versus is None:
        return ["–", "–", "–", mark, "–"]
    interval = "" if versus.ci is None else f" [{versus.ci[0]:+.2f}, {versus.ci[1]:+.2f}]"
    method = " (Welch)" if versus.method == "Welch" else ""
    if versus.method == "untested":
        method = f" ({versus.reason})"
    elif versus.unpaired_seeds:
        method = f" ({versus.n} pairs)"
    return [f"{versus.difference:+.2f}{interval}", p_text(versus.p_holm) + method,
            p_text(versus.p_wilcoxon), mark, seeds_needed_text(versus)]


def summary_table(summaries: Sequence[Summary], verdict: Verdict | None = None,
                  equal_time: EqualCost | None = None) -> Table:
    """Ranked variants (best first, highlighted): the ranking metric's mean ± std and 95 % CI,
    the paired comparison with the best (``verdict``), the other test metrics (mean ± std), the
    validation metric at equal wall time, speed."""
    metric = verdict.metric if verdict else None
    others = [m for m in TEST_METRICS if m != metric and any(m in s.stats for s in summaries)]
    header = ["rank", "variant", "seeds ok"]
    if metric:
        header += [metric, "95 % CI", "Δ vs best [95 % CI]", "p (t, Holm)", "p (Wilcoxon)",
                   "vs best", "seeds needed"]
    header += others
    if equal_time:
        header += [equal_time.label(), "vs best at equal time"]
    header += ["steps/s", "wall time (s)"]
    rows = []
    for summary in summaries:
        cells = [
            str(summary.rank) if summary.rank is not None else "–",
            summary.variant,
            f"{len(summary.ok)}/{len(summary.jobs)}",
        ]
        if metric and verdict:
            value = summary.stats.get(metric)
            cells += [value.text() if value else "–", value.ci_text() if value else "–"]
            cells += comparison_cells(verdict, summary.variant)
        cells += [summary.stats[m].text() if m in summary.stats else "–" for m in others]
        if equal_time:
            seeds = list(equal_time.values.get(summary.variant, {}).values())
            reached = stat(seeds)
            cells += [reached.text() if reached else "not reached",
                      equal_time.verdict.mark(summary.variant)]
        for key in ("steps_per_s", "wall_time_s"):
            value = summary.stats.get(key)
            cells.append(value.text(1 if key == "wall_time_s" else 2) if value else "–")
        rows.append(cells)
    best = frozenset(i for i, s in enumerate(summaries) if s.rank == 1)
    return Table(header, rows, best)


def jobs_table(jobs: Sequence[Job]) -> Table:
    """Every job: status, variant, seed, test metrics, directory and reason for failures."""
    metrics = [m for m in TEST_METRICS if any(m in j.results for j in jobs)]
    header = ["job", "status", "variant", "seed", *metrics, "resumes", "directory / reason"]
    rows = []
    failed = set()
    for index, job in enumerate(jobs):
        cells = [job.name, job.status, job.variant, "–" if job.seed is None else str(job.seed)]
        for metric in metrics:
            value = job.results.get(metric)
            cells.append(f"{value:.3f}" if isinstance(value, (int, float)) else "–")
        cells.append(str(job.resumes))
        cells.append(str(job.directory) if job.status == "ok" else job.reason)
        if job.status != "ok":
            failed.add(index)
        rows.append(cells)
    return Table(header, rows, frozenset(failed))


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    """A GitHub-flavoured Markdown table; highlighted rows in bold."""
    lines = [
        "| " + " | ".join(md_cell(h) for h in table.header) + " |",
        "| " + " | ".join("---" for _ in table.header) + " |",
    ]
    for index, row in enumerate(table.rows):
        cells = [md_cell(c) for c in row]
        if index in table.highlight:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(title: str, sections: Sequence[Section], figure_dir: str) -> str:
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            parts += [paragraph, ""]
        if section.table is not None:
            parts += [markdown_table(section.table), ""]
        if section.figure is not None:
            parts += [f"![{section.title}]({figure_dir}/{section.figure})", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: left; }
td { white-space: nowrap; }
th { background: #f3f3f3; }
tr.highlight td { background: #fff3c4; font-weight: bold; }
tr.failed td { background: #fde2e2; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def html_table(table: Table, highlight_class: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = []
    for index, row in enumerate(table.rows):
        css = f' class="{highlight_class}"' if index in table.highlight else ""
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row)
        body.append(f"<tr{css}>{cells}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def html_page(title: str, sections: Sequence[Section], figures: Mapping[str, bytes]) -> str:
    """One HTML file with every figure embedded as a base64 PNG."""
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        if section.table is not None:
            css = "failed" if section.title.lower().startswith("jobs") else "highlight"
            parts.append(html_table(section.table, css))
        if section.figure is not None and section.figure in figures:
            data = base64.b64encode(figures[section.figure]).decode("ascii")
            alt = html.escape(section.title)
            parts.append(f'<img alt="{alt}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts)


@dataclass
class Report:
    """What :func:`build_report` wrote and found."""

    markdown_path: Path
    html_path: Path
    jobs: list[Job]
    summaries: list[Summary]
    rank_by: str | None
    figures: dict[str, bytes] = field(default_factory=dict)
    verdict: Verdict | None = None
    equal_time: EqualCost | None = None
    equal_evaluations: EqualCost | None = None
    exports: dict[str, Path] = field(default_factory=dict)  # report.tex, summary.csv

    @property
    def best(self) -> Summary | None:
        return next((s for s in self.summaries if s.rank == 1), None)

    def table(self) -> Table:
        return summary_table(self.summaries, self.verdict, self.equal_time)

    def summary_markdown(self) -> str:
        return markdown_table(self.table())

    def verdict_line(self) -> str:
        return self.verdict.sentence() if self.verdict else "No test metric to rank by."
