"""Decoupled straight-through Gumbel-Softmax (Shah, Yan, Mozer & Liu 2024, "Improving Discrete
Optimisation Via Decoupled Straight-Through Gumbel-Softmax", arXiv:2410.13331).

ST Gumbel-Softmax (Jang et al. 2017, Section 2.2) uses one temperature for both passes. Decoupled
ST-GS gives each pass its own, with one shared Gumbel draw ``g`` per sample:

    forward:   D = one_hot(argmax softmax((theta + g) / tau_f))
    backward:  y_b = softmax((theta + g) / tau_b)
    z = D + (y_b - y_b.detach())                   (forward exactly D)

so the gradient is ``J(y_b)^T grad_D f(D) / tau_b``. With ``tau_f = tau_b`` it is ST-GS.

Note what this implies when the forward pass is the one-hot D, as here and as the contract
requires: ``argmax`` is invariant to a positive rescaling, so ``tau_f`` cannot change D, whose
distribution is ``Cat(softmax(theta))`` for every ``tau_f``. The estimate is therefore ST-GS at
the backward temperature ``tau_b``; the decoupling is that ``tau_b`` is chosen (and scheduled)
on its own, and ``tau_f`` is reported as a metric and validated but has no effect on a hard
forward pass. (It would matter only for a relaxed forward value, which the contract excludes.)

Configuration: ``temperature`` is the backward schedule (``estimator/temperature=...``, the
schedule ST-GS uses), ``forward_temperature`` the forward one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import EstimatorOutput, Objective, TemperedEstimator
from estimators.sampling import one_hot_argmax, perturbed_logits
from estimators.temperature import ConstantTemperature, TemperatureSchedule


class DecoupledSTGumbelSoftmax(TemperedEstimator):
    """Decoupled ST-GS: ``forward_temperature`` (tau_f) for the forward argmax,
    ``temperature`` (tau_b) for the backward soft sample; one Gumbel draw shared by both."""

    tau_forward: Tensor  # buffer [], float64

    def __init__(
        self,
        num_samples: int = 1,
        temperature: TemperatureSchedule | None = None,
        forward_temperature: TemperatureSchedule | None = None,
    ) -> None:
        super().__init__(num_samples, temperature)
        self.forward_temperature = (
            forward_temperature if forward_temperature is not None else ConstantTemperature(1.0)
        )
        if not isinstance(self.forward_temperature, TemperatureSchedule):
            raise ValueError(
                f"estimator.forward_temperature={forward_temperature!r} is invalid: use a "
                f"temperature schedule (estimator/temperature@estimator.forward_temperature="
                f"constant|exponential)"
            )
        self.register_buffer(
            "tau_forward", torch.tensor(0.0, dtype=torch.float64), persistent=False
        )
        self.set_step(self.step)

    def set_step(self, step: int) -> None:
        super().set_step(step)
        if hasattr(self, "tau_forward"):  # not yet registered during the base constructor
            self.tau_forward.fill_(self.forward_temperature(self.step))

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        tau_b = self.tau.clone()  # [], backward temperature at this step
        tau_f = self.tau_forward.clone()  # [], forward temperature at this step
        scores = perturbed_logits(logits, self.num_samples)  # [S, B, N, K], theta + g
        hard = one_hot_argmax((scores / tau_f).detach())  # [S, B, N, K]
        soft = torch.softmax(scores / tau_b, dim=-1)  # [S, B, N, K]
        z = hard + (soft - soft.detach())  # [S, B, N, K], forward exactly one-hot
        cost = f(z)  # [S, B]
        return EstimatorOutput(
            surrogate=cost.mean(0),
            value=cost.detach().mean(0),
            metrics={"temperature": tau_b, "forward_temperature": tau_f},
        )

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, temperature={self.temperature!r}, "
            f"forward_temperature={self.forward_temperature!r}"
        )
