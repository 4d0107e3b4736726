"""The gradient probe's measurement core against analytic answers; vmap and loop paths agree.

Statistical tests use fixed seeds (so they are deterministic) and tolerances of several standard
errors computed from exact moments, with the arithmetic next to each assertion.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor

from estimators import (
    ConstantTemperature,
    GumbelSoftmax,
    LearnedBaseline,
    Marginalization,
    MovingAverageBaseline,
    NoBaseline,
    ScoreFunction,
    STGumbelSoftmax,
)
from estimators.base import EstimatorOutput, Objective
from estimators.sampling import enumerate_one_hot
from experiments.probe.sampler import ALL, LOGITS, GradientSampler, probe_estimators
from models import CategoricalVAE
from models.toy import ToyProblem

TOY_BATCH = (torch.zeros(1, 1), torch.zeros(1))


def make_toy(num_variables: int = 2, num_classes: int = 3) -> ToyProblem:
    """A toy with random logits and a random target in [0, 1] (a non-trivial exact gradient)."""
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(num_variables, num_classes, generator=generator).tolist()
    toy = ToyProblem(Marginalization(), num_variables, num_classes, target=target)
    with torch.no_grad():
        toy.theta.copy_(torch.randn(num_variables, num_classes, generator=generator))
    return toy


def make_vae(estimator=None) -> tuple[CategoricalVAE, tuple[Tensor, Tensor]]:
    """A tiny VAE (2 x 3 latents: 9 configurations, an exact gradient) and a batch of 6 images."""
    torch.manual_seed(0)
    model = CategoricalVAE(
        estimator or STGumbelSoftmax(),
        image_shape=(4, 4),
        num_variables=2,
        num_classes=3,
        encoder_hidden=[12],
        decoder_hidden=[12],
    )
    x = torch.bernoulli(torch.full((6, 16), 0.5, dtype=torch.float32))
    return model, (x, torch.zeros(6, dtype=torch.long))


def score_function_moments(toy: ToyProblem) -> tuple[Tensor, float, float]:
    """Exact mean ``mu``, ``T = tr Cov`` and ``E[Y^2]`` with ``Y = ||g - mu||^2`` of the
    single-sample score-function gradient ``g(z) = f(z) (z - p)`` w.r.t. theta, by enumeration."""
    num_variables, num_classes = toy.theta.shape
    configs = enumerate_one_hot(num_variables, num_classes, dtype=torch.float64)  # [C, N, K]
    p = toy.theta.detach().double().softmax(-1)  # [N, K]
    q = (configs * p.log()).sum(dim=(-1, -2)).exp()  # [C]
    f = (configs - toy.target.double()).pow(2).sum(dim=(-1, -2))  # [C]
    g = (f[:, None, None] * (configs - p)).flatten(1)  # [C, N*K]
    mu = (q[:, None] * g).sum(0)  # [N*K]
    y = (g - mu).pow(2).sum(1)  # [C]
    return mu, float((q * y).sum()), float((q * y.pow(2)).sum())


def test_score_function_variance_matches_the_analytic_value() -> None:
    toy = make_toy()
    sampler = GradientSampler(toy, TOY_BATCH)
    estimator = sampler.prepare(ScoreFunction(baseline=NoBaseline()))
    num_samples = 4096
    stats = sampler.probe(estimator, num_samples, chunk_size=1024, seed=0).groups[ALL]
    mu, trace, fourth = score_function_moments(toy)
    # The estimate of T is ~ a mean of S draws of Y = ||g - mu||^2: its standard error is
    # sqrt((E[Y^2] - T^2) / S); allow 4 standard errors.
    standard_error = math.sqrt((fourth - trace**2) / num_samples)
    assert abs(stats.trace_cov - trace) < 4 * standard_error, (stats.trace_cov, trace)
    assert math.isclose(stats.log10_trace_cov, math.log10(stats.trace_cov))
    # ||mean||^2 has expectation ||mu||^2 + T / S; its deviation is dominated by
    # 2 mu.(mean - mu), of standard deviation 2 sqrt(mu' Sigma mu / S) <= 2 ||mu|| sqrt(T / S).
    expected = float(mu.pow(2).sum()) + trace / num_samples
    tolerance = 4 * 2 * float(mu.norm()) * math.sqrt(trace / num_samples) + 4 * trace / num_samples
    assert abs(stats.mean_grad_sq_norm - expected) < tolerance
    assert math.isclose(stats.snr, stats.mean_grad_sq_norm / stats.trace_cov)


def test_exact_gradient_is_the_analytic_gradient() -> None:
    toy = make_toy()
    exact = GradientSampler(toy, TOY_BATCH).exact_gradient()
    assert exact is not None
    assert torch.allclose(exact["theta"], toy.exact_gradient(), atol=1e-6)
    assert torch.allclose(exact[LOGITS][0], toy.exact_gradient(), atol=1e-6)  # B = 1


def test_score_function_is_unbiased_within_noise_on_every_group() -> None:
    model, batch = make_vae(ScoreFunction(baseline=NoBaseline()))
    sampler = GradientSampler(model, batch)
    assert set(sampler.groups) == {"encoder", "decoder", ALL, LOGITS}
    exact = sampler.exact_gradient()
    num_samples = 512
    result = sampler.probe(model.estimator, num_samples, chunk_size=128, exact=exact, seed=0)
    for group, stats in result.groups.items():
        # E||mean - g*||^2 = T / S for an unbiased estimator; ||mean - g*||^2 is about a weighted
        # chi-square with that mean and standard deviation <= sqrt(2) T / S, so 4 T / S is more
        # than 2 standard deviations above its mean.
        assert stats.bias_norm is not None and stats.mse is not None
        assert stats.bias_norm**2 < 4 * stats.trace_cov / num_samples, group
        # mse = population variance + bias^2, an identity of the estimates
        assert math.isclose(
            stats.mse,
            stats.trace_cov * (num_samples - 1) / num_samples + stats.bias_norm**2,
            rel_tol=1e-6,
        )


def test_gumbel_softmax_bias_is_clear_at_large_temperature_and_shrinks_with_it() -> None:
    toy = make_toy()
    sampler = GradientSampler(toy, TOY_BATCH)
    exact = sampler.exact_gradient()
    num_samples = 4096
    bias, noise = {}, {}
    for tau in (0.3, 1.0, 3.0, 10.0):
        estimator = sampler.prepare(GumbelSoftmax(temperature=ConstantTemperature(tau)))
        stats = sampler.probe(estimator, num_samples, 1024, exact, seed=0).groups[ALL]
        assert stats.bias_norm is not None
        bias[tau] = stats.bias_norm
        # sqrt(T / S) bounds the standard error of the estimated bias norm (the sampling error
        # of the mean in the worst direction); measured 0.014, 0.005, 0.001, 0.0001 here.
        noise[tau] = math.sqrt(stats.trace_cov / num_samples)
    for tau in (1.0, 3.0, 10.0):
        assert bias[tau] > 10 * noise[tau], (tau, bias[tau], noise[tau])  # measured > 30x
    for smaller, larger in ((0.3, 1.0), (1.0, 3.0), (3.0, 10.0)):
        # gaps measured ~0.1 each; 4 standard errors of the difference are at most 0.06
        gap_error = math.hypot(noise[larger], noise[smaller])
        assert bias[larger] - bias[smaller] > 4 * gap_error, (smaller, larger, bias)


def test_marginalization_has_zero_variance_and_zero_bias() -> None:
    model, batch = make_vae(Marginalization())
    sampler = GradientSampler(model, batch)
    exact = sampler.exact_gradient()
    result = sampler.probe(model.estimator, 16, chunk_size=8, exact=exact, seed=0)
    for stats in result.groups.values():
        assert stats.exact_grad_sq_norm is not None and stats.exact_grad_sq_norm > 0
        assert stats.trace_cov <= 1e-12 * stats.exact_grad_sq_norm
        assert (
            stats.bias_norm is not None and stats.bias_norm**2 <= 1e-10 * stats.exact_grad_sq_norm
        )
        assert stats.cosine is not None and stats.cosine > 1 - 1e-5


@pytest.mark.parametrize(
    "make_estimator",
    [
        lambda: ScoreFunction(baseline=NoBaseline()),
        lambda: STGumbelSoftmax(temperature=ConstantTemperature(0.7)),
        lambda: Marginalization(),
    ],
    ids=["score_function", "st_gumbel_softmax", "marginalization"],
)
def test_vmap_and_loop_agree_exactly_with_matched_seeds(make_estimator) -> None:
    # On the CPU, torch.rand fills a tensor sequentially from one Mersenne-Twister stream, so
    # vmap's single draw of shape [C, ...] (randomness="different") consumes the same numbers, in
    # the same order, as C sequential draws of shape [...] in the loop: with the same seed both
    # paths see identical noise and must agree up to floating-point summation order. (An
    # estimator drawing twice per call would interleave differently; the statistical test below
    # covers that case.)
    model, batch = make_vae(make_estimator())
    sampler = GradientSampler(model, batch)
    exact = sampler.exact_gradient()
    batched = sampler.probe(model.estimator, 12, chunk_size=5, exact=exact, method="vmap", seed=3)
    looped = sampler.probe(model.estimator, 12, chunk_size=5, exact=exact, method="loop", seed=3)
    assert (batched.method, looped.method) == ("vmap", "loop")
    for group in sampler.groups:
        first, second = vars(batched.groups[group]), vars(looped.groups[group])
        scale = first["exact_grad_sq_norm"]  # float32 round-off is relative to the gradient
        if first["trace_cov"] < 1e-10 * scale:  # marginalization: 0 up to round-off
            del first["log10_trace_cov"], first["snr"], second["log10_trace_cov"], second["snr"]
        for key, value in first.items():
            tolerance = 1e-5 * (math.sqrt(scale) if key == "bias_norm" else scale)
            assert second[key] == pytest.approx(value, rel=1e-4, abs=tolerance), (group, key)


def test_vmap_and_loop_agree_statistically_with_different_seeds() -> None:
    toy = make_toy()
    sampler = GradientSampler(toy, TOY_BATCH)
    estimator = sampler.prepare(ScoreFunction(baseline=NoBaseline()))
    _, trace, fourth = score_function_moments(toy)
    num_samples = 128  # the loop is slow on a busy machine (one autograd call per sample)
    batched = sampler.probe(estimator, num_samples, 64, method="vmap", seed=1).groups[ALL]
    looped = sampler.probe(estimator, num_samples, 64, method="loop", seed=2).groups[ALL]
    # Two independent estimates of T, each with standard error sqrt((E[Y^2] - T^2) / S): their
    # difference has standard error sqrt(2) times that; allow 4 of those.
    standard_error = math.sqrt(2 * (fourth - trace**2) / num_samples)
    assert abs(batched.trace_cov - looped.trace_cov) < 4 * standard_error


class ItemCallingScoreFunction(ScoreFunction):
    """A score function whose forward calls ``.item()`` (as logging code might): not vmappable."""

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        output = super().estimate(logits, f, features)
        output.metrics["first_value"] = float(output.value[0].item())
        return output


def test_auto_falls_back_to_the_loop_with_a_warning() -> None:
    model, batch = make_vae(ItemCallingScoreFunction(baseline=NoBaseline()))
    sampler = GradientSampler(model, batch)
    with pytest.warns(UserWarning, match="cannot be vmapped"):
        result = sampler.probe(model.estimator, 6, chunk_size=3, seed=0)
    assert result.method == "loop"
    reference = sampler.probe(ScoreFunction(baseline=NoBaseline()), 6, 3, method="vmap", seed=0)
    for group in sampler.groups:  # the fallback restarts from the seed: same noise, same stats
        expected = reference.groups[group].trace_cov
        assert result.groups[group].trace_cov == pytest.approx(expected, rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second warning
        assert sampler.probe(model.estimator, 4, chunk_size=2, seed=0).method == "loop"
    with pytest.raises(RuntimeError):
        sampler.probe(model.estimator, 4, chunk_size=2, method="vmap", seed=0)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_probe_leaves_parameters_estimator_state_and_random_state_unchanged(method: str) -> None:
    estimator = ScoreFunction(num_samples=2, baseline=MovingAverageBaseline(decay=0.9))
    model, batch = make_vae(estimator)
    learned = ScoreFunction(baseline=LearnedBaseline(hidden=4))
    loss, _ = model.objective(batch, estimator)  # warm-starts the moving average
    assert bool(estimator.baseline.initialized)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sampler = GradientSampler(model, batch)
    sampler.prepare(learned)
    learned_before = {k: v.clone() for k, v in learned.state_dict().items()}
    rng_before = torch.get_rng_state()
    results = probe_estimators(
        sampler, {"train": estimator, "learned": learned}, 6, 3, method=method, seed=0
    )
    assert all(result.method == method for result in results.values())
    assert torch.equal(torch.get_rng_state(), rng_before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in learned.state_dict().items():
        assert torch.equal(value, learned_before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in learned.parameters())


def test_parameter_groups_and_validation() -> None:
    model, batch = make_vae(ScoreFunction(baseline=LearnedBaseline(hidden=4)))
    sampler = GradientSampler(model, batch, groups={"first": ["encoder.0."], "none": ["nope."]})
    assert set(sampler.groups) == {"first", ALL, LOGITS}  # unmatched groups are left out
    assert not any(name.startswith("estimator.") for name in sampler.groups[ALL])
    result = sampler.probe(model.estimator, 4, 2, seed=0)
    sizes = {group: stats.num_coordinates for group, stats in result.groups.items()}
    assert sizes == {
        "first": 16 * 12 + 12,
        ALL: sum(p.numel() for n, p in model.named_parameters() if not n.startswith("estimator.")),
        LOGITS: 6 * 2 * 3,
    }
    with pytest.raises(ValueError, match="num_samples"):
        sampler.probe(model.estimator, 1)
    with pytest.raises(ValueError, match="reserved"):
        GradientSampler(model, batch, groups={"all": ["encoder."]})
    assert GradientSampler(make_vae()[0], batch).exact_gradient(max_configurations=8) is None


class NoisyToy(ToyProblem):
    """The toy plus ``eps * sum(theta)`` with ``eps ~ N(0, 1)``: randomness outside the
    estimator (like M2's Gaussian z), of variance 1 per coordinate of the gradient."""

    def objective(self, batch, estimator):
        loss, metrics = super().objective(batch, estimator)
        return loss + torch.randn(()) * self.theta.sum(), metrics


def test_exact_gradient_of_a_noisy_objective_warns_and_averages() -> None:
    generator = torch.Generator().manual_seed(1)
    toy = NoisyToy(Marginalization(), 2, 3, target=torch.rand(2, 3, generator=generator).tolist())
    sampler = GradientSampler(toy, TOY_BATCH)
    with pytest.warns(UserWarning, match="raise exact_samples"):
        sampler.exact_gradient(seed=0)
    averaged = sampler.exact_gradient(num_samples=400, chunk_size=200, seed=0)
    assert averaged is not None
    # Each of the 6 coordinates averages 400 draws of N(0, 1) noise: standard error 1/20 = 0.05;
    # allow 4 of them.
    assert torch.allclose(averaged["theta"], toy.exact_gradient(), atol=0.2)
