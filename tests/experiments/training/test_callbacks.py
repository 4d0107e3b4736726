"""The per-step callbacks: what they guarantee, with the least host work per step."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar

from experiments.training.builder import build, build_trainer
from experiments.training.callbacks import (
    NonFiniteLossError,
    ProgressBar,
    StopOnNonFinite,
    flag_non_finite,
)
from experiments.training.job import finish_wandb  # noqa: F401  (registers the run-dir resolver)

SMALL_RUN = [
    "datamodule=synthetic", "datamodule.num_examples=200", "datamodule.batch_size=10",
    "model.encoder_hidden=[8]", "model.decoder_hidden=[8]", "model.num_variables=2",
    "model.num_classes=3", "trainer.max_steps=20", "trainer.log_every_n_steps=5",
    "trainer.limit_val_batches=0", "logger=csv_only", "~callbacks.progress_bar",
]


def test_samples_per_second_is_on_every_written_row(compose_config, tmp_path: Path) -> None:
    cfg = compose_config(SMALL_RUN, tmp_path / "run")
    model, datamodule = build(cfg)
    build_trainer(cfg, tmp_path / "run").fit(model, datamodule=datamodule)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/neg_elbo")]
    assert [int(row["step"]) for row in rows] == [4, 9, 14, 19]
    assert all(float(row["train/samples_per_s"]) > 0 for row in rows)


def test_flag_non_finite_is_exact_over_tensors_of_several_dtypes() -> None:
    finite = [torch.full((3, 4), 1e30), torch.ones(5, dtype=torch.float64)]  # a sum would overflow
    assert float(flag_non_finite(finite)) == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensors = [t.clone() for t in finite]
        tensors[1][2] = bad
        assert float(flag_non_finite(tensors)) == 1.0
    assert finite[0].eq(1e30).all()  # values untouched


class SqrtAtZero(L.LightningModule):
    """Loss |w| through sqrt(w^2) at w = 0: finite loss, NaN gradient (0/0)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return (self.w**2).sqrt().sum() + 0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)))


@pytest.mark.parametrize("check_gradients, stops", [(True, "gradient"), (False, None)])
def test_non_finite_gradient_stops_before_the_update(tmp_path, check_gradients, stops) -> None:
    model = SqrtAtZero()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StopOnNonFinite(check_gradients)], default_root_dir=tmp_path)
    if stops:
        with pytest.raises(NonFiniteLossError, match="non-finite gradient at step 0"):
            trainer.fit(model)
        assert model.w.eq(0).all()
    else:
        trainer.fit(model)
        assert model.w.isnan().all()  # unchecked: the NaN gradient reached the parameters


def test_progress_bar_updates_every_n_steps_and_at_the_epochs_end(monkeypatch) -> None:
    updated: list[int] = []
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end",
                        lambda self, trainer, module, outputs, batch, index: updated.append(index))
    bar = ProgressBar(every_n_steps=10)
    bar._trainer = SimpleNamespace(num_training_batches=25, max_epochs=1, max_steps=-1)
    for index in range(25):
        bar.on_train_batch_end(bar._trainer, None, None, None, index)
    assert updated == [9, 19, 24]


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "10"])
def test_progress_bar_refuses_a_bad_interval_in_one_line(value) -> None:
    with pytest.raises(ValueError, match=r"callbacks\.progress_bar\.every_n_steps=.* is invalid"):
        ProgressBar(every_n_steps=value)
