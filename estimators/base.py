"""The estimator contract shared by every gradient estimator in catgrad.

A model owns a categorical distribution q(z|x) over N independent variables of K classes each,
given by unnormalized ``logits [B, N, K]``, and a per-example cost ``f``. An estimator turns them
into three things (see ``EstimatorOutput``):

* ``surrogate [B]``: differentiable; the gradient of ``surrogate.mean()`` with respect to every
  parameter (the encoder's through ``logits``, the decoder's through ``f``, the estimator's own
  such as a learned baseline) *is* the estimator's gradient of ``E_q[f(z)]``. Its value means
  nothing (a score-function surrogate is not a loss): never log it.
* ``value [B]``: a detached estimate of ``E_q[f(z)]`` computed with discrete (one-hot) samples, so
  that every estimator reports the same quantity.
* ``metrics``: scalars worth logging (temperature, baseline, number of ``f`` evaluations ...).

``f`` maps one-hot or relaxed samples ``[S, B, N, K]`` to costs ``[S, B]``; it must broadcast over
the leading sample axis and may depend on model parameters, but on ``logits`` only through ``z``.
Analytic terms (the KL to the prior, entropies, classification losses) are the model's job.

Estimators are ``nn.Module``s so that their state (moving averages, baseline networks) is part of
every checkpoint. Before training, the model calls :meth:`Estimator.prepare` with the latent shape
and the size of the per-example features; this is where an estimator validates that it can handle
the shape (enumeration budgets) and builds shape-dependent parts (a learned baseline network),
so bad configurations fail before any work starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from estimators.temperature import ConstantTemperature, TemperatureSchedule
from estimators.validation import require_int

Objective = Callable[[Tensor], Tensor]
"""``f``: samples ``[S, B, N, K]`` -> per-example cost ``[S, B]``."""


@dataclass
class EstimatorOutput:
    """What an estimator returns; see the module docstring for the contract of each field."""

    surrogate: Tensor  # [B], differentiable
    value: Tensor  # [B], detached estimate of E_q[f(z)] with discrete samples
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Estimator(nn.Module):
    """Base class of all estimators of ``grad E_{z~q}[f(z)]`` for categorical ``q``.

    Subclasses implement :meth:`estimate`. ``num_samples`` (S) is the number of samples of z
    drawn per example (ignored by exact marginalization, which evaluates every configuration).
    """

    def __init__(self, num_samples: int = 1) -> None:
        super().__init__()
        self.num_samples = require_int("estimator.num_samples", num_samples)
        self.step = 0  # global training step, set by the model (drives temperature schedules)
        self._state_updates_enabled = True

    # ----------------------------------------------------------------------------------------
    # Hooks called by models
    # ----------------------------------------------------------------------------------------
    def prepare(self, num_variables: int, num_classes: int, feature_dim: int | None) -> None:
        """Validate the latent shape ``[N, K]`` and build shape-dependent parts.

        Called once by the model's constructor. ``feature_dim`` is the size of the per-example
        ``features`` the model passes to :meth:`forward` (None if it passes none). Raise a
        ``ValueError`` with one line naming the offending values and the fix when the shape cannot
        be handled.
        """

    def set_step(self, step: int) -> None:
        """Tell the estimator the global training step (for temperature schedules)."""
        self.step = int(step)

    @property
    def updates_state(self) -> bool:
        """Whether calls may update internal state (moving averages); False inside ``frozen()``."""
        return self._state_updates_enabled and self.training

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Context in which the estimator's state (buffers) is left unchanged, e.g. for probes."""
        previous = self._state_updates_enabled
        self._state_updates_enabled = False
        try:
            yield
        finally:
            self._state_updates_enabled = previous

    # ----------------------------------------------------------------------------------------
    # The contract
    # ----------------------------------------------------------------------------------------
    def forward(
        self, logits: Tensor, f: Objective, features: Tensor | None = None
    ) -> EstimatorOutput:
        """Estimate ``grad E_q[f]``; ``logits [B, N, K]``, optional ``features [B, D]``."""
        if logits.dim() != 3:
            raise ValueError(f"logits must have shape [B, N, K], got {tuple(logits.shape)}")
        return self.estimate(logits, f, features)

    def estimate(
        self, logits: Tensor, f: Objective, features: Tensor | None
    ) -> EstimatorOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}"


class TemperedEstimator(Estimator):
    """An estimator with a temperature schedule ``tau(step)`` (the Gumbel-Softmax family).

    ``self.tau`` is a 0-d float64 buffer holding the schedule's value at the current step,
    refreshed by :meth:`set_step` (a host-side ``fill_``: no device value is ever read back).
    Estimates read the tensor, never the schedule, so a compiled objective
    (``model.compile=true``) sees a tensor input instead of a Python float that would be baked
    into the graph and recompile it whenever the schedule moves. Not saved in checkpoints: it is
    a function of the step. float64 keeps the schedule's value exact, and as a 0-d tensor it
    does not promote the dtype of the tensors it divides (float32 and bfloat16 stay as they are).
    """

    tau: Tensor  # buffer [], float64

    def __init__(self, num_samples: int = 1, temperature: TemperatureSchedule | None = None
                 ) -> None:
        super().__init__(num_samples)
        self.temperature = temperature if temperature is not None else ConstantTemperature(1.0)
        self.register_buffer("tau", torch.tensor(0.0, dtype=torch.float64), persistent=False)
        self.set_step(0)

    def check_temperature(self, tau: float) -> None:
        """Raise a one-line ``ValueError`` if this estimator cannot use ``tau`` (default: any)."""

    def set_step(self, step: int) -> None:
        super().set_step(step)
        tau = self.temperature(self.step)
        self.check_temperature(tau)
        self.tau.fill_(tau)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, temperature={self.temperature!r}"


def log_probs_of(log_probs: Tensor, one_hot: Tensor) -> Tensor:
    """``log q(z)`` of one-hot samples.

    ``log_probs [B, N, K]``, ``one_hot [S, B, N, K]`` -> ``[S, B]``.

    Uses a masked sum instead of ``one_hot * log_probs`` so that classes with probability zero
    (logit ``-inf``) give ``0 * -inf = 0`` instead of NaN.
    """
    picked = torch.where(one_hot > 0, log_probs.expand_as(one_hot), 0.0)  # [S, B, N, K]
    return picked.sum(dim=(-1, -2))  # [S, B]
