"""Gapped straight-through (GST; Fan, Chi, Rudnicky & Ramadge 2022, "Training Discrete Deep
Generative Models via Gapped Straight-Through Estimator", ICML).

Gumbel-Rao (:mod:`estimators.gumbel_rao`) averages ST Gumbel-Softmax's soft sample over Gumbel
perturbations conditioned on the sampled class D, at the price of M conditional draws. GST
replaces that Monte Carlo average by one *deterministic* perturbation ``m`` of the logits built
from D, chosen to have the two properties the paper identifies in the conditional perturbations
(Section 4: consistency, ``argmax(theta + m) = D``, and a gap between the sampled class and the
others). With ``a = argmax_k theta_k``, the perturbation ``m_2`` of their Section 4.2 (Figure 2),
as the authors' reference implementation computes it:

    theta_tilde_D = theta_a                           (the sampled class is lifted to the top)
    theta_tilde_i = min(theta_i, theta_a - kappa)     (i != D: pushed at least kappa below it)
    z = D + (s - s.detach()),  s = softmax(theta_tilde / tau),  theta_tilde = theta + stopgrad(m)

so the forward value is exactly the one-hot D ~ Cat(softmax(theta)), no noise is drawn after D
("no resampling"), and the gradient is ``J(softmax(theta_tilde / tau))^T grad_D f(D) / tau``.
``kappa = gap`` gives GST-1.0 (``gap: 1.0``); ``adaptive_gap: true`` gives GST-p, with the
sample-dependent gap ``kappa = -log(1 - p_D) / p_D`` (``p_D = softmax(theta)_D``, clamped to
``1 - 1e-5`` as in the reference implementation; ``kappa -> 1`` as ``p_D -> 0``).

Biased, like every straight-through estimator; one call of f per sample. Masked classes (logit
``-inf``) stay at ``-inf`` and get no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import EstimatorOutput, Objective, TemperedEstimator
from estimators.sampling import sample_one_hot, sampling_dtype
from estimators.straight_through import gradient_only
from estimators.temperature import TemperatureSchedule
from estimators.validation import require_number


def adaptive_gap(p_sampled: Tensor) -> Tensor:
    """GST-p's gap ``-log(1 - p) / p`` for the probability ``p`` of the sampled class.

    ``p`` is clamped to ``1 - 1e-5`` (reference implementation); below ``1e-4`` the series
    ``1 + p / 2`` avoids dividing a rounded ``log1p`` by a tiny p.
    """
    p = p_sampled.clamp(max=1.0 - 1e-5)
    safe = p.clamp(min=1e-4)
    return torch.where(p > 1e-4, -torch.log1p(-safe) / safe, 1.0 + p / 2)


def gapped_logits(theta: Tensor, hard: Tensor, gap: Tensor | float) -> Tensor:
    """GST's perturbed logits ``theta_tilde`` (no gradient): ``theta [B, N, K]``, one-hot
    ``hard [S, B, N, K]``, ``gap`` broadcastable to ``[S, B, N, 1]`` -> ``[S, B, N, K]``."""
    theta = theta.detach()
    top = theta.max(dim=-1, keepdim=True).values  # [B, N, 1], theta_a
    lowered = torch.minimum(theta.unsqueeze(0), top.unsqueeze(0) - gap)  # [S, B, N, K]
    return torch.where(hard > 0, top.unsqueeze(0).expand_as(lowered), lowered)  # [S, B, N, K]


class GappedStraightThrough(TemperedEstimator):
    """GST-1.0 (``gap``) or GST-p (``adaptive_gap``), Fan et al. (2022) Section 4.2."""

    def __init__(
        self,
        num_samples: int = 1,
        temperature: TemperatureSchedule | None = None,
        gap: float = 1.0,
        adaptive_gap: bool = False,
    ) -> None:
        super().__init__(num_samples, temperature)
        self.gap = require_number(
            "estimator.gap", gap, minimum=0.0, inclusive=False,
            hint=" (GST-1.0 uses 1.0; or set estimator.adaptive_gap=true for GST-p)",
        )
        if not isinstance(adaptive_gap, bool):
            raise ValueError(
                f"estimator.adaptive_gap={adaptive_gap!r} is invalid: use true (GST-p) or false"
            )
        self.adaptive_gap = adaptive_gap

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        tau = self.tau.clone()  # [], this step's value
        theta = logits.to(sampling_dtype(logits))  # [B, N, K]
        hard = sample_one_hot(logits, self.num_samples)  # [S, B, N, K], no gradient
        with torch.no_grad():
            if self.adaptive_gap:
                p_sampled = (torch.softmax(theta, dim=-1) * hard).sum(-1, keepdim=True)
                gap: Tensor | float = adaptive_gap(p_sampled)  # [S, B, N, 1]
            else:
                gap = self.gap
            perturbed = gapped_logits(theta, hard, gap)  # [S, B, N, K]
        scores = perturbed + gradient_only(theta)  # [S, B, N, K], d/dtheta = identity
        soft = torch.softmax(scores / tau, dim=-1)  # [S, B, N, K]
        z = hard + (soft - soft.detach())  # [S, B, N, K], forward exactly one-hot
        cost = f(z)  # [S, B]
        metrics: dict[str, Tensor | float] = {"temperature": tau}
        if self.adaptive_gap:
            metrics["gap"] = gap.mean() if isinstance(gap, Tensor) else gap
        return EstimatorOutput(surrogate=cost.mean(0), value=cost.detach().mean(0), metrics=metrics)

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, temperature={self.temperature!r}, "
            f"gap={'adaptive' if self.adaptive_gap else self.gap}"
        )
