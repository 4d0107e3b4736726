"""ARSM (Yin et al. 2019): unbiased against enumeration, pseudo actions equal to brute-force
swapping, f evaluated only at distinct pseudo actions, masked classes never visited."""

from __future__ import annotations

import math

import pytest
import torch

from estimators.arsm import ARSM, Races, pair_actions
from tests.estimators.helpers import (
    Quadratic,
    Recorder,
)


@pytest.mark.parametrize("n, k", [(2, 3), (1, 4)], ids=["N=2,K=3", "N=1,K=4"])
def test_unbiased_against_enumeration(n: int, k: int) -> None:
    # R = 20,000 single-sample estimates per row on a 2 x (N, K) quadratic problem; each
    # coordinate of the logits and decoder gradients within 5 SE (SE = sd / sqrt(R)) of the
    # enumerated gradient: at most 24 coordinates, P(false failure) < 24 * 6e-7 for Gaussian
    # errors. (Development runs, seed 1: largest |z| 1.3-2.1 for (2, 3), (1, 4), (3, 2).)
    torch.manual_seed(0)
    problem = Quadratic(n=n, k=k)
    problem.assert_unbiased(ARSM(num_samples=1), replicas=20_000)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_pseudo_actions_match_brute_force_swaps(k: int) -> None:
    # z^{m<->j} = argmin(log pi - phi) after swapping pi_m and pi_j in every variable, computed
    # naively for every pair, against pair_actions (which only looks at the three smallest
    # races) and against Races.changes (which builds no pseudo action); one class masked.
    torch.manual_seed(1)
    log_pi = torch.randn(2, 20, 3, k, dtype=torch.float64)  # [S, B, N, K]
    phi = torch.randn(20, 3, k, dtype=torch.float64)  # [B, N, K]
    phi[:, 0, k - 1] = -math.inf
    races = Races(log_pi, phi.unsqueeze(0))
    assert torch.equal(races.z, (log_pi - phi).argmin(-1))
    grid = torch.cartesian_prod(torch.arange(2), torch.arange(20), torch.arange(k), torch.arange(k))
    actions = pair_actions(races, *grid.unbind(1)).view(2, 20, k, k, 3)  # [S, B, m, j, N]
    changes = races.changes()  # [S, B, N, K, K]
    for m in range(k):
        for j in range(k):
            swapped = log_pi.clone()
            swapped[..., [m, j]] = swapped[..., [j, m]]
            brute = (swapped - phi).argmin(-1)  # [S, B, N]
            assert torch.equal(actions[:, :, m, j], brute), (m, j)
            assert torch.equal(changes[..., m, j], brute != races.z), (m, j)
    assert torch.all(actions[..., 0] != k - 1)


def test_f_is_evaluated_at_the_sample_and_the_distinct_pseudo_actions_only() -> None:
    # One variable with K = 5 and S = 2 samples: f is called with the S samples (with gradient),
    # then once more with, for each example, the swaps m < j whose pseudo action differs from
    # its sample (packed; shorter lists padded with a sample); the metric counts S + the mean
    # number of such swaps per example. Masked
    # classes never reach f and get gradient 0.
    torch.manual_seed(2)
    logits = torch.tensor(
        [[[0.5, -math.inf, 0.0, 1.0, -1.0]], [[2.0, 0.1, -math.inf, -math.inf, 0.3]]],
        dtype=torch.float64, requires_grad=True,
    )  # [B=2, N=1, K=5]
    f = Recorder(lambda z: (z * torch.arange(5.0, dtype=z.dtype)).sum((-1, -2)))
    output = ARSM(num_samples=2)(logits, f)
    assert len(f.inputs) == 2 and f.inputs[0].shape == (2, 2, 1, 5)
    configs = torch.cat(f.inputs)  # [2 + U, B, 1, 5]
    assert torch.all(configs[:, 0, 0, 1] == 0) and torch.all(configs[:, 1, 0, 2:4] == 0)
    assert torch.all(configs.sum(-1) == 1)
    # 10 pairs m < j per sample, 2 samples: at most 20 pseudo actions per example.
    packed = f.inputs[1].shape[0]
    assert 1 <= packed <= 20
    assert 2 < float(output.metrics["f_evaluations"]) <= 2 + packed
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
