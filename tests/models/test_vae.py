"""Categorical VAE: analytic KL, exact discrete ELBO, importance-weighted bound, gradients."""

from __future__ import annotations

import itertools

import torch

from estimators import Marginalization, STGumbelSoftmax
from estimators.sampling import enumerate_one_hot
from models import CategoricalVAE
from models.categorical import categorical_kl


def small_vae(num_variables: int = 2, num_classes: int = 3, **kwargs) -> CategoricalVAE:
    torch.manual_seed(0)
    return CategoricalVAE(
        estimator=kwargs.pop("estimator", STGumbelSoftmax()),
        image_shape=(2, 3),
        num_variables=num_variables,
        num_classes=num_classes,
        encoder_hidden=[8],
        decoder_hidden=[8],
        **kwargs,
    ).double()


def test_categorical_kl_equals_enumeration() -> None:
    q = torch.randn(4, 2, 3, dtype=torch.float64)
    p = torch.randn(2, 3, dtype=torch.float64)
    configs = enumerate_one_hot(2, 3).double()  # [9, 2, 3]
    log_q = torch.einsum("cnk,bnk->bc", configs, q.log_softmax(-1))  # [4, 9]
    log_p = torch.einsum("cnk,nk->c", configs, p.log_softmax(-1))  # [9]
    enumerated = (log_q.exp() * (log_q - log_p)).sum(-1)
    assert torch.allclose(categorical_kl(q, p), enumerated, atol=1e-12)


def test_neg_elbo_is_exact_when_enumerable_and_matches_monte_carlo() -> None:
    model = small_vae(eval_samples=20_000, exact_eval_max_configurations=1024)
    x = torch.bernoulli(torch.full((5, 6), 0.5, dtype=torch.float64))
    exact = model.neg_elbo(x)
    # Hand-written ELBO: sum_z q(z|x) [-log p(x|z)] + KL.
    logits = model.encode(x)
    configs = enumerate_one_hot(2, 3).double()
    weights = torch.einsum("cnk,bnk->cb", configs, logits.log_softmax(-1)).exp()
    costs = model.reconstruction_cost(x, configs.unsqueeze(1).expand(-1, 5, -1, -1))
    by_hand = (weights * costs).sum(0) + model.kl(logits)
    assert torch.allclose(exact.double(), by_hand.double(), atol=1e-5)
    model.exact_eval_max_configurations = 1  # force Monte Carlo with 20,000 hard samples
    torch.manual_seed(1)
    monte_carlo = model.neg_elbo(x)
    # sd of -log p(x|z) across z is < 3 nats here: SE < 3 / sqrt(20000) = 0.02; allow 0.15.
    assert torch.allclose(monte_carlo.double(), exact.double(), atol=0.15)


def test_importance_weighted_bound_is_tighter_and_converges_to_log_likelihood() -> None:
    model = small_vae()
    x = torch.bernoulli(torch.full((4, 6), 0.5, dtype=torch.float64))
    # Exact -log p(x) = -log sum_z p(z) p(x|z) by enumeration (uniform prior, 9 configurations).
    configs = enumerate_one_hot(2, 3).double().unsqueeze(1).expand(-1, 4, -1, -1)
    exact_nll = -torch.logsumexp(model.log_joint(x, configs).double(), dim=0)
    model.iwae_samples = 5000
    torch.manual_seed(2)
    iwae = model.nll_iwae(x).double()
    neg_elbo = model.neg_elbo(x).double()
    assert torch.all(iwae <= neg_elbo + 1e-6)
    # log(mean of M weights) has SE ~ (sd(w) / E[w]) / sqrt(M); the weights' relative sd was
    # measured at <= 0.48 for this model and x, so SE <= 0.48 / sqrt(5000) = 0.0068 nats.
    # 4 SE = 0.027. (A single estimate may fall either side of log p(x): it is a bound only in
    # expectation.)
    assert torch.allclose(iwae, exact_nll, atol=0.027)


def test_objective_gradient_with_marginalization_equals_exact_neg_elbo_gradient() -> None:
    model = small_vae(estimator=Marginalization())
    x = torch.bernoulli(torch.full((3, 6), 0.5, dtype=torch.float64))
    loss, metrics = model.objective((x, torch.zeros(3)), model.estimator)
    grads = torch.autograd.grad(loss, list(model.encoder.parameters()) + list(
        model.decoder.parameters()))
    logits = model.encode(x)
    configs = enumerate_one_hot(2, 3).double().unsqueeze(1).expand(-1, 3, -1, -1)
    weights = torch.einsum("cbnk,bnk->cb", configs, logits.log_softmax(-1)).exp()
    exact = ((weights * model.reconstruction_cost(x, configs)).sum(0) + model.kl(logits)).mean()
    exact_grads = torch.autograd.grad(exact, list(model.encoder.parameters()) + list(
        model.decoder.parameters()))
    for got, want in itertools.zip_longest(grads, exact_grads):
        assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(metrics["neg_elbo"], exact.detach())


def test_learned_prior_is_a_parameter() -> None:
    model = small_vae(learned_prior=True)
    assert any(name == "prior_logits" for name, _ in model.named_parameters())
    assert "prior_logits" in small_vae().state_dict()  # a buffer when fixed


def test_kl_and_entropy_gradients_finite_with_masked_classes() -> None:
    from models.categorical import categorical_entropy

    logits = torch.tensor([[[1.0, -float("inf"), 0.5]]], requires_grad=True)
    kl = categorical_kl(logits, torch.zeros(1, 3))
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    assert torch.isfinite(grad).all() and grad[0, 0, 1] == 0
    # Same value as the unmasked 2-class distribution against a uniform 3-class prior.
    two = torch.tensor([[[1.0, 0.5]]])
    q = two.softmax(-1)
    assert torch.allclose(kl, (q * (q.log() + torch.log(torch.tensor(3.0)))).sum())
    entropy = categorical_entropy(logits)
    (grad,) = torch.autograd.grad(entropy.sum(), logits)
    assert torch.isfinite(grad).all()
    assert torch.allclose(entropy, -(q * q.log()).sum())
