"""The logits tap: how the probe reaches the gradient with respect to the logits a model hands
its estimator, and the module ``torch.func`` differentiates (see docs/gradients.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from estimators.base import Estimator, EstimatorOutput, Objective


class LogitsTap(Estimator):
    """Delegates to ``inner`` after adding ``offset`` to the logits; records the call's shapes.

    With ``inner=None`` it only records (``surrogate = value = 0``): a cheap discovery pass that
    learns the latent shape without running any estimator. Not an ``nn.Module`` child of anything:
    the probed estimator keeps its own parameters and buffers.
    """

    def __init__(self, inner: Estimator | None) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a submodule: no parameter aliasing
        self.offset: Tensor | None = None
        self.calls = 0
        self.logits_shape: torch.Size | None = None
        self.logits_dtype: torch.dtype | None = None
        self.feature_dim: int | None = None

    def forward(
        self, logits: Tensor, f: Objective, features: Tensor | None = None
    ) -> EstimatorOutput:
        self.calls += 1
        self.logits_shape = logits.shape  # [B, N, K]
        self.logits_dtype = logits.dtype
        self.feature_dim = None if features is None else int(features.shape[-1])
        inner: Estimator | None = self.inner  # type: ignore[assignment]
        if inner is None:
            zeros = logits.new_zeros(logits.shape[0])  # [B]
            return EstimatorOutput(surrogate=zeros, value=zeros)
        if self.offset is not None:
            logits = logits + self.offset  # [B, N, K]
        return inner(logits, f, features=features)


class ObjectiveModule(nn.Module):
    """``forward(batch, offset) -> loss`` of ``model.objective`` under a tap: what is vmapped."""

    def __init__(self, model: nn.Module, tap: LogitsTap, use_offset: bool) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "tap", tap)
        self.use_offset = use_offset

    def forward(self, batch: Any, offset: Tensor) -> Tensor:
        tap: LogitsTap = self.tap  # type: ignore[assignment]
        tap.offset = offset if self.use_offset else None
        try:
            loss, _ = self.model.objective(batch, tap)  # type: ignore[operator]
        finally:
            tap.offset = None
        if not self.use_offset:
            loss = loss + 0.0 * offset.sum()  # offset only carries the vmapped sample axis
        return loss
