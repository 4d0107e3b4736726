"""Train and test one model with one estimator: ``python -m experiments.train [overrides]``.

Composes ``conf/config.yaml``; builds estimator, datamodule, model, callbacks, loggers and trainer
from their config groups (``_target_``); fits; tests the best checkpoint (the last weights when no
checkpoint was written); writes ``results.json`` in the run directory:

    {"status": "completed", "test/neg_elbo": ..., "test/nll_iwae": ..., "wall_time_s": ...,
     "model": "vae", "estimator": "st_gumbel_softmax", "datamodule": "digits", "seed": 0, ...}

Reliability (see README "Resuming and failures"):

* ``resume=<run dir or .ckpt>`` continues a run in its own directory. Data order, binarization
  noise (``datamodules.tensor_data``) and estimator noise (``StepSeeding``) are functions of the
  seed and the step, so on CPU a resumed run ends bitwise equal to an uninterrupted one.
* Checkpoint writes are atomic; a non-finite loss or gradient stops the run before it reaches the
  parameters, keeps the last good checkpoint and records ``"status": "failed"`` in results.json.
* Configuration mistakes stop the run before any work with one line on stderr (exit code 2);
  a training failure exits with code 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def run_dir_for_resume(resume: str | None, default: str) -> str:
    """Hydra run directory: the resumed run's own directory, else ``default``."""
    if not resume:
        return default
    path = Path(resume).expanduser()
    if path.suffix == ".ckpt":  # <run>/checkpoints/<name>.ckpt
        return str(path.parent.parent)
    return str(path)


OmegaConf.register_new_resolver("run_dir_for_resume", run_dir_for_resume, replace=True)


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
    if not message.startswith(key.split(".")[0]):
        message = f"{key}: {message}"
    return ConfigurationError(message)


def checked(key: str, make: Any) -> Any:
    """Run ``make()``; configuration mistakes become one-line errors naming ``key``."""
    try:
        return make()
    except Exception as error:
        problem = user_error(key, error)
        if problem is None:
            raise
        raise problem from error


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """Instantiate and validate estimator, datamodule and model (and its optimizer); load data."""
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigurationError(f"seed={cfg.seed!r} is invalid: use an integer (0 is fine)")
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before any weight is initialised
    estimator = checked("estimator", lambda: instantiate(cfg.estimator, _convert_="all"))
    datamodule = checked("datamodule", lambda: instantiate(cfg.datamodule, _convert_="all"))
    model = checked(
        "model", lambda: instantiate(cfg.model, estimator=estimator, _convert_="all")
    )
    checked("model.optimizer", model.configure_optimizers)
    checked("datamodule", lambda: model.check_datamodule(datamodule))
    checked("datamodule", lambda: datamodule.setup("fit"))
    return model, datamodule


def choices() -> dict[str, str]:
    """The config-group options of this run (model, estimator, estimator/baseline, ...)."""
    picked = HydraConfig.get().runtime.choices
    return {
        key: str(value)
        for key, value in picked.items()
        if value is not None and not key.startswith("hydra")
    }


def check_writable(directory: Path) -> None:
    """Fail before any work when the run directory cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigurationError(
            f"run directory {directory} is not writable ({error.strerror}): choose another with "
            f"hydra.run.dir=<path> (or hydra.sweep.dir for multiruns)"
        ) from None


def write_results(directory: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically: a full disk leaves any previous file intact."""
    target = directory / "results.json"
    temporary = directory / ".results.json.tmp"
    try:
        temporary.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise TrainingFailed(
            f"could not write {target} ({error.strerror}); checkpoints in "
            f"{directory / 'checkpoints'} are kept: free space and test again with resume="
            f"{directory}"
        ) from None
    return target


def finish_wandb() -> None:
    """End this job's wandb run so that the next Hydra multirun job starts a fresh one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def prepare_resume(cfg: DictConfig, model: Any, output_dir: Path) -> Path | None:
    """Validate ``cfg.resume``; trim metrics logged after its checkpoint. None if not resuming."""
    if not cfg.get("resume"):
        return None
    import torch

    from experiments.checkpointing import CheckpointError, check_checkpoint, resolve_resume
    from experiments.loggers import drop_rows_after

    try:
        path = resolve_resume(cfg.resume)
        check_checkpoint(path, model)
    except CheckpointError as error:
        raise ConfigurationError(str(error)) from None
    step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    drop_rows_after(output_dir / "csv" / "metrics.csv", step)
    return path


def build_trainer(cfg: DictConfig, output_dir: Path, extra_callbacks: Sequence[Any] = ()) -> Any:
    """The ``lightning.Trainer`` of ``cfg`` with its callbacks and loggers, ``extra_callbacks``,
    the always-on :class:`StepSeeding` and :class:`StopOnNonFinite`, and atomic checkpoint writes;
    the resolved config is logged to every logger. (Also used by ``experiments.benchmark``.)"""
    from experiments.callbacks import StepSeeding, StopOnNonFinite
    from experiments.checkpointing import AtomicCheckpointIO

    for group in ("callbacks", "logger"):
        for name, config in (cfg.get(group) or {}).items():
            if config is not None and "_target_" not in config:
                raise ConfigurationError(
                    f"{group}.{name} has settings but no _target_ (an experiment config set keys "
                    f"of a {group} that {group}={HydraConfig.get().runtime.choices.get(group)} "
                    f"does not define): add its _target_ or remove {group}.{name}"
                )
    callbacks = [
        checked(f"callbacks.{name}", lambda c=config: instantiate(c, _convert_="all"))
        for name, config in (cfg.get("callbacks") or {}).items()
        if config is not None  # callbacks.<name>=null removes a callback
    ]
    callbacks += [*extra_callbacks, StepSeeding(cfg.seed)]
    callbacks.append(StopOnNonFinite(cfg.get("check_finite_gradients", True)))
    loggers = [
        checked(f"logger.{name}", lambda c=config: instantiate(c, _convert_="all"))
        for name, config in (cfg.get("logger") or {}).items()
        if config is not None
    ]
    trainer = checked(
        "trainer",
        lambda: instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            default_root_dir=output_dir,
            plugins=[AtomicCheckpointIO()],
        ),
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)  # type: ignore[arg-type]
    return trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and write ``results.json``; returns the results."""
    os.environ.setdefault("WANDB_MODE", "offline")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    check_writable(output_dir)

    from experiments.callbacks import NonFiniteLossError

    model, datamodule = build(cfg)
    resume_path = prepare_resume(cfg, model, output_dir)
    trainer = build_trainer(cfg, output_dir)

    start = time.perf_counter()
    identity = {"seed": cfg.seed, **choices()}
    try:
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path)
        except NonFiniteLossError as error:
            if trainer.is_global_zero:
                write_results(
                    output_dir,
                    {
                        "status": "failed",
                        "failure": str(error),
                        "failed_step": error.step,
                        "last_checkpoint": error.checkpoint,
                        "wall_time_s": time.perf_counter() - start,
                        **identity,
                    },
                )
            raise TrainingFailed(str(error)) from None
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        if best and not Path(best).is_file():  # e.g. a resumed run whose best file is gone
            print(f"warning: best checkpoint {best} is missing; testing the last weights",
                  file=sys.stderr)
            best = ""
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics = {name: float(value) for name, value in (tested[0] if tested else {}).items()}
        results: dict[str, Any] = {
            "status": "completed",
            **metrics,
            "wall_time_s": time.perf_counter() - start,
            "global_step": trainer.global_step,
            "checkpoint": best or None,
            "resumed_from": str(resume_path) if resume_path else None,
            **identity,
        }
        if trainer.is_global_zero:
            write_results(output_dir, results)
            summary = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
            print(f"results: {summary} ({results['wall_time_s']:.1f} s) -> {output_dir}")
            if not all(math.isfinite(v) for v in metrics.values()):
                print("warning: some test metrics are not finite", file=sys.stderr)
        return results
    finally:
        finish_wandb()


class JobFailed(RuntimeError):
    """A job of a multirun failed (configuration error or failed training)."""


def fail(message: str, code: int) -> NoReturn:
    """Report ``message`` as one ``error:`` line and stop this job.

    A single run exits with ``code``. A job of a multirun raises :class:`JobFailed` instead (and
    writes the line to the job's log, where ``experiments.report`` finds it): ``sys.exit`` would end
    the whole sweep, while Hydra records an exception as this job's failure, runs the remaining
    jobs and exits non-zero at the end.
    """
    if in_multirun():
        logging.getLogger(__name__).error("error: %s", message)
        raise JobFailed(message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except ConfigurationError as error:
        fail(str(error), 2)
    except TrainingFailed as error:
        fail(str(error), 1)
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


if __name__ == "__main__":
    problem = check_group_options(sys.argv[1:])
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
