"""The toy problem E_{z~Cat(softmax theta)}[||z - t||^2]: closed forms, validation, training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from datamodules.toy import ToyDataModule
from estimators import Marginalization, ScoreFunction
from estimators.sampling import enumerate_one_hot
from experiments.training.job import run
from models.toy import ToyProblem, default_target


def make_toy(estimator=None, num_variables: int = 2, num_classes: int = 3) -> ToyProblem:
    generator = torch.Generator().manual_seed(3)
    target = torch.rand(num_variables, num_classes, generator=generator).tolist()
    toy = ToyProblem(estimator or Marginalization(), num_variables, num_classes, target=target)
    with torch.no_grad():
        toy.theta.copy_(torch.randn(num_variables, num_classes, generator=generator))
    return toy


def test_exact_cost_and_gradient_match_enumeration_and_autograd() -> None:
    toy = make_toy()
    configs = enumerate_one_hot(2, 3)  # [9, 2, 3]
    log_q = (configs * toy.theta.log_softmax(-1)).sum(dim=(-1, -2))  # [9]
    enumerated = (log_q.exp() * toy.cost(configs.unsqueeze(1)).squeeze(1)).sum()
    assert torch.allclose(toy.exact_cost(), enumerated, atol=1e-6)
    (autograd,) = torch.autograd.grad(enumerated, toy.theta)
    assert torch.allclose(toy.exact_gradient(), autograd, atol=1e-6)


def test_objective_gradient_with_marginalization_is_the_exact_gradient() -> None:
    toy = make_toy()
    batch = (torch.zeros(5, 1), torch.zeros(5))
    loss, metrics = toy.objective(batch, toy.estimator)
    (gradient,) = torch.autograd.grad(loss, toy.theta)
    assert torch.allclose(gradient, toy.exact_gradient(), atol=1e-6)
    assert torch.allclose(torch.as_tensor(metrics["value"]), toy.exact_cost(), atol=1e-6)


def test_default_target_and_bad_target_shape() -> None:
    assert torch.allclose(default_target(1, 2), torch.tensor([[0.499, 0.501]]))
    toy = ToyProblem(ScoreFunction(), num_variables=2, num_classes=4)
    assert toy.target.shape == (2, 4) and toy.theta.shape == (2, 4)
    with pytest.raises(ValueError, match=r"model.target has shape \[3\]"):
        ToyProblem(ScoreFunction(), num_classes=4, target=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="num_classes"):
        ToyProblem(ScoreFunction(), num_classes=1)
    with pytest.raises(ValueError, match="batch_size"):
        ToyDataModule(batch_size=0)


def test_toy_trains_through_the_entry_point(compose_config, tmp_path) -> None:
    # Exact marginalization, Adam lr 0.1, 60 steps from uniform logits: the exact cost must drop
    # from its value at theta = 0 (deterministic gradients, so no tolerance for noise is needed).
    overrides = [
        "model=toy",
        "datamodule=toy",
        "estimator=marginalization",
        "model.num_classes=4",
        "model.target=[0.1,0.9,0.4,0.2]",
        "model.optimizer.lr=0.1",
        "datamodule.steps_per_epoch=60",
        "trainer.max_epochs=1",
        "callbacks=none",
        "logger=csv_only",
    ]
    results = run(compose_config(overrides, run_dir=tmp_path))
    initial = ToyProblem(Marginalization(), num_classes=4, target=[0.1, 0.9, 0.4, 0.2])
    assert results["test/exact_cost"] < initial.exact_cost().item() - 0.5
    assert math.isclose(results["test/neg_elbo"], results["test/exact_cost"])
    assert json.loads((tmp_path / "results.json").read_text())["model"] == "toy"
