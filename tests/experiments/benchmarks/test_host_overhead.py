"""experiments.benchmarks.host_overhead: each variant switches off what it names, and the
benchmark runs interleaved and writes its table and JSON. (No timing asserts.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Checkpoint, ProgressBar

from experiments.benchmarks import host_overhead
from experiments.benchmarks.training_speed import MNIST_SHAPE
from experiments.training.callbacks import SamplesPerSecond, StepSeeding, StopOnNonFinite

TINY = [*MNIST_SHAPE, "datamodule.num_examples=400", *host_overhead.TINY_NETWORKS]


def kinds(trainer) -> set[type]:
    found = set()
    for callback in trainer.callbacks:
        for kind in (Checkpoint, ProgressBar, SamplesPerSecond, StepSeeding, StopOnNonFinite):
            if isinstance(callback, kind):
                found.add(kind)
    return found


def test_defaults_have_every_component_and_lightning_only_none(tmp_path: Path) -> None:
    _, _, _, defaults = host_overhead.build_variant("defaults", TINY, 5, tmp_path / "a")
    assert kinds(defaults) == {Checkpoint, ProgressBar, SamplesPerSecond, StepSeeding,
                               StopOnNonFinite}
    assert len(defaults.loggers) == 2
    _, _, _, bare = host_overhead.build_variant("lightning_only", TINY, 5, tmp_path / "b")
    assert kinds(bare) == set() and bare.loggers == []


@pytest.mark.parametrize("name, missing", [
    ("no_progress_bar", ProgressBar), ("no_samples_per_s", SamplesPerSecond),
    ("no_checkpoints", Checkpoint), ("no_finite_checks", StopOnNonFinite),
    ("no_reseeding", StepSeeding),
])
def test_each_variant_drops_its_component_only(tmp_path: Path, name: str, missing: type) -> None:
    _, _, _, trainer = host_overhead.build_variant(name, TINY, 5, tmp_path)
    everything = {Checkpoint, ProgressBar, SamplesPerSecond, StepSeeding, StopOnNonFinite}
    assert kinds(trainer) == everything - {missing}


def test_benchmark_writes_each_variants_figures(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("CATGRAD_DATA_DIR", raising=False)  # generated data of MNIST's shape
    out = tmp_path / "host.json"
    host_overhead.main(["datamodule.num_examples=400", "--variants", "defaults", "no_reseeding",
                        "--rounds", "1", "--blocks", "2", "--block", "3", "--warmup", "2",
                        "--json", str(out)])
    assert "no_reseeding" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert set(written["variants"]) == {"defaults", "no_reseeding"}
    for name, figures in written["variants"].items():
        assert len(written["rows"][name]) == 2
        for key in ("catgrad_ms", "bare_ms", "ratio", "catgrad_ms_cpu", "ratio_cpu"):
            assert math.isfinite(figures[key]) and figures[key] > 0, (name, key)
    assert written["variants"]["defaults"]["cost_ms"] == 0.0


def test_host_profile_splits_a_step_into_parts(monkeypatch, capsys) -> None:
    from experiments.benchmarks import host_profile

    monkeypatch.delenv("CATGRAD_DATA_DIR", raising=False)
    parts = host_profile.main(["datamodule.num_examples=400", "--steps", "6"])
    assert "lightning_only: " in capsys.readouterr().out
    assert parts["objective (model forward, loss)"] > 0
    assert parts["autograd backward"] > 0 and parts["next batch (datamodule and fetcher)"] > 0
    assert all(math.isfinite(ms) for ms in parts.values())
