"""The unordered set estimator (Kool et al. 2020): unbiased against enumeration, exact when the
set covers every configuration, lower variance than RLOO at the same k, and its sampler draws
distinct joint configurations without replacement.

Statistical tests draw R independent estimates in one call by replicating an example R times
along the batch axis (``Quadratic.estimates``). Fixed seeds; tolerances from standard errors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from estimators import LeaveOneOutBaseline, Marginalization, ScoreFunction
from estimators.sampling import enumerate_one_hot
from estimators.unordered_set import UnorderedSet, stochastic_beam_search
from tests.estimators.helpers import (
    Quadratic,
    Recorder,
    assert_mean_matches,
)


def test_unbiased_against_enumeration() -> None:
    # R = 20,000 estimates per row with k = 3 on a 2 x (N=2, K=3) quadratic problem (9
    # configurations, so k < K^N); every coordinate of the logits and decoder gradients within
    # 5 SE of the enumerated gradient (SE = sample sd / sqrt(R)): 24 coordinates, P(false failure)
    # < 24 * 6e-7 for Gaussian errors. (Development runs, k = 2, 3, 5: largest |z| 1.6-2.3; the
    # k = 1 "baseline" q(s) f(s), which is not a valid baseline, gave |z| = 50.)
    torch.manual_seed(0)
    problem = Quadratic()
    problem.assert_unbiased(UnorderedSet(num_samples=3), replicas=20_000)


def test_value_unbiased_against_enumeration() -> None:
    # value = sum_s q(s) R(S, s) f(s) is unbiased for E_q[f]: mean of R = 10,000 values per row
    # within 5 SE of the enumerated expectation (2 rows).
    torch.manual_seed(1)
    problem = Quadratic()
    replicas = 10_000
    logits = problem.logits.repeat(replicas, 1, 1)  # [R*B, N, K]
    f = problem.f_for(problem.w.repeat(replicas, 1, 1), problem.t.repeat(replicas))
    values = UnorderedSet(num_samples=3)(logits, f).value.view(replicas, -1)  # [R, B]
    exact = Marginalization()(problem.logits, problem.f_for(problem.w, problem.t)).value
    assert_mean_matches(values, exact)


@pytest.mark.parametrize("n, k", [(1, 4), (2, 2)], ids=["N=1,K=4", "N=2,K=2"])
def test_exact_when_the_set_holds_every_configuration(n: int, k: int) -> None:
    # num_samples = K^N: the set is the whole domain, every ratio R is 1, and each single
    # estimate equals the enumerated gradient (float64 rounding only). For N = 2 this also shows
    # that the set is one of joint configurations (K^N = 4 of them), not of classes per variable.
    torch.manual_seed(2)
    problem = Quadratic(n=n, k=k)
    exact_logits, exact_w = problem.exact()
    grad_logits, grad_w = problem.estimates(UnorderedSet(num_samples=k**n), replicas=50)
    torch.testing.assert_close(grad_logits, exact_logits.expand_as(grad_logits), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_w, exact_w.expand_as(grad_w), rtol=0, atol=1e-12)


def test_lower_variance_than_rloo_at_the_same_k() -> None:
    # k = 4 samples each: without replacement + built-in baseline vs i.i.d. + leave-one-out
    # baseline (score_function, estimator/baseline=leave_one_out), R = 20,000 estimates each on
    # the quadratic problem. Trace of the covariance of the logits gradient, measured with seeds
    # 0, 1, 2: 0.378 / 0.375 / 0.378 vs 0.825 / 0.832 / 0.826 (ratio 0.45-0.46). A variance from
    # R = 20,000 draws has a relative SE of about sqrt(2 / R) * (a few) < 5 %, so the asserted
    # ratio 0.7 is more than 10 SE from the measured one.
    torch.manual_seed(3)
    problem = Quadratic()
    unordered, _ = problem.estimates(UnorderedSet(num_samples=4), replicas=20_000)
    rloo, _ = problem.estimates(
        ScoreFunction(num_samples=4, baseline=LeaveOneOutBaseline()), replicas=20_000
    )
    assert unordered.var(0).sum() < 0.7 * rloo.var(0).sum(), (unordered.var(0), rloo.var(0))


def inclusion_probabilities(log_q: torch.Tensor) -> torch.Tensor:
    """P(s in S) for a set of k = 2 draws without replacement: ``q_s + sum_{t != s} q_t q_s /
    (1 - q_t)`` (s first, or second after t)."""
    q = log_q.exp()  # [C]
    second = (q.unsqueeze(1) * q.unsqueeze(0) / (1 - q.unsqueeze(1))).fill_diagonal_(0.0)
    return q + second.sum(0)  # [C]


def test_beam_search_draws_joint_configurations_without_replacement() -> None:
    # N = 2, K = 3 (9 joint configurations), k = 2, n = 40,000 draws. The two configurations of
    # a draw always differ, and each configuration's inclusion frequency matches the exact
    # probability of sampling without replacement from q(z) = q_1(z_1) q_2(z_2) within 5 binomial
    # SE (sqrt(P (1 - P) / n) <= 0.0025): 9 configurations, P(false failure) < 9 * 6e-7.
    torch.manual_seed(4)
    log_probs = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    log_probs = log_probs.log_softmax(-1)  # [N, K]
    n = 40_000
    classes, joint = stochastic_beam_search(log_probs.expand(n, 2, 3), 2)  # [n, 2, N], [n, 2]
    assert torch.all((classes[:, 0] != classes[:, 1]).any(-1))
    configs = enumerate_one_hot(2, 3, dtype=torch.float64)  # [9, N, K], row c = 3 z_1 + z_2
    log_q = torch.einsum("cnk,nk->c", configs, log_probs)  # [9]
    codes = classes[..., 0] * 3 + classes[..., 1]  # [n, 2]
    torch.testing.assert_close(joint, log_q[codes])  # reported log-probabilities are q(s)
    frequency = torch.bincount(codes.flatten(), minlength=9).double() / n  # [9]
    expected = inclusion_probabilities(log_q)
    standard_error = (expected * (1 - expected) / n).sqrt()
    assert torch.all((frequency - expected).abs() <= 5 * standard_error), (frequency, expected)


def test_fewer_possible_configurations_than_k_is_exact_and_never_visits_masked() -> None:
    # Variable 0 has one possible class, variable 1 two: 2 configurations of positive
    # probability < k = 4. The estimate is then exact, and f never sees a masked class.
    logits = torch.tensor(
        [[[0.3, -math.inf, -math.inf], [0.2, -math.inf, -0.7]]], dtype=torch.float64
    )  # [1, 2, 3]
    w = torch.randn(1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def cost(z: torch.Tensor) -> torch.Tensor:
        return ((z * w).sum((-1, -2)) - 0.5).pow(2)

    leaf = logits.clone().requires_grad_()
    (exact,) = torch.autograd.grad(Marginalization()(leaf, cost).surrogate.sum(), leaf)
    torch.manual_seed(5)
    f = Recorder(cost)
    leaf = logits.clone().requires_grad_()
    output = UnorderedSet(num_samples=4)(leaf, f)
    (grad,) = torch.autograd.grad(output.surrogate.sum(), leaf)
    torch.testing.assert_close(grad, exact, rtol=0, atol=1e-12)
    assert torch.all(f.inputs[0][..., torch.isinf(logits[0])] == 0)
    assert output.metrics["f_evaluations"] == 4.0  # min(k, K^N) = 4 configurations, 2 padding


def test_weights_match_enumerated_set_probabilities() -> None:
    # R(S, s) = p^{D\s}(S \ {s}) / p(S) with p(S) the sum over orderings of
    # prod_i q(b_i) / (1 - q(b_1) - ... - q(b_{i-1})): compare the estimator's weights with
    # that sum, enumerated over all 3! orderings, for a set of 3 of 6 classes.
    from estimators.unordered_set import unordered_set_weights

    q = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05], dtype=torch.float64)
    members = [0, 2, 4]

    def set_probability(items: list[int], mass: float) -> float:
        total = 0.0
        for order in itertools.permutations(items):
            p, left = 1.0, mass
            for item in order:
                p *= q[item].item() / left
                left -= q[item].item()
            total += p
        return total

    log_weights, inner = unordered_set_weights(
        q[members].log().unsqueeze(0), torch.ones(1, 3, dtype=torch.bool)
    )
    full = set_probability(members, 1.0)
    for i, s in enumerate(members):
        rest = [m for m in members if m != s]
        ratio = set_probability(rest, 1.0 - q[s].item()) / full
        assert log_weights[0, i].exp().item() == pytest.approx(q[s].item() * ratio, rel=1e-12)
        for j, t in enumerate(members):
            if t == s:
                continue
            pair = [m for m in rest if m != t]
            inner_ratio = set_probability(pair, 1.0 - q[s].item() - q[t].item()) / (
                set_probability(rest, 1.0 - q[s].item())
            )
            assert inner[0, i, j].item() == pytest.approx(q[t].item() * inner_ratio, rel=1e-12)
        assert inner[0, i, i].item() == pytest.approx(q[s].item(), rel=1e-12)


@pytest.mark.parametrize("k", [1, 13, 2.5])
def test_bad_num_samples_is_a_one_line_error(k) -> None:
    with pytest.raises(ValueError, match=r"^estimator\.num_samples=") as error:
        UnorderedSet(num_samples=k)
    assert "\n" not in str(error.value)
