"""Train and test one model with one estimator: ``python -m experiments.train [overrides]``.

Composes ``conf/config.yaml`` and runs one job (:mod:`experiments.training.job`). Configuration
mistakes stop the run before any work with one line on stderr (exit code 2); a training failure
exits with code 1, a job stopped by SIGTERM with 143 (rerun the command to resume it). An
unknown ``group=option`` is caught before Hydra composes (and before torch is imported).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.training.errors import ConfigurationError, TrainingFailed
from experiments.training.gpu_slots import check_jobs_per_gpu, launcher_problem, take_gpu_slot
from experiments.training.job import run
from experiments.training.sweep_end import report_sweep_end


def fail(message: str, code: int) -> None:
    """Report ``message`` as one ``error:`` line and stop this job.

    A single run exits with ``code``. A job of a multirun returns instead, after writing the line
    to the job's log (where ``experiments.report`` finds it): ``sys.exit`` would end the whole
    sweep, and an exception would print its traceback after the line. The sweep's end
    (:mod:`experiments.training.sweep_end`) counts the job as failed and exits non-zero.
    """
    if in_multirun():
        logging.getLogger(__name__).error("error: %s", message)
        return None
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def stopped_by_sigterm(stop: SystemExit) -> bool:
    """Whether ``stop`` is Lightning's stop after a SIGTERM (a ``SystemExit`` whose exit status
    would be 0, as if the job had finished)."""
    if "lightning" not in sys.modules:  # nothing trained yet: not Lightning's
        return False
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(stop, SIGTERMException)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        take_gpu_slot(cfg)  # jobs_per_gpu: this job's GPU, before anything touches CUDA
        results = run(cfg)
    except ConfigurationError as error:
        fail(str(error), 2)
        return None
    except TrainingFailed as error:
        fail(str(error), 1)
        return None
    except SystemExit as stop:
        if not stopped_by_sigterm(stop):
            raise
        print("error: stopped by SIGTERM; the same command resumes the job from its last "
              "checkpoint", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except Exception:
        if in_multirun():  # Hydra keeps a job's exception to itself: log it for the report
            logging.getLogger(__name__).exception("error: the job raised")
        raise
    value = results.get("test/neg_elbo")
    return float(value) if value is not None else None


CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def check_group_options(arguments: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """One-line error for ``group=option`` overrides naming an option that has no yaml file.

    Checked on the command line before Hydra composes (and before torch is imported), so a typo
    such as ``estimator=reinforce`` is reported at once with the allowed values.
    """
    for argument in arguments:
        if "=" not in argument or argument.startswith(("+", "~", "hydra")):
            continue
        group, value = argument.split("=", 1)
        folder = config_dir / group
        if "." in group or not folder.is_dir():
            continue
        allowed = sorted(p.stem for p in folder.glob("*.yaml"))
        for option in value.split(","):
            if option and option != "null" and option not in allowed:
                return (
                    f"{group}={option} is unknown: choose one of {', '.join(allowed)} "
                    f"(files in conf/{group}/)"
                )
    return None


def check_output_directories(arguments: list[str]) -> str | None:
    """One-line error for a ``hydra.run.dir``/``hydra.sweep.dir`` that cannot be created (under a
    file or a read-only folder), before Hydra tries (and fails with a traceback)."""
    given = dict(a.split("=", 1) for a in arguments if a.startswith(("hydra.run.dir=",
                                                                     "hydra.sweep.dir=")))
    multirun = "-m" in arguments or "--multirun" in arguments
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if key not in given or "${" in given[key]:
        return None
    directory = Path(given[key]).expanduser().absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        reason = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is not writable"
    else:
        return None
    return f"{key}={given[key]} cannot be created ({reason}): choose a writable directory"


def check_jobs_per_gpu_argument(arguments: list[str]) -> str | None:
    """One-line error for a ``jobs_per_gpu=`` override that cannot work: not null or an integer
    >= 1, a sweep over it (the launcher runs one count for the whole sweep), or a launcher other
    than ``local`` selected on the command line (naming SLURM's way to share a GPU). Values from
    config files are checked when the run starts (:class:`GpuSlotCheck`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [a for a in arguments if a.lstrip("+").startswith("jobs_per_gpu=")]
    if not given:
        return None
    text = given[-1].split("=", 1)[1]
    try:
        override = OverridesParser.create().parse_override(given[-1])
    except Exception:  # Hydra reports the syntax error itself
        return None
    if override.is_sweep_override():
        return (f"jobs_per_gpu={text} cannot be swept: give one value for the whole sweep (run one "
                "sweep per value)")
    try:
        jobs = check_jobs_per_gpu(override.value(), shown=text)
    except ValueError as error:
        return str(error)
    launchers = [a.split("=", 1)[1] for a in arguments if a.startswith("hydra/launcher=")]
    return launcher_problem(jobs, multirun=True, launcher=launchers[-1] if launchers else None)


if __name__ == "__main__":
    problem = (check_group_options(sys.argv[1:]) or check_output_directories(sys.argv[1:])
               or check_jobs_per_gpu_argument(sys.argv[1:]))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except SystemExit:
        report_sweep_end()
        raise
    sys.exit(report_sweep_end())
