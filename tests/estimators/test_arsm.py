"""ARSM (Yin et al. 2019): unbiased against enumeration, pseudo actions equal to brute-force
swapping, f evaluated only at distinct pseudo actions, masked classes never visited."""

from __future__ import annotations

import math

import pytest
import torch

from estimators.arsm import ARSM, pseudo_actions
from tests.test_new_estimators import Quadratic, Recorder, assert_mean_matches


@pytest.mark.parametrize("n, k", [(2, 3), (1, 4)], ids=["N=2,K=3", "N=1,K=4"])
def test_unbiased_against_enumeration(n: int, k: int) -> None:
    # R = 20,000 single-sample estimates per row on a 2 x (N, K) quadratic problem; each
    # coordinate of the logits and decoder gradients within 5 SE (SE = sd / sqrt(R)) of the
    # enumerated gradient: at most 24 coordinates, P(false failure) < 24 * 6e-7 for Gaussian
    # errors. (Development runs, seed 1: largest |z| 1.3-2.1 for (2, 3), (1, 4), (3, 2).)
    torch.manual_seed(0)
    problem = Quadratic(n=n, k=k)
    exact_logits, exact_w = problem.exact()
    grad_logits, grad_w = problem.estimates(ARSM(num_samples=1), replicas=20_000)
    assert_mean_matches(grad_logits, exact_logits)
    assert_mean_matches(grad_w, exact_w)


def test_pseudo_actions_match_brute_force_swaps() -> None:
    # z^{m<->j} = argmin(log pi - phi) after swapping pi_m and pi_j, computed naively for every
    # pair, against the three-smallest-races shortcut; one class masked (phi = -inf).
    torch.manual_seed(1)
    log_pi = torch.randn(50, 2, 6, dtype=torch.float64)
    phi = torch.randn(50, 2, 6, dtype=torch.float64)
    phi[:, 0, 2] = -math.inf
    z, swaps = pseudo_actions(log_pi, phi)
    assert torch.equal(z, (log_pi - phi).argmin(-1))
    for m in range(6):
        for j in range(6):
            swapped = log_pi.clone()
            swapped[..., [m, j]] = swapped[..., [j, m]]
            assert torch.equal(swaps[..., m, j], (swapped - phi).argmin(-1)), (m, j)
    assert torch.all(swaps[:, 0] != 2)


def test_f_is_evaluated_at_the_sample_and_the_distinct_pseudo_actions_only() -> None:
    # One variable with K = 5 and S = 2 samples: f gets S samples first, then for each example
    # the swaps m < j whose pseudo action differs from the sample (padding repeats a sample).
    # The metric counts S + (number of such swaps); masked classes never reach f and get
    # gradient 0.
    torch.manual_seed(2)
    logits = torch.tensor(
        [[[0.5, -math.inf, 0.0, 1.0, -1.0]], [[2.0, 0.1, -math.inf, -math.inf, 0.3]]],
        dtype=torch.float64, requires_grad=True,
    )  # [B=2, N=1, K=5]
    f = Recorder(lambda z: (z * torch.arange(5.0, dtype=z.dtype)).sum((-1, -2)))
    output = ARSM(num_samples=2)(logits, f)
    configs = f.inputs[0]  # [2 + U, 2, 1, 5]
    assert torch.all(configs[..., 1][:, 0] == 0) and torch.all(configs[:, 1, 0, 2:4] == 0)
    assert torch.all(configs.sum(-1) == 1)
    # 10 pairs m < j per sample, 2 samples: at most 20 pseudo actions per example. The packed
    # axis holds the largest count over the batch; the metric is S + the mean count.
    evaluations = float(output.metrics["f_evaluations"])
    packed = configs.shape[0] - 2
    assert 1 <= packed <= 20
    assert 2 < evaluations <= 2 + packed
    (grad,) = torch.autograd.grad(output.surrogate.sum(), logits)
    assert torch.isfinite(grad).all()
    assert grad[0, 0, 1] == 0 and torch.all(grad[1, 0, 2:4] == 0)


def test_unchanged_pseudo_actions_cost_nothing() -> None:
    # A near-deterministic variable (one class at +30): almost every swap leaves the argmin in
    # place, so f is evaluated at far fewer than the K (K - 1) / 2 + 1 = 46 configurations.
    torch.manual_seed(3)
    logits = torch.full((4, 1, 10), -30.0)
    logits[..., 0] = 30.0
    output = ARSM()(logits.requires_grad_(), lambda z: z.sum((-1, -2)))
    assert float(output.metrics["f_evaluations"]) < 12


def test_bad_num_samples_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^estimator\.num_samples=-1 is invalid"):
        ARSM(num_samples=-1)
