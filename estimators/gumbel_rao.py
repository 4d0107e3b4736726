"""Gumbel-Rao: Rao-Blackwellized straight-through Gumbel-Softmax (Paulus, Maddison & Krause 2021,
"Rao-Blackwellizing the Straight-Through Gumbel-Softmax Gradient Estimator", ICLR).

ST Gumbel-Softmax (Jang et al. 2017) uses, with ``G ~ Gumbel(0, 1)^K`` and ``D = H(logits + G)``
(one-hot argmax), the gradient ``dsoftmax((logits + G)/tau)/dlogits^T grad_D f(D)``. Its forward
pass only depends on D, so conditioning the backward pass on D (Paulus et al., Eq. 8-9)

    grad_GR = E_G[ dsoftmax_tau(logits + G)/dlogits | H(logits + G) = D ]^T grad_D f(D)

has the same expectation and no more variance (Rao-Blackwell). It is estimated with M conditional
draws ``G_m | D`` (Paulus et al., Section 3.2/Appendix; top-down sampling of Maddison, Tarlow &
Minka 2014), by straight-through with the averaged soft sample:

    D ~ q,  y_bar = (1/M) sum_m softmax((logits + G_m) / tau),  z = D + (y_bar - y_bar.detach())

The conditional noise ``G_m`` is sampled without gradient: only the explicit ``logits`` carry the
derivative, exactly as in ST Gumbel-Softmax. ``M = 1`` has the distribution of ST Gumbel-Softmax.

:func:`conditional_gumbel` (the top-down sampler) is reused by RELAX/REBAR
(:mod:`estimators.relax`), which do differentiate through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import EstimatorOutput, Objective, TemperedEstimator
from estimators.sampling import gumbel_noise, sample_one_hot, sampling_dtype
from estimators.straight_through import gradient_only
from estimators.temperature import TemperatureSchedule
from estimators.validation import require_int


def conditional_gumbel(log_probs: Tensor, one_hot: Tensor, noise: Tensor) -> Tensor:
    """Perturbed log-probabilities ``log_probs + G`` conditioned on ``argmax = one_hot``.

    ``log_probs [..., K]`` must be normalized (``logsumexp = 0``), ``one_hot [..., K]`` is the
    conditioning category, ``noise [..., K]`` are i.i.d. Gumbel(0, 1) draws ``g``; all three
    broadcast together. With ``b`` the chosen class (Maddison et al. 2014; Tucker et al. 2017,
    Appendix; Paulus et al. 2021, Appendix):

        z_b = g_b                                    (the maximum ~ Gumbel(logsumexp = 0))
        z_k = -log(exp(-g_k - log p_k) + exp(-z_b))  (Gumbel(log p_k) truncated to (-inf, z_b])

    so ``argmax z = b`` always and, when ``b ~ Cat(p)``, ``z`` is distributed as ``log p + G``.
    Differentiable in ``log_probs`` (the reparameterization REBAR/RELAX need). Classes with
    ``log p = -inf`` stay ``-inf`` with zero (never NaN) gradient.
    """
    finite = torch.isfinite(log_probs)  # [..., K]
    safe = torch.where(finite, log_probs, torch.zeros_like(log_probs))  # [..., K]
    top = (noise * one_hot).sum(dim=-1, keepdim=True)  # [..., 1], z_b = g_b
    truncated = -torch.logaddexp(-noise - safe, -top)  # [..., K]
    z = torch.where(one_hot > 0, top, truncated)  # [..., K]
    return torch.where(finite, z, log_probs)  # [..., K]


class GumbelRao(TemperedEstimator):
    """Gumbel-Rao estimator with ``num_conditional`` (M) conditional Gumbel draws per sample.

    ``num_samples`` (S) categories D are drawn per example; each gets its own M draws. Paulus et
    al. use M in {10, 100, 1000}; the cost of the extra draws is M softmaxes, not M calls of f.
    """

    def __init__(
        self,
        num_samples: int = 1,
        num_conditional: int = 10,
        temperature: TemperatureSchedule | None = None,
    ) -> None:
        super().__init__(num_samples, temperature)
        self.num_conditional = require_int("estimator.num_conditional", num_conditional)

    def averaged_soft_sample(self, log_probs: Tensor, hard: Tensor, tau: Tensor | float
                             ) -> Tensor:
        """``(1/M) sum_m softmax((log_probs + G_m) / tau)`` with ``G_m | argmax = hard``.

        ``log_probs [B, N, K]`` (normalized, differentiable), ``hard [S, B, N, K]`` one-hot ->
        ``[S, B, N, K]``.
        """
        with torch.no_grad():
            noise = gumbel_noise((self.num_conditional, *hard.shape), hard.device)  # [M,S,B,N,K]
            perturbed = conditional_gumbel(log_probs.detach(), hard, noise.to(hard.dtype))
        scores = perturbed + gradient_only(log_probs)  # [M, S, B, N, K], d/dlog_probs = identity
        return torch.softmax(scores / tau, dim=-1).mean(0)  # [S, B, N, K]

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        tau = self.tau.clone()  # [], this step's value
        dtype = sampling_dtype(logits)
        log_probs = logits.to(dtype).log_softmax(dim=-1)  # [B, N, K]
        hard = sample_one_hot(logits, self.num_samples)  # [S, B, N, K], no gradient
        soft = self.averaged_soft_sample(log_probs, hard, tau)  # [S, B, N, K]
        z = hard + (soft - soft.detach())  # [S, B, N, K], forward exactly one-hot
        cost = f(z)  # [S, B]
        return EstimatorOutput(
            surrogate=cost.mean(0), value=cost.detach().mean(0), metrics={"temperature": tau}
        )

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, num_conditional={self.num_conditional}, "
            f"temperature={self.temperature!r}"
        )
