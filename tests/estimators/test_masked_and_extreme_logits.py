"""Numerical safety of unordered_set, indecater, gapped_st, decoupled_st_gs and arsm beyond the
generic fuzz test (tests/estimators/test_numerical_safety.py): logits +-1e4 with -inf classes,
K = 1000, bfloat16 autocast, temperatures over five decades; value, surrogate and all gradients
finite, masked classes never passed to f and exactly 0 in the logits' gradient (check_safe)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.estimators.test_straight_through_and_control_variates import (
    build,
    check_safe,
    extreme_logits,
)

OPTIONS = ["unordered_set", "indecater", "gapped_st", "decoupled_st_gs", "arsm"]
TAU_OVERRIDES = {
    "gapped_st": ["estimator.temperature.tau={}"],
    "decoupled_st_gs": [
        "estimator/temperature=constant", "estimator.temperature.tau={}",
        "estimator.forward_temperature.tau={}",
    ],
}
CASES = [
    (name, tau) for name in OPTIONS for tau in ((1e-3, 1.0, 100.0) if name in TAU_OVERRIDES else
                                                (None,))
]


@pytest.mark.parametrize("name, tau", CASES)
def test_extreme_logits_and_masked_classes(compose_config, name: str, tau: float | None) -> None:
    overrides = [o.format(tau) for o in TAU_OVERRIDES.get(name, [])]
    estimator = build(compose_config, name, overrides)
    torch.manual_seed(9)
    check_safe(estimator, extreme_logits())


@pytest.mark.parametrize("name", OPTIONS)
def test_many_classes_bfloat16_autocast(compose_config, name: str) -> None:
    # K = 1000 with 30 % masked classes, logits on scales 1, 1e2, 1e4, float32 and bfloat16.
    estimator = build(compose_config, name, n=2, k=1000)
    torch.manual_seed(10)
    for scale, autocast in [(1.0, False), (1e2, True), (1e4, True)]:
        logits = torch.randn(2, 2, 1000) * scale  # [B, N, K]
        logits = logits.masked_fill(torch.rand(2, 2, 1000) < 0.3, -math.inf)
        logits[..., 0] = 0.0  # at least one class per variable
        check_safe(estimator, logits, autocast)
