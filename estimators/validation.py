"""Constructor checks shared by every configurable catgrad object (estimators, models, data,
callbacks), so that a bad config value fails before any work with the same one-line message."""

from __future__ import annotations


def require_int(key: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ``>= minimum``; else raise a one-line ``ValueError``
    naming the config ``key`` (e.g. ``"model.num_classes"``) and what is allowed."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid: use an integer >= {minimum}")
    return value


def require_number(
    key: str, value: object, minimum: float = 0.0, inclusive: bool = True, hint: str = ""
) -> float:
    """Return ``value`` as a float if it is a real number ``>= minimum`` (``> minimum`` when not
    ``inclusive``); else raise a one-line ``ValueError`` naming ``key``, followed by ``hint``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value >= minimum if inclusive else value > minimum)
    ):
        bound = f"{'>=' if inclusive else '>'} {minimum:g}"
        raise ValueError(f"{key}={value!r} is invalid: use a number {bound}{hint}")
    return float(value)
