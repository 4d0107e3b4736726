"""Smoke test of experiments.benchmarks.training_speed at tiny sizes: it runs, prints its table,
writes its JSON.
(No timing asserts: the figures depend on the machine and its load.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments.benchmarks import training_speed

TINY = [
    "model.encoder_hidden=[32]",
    "model.decoder_hidden=[32]",
    "model.iwae_samples=10",
    "--rounds", "2", "--block", "3", "--warmup", "2", "--eval-images", "20",
]


@pytest.mark.slow
def test_benchmark_runs_interleaved_and_writes_json(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("CATGRAD_DATA_DIR", raising=False)  # generated data of MNIST's shape
    out = tmp_path / "bench.json"
    results = training_speed.main(
        [*TINY, "--cli-steps", "2", "--json", str(out), "--run-dir", str(tmp_path / "runs")]
    )
    table = capsys.readouterr().out
    for label in ("1 bare PyTorch loop", "2 catgrad", "3 matmul bound", "ratios (CPU ): 2/1"):
        assert label in table
    written = json.loads(out.read_text())
    assert written["blocks"] == 2 and len(written["rows"]) == 2 and written["data"] != "MNIST"
    for path in ("bare", "catgrad", "bound"):
        assert written["samples_per_s"][path] > 0 and written["samples_per_s_cpu"][path] > 0
    for key in ("ratio_catgrad_bare", "ratio_catgrad_bound", "first_step_s", "nll_iwae_s",
                "peak_rss_mb", "cli_first_step_s", "cli_peak_rss_mb", "flops_per_sample"):
        assert math.isfinite(written[key]) and written[key] > 0, key
    assert written["nll_iwae_images"] == 20 and written["nll_iwae_samples"] == 10
    assert results["flops_per_sample"] == written["flops_per_sample"]


def test_matmul_bound_counts_the_flops_of_a_training_step() -> None:
    """The bound's matmuls are exactly the FLOPs the flop counter sees in one bare-loop step."""
    import torch

    from models.networks import mlp

    encoder, decoder = mlp(12, [8], 6), mlp(6, [8], 12)
    bound = training_speed.MatmulBound([encoder, decoder], batch=5, device=torch.device("cpu"))
    layers = [(12, 8), (8, 6), (6, 8), (8, 12)]
    forward = sum(2 * 5 * a * b for a, b in layers)
    first = 2 * 5 * 12 * 8  # the first layer's input needs no gradient
    assert bound.flops == 3 * forward - first
    bound.step()
