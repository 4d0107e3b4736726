"""User-facing failures of a training job: configuration mistakes (one line, exit code 2) and
failed training (exit code 1), and the translation of constructor errors into such lines."""

from __future__ import annotations

import sys
from typing import Any, NoReturn


class ConfigurationError(RuntimeError):
    """A user-facing configuration problem, reported as one line (exit code 2)."""


class TrainingFailed(RuntimeError):
    """Training stopped (non-finite loss); results.json records it (exit code 1)."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost cause (Hydra wraps constructor errors in InstantiationException)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError)


def user_error(key: str, error: BaseException) -> ConfigurationError | None:
    """A one-line :class:`ConfigurationError` for a mistake in config ``key``, or None when
    ``error`` is not a configuration mistake (a bug should keep its traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from datamodules.mnist import DataNotFoundError

    cause = root_cause(error)
    if not isinstance(cause, (*USER_ERRORS, DataNotFoundError, MisconfigurationException)):
        return None
    for line in str(error).splitlines():  # Hydra names the exact key it was instantiating
        if line.strip().startswith("full_key:"):
            key = line.split(":", 1)[1].strip()
    message = " ".join(str(cause).split())
    if isinstance(cause, TypeError) and "not supported between instances of" in message:
        words = non_numeric_overrides(key)  # e.g. trainer.max_steps=abc compared with a number
        if words:
            return ConfigurationError(
                f"{words[0]} is not a number ({message}): give a number, e.g. 1000 or 1e-3")
    if not message.startswith(key.split(".")[0]):
        message = f"{key}: {message}"
    return ConfigurationError(message)


def non_numeric_overrides(key: str) -> list[str]:
    """Command-line overrides under ``key`` whose value is text, not a number (``key=value``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    found = []
    for override in HydraConfig.get().overrides.task:
        name, _, value = str(override).lstrip("+~").partition("=")
        if not (name == key or name.startswith(f"{key}.")) or value in ("null", "true", "false"):
            continue
        try:
            float(value)
        except ValueError:
            found.append(f"{name}={value}")
    return found


def checked(key: str, make: Any) -> Any:
    """Run ``make()``; configuration mistakes become one-line errors naming ``key``."""
    try:
        return make()
    except Exception as error:
        problem = user_error(key, error)
        if problem is None:
            raise
        raise problem from error


def stop(message: str) -> NoReturn:
    """A configuration mistake found in the launching process (e.g. by a Hydra callback, before
    any job): one ``error:`` line on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
