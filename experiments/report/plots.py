"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

Per variant, curves are averaged over its seeds on the first seed's steps (others interpolated),
with a band of ± one standard deviation where there are several seeds.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from experiments.report.runs import Series  # noqa: E402
from experiments.report.statistics import PROBE_METRICS, Summary  # noqa: E402

PROBE_GROUPS = ("logits", "encoder", "decoder")


def to_png(figure: Figure) -> bytes:
    """Render and close ``figure``."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def mean_band(runs: Sequence[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over runs on the first run's x values (the others interpolated)."""
    x = np.asarray(runs[0][0], dtype=float)
    values = np.vstack([np.interp(x, np.asarray(s, float), np.asarray(v, float)) for s, v in runs])
    return x, values.mean(axis=0), values.std(axis=0)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (for noisy per-step training metrics)."""
    if window <= 1 or len(values) < 2:
        return list(values)
    array = np.asarray(values, dtype=float)
    cumulative = np.cumsum(np.insert(array, 0, 0.0))
    out = [(cumulative[i + 1] - cumulative[max(0, i + 1 - window)]) / min(i + 1, window)
           for i in range(len(array))]
    return out


@dataclass
class Palette:
    """One colour and line style per variant, the same in every figure; ``best`` drawn thicker.

    Labels ``"<variant> | <estimator>"`` (other estimators probed along a variant's runs) take
    their variant's colour, dashed."""

    variants: Sequence[str]
    best: str | None = None

    def style(self, label: str) -> dict[str, object]:
        variant, _, other = label.partition(" | ")
        index = list(self.variants).index(variant) if variant in self.variants else 0
        styles = ("-", "--", ":", "-.")
        return {
            "color": COLORS(index % COLORS.N),
            "linestyle": "--" if other else styles[(index // COLORS.N) % len(styles)],
            "linewidth": 2.6 if label == self.best else 1.3,
        }


COLORS = matplotlib.colormaps["tab20"]


def draw_bands(axes: Axes, by_variant: Mapping[str, Sequence[Series]], palette: Palette) -> None:
    """One mean line (and std band) per variant."""
    for variant, runs in by_variant.items():
        runs = [run for run in runs if len(run[0]) > 0]
        if not runs:
            continue
        x, mean, std = mean_band(runs)
        style = palette.style(variant)
        axes.plot(x, mean, label=variant, **style)  # type: ignore[arg-type]
        if len(runs) > 1:
            axes.fill_between(x, mean - std, mean + std, alpha=0.12, color=style["color"])


def legend_outside(figure: Figure, axes: Axes) -> None:
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def test_metrics_figure(summaries: Sequence[Summary], metrics: Sequence[str]) -> bytes | None:
    """Horizontal bars: each test metric per variant, mean ± std over seeds (best in red)."""
    metrics = [m for m in metrics if any(s.stats.get(m) for s in summaries)]
    if not metrics or not summaries:
        return None
    height = 0.45 * len(summaries) + 1.2
    figure, axes_row = plt.subplots(
        1, len(metrics), figsize=(4.2 * len(metrics), height), squeeze=False
    )
    labels = [s.variant for s in summaries]
    for column, (axes, metric) in enumerate(zip(axes_row[0], metrics, strict=True)):
        means = [s.stats[metric].mean if metric in s.stats else np.nan for s in summaries]
        stds = [s.stats[metric].std if metric in s.stats else 0.0 for s in summaries]
        colors = ["tab:red" if s.rank == 1 else "tab:blue" for s in summaries]
        positions = np.arange(len(summaries))
        axes.barh(positions, means, xerr=stds, color=colors, alpha=0.8, capsize=3)
        axes.set_yticks(positions, labels if column == 0 else [""] * len(labels), fontsize=8)
        axes.invert_yaxis()
        finite = [m for m in means if np.isfinite(m)]
        if finite:
            low, high = min(finite), max(finite)
            pad = max(0.05 * (high - low), 0.5 * (max(stds) or 0.0), 1e-3)
            axes.set_xlim(low - 3 * pad, high + 3 * pad)
        axes.set_title(metric, fontsize=10)
        axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return to_png(figure)


def curves_figure(
    panels: Sequence[tuple[str, str, Mapping[str, Sequence[Series]]]],
    palette: Palette,
    log_y: Callable[[str], bool] = lambda _: False,
) -> bytes | None:
    """Side-by-side panels of ``(title, x label, {variant: runs})``; None when all are empty."""
    panels = [p for p in panels if any(p[2].values())]
    if not panels:
        return None
    figure, axes_row = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for axes, (title, x_label, by_variant) in zip(axes_row[0], panels, strict=True):
        draw_bands(axes, by_variant, palette)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel(x_label)
        axes.grid(alpha=0.3)
        if log_y(title):
            axes.set_yscale("log")
    legend_outside(figure, axes_row[0][0])
    figure.tight_layout()
    return to_png(figure)


def probe_figure(
    series: Mapping[tuple[str, str, str], Sequence[Series]], palette: Palette
) -> bytes | None:
    """Grid of probe metrics (rows) by parameter group (columns) over training steps.

    ``series`` maps ``(metric, group, variant)`` to one ``(steps, values)`` per seed.
    """
    metrics = [m for m in PROBE_METRICS if any(k[0] == m[0] and v for k, v in series.items())]
    groups = [g for g in PROBE_GROUPS if any(k[1] == g for k in series)]
    if not metrics or not groups:
        return None
    figure, grid = plt.subplots(
        len(metrics), len(groups), figsize=(4.4 * len(groups), 3.0 * len(metrics)), squeeze=False
    )
    for row, (metric, label, log_scale) in enumerate(metrics):
        for column, group in enumerate(groups):
            axes = grid[row][column]
            by_variant = {k[2]: v for k, v in series.items() if k[0] == metric and k[1] == group}
            draw_bands(axes, by_variant, palette)
            if log_scale and any(v for v in by_variant.values()):
                axes.set_yscale("log")
            axes.set_title(f"{group}: {label}", fontsize=9)
            axes.grid(alpha=0.3)
            if row == len(metrics) - 1:
                axes.set_xlabel("training step")
    legend_outside(figure, grid[0][0])
    figure.tight_layout()
    return to_png(figure)


def speed_figure(summaries: Sequence[Summary]) -> bytes | None:
    """Training throughput per variant (steps/s, mean ± std over seeds)."""
    rows = [s for s in summaries if "steps_per_s" in s.stats]
    if not rows:
        return None
    figure, axes = plt.subplots(figsize=(6.0, 0.45 * len(rows) + 1.2))
    positions = np.arange(len(rows))
    axes.barh(
        positions,
        [s.stats["steps_per_s"].mean for s in rows],
        xerr=[s.stats["steps_per_s"].std for s in rows],
        color="tab:green",
        alpha=0.8,
        capsize=3,
    )
    axes.set_yticks(positions, [s.variant for s in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("training steps per second")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return to_png(figure)


def smoothed_runs(runs: Sequence[Series], points: int) -> list[Series]:
    """Each run smoothed over ``len / points`` logged values (none for sparse logs)."""
    return [(steps, smooth(values, len(values) // points)) for steps, values in runs]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower cost and lower variance)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def variance_cost_figure(points: Mapping[str, tuple[float, float | None]], palette: Palette
                         ) -> bytes | None:
    """log10 tr Cov of the gradient against milliseconds per training step, one point per
    variant, with the efficient frontier; exact estimators (zero variance) along the bottom."""
    finite = {v: (x, y) for v, (x, y) in points.items() if y is not None}
    if len(points) < 2 or not finite:
        return None
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    floor = min(y for _, y in finite.values()) - 0.5
    placed = {v: (x, floor if y is None else y) for v, (x, y) in points.items()}
    for index, (variant, (x, y)) in enumerate(sorted(placed.items(), key=lambda i: i[1])):
        color = palette.style(variant)["color"]
        exact = points[variant][1] is None
        axes.scatter([x], [y], color=color, marker="v" if exact else "o", s=60,  # type: ignore[arg-type]
                     zorder=3)
        label = f"{variant} (exact: tr Cov = 0)" if exact else variant
        offset = (5, 4) if index % 2 == 0 else (5, -11)  # neighbours on alternate sides
        axes.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    front = pareto_front(list(placed.values()))
    axes.step([x for x, _ in front], [y for _, y in front], where="post", color="grey",
              linestyle="--", linewidth=1, label="efficient frontier")
    axes.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.tick_params(axis="x", which="minor", labelsize=7)
    axes.set_xlabel("milliseconds per training step (log scale)")
    axes.set_ylabel("log10 tr Cov of the encoder gradient")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    return to_png(figure)
