"""The comparison report on fabricated sweep directories (no training): every job is listed,
statistics over seeds are right, the best variant is highlighted, the HTML is self-contained."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from experiments.report.runs import load_sweeps, planned_overrides
from experiments.report.sweep_report import build_report, main

# variant -> test/nll_iwae per seed (lower is better: "b" wins)
NLL = {"a": [30.0, 31.0, 32.0], "b": [25.0, 26.0]}


def write_job(sweep: Path, number: int, estimator: str, seed: int, nll: float | None) -> Path:
    """One Hydra job folder as experiments.train leaves it (nll None: the job crashed)."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"estimator={estimator}", f"seed={seed}"])
    )
    choices = {"estimator": estimator, "model": "vae", "datamodule": "synthetic"}
    hydra_cfg = {"hydra": {"runtime": {"choices": choices}}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_cfg))
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"seed": seed, "datamodule": {"batch_size": 10}})
    )
    rows = ["step,epoch,train/neg_elbo,train/temperature,train/samples_per_s,val/neg_elbo"]
    for step in range(0, 20):
        val = f"{40 - step / 2}" if step % 5 == 4 else ""
        rows.append(f"{step},0,{50 - step},{1 - step / 100},{100 + seed},{val}")
    (job / "csv").mkdir()
    (job / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    probe = [
        {"version": 1, "step": step, "epoch": 0, "estimator": estimator, "group": group,
         "log10_trace_cov": -1.0 - step / 10, "snr": 0.5, "bias_norm": 0.01, "num_samples": 8}
        for step in (0, 10) for group in ("logits", "encoder", "decoder")
    ]
    (job / "probe.jsonl").write_text("".join(json.dumps(row) + "\n" for row in probe))
    if nll is not None:
        results = {"status": "completed", "test/nll_iwae": nll, "test/neg_elbo": nll + 1,
                   "wall_time_s": 10.0, "global_step": 20, "seed": seed, "estimator": estimator}
        (job / "results.json").write_text(json.dumps(results))
    else:
        (job / "train.log").write_text("[INFO] start\nRuntimeError: boom at step 3\n")
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep ``seed=0,1,2 estimator=a,b``: job 5 (b, seed 2) never started; an extra job 6
    (b, seed 3) crashed without results.json."""
    root = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    root.mkdir(parents=True)
    master = {"hydra": {"sweeper": {"params": {"seed": "0,1,2"}},
                        "overrides": {"task": ["estimator=a,b"]}}}
    (root / "multirun.yaml").write_text(yaml.safe_dump(master))
    # Hydra's order: the product over estimator (params first: seed, then estimator).
    number = 0
    for seed in range(3):
        for estimator in ("a", "b"):
            if estimator == "b" and seed == 2:
                number += 1  # job 5 never started: no folder at all
                continue
            write_job(root, number, estimator, seed, NLL[estimator][seed])
            number += 1
    write_job(root, 6, "b", 3, None)  # an extra job that crashed (no results.json)
    return root


def test_planned_jobs_follow_hydra_order(sweep: Path) -> None:
    planned = planned_overrides(sweep)
    assert planned is not None and len(planned) == 6
    assert planned[0] == ["seed=0", "estimator=a"] and planned[5] == ["seed=2", "estimator=b"]


def test_every_job_is_listed_with_its_status(sweep: Path) -> None:
    jobs = {job.number: job for job in load_sweeps([sweep])}
    assert jobs[5].status == "missing" and "never started" in jobs[5].reason
    assert jobs[6].status == "failed" and "boom at step 3" in jobs[6].reason
    assert [jobs[n].status for n in range(5)] == ["ok"] * 5
    assert jobs[0].variant == "a" and jobs[1].variant == "b" and jobs[1].seed == 0


def test_report_statistics_ranking_and_files(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = build_report([sweep], out)
    by_variant = {s.variant: s for s in report.summaries}
    a, b = by_variant["a"], by_variant["b"]
    assert a.stats["test/nll_iwae"].mean == pytest.approx(statistics.fmean(NLL["a"]))
    assert a.stats["test/nll_iwae"].std == pytest.approx(statistics.stdev(NLL["a"]))
    assert b.stats["test/nll_iwae"].count == 2 and len(b.failed) == 1
    assert report.rank_by == "test/nll_iwae" and report.best is b and a.rank == 2
    assert b.stats["steps_per_s"].mean == pytest.approx(10.05)  # 100.5 samples/s / batch 10
    assert set(report.figures) >= {"test_metrics.png", "curves.png", "probe.png",
                                   "temperature.png", "speed.png"}
    text = report.markdown_path.read_text()
    assert "| **1** | **b** | **2/3** |" in text  # best row highlighted; 2 of 3 jobs ok
    assert "never started" in text and "boom at step 3" in text
    for name in report.figures:
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    page = report.html_path.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(report.figures)
    assert all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    assert 'class="highlight"' in page and 'class="failed"' in page


def test_several_sweeps_and_the_cli(sweep: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    write_job(other, 0, "c", 0, 20.0)
    out = tmp_path / "both"
    assert main([str(sweep), str(other), "--out", str(out), "--rank-by", "test/neg_elbo"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    assert "| **1** | **c** |" in printed and "jobs failed or never started" in printed


def test_cli_rejects_a_missing_directory(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: no such sweep")
