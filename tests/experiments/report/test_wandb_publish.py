"""The wandb side of the report, without network: the Report specification, the one-line
failures of the online path (no login, offline mode, unreachable server, a hanging save) and the
offline report run with the figures as media."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from experiments.report import wandb_publish
from experiments.report.sweep_report import main
from experiments.report.wandb_publish import (
    WandbReportError,
    build_report_spec,
    publish_report,
    save_with_timeout,
)


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No API key anywhere, and any attempt to open a connection fails the test."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "online")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(wandb_publish.socket, "create_connection", no_network)


def test_report_spec_compares_the_groups_runs_by_variant() -> None:
    import wandb_workspaces.reports.v2 as wr

    report = build_report_spec("team", "catgrad", "compare_estimators_x", "A title")
    assert (report.entity, report.project, report.title) == ("team", "catgrad", "A title")
    grids = [block for block in report.blocks if isinstance(block, wr.PanelGrid)]
    assert len(grids) == 2
    for grid in grids:
        (runset,) = grid.runsets
        assert runset.filters == "Group = 'compare_estimators_x'"
        assert runset.groupby == ["config.variant"]
    bars = [p for p in grids[0].panels if isinstance(p, wr.BarPlot)]
    assert {p.metrics[0] for p in bars} == {"test/nll_iwae", "test/neg_elbo", "test/accuracy"}
    lines = [p for p in grids[1].panels if isinstance(p, wr.LinePlot)]
    assert {"val/neg_elbo", "train/temperature"} <= {y for p in lines for y in p.y}
    assert all(p.groupby == wr.Config("variant") for p in [*bars, *lines])
    assert any(p.metric_regex and "log10_trace_cov" in p.metric_regex for p in lines)


def test_report_spec_leads_with_the_verdict_when_given() -> None:
    import wandb_workspaces.reports.v2 as wr

    summary = "Winner: a on test/nll_iwae\n\n| rank | variant |\n| --- | --- |\n| 1 | a |"
    report = build_report_spec("team", "catgrad", "g", "t", summary)
    heading, text = report.blocks[0], report.blocks[1]
    assert isinstance(heading, wr.H1) and isinstance(text, wr.MarkdownBlock)
    assert text.text == summary
    plain = build_report_spec("team", "catgrad", "g", "t")
    assert not any(isinstance(block, wr.MarkdownBlock) for block in plain.blocks)


def test_without_login_fails_with_one_line_and_no_network(no_credentials, capsys) -> None:
    start = time.perf_counter()
    code = main(["--wandb", "team/catgrad", "--group", "g"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: not logged in to wandb")
    assert time.perf_counter() - start < 5


def test_offline_mode_and_bad_arguments_fail_clearly(no_credentials, monkeypatch) -> None:
    with pytest.raises(WandbReportError, match="ENTITY/PROJECT"):
        publish_report("catgrad", "g", "t")
    with pytest.raises(WandbReportError, match="--group"):
        publish_report("team/catgrad", None, "t")
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(WandbReportError, match="only be saved online"):
        publish_report("team/catgrad", "g", "t")


def test_unreachable_server_fails_fast(no_credentials, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb_publish, "reachable", lambda url, timeout=5.0: False)
    with pytest.raises(WandbReportError, match="cannot reach https://api.wandb.ai"):
        publish_report("team/catgrad", "g", "t")


def test_reachable_uses_a_bounded_connection_attempt(monkeypatch) -> None:
    seen: dict[str, object] = {}

    def fake_connect(address: tuple[str, int], timeout: float) -> None:
        seen.update(address=address, timeout=timeout)
        raise OSError("unreachable")

    monkeypatch.setattr(wandb_publish.socket, "create_connection", fake_connect)
    assert not wandb_publish.reachable("https://wandb.example.org", timeout=2.0)
    assert seen == {"address": ("wandb.example.org", 443), "timeout": 2.0}


def test_a_hanging_save_is_abandoned() -> None:
    class Hanging:
        def save(self) -> None:
            time.sleep(30)

    start = time.perf_counter()
    with pytest.raises(WandbReportError, match="took over"):
        save_with_timeout(Hanging(), timeout=0.2)
    assert time.perf_counter() - start < 2


@pytest.mark.slow
def test_report_figures_are_logged_to_an_offline_wandb_run(tmp_path: Path, monkeypatch) -> None:
    from experiments.report.sweep_report import build_report
    from experiments.report.wandb_publish import log_report_run
    from tests.experiments.report.test_sweep_report import write_job

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    write_job(sweep, 0, "a", 0, 20.0)
    write_job(sweep, 1, "b", 0, 21.0)
    report = build_report([sweep])
    log_report_run(report, "my_sweep")
    (run,) = (sweep / "wandb").glob("offline-run-*")
    images = {p.name.rsplit("_", 2)[0] for p in run.glob("files/media/images/report/*.png")}
    assert images == set(name.removesuffix(".png") for name in report.figures)
    assert list(run.glob("files/media/table/report/summary_*.table.json"))
    (verdict,) = run.glob("files/media/html/report/verdict_*.html")
    assert report.verdict_line() in verdict.read_text()  # one seed each: "Not resolved: ..."
    record = next(run.glob("run-*.wandb"))
    deadline = time.monotonic() + 20  # wandb's service process may still be flushing the file
    while b"my_sweep" not in record.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"my_sweep" in record.read_bytes()  # the group
