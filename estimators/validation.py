"""Constructor checks shared by every configurable catgrad object (estimators, models, data,
callbacks), so that a bad config value fails before any work with the same one-line message."""

from __future__ import annotations


def require_int(key: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ``>= minimum``; else raise a one-line ``ValueError``
    naming the config ``key`` (e.g. ``"model.num_classes"``) and what is allowed."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid: use an integer >= {minimum}")
    return value
