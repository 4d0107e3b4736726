"""Property-based numerical fuzzing of every estimator config (hypothesis).

For logits up to +-1e4 with masked (-inf) classes, temperatures from 1e-3 to 1e2, K from 2 to
1000, in float32 and under bfloat16 autocast: value, surrogate and gradients stay finite, masked
classes are never sampled and straight-through samples are exactly one-hot. About 10^4 cases in
all (``CASES_PER_ESTIMATOR`` each), derandomized so CI is reproducible.
"""

from __future__ import annotations

import copy
import math
import os
from functools import cache

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estimators import ConstantTemperature, Estimator
from tests.conftest import CONFIG_DIR

OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "estimator").glob("*.yaml"))
CASES_PER_ESTIMATOR = int(os.environ.get("CATGRAD_FUZZ_CASES", 10_000)) // len(OPTIONS)
# Estimators whose forward value of z is the one-hot sample itself.
FORWARD_ONE_HOT = {
    "score_function", "st_gumbel_softmax", "straight_through", "gumbel_rao", "reinmax"
}


@cache
def template(option: str) -> Estimator:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"estimator={option}"])
    GlobalHydra.instance().clear()
    return instantiate(cfg.estimator, _convert_="all")


@st.composite
def cases(draw: st.DrawFn, option: str) -> dict:
    num_classes = draw(st.one_of(st.integers(2, 12), st.integers(2, 1000)))
    max_vars = 1 if option == "marginalization" else 3
    return {
        "num_classes": num_classes,
        "num_variables": draw(st.integers(1, max_vars)),
        "batch": draw(st.integers(1, 3)),
        "scale": 10 ** draw(st.floats(-3, 4)),
        "spike": draw(st.booleans()),
        "mask_fraction": draw(st.sampled_from([0.0, 0.0, 0.3, 0.9])),
        "tau": 10 ** draw(st.floats(-3, 2)),
        "bfloat16": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_logits(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf logits ``[B, N, K]`` (float32, -inf where masked) and the mask."""
    generator = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["num_variables"], case["num_classes"])
    logits = torch.randn(shape, generator=generator) * case["scale"]
    if case["spike"]:  # one class at +1e4, the rest at -1e4: probabilities of exactly 0 and 1
        logits = torch.full(shape, -1e4)
        logits[..., 0] = 1e4
    mask = torch.rand(shape, generator=generator) < case["mask_fraction"]
    keep = torch.randint(case["num_classes"], shape[:-1], generator=generator)
    mask.scatter_(-1, keep.unsqueeze(-1), False)  # at least one class stays possible
    logits = logits.masked_fill(mask, -math.inf).requires_grad_()
    return logits, mask


def check_case(option: str, case: dict) -> None:
    torch.manual_seed(case["seed"])
    estimator = copy.deepcopy(template(option))
    n, k = case["num_variables"], case["num_classes"]
    estimator.prepare(n, k, 4)
    if hasattr(estimator, "temperature"):
        tau = max(case["tau"], 1.0) if option == "reinmax" else case["tau"]  # ReinMax: tau >= 1
        estimator.temperature = ConstantTemperature(tau)
    logits, mask = make_logits(case)
    weights = torch.randn(n * k, 3, requires_grad=True)
    features = torch.randn(case["batch"], 4)
    seen: list[torch.Tensor] = []

    def f(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.detach().float())
        out = z.flatten(-2).to(weights.dtype) @ weights  # [S, B, 3]
        return (out - 1.0).pow(2).sum(-1)  # [S, B]

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["bfloat16"]):
        inputs = logits.to(torch.bfloat16) if case["bfloat16"] else logits
        output = estimator(inputs, f, features=features)
        surrogate = output.surrogate.float().mean()
    assert torch.isfinite(output.value).all(), case
    assert torch.isfinite(surrogate), case
    grad_logits, grad_weights = torch.autograd.grad(surrogate, [logits, weights], allow_unused=True)
    for grad in (grad_logits, grad_weights):
        assert grad is None or torch.isfinite(grad).all(), case
    for z in seen:
        assert torch.isfinite(z).all(), case
        if option != "marginalization":  # enumeration visits masked classes with weight 0
            assert (z[..., mask.expand_as(z)] == 0).all(), ("masked class sampled", case)
        if option in FORWARD_ONE_HOT:
            assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all(), ("not one-hot", case)


@pytest.mark.parametrize("option", OPTIONS)
def test_estimator_is_numerically_safe(option: str) -> None:
    @settings(
        max_examples=CASES_PER_ESTIMATOR,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=cases(option))
    def property_holds(case: dict) -> None:
        check_case(option, case)

    property_holds()
