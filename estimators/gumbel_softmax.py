"""Gumbel-Softmax (Concrete) and straight-through Gumbel-Softmax estimators.

Jang, Gu & Poole (2017), Eq. (1)-(2); Maddison, Mnih & Teh (2017). With ``g ~ Gumbel(0, 1)``:

* relaxed sample ``y = softmax((logits + g) / tau)``; the gradient of ``f(y)`` is a biased,
  low-variance estimate of ``grad E_q[f(z)]`` whose bias vanishes as ``tau -> 0``.
* straight-through (Section 2.2): forward ``z = one_hot(argmax(logits + g))`` (an exact sample of
  q), backward through ``y``: ``z + (y - y.detach())``. The parentheses keep the forward value
  exactly one-hot in floating point.

Both report ``value`` as ``f`` on the hard samples, so their logged value is the discrete
objective, comparable with every other estimator (the relaxed objective is not an ELBO).
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import EstimatorOutput, Objective, TemperedEstimator
from estimators.sampling import one_hot_argmax, perturbed_logits


class GumbelSoftmax(TemperedEstimator):
    """Relaxed Gumbel-Softmax estimator; ``temperature`` maps the global step to ``tau``."""

    def relaxed_and_hard(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Soft samples ``[S, B, N, K]`` (differentiable), their hard argmax and ``tau`` ``[]``."""
        tau = self.tau.clone()  # [], this step's value (the buffer changes with the step)
        scores = perturbed_logits(logits, self.num_samples)  # [S, B, N, K] float32
        soft = torch.softmax(scores / tau, dim=-1)  # [S, B, N, K]
        hard = one_hot_argmax(scores.detach())  # [S, B, N, K]
        return soft, hard, tau

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        soft, hard, tau = self.relaxed_and_hard(logits)
        relaxed_cost = f(soft)  # [S, B]
        with torch.no_grad():
            discrete_cost = f(hard)  # [S, B]
        return EstimatorOutput(
            surrogate=relaxed_cost.mean(0),
            value=discrete_cost.mean(0),
            metrics={"temperature": tau, "relaxed_value": relaxed_cost.detach().mean()},
        )


class STGumbelSoftmax(GumbelSoftmax):
    """Straight-through Gumbel-Softmax: one-hot forward, relaxed backward.

    Jang et al. 2017, §2.2.
    """

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        soft, hard, tau = self.relaxed_and_hard(logits)
        z = hard + (soft - soft.detach())  # [S, B, N, K], forward exactly one-hot
        cost = f(z)  # [S, B]
        return EstimatorOutput(
            surrogate=cost.mean(0), value=cost.detach().mean(0), metrics={"temperature": tau}
        )
