"""Plain straight-through estimator (Bengio, Léonard & Courville 2013, "Estimating or propagating
gradients through stochastic neurons for conditional computation", Section 4; categorical form as
the "ST" column of Jang, Gu & Poole 2017, Table 1).

Forward: an exact sample ``z ~ q = Cat(softmax(logits))`` (one-hot). Backward: the gradient of
``p = softmax(logits / tau)``, i.e. the sample is treated as if it were ``p``:

    z_st = z + (p - p.detach())            (forward exactly z, backward dz_st/dlogits = J(p) / tau)
    grad_logits = J(p)^T grad_z f(z) / tau,  J(p) = diag(p) - p p^T

Unlike ST Gumbel-Softmax no noise enters the backward pass: for a linear ``f`` the gradient is the
same for every sample (and exact at ``tau = 1``). Biased in general.

This module also holds :func:`gradient_only`, the zero-valued "gradient carrier" shared by the
other straight-through-style estimators of catgrad (Gumbel-Rao, ReinMax, RELAX).
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import EstimatorOutput, Objective, TemperedEstimator
from estimators.sampling import sample_one_hot, sampling_dtype


def gradient_only(x: Tensor) -> Tensor:
    """``x - x.detach()`` with non-finite entries of ``x`` replaced by 0 first.

    Forward value exactly 0; gradient the identity on finite entries and 0 (never NaN) on masked
    ones (logit ``-inf``, where ``-inf - (-inf)`` would be NaN). Multiplying it by a detached
    tensor ``g`` and summing injects ``g`` as the gradient of ``x`` without changing any value.
    """
    safe = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return safe - safe.detach()


class StraightThrough(TemperedEstimator):
    """Plain ST: one-hot sample forward, ``softmax(logits / tau)`` backward (Bengio et al. 2013).

    ``temperature`` maps the global step to ``tau`` (default constant 1, the classic estimator;
    a schedule gives Jang et al.'s "Annealed ST").
    """

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        tau = self.tau.clone()  # [], this step's value
        dtype = sampling_dtype(logits)
        probs = torch.softmax(logits.to(dtype) / tau, dim=-1)  # [B, N, K]
        hard = sample_one_hot(logits, self.num_samples)  # [S, B, N, K], no gradient
        z = hard + (probs - probs.detach())  # [S, B, N, K], forward exactly one-hot
        cost = f(z)  # [S, B]
        return EstimatorOutput(
            surrogate=cost.mean(0), value=cost.detach().mean(0), metrics={"temperature": tau}
        )
