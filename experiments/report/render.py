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

from experiments.report.runs import Job
from experiments.report.statistics import TEST_METRICS, Summary


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


def summary_table(summaries: Sequence[Summary]) -> Table:
    """Ranked variants (best first, highlighted): seeds, test metrics (mean ± std), speed."""
    metrics = [m for m in TEST_METRICS if any(m in s.stats for s in summaries)]
    header = ["rank", "variant", "seeds ok", *metrics, "steps/s", "wall time (s)"]
    rows = []
    for summary in summaries:
        cells = [
            str(summary.rank) if summary.rank is not None else "–",
            summary.variant,
            f"{len(summary.ok)}/{len(summary.jobs)}",
        ]
        for key in [*metrics, "steps_per_s", "wall_time_s"]:
            value = summary.stats.get(key)
            digits = 1 if key == "wall_time_s" else 2
            cells.append(value.text(digits) if value is not None else "–")
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
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
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
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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

    @property
    def best(self) -> Summary | None:
        return next((s for s in self.summaries if s.rank == 1), None)

    def summary_markdown(self) -> str:
        return markdown_table(summary_table(self.summaries))
