"""Baselines (control variates) for the score-function estimator.

A baseline ``b`` is subtracted from the cost in the score-function term
``(f(z) - b) * grad log q(z)``; the estimator stays unbiased as long as ``b`` does not depend on the
sample ``z`` it multiplies (Williams 1992; Mnih & Gregor 2014). Every baseline here honours that:

* ``NoBaseline``: ``b = 0``.
* ``MovingAverageBaseline``: an exponential moving average of past costs. Each call uses the
  average of *previous* calls, then updates it. The first call uses ``b = 0`` and warm-starts the
  average at that batch's mean cost (a zero-initialised average far from f's scale would bias
  many early steps towards high variance).
* ``LearnedBaseline``: NVIL's input-dependent baseline ``b(x)`` (Mnih & Gregor 2014, §3.3), a small
  MLP on the model's per-example features trained by the squared error ``(f(z) - b(x))^2``.
* ``LeaveOneOutBaseline``: with ``S >= 2`` samples, ``b_s = mean_{s' != s} f(z_s')``
  (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from estimators.validation import require_int


class Baseline(nn.Module):
    """Maps detached costs ``[S, B]`` (and features ``[B, D]``) to a baseline ``[S, B]``."""

    min_samples = 1

    def prepare(self, feature_dim: int | None) -> None:
        """Build parts that depend on the size of the model's per-example features."""

    def forward(
        self, costs: Tensor, features: Tensor | None, update: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Return ``(b [S, B] detached, aux_loss [B] or None)``.

        ``aux_loss`` trains the baseline's own parameters; the estimator adds it to its surrogate.
        ``update`` says whether internal statistics may change (False inside probes).
        """
        raise NotImplementedError


class NoBaseline(Baseline):
    def forward(
        self, costs: Tensor, features: Tensor | None, update: bool
    ) -> tuple[Tensor, Tensor | None]:
        return torch.zeros_like(costs), None


class MovingAverageBaseline(Baseline):
    """``b_t = decay * b_{t-1} + (1 - decay) * mean(f)``, used before it is updated."""

    average: Tensor  # [] buffer
    initialized: Tensor  # [] bool buffer

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay < 1.0:
            raise ValueError(
                f"estimator.baseline.decay={decay!r} is invalid: it must be in [0, 1)"
            )
        self.decay = float(decay)
        self.register_buffer("average", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(
        self, costs: Tensor, features: Tensor | None, update: bool
    ) -> tuple[Tensor, Tensor | None]:
        # Before the first update the average is 0 (and `initialized` False): b = 0 for one call.
        baseline = self.average.to(costs.dtype).expand_as(costs)  # [S, B]
        if update:
            batch_mean = costs.detach().mean().to(self.average.dtype)
            blended = self.decay * self.average + (1.0 - self.decay) * batch_mean
            new_average = torch.where(self.initialized, blended, batch_mean)
            baseline = baseline.clone()  # the in-place update below must not change b
            self.average.copy_(new_average)
            self.initialized.fill_(True)
        return baseline, None

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


class LearnedBaseline(Baseline):
    """NVIL input-dependent baseline.

    An MLP ``features [B, D] -> b [B]`` (a constant if D is None).
    """

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.hidden = require_int("estimator.baseline.hidden", hidden)
        self.network: nn.Module | None = None
        self.constant = nn.Parameter(torch.zeros(()))

    def prepare(self, feature_dim: int | None) -> None:
        if feature_dim is not None and self.network is None:
            self.network = nn.Sequential(
                nn.Linear(feature_dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1)
            )

    def forward(
        self, costs: Tensor, features: Tensor | None, update: bool
    ) -> tuple[Tensor, Tensor | None]:
        if self.network is not None:
            if features is None:
                raise ValueError("the learned baseline was prepared for features but got none")
            predicted = self.network(features.detach()).squeeze(-1) + self.constant  # [B]
        else:
            predicted = self.constant.expand(costs.shape[1])  # [B]
        predicted = predicted.to(costs.dtype)
        squared_error = (costs.detach() - predicted.unsqueeze(0)).pow(2).mean(0)  # [B]
        return predicted.detach().unsqueeze(0).expand_as(costs), squared_error


class LeaveOneOutBaseline(Baseline):
    """``b_s`` = mean cost of the other ``S - 1`` samples of the same example."""

    min_samples = 2

    def forward(
        self, costs: Tensor, features: Tensor | None, update: bool
    ) -> tuple[Tensor, Tensor | None]:
        num_samples = costs.shape[0]
        total = costs.detach().sum(0, keepdim=True)  # [1, B]
        return (total - costs.detach()) / (num_samples - 1), None  # [S, B]
