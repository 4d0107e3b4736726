"""ReinMax (Liu, Zhang, Kong, Han, Chen & Gao 2023, "Bridging Discrete and Backpropagation:
Straight-Through and Beyond", NeurIPS), Algorithm 2.

Straight-through is a first-order (forward Euler) approximation of the gradient of ``E_q[f(D)]``;
ReinMax replaces it with Heun's second-order method. With ``pi_0 = softmax(logits)``, an exact
sample ``D ~ Cat(pi_0)`` and temperature ``tau >= 1``:

    pi_1 = (D + softmax(logits / tau)) / 2
    pi_1 = softmax(stopgrad(log pi_1 - logits) + logits)      (value pi_1, Jacobian J(pi_1))
    pi_2 = 2 pi_1 - pi_0 / 2
    D_rm = pi_2 - stopgrad(pi_2) + D                          (forward exactly D)

so that ``grad_logits = (2 J(pi_1) - J(pi_0) / 2)^T grad_D f(D)`` with ``J(p) = diag(p) - p p^T``.
``tau`` only enters through the value of ``pi_1``. The paper requires ``tau >= 1`` (Section 5;
its Algorithm 2 and experiments), which is validated here.

``J(p)^T g`` is injected without computing ``log pi_1`` (which is ``-inf`` for masked classes and
underflows for logits far apart): ``p * (delta - <p, delta>)`` with ``p`` detached and
``delta = logits - logits.detach()`` is exactly 0 forward and has Jacobian ``J(p)`` backward, the
same derivative as the paper's ``softmax(stopgrad(log p - logits) + logits)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import EstimatorOutput, Objective, TemperedEstimator
from estimators.sampling import sample_one_hot, sampling_dtype
from estimators.straight_through import gradient_only
from estimators.temperature import TemperatureSchedule


def softmax_jacobian_carrier(probs: Tensor, logits: Tensor) -> Tensor:
    """A zero tensor whose derivative w.r.t. ``logits`` is ``J(probs) = diag(p) - p p^T``.

    ``probs [..., K]`` (treated as a constant), ``logits [..., K]`` (broadcast) -> ``[..., K]``.
    """
    p = probs.detach()  # [..., K]
    delta = gradient_only(logits)  # [..., K], value 0
    return p * (delta - (p * delta).sum(dim=-1, keepdim=True))  # [..., K], value exactly 0


class ReinMax(TemperedEstimator):
    """ReinMax, Liu et al. (2023) Algorithm 2; ``temperature`` must stay >= 1 (default 1)."""

    def __init__(
        self, num_samples: int = 1, temperature: TemperatureSchedule | None = None
    ) -> None:
        super().__init__(num_samples, temperature)
        # A schedule's lowest value (tau_min) or, for a constant, its value must be >= 1.
        lowest = getattr(self.temperature, "tau_min", None)
        self.check_temperature(float(lowest) if lowest is not None else self.temperature(0))

    def check_temperature(self, tau: float) -> None:
        if not tau >= 1.0:
            raise ValueError(
                f"ReinMax needs temperature tau >= 1 (Liu et al. 2023), got tau={tau}: "
                f"use estimator/temperature=constant with estimator.temperature.tau >= 1"
            )

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        tau = self.tau.clone()  # [], this step's value (>= 1, checked by set_step)
        dtype = sampling_dtype(logits)
        theta = logits.to(dtype)  # [B, N, K]
        pi_0 = torch.softmax(theta, dim=-1)  # [B, N, K]
        hard = sample_one_hot(logits, self.num_samples)  # [S, B, N, K], no gradient
        pi_1 = (hard + torch.softmax(theta / tau, dim=-1)) / 2  # [S, B, N, K]
        carrier = (
            2 * softmax_jacobian_carrier(pi_1, theta) - softmax_jacobian_carrier(pi_0, theta) / 2
        )  # [S, B, N, K], value exactly 0
        z = hard + carrier  # [S, B, N, K], forward exactly one-hot
        cost = f(z)  # [S, B]
        return EstimatorOutput(
            surrogate=cost.mean(0), value=cost.detach().mean(0), metrics={"temperature": tau}
        )
