"""Temperature schedules for relaxed estimators, computed from the global step (never compounded).

Jang, Gu & Poole (2017), Section 3/4: ``tau = max(tau_min, tau0 * exp(-r * t))`` where ``t`` is the
global step rounded down to a multiple of ``interval`` (they update tau every N steps).
"""

from __future__ import annotations

import math


def _require_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"temperature.{name}={value!r} is invalid: it must be a number > 0")


class TemperatureSchedule:
    """Maps a global step to a temperature ``tau > 0``."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


class ConstantTemperature(TemperatureSchedule):
    """``tau`` at every step."""

    def __init__(self, tau: float = 1.0) -> None:
        _require_positive("tau", tau)
        self.tau = float(tau)

    def __call__(self, step: int) -> float:
        return self.tau

    def __repr__(self) -> str:
        return f"ConstantTemperature(tau={self.tau})"


class ExponentialTemperature(TemperatureSchedule):
    """``max(tau_min, tau0 * exp(-rate * floor(step / interval) * interval))``.

    Jang et al. 2017.
    """

    def __init__(
        self, tau0: float = 1.0, rate: float = 1e-4, tau_min: float = 0.5, interval: int = 1000
    ) -> None:
        _require_positive("tau0", tau0)
        _require_positive("tau_min", tau_min)
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate < 0:
            raise ValueError(f"temperature.rate={rate!r} is invalid: it must be a number >= 0")
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(
                f"temperature.interval={interval!r} is invalid: it must be an integer >= 1"
            )
        if tau_min > tau0:
            raise ValueError(
                f"temperature.tau_min={tau_min} exceeds tau0={tau0}: the schedule would never "
                f"anneal; set tau_min <= tau0"
            )
        self.tau0 = float(tau0)
        self.rate = float(rate)
        self.tau_min = float(tau_min)
        self.interval = interval

    def __call__(self, step: int) -> float:
        t = (step // self.interval) * self.interval
        return max(self.tau_min, self.tau0 * math.exp(-self.rate * t))

    def __repr__(self) -> str:
        return (
            f"ExponentialTemperature(tau0={self.tau0}, rate={self.rate}, "
            f"tau_min={self.tau_min}, interval={self.interval})"
        )
