r"""The unordered set estimator with its built-in baseline (Kool, van Hoof & Welling 2020,
"Estimating Gradients for Discrete Random Variables by Sampling without Replacement", ICLR).

**What is sampled without replacement.** ``f`` takes full configurations ``z = (z_1, ..., z_N)``
and the expectation is over the *joint* distribution ``q(z) = prod_n q_n(z_n)`` on the domain
``D`` of all ``K^N`` configurations. The estimator therefore draws a set ``S^k`` of ``k``
*distinct joint configurations* from ``q`` without replacement; its formulas only need the
probabilities ``q(s)`` of the configurations in the set. Drawing k classes without replacement
per variable and pairing them up would not be such a set (its members are not distinct draws of
the joint distribution, and the set probabilities below would not apply), so it is not done.
The joint set is drawn by Gumbel-top-k over ``D`` without enumerating it: stochastic beam search
(Kool, van Hoof & Welling 2019, "Stochastic Beams and Where to Find Them", ICML) expands the
variables one at a time, keeps the k partial configurations with the largest perturbed
log-probabilities, and draws each child's Gumbel conditionally on its parent's maximum (their
top-down sampling, in the numerically stable form given in their appendix). Cost: ``O(N k K)``
and k calls of f. For ``N = 1`` it is plain Gumbel-top-k on the K classes.

**The estimator** (Kool et al. 2020: the unordered set estimator with its "built-in baseline").
With ``p(S)`` the probability of the unordered set, ``p^{D\s}(S \ {s})`` that of the set without
s when sampling from the domain without s, and the leave-one-out ratios

    R(S, s)        = p^{D\s}(S \ {s}) / p(S)
    R^{D\s}(S, s') = p^{D\{s,s'}}(S \ {s, s'}) / p^{D\s}(S \ {s})  (s' != s),
    R^{D\s}(S, s)  = 1,

the value ``sum_{s in S} q(s) R(S, s) f(s)`` is unbiased for ``E_q[f]`` and

    grad = sum_{s in S} grad q(s) R(S, s) [ f(s) - sum_{s' in S} q(s') R^{D\s}(S, s') f(s') ]

is unbiased for ``grad E_q[f]``; the bracket's second term is the built-in baseline, an
unordered-set estimate of ``E_q[f]`` that uses s only through ``q(s) f(s)``. With
``k = |D|`` every ratio is 1 and the gradient is exact. The decoder gets the gradient of the
value (weights detached), which is unbiased for it.

**Set probabilities.** With ``r = 1 - sum_{s in S} q(s)`` the mass outside the set, the
probability that the next ``|C|`` draws are the members of ``C`` (in any order) when the
remaining mass is ``r + q(C)`` obeys ``Q(C) = sum_{c in C} q(c) / (r + q(C)) Q(C \ {c})``,
``Q({}) = 1`` (the sum over the orderings of the set). Then ``p(S) = Q(S)``,
``p^{D\s}(S \ {s}) = Q(S \ {s})`` and ``p^{D\{s,s'}}(S \ {s,s'}) = Q(S \ {s,s'})``
(probabilities are ratios of masses, so the renormalised domains need no other change). One
dynamic programme over the ``2^k`` subsets in log-space gives them all exactly (the paper
approximates them by numerical integration); hence
``2 <= num_samples <= 12`` (the baseline needs a second sample: with k = 1 the set without s
is empty and cannot estimate the rest of ``E_q[f]``).

**Fewer configurations than k.** When a variable's masked classes (logit ``-inf``) leave fewer
than k configurations of positive probability, the beam holds all of them plus impossible
padding; that example's estimate is then exact (value ``sum_s q(s) f(s)``, gradient
``sum_s grad q(s) [f(s) - value]``), and the padding is never passed to f (it is replaced by a
copy of a valid configuration with weight 0). Likewise ``k > K^N`` draws all ``K^N``.

Contract: ``surrogate``/``value`` as in :mod:`estimators.base`; ``metrics["f_evaluations"]`` is
the number of configurations f was called with per example (k, or ``K^N`` if smaller).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from estimators.base import Estimator, EstimatorOutput, Objective, log_probs_of
from estimators.sampling import gumbel_noise, sampling_dtype

MAX_SAMPLES = 12  # the exact set probabilities cost O(2^k k) per example


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2``; ``0 -> -inf``."""
    x = x.clamp(max=0.0)
    return torch.where(
        x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


def truncated_gumbel(gumbels: Tensor, maximum: Tensor, target: Tensor) -> Tensor:
    """Gumbels conditioned on their maximum being ``target`` (Kool et al. 2019, top-down sampling).

    ``gumbels [..., K]`` are independent ``Gumbel(phi_k)`` draws, ``maximum [..., 1]`` their
    maximum, ``target [..., 1]`` the parent's perturbed log-probability:
    ``-log(exp(-target) - exp(-maximum) + exp(-g))``, computed as ``target - softplus(v)`` with
    ``v = target - g + log(1 - exp(g - maximum))``. ``-inf`` entries (impossible children, or an
    impossible parent) stay ``-inf``.
    """
    possible = torch.isfinite(gumbels) & torch.isfinite(target)  # [..., K]
    g = torch.where(possible, gumbels, torch.zeros_like(gumbels))  # [..., K]
    top = torch.where(torch.isfinite(maximum), maximum, torch.zeros_like(maximum))  # [..., 1]
    parent = torch.where(torch.isfinite(target), target, torch.zeros_like(target))  # [..., 1]
    v = parent - g + log1mexp(g - top)  # [..., K]
    shifted = parent - torch.nn.functional.softplus(v)  # [..., K]
    return torch.where(possible, shifted, torch.full_like(gumbels, -math.inf))  # [..., K]


def stochastic_beam_search(log_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k distinct joint configurations drawn without replacement from ``prod_n q_n``.

    ``log_probs [B, N, K]`` (normalized per variable) -> class indices ``[B, W, N]`` and their
    joint log-probabilities ``[B, W]`` with ``W = min(k, K^N)``; ``-inf`` marks padding when fewer
    than W configurations have positive probability. Without gradient.
    """
    batch, num_variables, num_classes = log_probs.shape
    device, dtype = log_probs.device, log_probs.dtype
    with torch.no_grad():
        log_probs = log_probs.detach()
        phi = torch.zeros(batch, 1, device=device, dtype=dtype)  # [B, W] partial log q
        perturbed = gumbel_noise((batch, 1), device).to(dtype)  # [B, W], root ~ Gumbel(0)
        classes = torch.zeros(batch, 1, 0, device=device, dtype=torch.long)  # [B, W, n]
        for n in range(num_variables):
            width = phi.shape[1]
            child_phi = phi.unsqueeze(-1) + log_probs[:, n].unsqueeze(1)  # [B, W, K]
            noise = gumbel_noise(child_phi.shape, device).to(dtype)  # [B, W, K]
            child = child_phi + noise  # [B, W, K], Gumbel(child_phi)
            maximum = child.max(dim=-1, keepdim=True).values  # [B, W, 1]
            child = truncated_gumbel(child, maximum, perturbed.unsqueeze(-1))  # [B, W, K]
            keep = min(k, width * num_classes)
            perturbed, index = child.flatten(1).topk(keep, dim=1)  # [B, W'], [B, W']
            parent, chosen = index // num_classes, index % num_classes  # [B, W'] each
            phi = child_phi.flatten(1).gather(1, index)  # [B, W']
            history = classes.gather(1, parent.unsqueeze(-1).expand(-1, -1, n))  # [B, W', n]
            classes = torch.cat([history, chosen.unsqueeze(-1)], dim=-1)  # [B, W', n + 1]
    return classes, phi


@functools.cache
def _subset_tables(k: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``bits [2^k, k]`` (member c of subset m), ``without [2^k, k]`` (index of ``m \\ {c}``,
    m itself where c is not a member) and the subsets grouped by size 1..k."""
    masks = torch.arange(2**k)  # [2^k]
    powers = 2 ** torch.arange(k)  # [k]
    bits = (masks.unsqueeze(1) & powers) > 0  # [2^k, k]
    without = torch.where(bits, masks.unsqueeze(1) - powers, masks.unsqueeze(1))  # [2^k, k]
    sizes = bits.sum(1)  # [2^k]
    levels = [torch.nonzero(sizes == size).squeeze(1) for size in range(1, k + 1)]
    return bits, without, levels


def log_subset_probabilities(log_q: Tensor, log_rest: Tensor) -> Tensor:
    """``log Q(C)`` for every subset C of the k sampled configurations (see the module docstring).

    ``log_q [B, k]`` (finite), ``log_rest [B]`` = ``log r`` (may be ``-inf``) -> ``[B, 2^k]``,
    subset m holding the members whose bit is set in m.
    """
    batch, k = log_q.shape
    cpu_bits, cpu_without, cpu_levels = _subset_tables(k)
    bits, without = cpu_bits.to(log_q.device), cpu_without.to(log_q.device)  # [2^k, k] each
    levels = [level.to(log_q.device) for level in cpu_levels]
    neg_inf = torch.tensor(-math.inf, dtype=log_q.dtype, device=log_q.device)
    members = torch.where(bits, log_q.unsqueeze(1), neg_inf)  # [B, 2^k, k]
    log_mass = torch.logsumexp(
        torch.cat([log_rest.view(batch, 1, 1).expand(-1, 2**k, 1), members], dim=-1), dim=-1
    )  # [B, 2^k], log(r + q(C))
    log_subsets = torch.zeros_like(log_mass)  # [B, 2^k]; Q({}) = 1, the rest filled below
    for level in levels:  # subsets of size 1, 2, ..., k: each needs the previous size only
        previous = log_subsets[:, without[level]]  # [B, M, k]
        terms = torch.where(bits[level], log_q.unsqueeze(1) + previous, neg_inf)  # [B, M, k]
        values = torch.logsumexp(terms, dim=-1) - log_mass[:, level]  # [B, M]
        log_subsets = log_subsets.index_copy(1, level, values)  # out of place (vmap-friendly)
    return log_subsets


def unordered_set_weights(log_q: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Log-weights ``log q(s) R(S, s)`` ``[B, k]`` and the baseline weights
    ``q(s') R^{D\\s}(S, s')`` as ``[B, k (s), k (s')]``, for the k configurations of each example.

    ``log_q [B, k]`` (``-inf`` where not ``valid``); examples with padding get the exact weights
    ``q(s)`` (their set is the whole support).
    """
    batch, k = log_q.shape
    exact = ~valid.all(dim=1)  # [B], the set holds every possible configuration
    safe_q = torch.where(valid, log_q, torch.zeros_like(log_q))  # [B, k]
    log_rest = log1mexp(torch.logsumexp(safe_q, dim=1))  # [B], log(1 - q(S))
    log_subsets = log_subset_probabilities(safe_q, log_rest)  # [B, 2^k]
    full = 2**k - 1
    one = 2 ** torch.arange(k, device=log_q.device)  # [k]
    log_ratio = log_subsets[:, full - one] - log_subsets[:, full : full + 1]  # [B, k], log R(S,s)
    pair = (full - one).unsqueeze(1) - one.unsqueeze(0)  # [k, k], S \ {s, s'} (s' != s)
    pair = torch.where(torch.eye(k, dtype=torch.bool, device=log_q.device), full - one, pair)
    log_inner = log_subsets[:, pair] - log_subsets[:, full - one].unsqueeze(-1)  # [B, k, k]
    eye = torch.eye(k, dtype=torch.bool, device=log_q.device)  # R^{D\s}(S, s) = 1
    log_inner = torch.where(eye, torch.zeros_like(log_inner), log_inner)  # [B, k, k]
    log_weights = torch.where(exact.unsqueeze(1), log_q, log_q + log_ratio)  # [B, k]
    log_inner = torch.where(exact.view(batch, 1, 1), torch.zeros_like(log_inner), log_inner)
    baseline_weights = (log_q.unsqueeze(1) + log_inner).exp()  # [B, k, k]
    if k == 1:  # no other sample to estimate E_{D\s}[f] with (only when K^N = 1): no baseline
        baseline_weights = torch.zeros_like(baseline_weights)
    return log_weights, baseline_weights


class UnorderedSet(Estimator):
    """Unordered set estimator with built-in baseline over ``num_samples`` (k) configurations
    drawn without replacement; see the module docstring. ``2 <= k <= 12``."""

    def __init__(self, num_samples: int = 4) -> None:
        super().__init__(num_samples)
        if num_samples < 2:
            raise ValueError(
                f"estimator.num_samples={num_samples} is too small for the unordered set "
                f"estimator: its built-in baseline needs num_samples >= 2"
            )
        if num_samples > MAX_SAMPLES:
            raise ValueError(
                f"estimator.num_samples={num_samples} is too large for the unordered set "
                f"estimator (exact set probabilities cost 2^k per example): use num_samples <= "
                f"{MAX_SAMPLES}"
            )

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        batch, num_variables, num_classes = logits.shape
        log_probs = logits.to(sampling_dtype(logits)).log_softmax(dim=-1)  # [B, N, K]
        classes, joint = stochastic_beam_search(log_probs, self.num_samples)  # [B,W,N], [B,W]
        valid = torch.isfinite(joint)  # [B, W]; configuration 0 is always valid
        classes = torch.where(valid.unsqueeze(-1), classes, classes[:, :1])  # [B, W, N]
        z = torch.zeros(
            (*classes.shape, num_classes), dtype=log_probs.dtype, device=logits.device
        ).scatter(-1, classes.unsqueeze(-1), 1.0).transpose(0, 1)  # [W, B, N, K]
        cost = f(z)  # [W, B]
        log_q = log_probs_of(log_probs, z)  # [W, B], differentiable
        with torch.no_grad():
            weight_dtype = torch.float64 if logits.device.type != "mps" else log_probs.dtype
            log_weights, inner = unordered_set_weights(joint.to(weight_dtype), valid)
            costs = cost.detach().to(weight_dtype).transpose(0, 1)  # [B, W]
            weights = log_weights.exp()  # [B, W], q(s) R(S, s) (0 for padding)
            baseline = (inner * costs.unsqueeze(1)).sum(-1)  # [B, W]
            advantage = weights * (costs - baseline)  # [B, W]
            value = (weights * costs).sum(1)  # [B]
        weights, advantage = (t.transpose(0, 1).to(log_q.dtype) for t in (weights, advantage))
        surrogate = (weights * cost.to(log_q.dtype) + advantage * log_q).sum(0)  # [B]
        return EstimatorOutput(
            surrogate=surrogate,
            value=value.to(log_q.dtype),
            metrics={"f_evaluations": float(z.shape[0])},
        )
