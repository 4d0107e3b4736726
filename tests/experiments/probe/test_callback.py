"""GradientProbe during training: logged keys, the run directory's file, an unchanged trajectory."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch

from datamodules.toy import ToyDataModule
from estimators import GumbelSoftmax, ScoreFunction
from experiments.probe.callback import GradientProbe
from experiments.training.job import run
from models.toy import ToyProblem

GROUPS = ("encoder", "decoder", "all", "logits")
METRICS = ("log10_trace_cov", "mean_grad_sq_norm", "snr", "bias_norm", "mse", "cosine")


def test_callback_logs_and_stores_probe_metrics_during_a_short_fit(compose_config, tmp_path):
    overrides = [
        "model=vae",
        "datamodule=synthetic",
        "estimator=st_gumbel_softmax",
        "model.num_variables=2",  # 3^2 = 9 configurations: exact gradient, bias metrics
        "model.num_classes=3",
        "model.encoder_hidden=[16]",
        "model.decoder_hidden=[16]",
        "model.iwae_samples=8",
        "trainer.max_steps=3",
        "trainer.max_epochs=1",
        "logger=csv_only",
        "callbacks=probe",
        "callbacks.gradient_probe.every_n_steps=2",
        "callbacks.gradient_probe.num_samples=8",
        "callbacks.gradient_probe.chunk_size=4",
        "+estimator@callbacks.gradient_probe.estimators.sf=score_function",
    ]
    run(compose_config(overrides, run_dir=tmp_path))
    with (tmp_path / "csv" / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    logged = {key for row in rows for key, value in row.items() if value not in ("", None)}
    for estimator in ("st_gumbel_softmax", "sf"):
        for group in GROUPS:
            for metric in METRICS:
                assert f"probe/{estimator}/{group}/{metric}" in logged
        assert f"probe/{estimator}/seconds" in logged
    assert "probe/st_gumbel_softmax/temperature" in logged
    records = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert {(r["step"], r["estimator"], r["group"]) for r in records} == {
        (step, estimator, group)
        for step in (0, 2)
        for estimator in ("st_gumbel_softmax", "sf")
        for group in GROUPS
    }
    assert all(r["num_samples"] == 8 and r["method"] == "vmap" for r in records)
    assert all(r["bias_norm"] is not None and r["trace_cov"] > 0 for r in records)


def fit_toy(callbacks: list[L.Callback], root) -> torch.Tensor:
    L.seed_everything(0)
    model = ToyProblem(ScoreFunction(), num_variables=2, num_classes=3)
    trainer = L.Trainer(
        max_steps=12,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=ToyDataModule(batch_size=4, steps_per_epoch=12))
    return model.theta.detach().clone()


def test_probing_does_not_change_the_training_trajectory(tmp_path) -> None:
    probe = GradientProbe(
        every_n_steps=3,
        num_samples=16,
        estimators={"gs": GumbelSoftmax()},
        train_estimator_name="sf",
    )
    with_probe = fit_toy([probe], tmp_path / "with")
    without = fit_toy([], tmp_path / "without")
    assert torch.equal(with_probe, without)
    records = (tmp_path / "with" / "probe.jsonl").read_text().splitlines()
    assert len(records) == 4 * 2 * 2  # steps 0, 3, 6, 9 x two estimators x {all, logits}


def test_bad_probe_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientProbe(every_n_steps=0)
    with pytest.raises(ValueError, match="num_samples"):
        GradientProbe(num_samples=1)
    with pytest.raises(ValueError, match="method"):
        GradientProbe(method="fast")
    with pytest.raises(ValueError, match="not an Estimator"):
        GradientProbe(estimators={"x": "score_function"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="nothing to probe"):
        GradientProbe(include_train_estimator=False)
    with pytest.raises(ValueError, match="used by both"):
        GradientProbe(estimators={"train": ScoreFunction()})
