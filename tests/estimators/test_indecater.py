"""IndeCateR (De Smet et al. 2023): unbiased against enumeration, exact for one variable, cost
counted in calls of f (N * K per sample) and reported, masked classes never visited."""

from __future__ import annotations

import math

import pytest
import torch

from estimators.indecater import IndeCateR
from tests.estimators.helpers import (
    Quadratic,
    Recorder,
    logits_gradient,
)


def test_unbiased_against_enumeration() -> None:
    # R = 10,000 single-sample estimates per row on a 2 x (N=2, K=3) quadratic problem; every
    # coordinate of the logits and decoder gradients within 5 SE (SE = sd / sqrt(R)) of the
    # enumerated gradient: 24 coordinates, P(false failure) < 24 * 6e-7 for Gaussian errors.
    # (Development run, R = 20,000: largest |z| 0.9 for the logits, 1.1 for the decoder.)
    torch.manual_seed(0)
    problem = Quadratic()
    problem.assert_unbiased(IndeCateR(num_samples=1), replicas=10_000)


@pytest.mark.parametrize("samples", [1, 3])
def test_exact_for_one_variable(samples: int) -> None:
    # N = 1: sum_k grad q(k) f(k) is the exact gradient whatever the sample, so every one of 50
    # replicas equals the enumerated gradient (float64 rounding), for the logits and the decoder.
    torch.manual_seed(1)
    problem = Quadratic(n=1, k=5)
    exact_logits, exact_w = problem.exact()
    grad_logits, grad_w = problem.estimates(IndeCateR(num_samples=samples), replicas=50)
    torch.testing.assert_close(grad_logits, exact_logits.expand_as(grad_logits), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_w, exact_w.expand_as(grad_w), rtol=0, atol=1e-12)


def test_cost_is_n_times_k_evaluations_per_sample_and_reported() -> None:
    # S = 2 samples, N = 3 variables, K = 4 classes: f is called once with 2 * 3 * 4 = 24
    # configurations per example, each the sample with exactly one variable changed (or not).
    torch.manual_seed(2)
    logits = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    f = Recorder(lambda z: z.sum(dim=(-1, -2)))
    output = IndeCateR(num_samples=2)(logits, f)
    assert len(f.inputs) == 1 and f.inputs[0].shape == (24, 5, 3, 4)
    assert output.metrics["f_evaluations"] == 24.0
    configs = f.inputs[0].view(2, 3, 4, 5, 3, 4)  # [S, N (changed), K, B, N, K]
    for n in range(3):  # variables other than n keep the sampled class of that sample
        others = [m for m in range(3) if m != n]
        same = configs[:, n, :, :, others] == configs[:, n, :1, :, others]
        assert torch.all(same)
        assert torch.all(configs[:, n, :, :, n].argmax(-1) == torch.arange(4).view(1, 4, 1))


def test_masked_classes_are_never_evaluated_and_get_no_gradient() -> None:
    # One variable (exact case) with two masked classes: the gradient is still the exact one,
    # 0 on the masked classes, and no configuration passed to f holds a masked class.
    logits = torch.tensor([[[0.5, -math.inf, 0.0, -math.inf, -1.0]]], dtype=torch.float64)
    w = torch.tensor([1.0, 5.0, -2.0, 7.0, 0.5], dtype=torch.float64)
    f = Recorder(lambda z: ((z * w).sum((-1, -2)) - 0.3).pow(2))
    grad = logits_gradient(IndeCateR(), logits, f)
    q = torch.softmax(logits, -1)[0, 0]
    values = (w - 0.3).pow(2)
    expected = q * (values - (q * values).sum())  # d/dlogits of sum_k q_k f(k)
    torch.testing.assert_close(grad[0, 0], expected, rtol=0, atol=1e-12)
    assert torch.all(f.inputs[0][..., [1, 3]] == 0)


def test_bad_num_samples_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^estimator\.num_samples=0 is invalid"):
        IndeCateR(num_samples=0)
