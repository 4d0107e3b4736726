"""Decoupled ST Gumbel-Softmax (Shah et al. 2024): ST-GS when the two temperatures are equal,
forward exactly one-hot, and the gradient set by the backward temperature alone (hand case)."""

from __future__ import annotations

import math

import pytest
import torch

import estimators.sampling as sampling
from estimators import ConstantTemperature, ExponentialTemperature, STGumbelSoftmax
from estimators.decoupled_st_gs import DecoupledSTGumbelSoftmax
from tests.estimators.helpers import (
    Quadratic,
    Recorder,
    linear_cost,
    logits_gradient,
)


def decoupled(tau_f: float, tau_b: float, samples: int = 1) -> DecoupledSTGumbelSoftmax:
    return DecoupledSTGumbelSoftmax(
        num_samples=samples,
        temperature=ConstantTemperature(tau_b),
        forward_temperature=ConstantTemperature(tau_f),
    )


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_equal_temperatures_is_st_gumbel_softmax(tau: float) -> None:
    # Same seed (same Gumbel draw), tau_f = tau_b = tau: the same one-hot forward samples and the
    # same gradient as ST-GS at tau, on a nonlinear (quadratic) f, 3 samples per row.
    problem = Quadratic()
    f_st, f_dec = (Recorder(problem.f_for(problem.w, problem.t)) for _ in range(2))
    torch.manual_seed(0)
    st = logits_gradient(STGumbelSoftmax(3, ConstantTemperature(tau)), problem.logits, f_st)
    torch.manual_seed(0)
    dec = logits_gradient(decoupled(tau, tau, samples=3), problem.logits, f_dec)
    assert torch.equal(f_st.inputs[0], f_dec.inputs[0])
    torch.testing.assert_close(dec, st, rtol=1e-12, atol=1e-12)


def test_forward_is_one_hot_and_the_backward_temperature_sets_the_gradient(monkeypatch) -> None:
    # Hand case with the Gumbel draw fixed at g = 0: logits [ln 3, 0], tau_f = 0.1, tau_b = 2,
    # f(z) = z_0. Forward: argmax([ln 3, 0] / 0.1) = class 0, one-hot. Backward:
    # y_b = softmax([ln 3, 0] / 2) = [sqrt 3, 1] / (sqrt 3 + 1), gradient
    # J(y_b) w / tau_b = [y0 y1, -y0 y1] / 2 = [sqrt 3 / (2 (sqrt 3 + 1)^2), -...] = [0.1160, ...].
    # ST-GS at the forward temperature would give y0 y1 / 0.1 with y = softmax([10 ln 3, 0]):
    # 3^10 / (3^10 + 1)^2 / 0.1 = 1.69e-4 -- the decoupling is what separates the two.
    monkeypatch.setattr(sampling, "gumbel_noise", lambda shape, device: torch.zeros(shape))
    logits = torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    f = Recorder(linear_cost(w))
    grad = logits_gradient(decoupled(0.1, 2.0), logits, f)
    assert torch.equal(f.inputs[0], torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64))
    value = math.sqrt(3.0) / (2 * (math.sqrt(3.0) + 1) ** 2)
    torch.testing.assert_close(
        grad, torch.tensor([[[value, -value]]], dtype=torch.float64), rtol=1e-12, atol=0
    )
    forward_tau_gradient = 3.0**10 / (3.0**10 + 1) ** 2 / 0.1
    assert abs(value - forward_tau_gradient) > 0.1


def test_forward_temperature_cannot_change_the_one_hot_sample() -> None:
    # argmax is invariant to dividing by tau_f > 0: with the same Gumbel draws the forward
    # samples are identical for tau_f = 0.01 and tau_f = 100 (the documented consequence of a
    # one-hot forward pass), and they are exact one-hot vectors.
    problem = Quadratic()
    seen = []
    for tau_f in (0.01, 100.0):
        f = Recorder(problem.f_for(problem.w, problem.t))
        torch.manual_seed(1)
        logits_gradient(decoupled(tau_f, 0.5, samples=16), problem.logits, f)
        seen.append(f.inputs[0])
    assert torch.equal(seen[0], seen[1])
    assert set(seen[0].unique().tolist()) == {0.0, 1.0} and torch.all(seen[0].sum(-1) == 1)


def test_schedules_follow_the_step_and_are_reported() -> None:
    estimator = DecoupledSTGumbelSoftmax(
        temperature=ExponentialTemperature(tau0=1.0, rate=1e-3, tau_min=0.1, interval=1),
        forward_temperature=ExponentialTemperature(tau0=2.0, rate=1e-3, tau_min=0.5, interval=1),
    )
    estimator.set_step(1000)
    output = estimator(torch.zeros(2, 1, 3), lambda z: z.sum((-1, -2)))
    assert float(output.metrics["temperature"]) == pytest.approx(math.exp(-1.0))
    assert float(output.metrics["forward_temperature"]) == pytest.approx(2 * math.exp(-1.0))


def test_bad_forward_temperature_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^estimator\.forward_temperature=0\.5 is invalid"):
        DecoupledSTGumbelSoftmax(forward_temperature=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau"):
        ConstantTemperature(0.0)
