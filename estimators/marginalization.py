"""Exact marginalization: ``E_q[f(z)] = sum_z q(z) f(z)`` over all ``K^N`` one-hot configurations.

Zero-variance and unbiased; the cost is ``K^N`` evaluations of f per example (Kingma et al. 2014
use it for M2's label, K = 10). The budget ``max_configurations`` guards against shapes such as
a 20x10 VAE (10^20 configurations): :meth:`Marginalization.prepare` refuses them before training.
"""

from __future__ import annotations

from torch import Tensor

from estimators.base import Estimator, EstimatorOutput, Objective, log_probs_of
from estimators.sampling import check_enumeration_budget, enumerate_one_hot


class Marginalization(Estimator):
    def __init__(self, max_configurations: int = 1024) -> None:
        super().__init__(num_samples=1)
        if (
            not isinstance(max_configurations, int)
            or isinstance(max_configurations, bool)
            or max_configurations < 1
        ):
            raise ValueError(
                f"estimator.max_configurations={max_configurations!r} is invalid: "
                f"use an integer >= 1"
            )
        self.max_configurations = max_configurations

    def prepare(self, num_variables: int, num_classes: int, feature_dim: int | None) -> None:
        check_enumeration_budget(num_variables, num_classes, self.max_configurations)

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        batch, num_variables, num_classes = logits.shape
        count = check_enumeration_budget(num_variables, num_classes, self.max_configurations)
        configs = enumerate_one_hot(num_variables, num_classes, logits.device)  # [C, N, K]
        configs = configs.to(logits.dtype).unsqueeze(1).expand(count, batch, -1, -1)  # [C,B,N,K]
        log_q = log_probs_of(logits.log_softmax(dim=-1), configs)  # [C, B]
        weights = log_q.exp()  # [C, B]
        cost = f(configs)  # [C, B]
        expectation = (weights * cost).sum(0)  # [B]
        return EstimatorOutput(
            surrogate=expectation,
            value=expectation.detach(),
            metrics={"configurations": float(count)},
        )

    def extra_repr(self) -> str:
        return f"max_configurations={self.max_configurations}"
