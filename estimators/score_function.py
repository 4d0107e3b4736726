"""Score-function (REINFORCE / likelihood-ratio) estimator with a pluggable baseline.

Williams (1992); Glynn (1990). ``grad E_q[f(z)] = E_q[f(z) grad log q(z)] + E_q[grad f(z)]``.
With S samples ``z_s ~ q`` drawn without gradient and a baseline ``b_s`` independent of ``z_s``
(see :mod:`estimators.baselines`), the surrogate per example is

    surrogate = mean_s [ f(z_s) + (f(z_s) - b_s).detach() * log q(z_s) ]  (+ the baseline's loss)

whose gradient is unbiased for both the encoder (through ``log q``) and the decoder (through f).
"""

from __future__ import annotations

from torch import Tensor

from estimators.base import Estimator, EstimatorOutput, Objective, log_probs_of
from estimators.baselines import Baseline, NoBaseline
from estimators.sampling import sample_one_hot, sampling_dtype


class ScoreFunction(Estimator):
    def __init__(self, num_samples: int = 1, baseline: Baseline | None = None) -> None:
        super().__init__(num_samples)
        self.baseline = baseline if baseline is not None else NoBaseline()
        if num_samples < self.baseline.min_samples:
            raise ValueError(
                f"estimator.num_samples={num_samples} is too small for the "
                f"{type(self.baseline).__name__}: it needs num_samples >= "
                f"{self.baseline.min_samples}"
            )

    def prepare(self, num_variables: int, num_classes: int, feature_dim: int | None) -> None:
        self.baseline.prepare(feature_dim)

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        log_probs = logits.to(sampling_dtype(logits)).log_softmax(dim=-1)  # [B, N, K]
        z = sample_one_hot(logits, self.num_samples)  # [S, B, N, K], no gradient
        cost = f(z)  # [S, B]
        log_q = log_probs_of(log_probs, z)  # [S, B]
        baseline, baseline_loss = self.baseline(cost.detach(), features, self.updates_state)
        advantage = (cost.detach() - baseline).to(log_q.dtype)  # [S, B]
        surrogate = (cost + advantage * log_q).mean(0)  # [B]
        metrics: dict[str, Tensor | float] = {"baseline": baseline.mean()}
        if baseline_loss is not None:
            surrogate = surrogate + baseline_loss
            metrics["baseline_mse"] = baseline_loss.detach().mean()
        return EstimatorOutput(surrogate=surrogate, value=cost.detach().mean(0), metrics=metrics)
