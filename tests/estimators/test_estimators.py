"""Estimator contract and statistical correctness against exact (enumerated) answers.

Every statistical assertion uses a fixed seed and a tolerance derived from the standard error;
the arithmetic is in the comments.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from estimators import (
    ConstantTemperature,
    Estimator,
    GumbelSoftmax,
    LearnedBaseline,
    LeaveOneOutBaseline,
    Marginalization,
    MovingAverageBaseline,
    NoBaseline,
    ScoreFunction,
    STGumbelSoftmax,
)
from estimators.sampling import enumerate_one_hot, sample_one_hot
from tests.conftest import CONFIG_DIR

B, N, K, D = 3, 2, 3, 5
ESTIMATOR_OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "estimator").glob("*.yaml"))
BASELINE_OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "estimator" / "baseline").glob("*.yaml"))


class Problem:
    """A small model: ``f(z) = (z_flat @ w - t)^2`` with decoder weights ``w`` and targets ``t``."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(B, N, K, generator=generator, dtype=dtype).requires_grad_()
        self.w = torch.randn(N * K, generator=generator, dtype=dtype).requires_grad_()
        self.t = torch.randn(B, generator=generator, dtype=dtype)
        self.features = torch.randn(B, D, generator=generator, dtype=dtype)

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return (z.flatten(-2).to(self.w.dtype) @ self.w - self.t).pow(2)  # [S, B]

    def exact_value(self) -> torch.Tensor:
        configs = enumerate_one_hot(N, K).to(self.w.dtype)  # [C, N, K]
        log_q = self.logits.log_softmax(-1)  # [B, N, K]
        weights = torch.einsum("cnk,bnk->cb", configs, log_q).exp()  # [C, B]
        costs = self.f(configs.unsqueeze(1).expand(-1, B, -1, -1))  # [C, B]
        return (weights * costs).sum(0)  # [B]

    def exact_gradient(self) -> torch.Tensor:
        """Gradient of mean_b E_q[f] w.r.t. (logits, w), flattened, by enumeration."""
        return self.gradient(self.exact_value().mean())

    def gradient(self, scalar: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(scalar, [self.logits, self.w])
        return torch.cat([g.flatten() for g in grads])


def compose_estimator(compose_config, overrides: list[str]) -> Estimator:
    cfg = compose_config(overrides)
    estimator = instantiate(cfg.estimator, _convert_="all")
    estimator.prepare(N, K, D)
    return estimator


# Every estimator config with its defaults, plus the score function with every baseline.
CONTRACT_CASES = [[f"estimator={option}"] for option in ESTIMATOR_OPTIONS] + [
    ["estimator=score_function", f"estimator/baseline={name}", "estimator.num_samples=2"]
    for name in BASELINE_OPTIONS
]


# ------------------------------------------------------------------------------------------------
# The contract, for every estimator config file
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", CONTRACT_CASES, ids=" ".join)
def test_contract_shapes_detached_value_finite_gradients(compose_config, overrides) -> None:
    torch.manual_seed(0)
    estimator = compose_estimator(compose_config, overrides)
    problem = Problem(dtype=torch.float32)
    output = estimator(problem.logits, problem.f, features=problem.features.float())
    assert output.surrogate.shape == (B,)
    assert output.value.shape == (B,)
    assert not output.value.requires_grad
    assert output.surrogate.requires_grad
    gradient = problem.gradient(output.surrogate.mean())
    assert torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0
    for name, metric in output.metrics.items():
        assert torch.isfinite(torch.as_tensor(metric)).all(), name
    # State is part of checkpoints: a reloaded copy has identical buffers and parameters.
    state = estimator.state_dict()
    clone = compose_estimator(compose_config, overrides)
    clone.load_state_dict(state)
    for key, tensor in clone.state_dict().items():
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize("overrides", CONTRACT_CASES, ids=" ".join)
def test_value_is_unbiased_for_expected_cost(compose_config, overrides) -> None:
    # value is a mean of R = 400 independent calls; each call's value is a mean of S >= 1 samples
    # of f. The assertion allows 5 standard errors of that mean (SE = sd / sqrt(R)), per example:
    # P(false failure) < 3 * 6e-7 for Gaussian errors.
    torch.manual_seed(1)
    estimator = compose_estimator(compose_config, overrides)
    problem = Problem(dtype=torch.float32)
    values = torch.stack(
        [estimator(problem.logits, problem.f, features=problem.features.float()).value
         for _ in range(400)]
    )  # [R, B]
    mean, standard_error = values.mean(0), values.std(0) / math.sqrt(values.shape[0])
    exact = problem.exact_value().detach()
    assert torch.all((mean - exact).abs() <= 5 * standard_error + 1e-5), (mean, exact)


# ------------------------------------------------------------------------------------------------
# Score function: unbiased with every baseline
# ------------------------------------------------------------------------------------------------
def make_baseline(name: str) -> tuple[ScoreFunction, int]:
    baselines = {
        "none": (NoBaseline(), 1),
        "moving_average": (MovingAverageBaseline(decay=0.9), 1),
        "learned": (LearnedBaseline(hidden=8), 1),
        "leave_one_out": (LeaveOneOutBaseline(), 4),
    }
    baseline, samples = baselines[name]
    estimator = ScoreFunction(num_samples=samples, baseline=baseline)
    estimator.prepare(N, K, D)
    return estimator.double(), samples


@pytest.mark.parametrize("baseline", BASELINE_OPTIONS)
def test_score_function_unbiased_against_enumeration(baseline: str) -> None:
    # R = 3000 independent gradient estimates; each coordinate's mean is compared with the exact
    # enumerated gradient within 5 standard errors (SE = sample sd / sqrt(3000)). With 24
    # coordinates (18 logits + 6 weights) a false failure has probability < 24 * 6e-7 = 1.4e-5;
    # the seed is fixed, so the test is deterministic.
    torch.manual_seed(2)
    estimator, _ = make_baseline(baseline)
    problem = Problem()
    exact = problem.exact_gradient()
    samples = torch.stack(
        [
            problem.gradient(estimator(problem.logits, problem.f, features=problem.features)
                             .surrogate.mean())
            for _ in range(3000)
        ]
    )  # [R, P]
    mean = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    assert torch.all((mean - exact).abs() <= 5 * standard_error + 1e-9), (mean - exact)


def test_baselines_reduce_variance() -> None:
    # Leave-one-out (S = 4) must have a smaller per-sample variance of the logits gradient than no
    # baseline with S = 4 samples: f here has mean ~ 5 and sd ~ 3, so the baseline removes most of
    # the mean's contribution. 1000 estimates each: the variance ratio's sampling error is ~6 %.
    torch.manual_seed(3)
    problem = Problem()
    variances = {}
    for name, baseline in (("none", NoBaseline()), ("loo", LeaveOneOutBaseline())):
        estimator = ScoreFunction(num_samples=4, baseline=baseline)
        grads = torch.stack(
            [problem.gradient(estimator(problem.logits, problem.f).surrogate.mean())
             for _ in range(1000)]
        )
        variances[name] = grads.var(0).sum()
    assert variances["loo"] < 0.8 * variances["none"], variances


def test_moving_average_uses_previous_value_and_warm_starts() -> None:
    baseline = MovingAverageBaseline(decay=0.5)
    first = torch.tensor([[2.0, 4.0]])
    b1, _ = baseline(first, None, update=True)
    assert torch.equal(b1, torch.zeros_like(first))  # nothing seen yet: b = 0, not its own mean
    assert baseline.average.item() == pytest.approx(3.0)  # warm-started at the first batch mean
    b2, _ = baseline(torch.tensor([[10.0, 10.0]]), None, update=True)
    assert torch.allclose(b2, torch.tensor(3.0))  # previous value, not including this batch
    assert baseline.average.item() == pytest.approx(0.5 * 3.0 + 0.5 * 10.0)
    b3, _ = baseline(torch.tensor([[100.0, 100.0]]), None, update=False)  # frozen: no update
    assert torch.allclose(b3, torch.tensor(6.5)) and baseline.average.item() == pytest.approx(6.5)


def test_frozen_estimator_keeps_state() -> None:
    estimator = ScoreFunction(1, MovingAverageBaseline())
    problem = Problem(dtype=torch.float32)
    estimator(problem.logits, problem.f)
    before = estimator.state_dict()["baseline.average"].clone()
    with estimator.frozen():
        estimator(problem.logits, problem.f)
    assert torch.equal(estimator.state_dict()["baseline.average"], before)


def test_leave_one_out_excludes_own_sample() -> None:
    costs = torch.tensor([[1.0], [2.0], [6.0]])  # [S=3, B=1]
    b, _ = LeaveOneOutBaseline()(costs, None, update=True)
    assert torch.allclose(b.squeeze(), torch.tensor([4.0, 3.5, 1.5]))


# ------------------------------------------------------------------------------------------------
# Gumbel family
# ------------------------------------------------------------------------------------------------
def test_gumbel_max_frequencies_match_softmax() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(4)
    logits = torch.tensor([[[2.0, 0.0, -1.0, -math.inf, 0.5]]])  # [1, 1, 5], class 3 masked
    counts = sample_one_hot(logits, 100_000).sum(dim=(0, 1, 2))  # [5]
    assert counts[3] == 0
    probs = logits.softmax(-1).flatten()
    keep = probs > 0
    # Chi-square goodness of fit on the 4 possible classes (3 d.o.f.); p < 1e-3 would reject.
    result = scipy_stats.chisquare(counts[keep].numpy(), (probs[keep] * 100_000).numpy())
    assert result.pvalue > 1e-3, result


def test_st_gumbel_softmax_forward_one_hot_backward_soft() -> None:
    logits = torch.randn(B, N, K).requires_grad_()
    c = torch.randn(N, K)

    def linear_f(z: torch.Tensor) -> torch.Tensor:
        return (z * c).sum(dim=(-1, -2))

    seen: list[torch.Tensor] = []

    def recording_f(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.detach())
        return linear_f(z)

    tau = ConstantTemperature(0.7)
    torch.manual_seed(5)
    st = STGumbelSoftmax(num_samples=3, temperature=tau)(logits, recording_f).surrogate.sum()
    (st_grad,) = torch.autograd.grad(st, logits)
    z = seen[0]
    assert set(z.unique().tolist()) <= {0.0, 1.0} and torch.all(z.sum(-1) == 1)
    # For a linear f the gradient through the soft sample does not depend on where f's gradient
    # is taken, so ST's gradient equals the relaxed estimator's with the same noise exactly.
    torch.manual_seed(5)
    soft = GumbelSoftmax(num_samples=3, temperature=tau)(logits, linear_f).surrogate.sum()
    (soft_grad,) = torch.autograd.grad(soft, logits)
    assert torch.allclose(st_grad, soft_grad, atol=1e-6)


def test_gumbel_softmax_bias_shrinks_with_temperature() -> None:
    # Mean of 200,000 relaxed gradient samples (in one call, S = 200,000) per temperature. The
    # per-coordinate SE is < 0.01 at tau = 2, 0.5 (sd < 3 measured) and < 0.03 at tau = 0.1, so a
    # bias norm over 24 coordinates is resolved to ~0.15; the asserted gaps are larger.
    problem = Problem()
    exact = problem.exact_gradient()
    bias = {}
    for tau in (2.0, 0.5, 0.1):
        torch.manual_seed(6)
        estimator = GumbelSoftmax(num_samples=200_000, temperature=ConstantTemperature(tau))
        estimate = problem.gradient(estimator(problem.logits, problem.f).surrogate.mean())
        bias[tau] = (estimate - exact).norm().item()
    assert bias[2.0] > 1.0, bias  # clearly biased at a high temperature
    assert bias[2.0] > 2 * bias[0.5] > 0
    assert bias[0.5] > bias[0.1], bias


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_non_positive_temperature_rejected(tau: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        ConstantTemperature(tau)


# ------------------------------------------------------------------------------------------------
# Marginalization
# ------------------------------------------------------------------------------------------------
def test_marginalization_matches_analytic_value_and_gradient() -> None:
    # For linear f(z) = sum_nk c_nk z_nk: E_q[f] = sum_nk softmax(logits)_nk c_nk, in float64.
    logits = torch.randn(B, N, K, dtype=torch.float64, requires_grad=True)
    c = torch.randn(B, N, K, dtype=torch.float64)
    output = Marginalization()(logits, lambda z: (z * c).sum(dim=(-1, -2)))
    analytic = (logits.softmax(-1) * c).sum(dim=(-1, -2))
    assert torch.allclose(output.value, analytic.detach(), atol=1e-12)
    (grad,) = torch.autograd.grad(output.surrogate.sum(), logits)
    (analytic_grad,) = torch.autograd.grad(analytic.sum(), logits)
    assert torch.allclose(grad, analytic_grad, atol=1e-12)


def test_marginalization_refuses_over_budget() -> None:
    estimator = Marginalization(max_configurations=1000)
    with pytest.raises(ValueError, match=r"K=10, N=20.*budget is 1000"):
        estimator.prepare(20, 10, None)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ScoreFunction(num_samples=0),
        lambda: ScoreFunction(num_samples=1, baseline=LeaveOneOutBaseline()),
        lambda: GumbelSoftmax(num_samples=-2),
        lambda: Marginalization(max_configurations=0),
    ],
)
def test_bad_estimator_arguments_rejected(build) -> None:
    with pytest.raises(ValueError, match="num_samples|max_configurations"):
        build()


def test_estimator_configs_exist() -> None:
    for required in ("score_function", "gumbel_softmax", "st_gumbel_softmax", "marginalization"):
        assert required in ESTIMATOR_OPTIONS
    assert set(BASELINE_OPTIONS) >= {"none", "moving_average", "learned", "leave_one_out"}
    assert Path(CONFIG_DIR / "estimator" / "temperature" / "exponential.yaml").exists()
