"""wandb side of the report.

* :func:`build_report_spec` builds a wandb Report (``wandb-workspaces``) comparing the runs of one
  group (a sweep: ``group = sweep_name``) by estimator variant: test metrics as bars, learning
  curves, gradient-probe curves, temperature and speed. Building it needs no network.
* :func:`publish_report` saves it online (``python -m experiments.report --wandb ENTITY/PROJECT
  --group G``). Reports cannot be saved offline, so it first checks, without waiting, that wandb
  is not in offline mode, that an API key is configured (``WANDB_API_KEY`` or ``wandb login``'s
  netrc entry) and that the server accepts a TCP connection within a few seconds; any failure is
  one :class:`WandbReportError` line, never a hang.
* :func:`log_report_run` logs the offline report's figures and summary table to a wandb run of the
  group (``job_type=report``), offline unless ``WANDB_MODE`` says otherwise.
"""

from __future__ import annotations

import html
import netrc
import os
import socket
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from wandb_workspaces.reports.v2.interface import PanelTypes

    from experiments.report.render import Report

DEFAULT_BASE_URL = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 5.0
SAVE_TIMEOUT_S = 120.0
# wandb run config key grouping runs by variant (conf/logger/wandb.yaml logs it).
VARIANT_KEY = "variant"
TEST_PANELS = ("test/nll_iwae", "test/neg_elbo", "test/accuracy")
CURVE_PANELS = ("val/neg_elbo", "train/neg_elbo", "val/accuracy", "train/temperature",
                "train/samples_per_s")
PROBE_REGEX = r"probe/.*/(logits|encoder)/(log10_trace_cov|snr|bias_norm)"


class WandbReportError(RuntimeError):
    """A one-line reason why the wandb Report cannot be built or saved."""


def split_entity_project(value: str) -> tuple[str, str]:
    entity, _, project = value.partition("/")
    if not entity or not project or "/" in project:
        raise WandbReportError(f"--wandb wants ENTITY/PROJECT, got {value!r}")
    return entity, project


def build_report_spec(entity: str, project: str, group: str, title: str,
                      summary: str | None = None) -> Any:
    """A ``wandb_workspaces.reports.v2.Report`` comparing ``group``'s runs by variant; with
    ``summary`` (the offline report's verdict and table, Markdown) that text comes first."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(
        entity=entity,
        project=project,
        name=group,
        filters=f"Group = '{group}'",
        groupby=[f"config.{VARIANT_KEY}"],
    )
    by_variant = wr.Config(VARIANT_KEY)
    bars: list[PanelTypes] = [
        wr.BarPlot(title=metric, metrics=[metric], groupby=by_variant,
                   groupby_aggfunc="mean", groupby_rangefunc="stddev")
        for metric in TEST_PANELS
    ]
    curves = [
        wr.LinePlot(title=metric, x="trainer/global_step", y=[metric], groupby=by_variant,
                    groupby_aggfunc="mean", groupby_rangefunc="stddev")
        for metric in CURVE_PANELS
    ]
    probe = wr.LinePlot(title="gradient probe", x="trainer/global_step", metric_regex=PROBE_REGEX,
                        groupby=by_variant, groupby_aggfunc="mean", log_y=True)
    verdict_blocks: list[Any] = (
        [wr.H1("Verdict"), wr.MarkdownBlock(text=summary)] if summary else []
    )
    return wr.Report(
        entity=entity,
        project=project,
        title=title,
        description=f"Estimators of sweep {group!r} compared by variant (mean ± std over seeds).",
        blocks=[
            *verdict_blocks,
            wr.H1("Test metrics"),
            wr.PanelGrid(runsets=[runset], panels=bars),
            wr.H1("Training"),
            wr.PanelGrid(runsets=[runset], panels=[*curves, probe]),
        ],
    )


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)


def has_api_key(url: str) -> bool:
    """An API key in the environment or in the netrc file ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(url).hostname or ""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether the wandb server accepts a TCP connection within ``timeout`` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def check_online() -> None:
    """Raise :class:`WandbReportError` unless saving a report can work right now."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in {"offline", "disabled", "dryrun"}:
        raise WandbReportError(
            f"WANDB_MODE={mode}: a wandb Report can only be saved online; run with "
            f"WANDB_MODE=online (offline runs: `wandb sync <run dir>/wandb/offline-run-*` first)"
        )
    url = base_url()
    if not has_api_key(url):
        raise WandbReportError(
            f"not logged in to wandb ({url}): run `wandb login` or set WANDB_API_KEY"
        )
    if not reachable(url):
        raise WandbReportError(f"cannot reach {url} within {CONNECT_TIMEOUT_S:.0f} s: no network?")


def save_with_timeout(report: Any, timeout: float = SAVE_TIMEOUT_S) -> str:
    """``report.save()`` in a daemon thread; a slow or failing save is one error line."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["report"] = report.save()
        except Exception as error:  # noqa: BLE001 - reported as one line
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise WandbReportError(f"saving the wandb Report took over {timeout:.0f} s; gave up")
    if "error" in outcome:
        raise WandbReportError(f"saving the wandb Report failed: {outcome['error']}")
    return str(getattr(outcome["report"], "url", ""))


def publish_report(entity_project: str, group: str | None, title: str,
                   summary: str | None = None) -> str:
    """Build and save the Report of ``group`` (``summary``: see :func:`build_report_spec`);
    returns its URL."""
    entity, project = split_entity_project(entity_project)
    if not group:
        raise WandbReportError("--wandb needs --group G (the sweep's sweep_name)")
    check_online()
    return save_with_timeout(build_report_spec(entity, project, group, title, summary))


def log_report_run(report: Report, group: str | None, project: str = "catgrad") -> str:
    """Log the figures, the summary table and the verdict (as media, and the verdict also in
    the run summary) to a ``job_type=report`` wandb run."""
    import wandb

    # The mode is passed explicitly: wandb caches the settings of its first use in a process,
    # so an environment variable changed afterwards would otherwise be ignored.
    mode = os.environ.setdefault("WANDB_MODE", "offline")
    out = report.markdown_path.parent
    group = group or out.name
    run = wandb.init(
        project=project, group=group, job_type="report", dir=str(out),
        name=f"report-{group}", reinit="finish_previous", mode=mode,  # type: ignore[arg-type]
    )
    try:
        table = report.table()
        columns: list[str | int] = [*table.header]  # wandb's Table takes list[str | int]
        verdict = html.escape(report.verdict_line())
        media: dict[str, Any] = {"report/summary": wandb.Table(columns=columns,
                                                                data=table.rows),
                                 "report/verdict": wandb.Html(f"<p>{verdict}</p>")}
        run.summary["report/verdict"] = report.verdict_line()
        for path in sorted((out / "plots").glob("*.png")):
            media[f"report/{path.stem}"] = wandb.Image(str(path))
        run.log(media)
        return str(run.dir)
    finally:
        run.finish()
