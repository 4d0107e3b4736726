"""Gapped straight-through (Fan et al. 2022): forward exactly the one-hot sample, the gradient a
deterministic function of that sample (no resampling), GST-1.0 and GST-p on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from estimators import ConstantTemperature
from estimators.gapped_st import GappedStraightThrough
from tests.estimators.helpers import (
    Recorder,
    linear_cost,
    logits_gradient,
)


def run_rows(estimator: GappedStraightThrough, logits: torch.Tensor, w: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row gradients ``[R, 1, K]`` and the sampled class of each row ``[R]``."""
    f = Recorder(linear_cost(w))
    grad = logits_gradient(estimator, logits, f)
    z = f.inputs[0][0]  # [R, 1, K]
    assert set(z.unique().tolist()) == {0.0, 1.0} and torch.all(z.sum(-1) == 1)  # one-hot
    return grad, z[:, 0].argmax(-1)


def softmax_list(values: list[float]) -> torch.Tensor:
    exp = torch.tensor([math.exp(v) for v in values], dtype=torch.float64)
    return exp / exp.sum()


def test_gst_1_hand_case_and_no_resampling() -> None:
    # logits theta = [2, 1, 0] (argmax a = 0, theta_a = 2), gap 1, tau = 1, f(z) = z_0 (w = e_0).
    # GST's logits: the sampled class D is lifted to theta_a = 2, the others become
    # min(theta_i, 2 - 1):
    #   D = 0: [2, 1, 0]    D = 1: [1, 2, 0]    D = 2: [1, 1, 2]
    # and the gradient is J(s) w = s_0 (e_0 - s) with s = softmax of those logits. 300 rows with
    # their own samples: each row's gradient is exactly the one of its D (a deterministic
    # function of the sample: nothing is resampled), and all three D occur.
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64).expand(300, 1, 3)
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    grad, sampled = run_rows(GappedStraightThrough(gap=1.0), logits, w)
    perturbed = {0: [2.0, 1.0, 0.0], 1: [1.0, 2.0, 0.0], 2: [1.0, 1.0, 2.0]}
    for d, values in perturbed.items():
        s = softmax_list(values)
        expected = s[0] * (torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) - s)
        rows = grad[sampled == d, 0]  # [R_d, K]
        assert rows.shape[0] > 0, d
        torch.testing.assert_close(rows, expected.expand_as(rows), rtol=0, atol=1e-14)


def test_gst_p_hand_case() -> None:
    # logits [ln 3, 0] -> p = [3/4, 1/4]; f(z) = z_0; tau = 1. GST-p's gap is
    # kappa = -log(1 - p_D) / p_D:
    #   D = 0: kappa = (4/3) ln 4 = 1.848, logits [ln 3, min(0, ln 3 - kappa)]
    #          = [ln 3, ln 3 - kappa]
    #   D = 1: kappa = 4 ln(4/3) = 1.151, logits [min(ln 3, ln 3 - kappa), ln 3]
    #          = [ln 3 - kappa, ln 3]
    # For K = 2, J(s) w = [s_0 s_1, -s_0 s_1], with s_0 s_1 = e^{-kappa} / (1 + e^{-kappa})^2 in
    # both cases (the two logits are kappa apart).
    torch.manual_seed(1)
    logits = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).expand(200, 1, 2)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    grad, sampled = run_rows(GappedStraightThrough(adaptive_gap=True), logits, w)
    for d, kappa in ((0, 4 / 3 * math.log(4.0)), (1, 4 * math.log(4 / 3))):
        product = math.exp(-kappa) / (1 + math.exp(-kappa)) ** 2
        expected = torch.tensor([product, -product], dtype=torch.float64)
        rows = grad[sampled == d, 0]  # [R_d, 2]
        assert rows.shape[0] > 0, d
        torch.testing.assert_close(rows, expected.expand_as(rows), rtol=0, atol=1e-14)


def test_temperature_divides_the_gapped_logits() -> None:
    # tau = 0.5, theta = [0, 0] (a = 0), gap 1: D = 0 -> [0, -1], D = 1 -> [-1, 0];
    # s = softmax(m / 0.5) has s_0 s_1 = e^{-2} / (1 + e^{-2})^2, and the gradient is
    # J(s) w / tau = [2 s_0 s_1, -2 s_0 s_1] for either D.
    torch.manual_seed(2)
    estimator = GappedStraightThrough(temperature=ConstantTemperature(0.5))
    logits = torch.zeros(100, 1, 2, dtype=torch.float64)
    grad, _ = run_rows(estimator, logits, torch.tensor([1.0, 0.0], dtype=torch.float64))
    product = 2 * math.exp(-2.0) / (1 + math.exp(-2.0)) ** 2
    expected = torch.tensor([product, -product], dtype=torch.float64)
    torch.testing.assert_close(grad[:, 0], expected.expand(100, 2), rtol=0, atol=1e-14)


def test_masked_classes_stay_masked() -> None:
    # A masked class (-inf) is never sampled and gets a zero (not NaN) gradient.
    torch.manual_seed(3)
    logits = torch.tensor([1.0, -math.inf, 0.0], dtype=torch.float64).expand(100, 1, 3)
    for adaptive in (False, True):
        grad, sampled = run_rows(
            GappedStraightThrough(adaptive_gap=adaptive), logits,
            torch.tensor([0.3, 1.0, -1.0], dtype=torch.float64),
        )
        assert torch.all(sampled != 1) and torch.isfinite(grad).all()
        assert torch.all(grad[..., 1] == 0)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"gap": 0.0}, "gap"), ({"gap": -1.0}, "gap"), ({"gap": "p"}, "gap"),
     ({"adaptive_gap": "yes"}, "adaptive_gap"), ({"num_samples": 0}, "num_samples")],
)
def test_bad_values_are_one_line_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^estimator\.{key}=") as error:
        GappedStraightThrough(**kwargs)
    assert "\n" not in str(error.value)
