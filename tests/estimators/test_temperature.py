"""Temperature schedules: values at given steps (Jang et al. 2017 annealing)."""

from __future__ import annotations

import math

import pytest

from estimators import ConstantTemperature, ExponentialTemperature


def test_constant() -> None:
    assert ConstantTemperature(0.3)(0) == 0.3 == ConstantTemperature(0.3)(10**6)


def test_exponential_steps_on_interval_boundaries() -> None:
    schedule = ExponentialTemperature(tau0=1.0, rate=1e-3, tau_min=0.5, interval=100)
    assert schedule(0) == 1.0
    assert schedule(99) == 1.0  # t is rounded down to a multiple of 100
    assert schedule(100) == pytest.approx(math.exp(-0.1))
    assert schedule(250) == pytest.approx(math.exp(-0.2))
    assert schedule(10_000) == 0.5  # exp(-10) < 0.5: clipped at tau_min


def test_exponential_is_a_function_of_the_step_not_of_calls() -> None:
    schedule = ExponentialTemperature(tau0=2.0, rate=1e-2, tau_min=0.1, interval=1)
    for _ in range(5):
        schedule(50)  # calling does not compound
    assert schedule(50) == pytest.approx(2.0 * math.exp(-0.5))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"tau0": 0.0}, "tau0"),
        ({"tau_min": -1.0}, "tau_min"),
        ({"rate": -1.0}, "rate"),
        ({"interval": 0}, "interval"),
        ({"tau0": 0.5, "tau_min": 1.0}, "tau_min"),
    ],
)
def test_invalid_schedules_rejected(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ExponentialTemperature(**kwargs)
