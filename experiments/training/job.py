"""One training job: train, test the best checkpoint and write ``results.json`` in the run
directory (see README "Resuming and failures")::

    {"status": "completed", "test/neg_elbo": ..., "test/nll_iwae": ..., "wall_time_s": ...,
     "model": "vae", "estimator": "st_gumbel_softmax", "datamodule": "digits", "seed": 0, ...}

* ``resume=<run dir or .ckpt>`` continues a run in its own directory. Data order, binarization
  noise (``datamodules.tensor_data``) and estimator noise (``StepSeeding``) are functions of the
  seed and the step, so on CPU a resumed run ends bitwise equal to an uninterrupted one.
* Checkpoint writes are atomic; a non-finite loss or gradient stops the run before it reaches the
  parameters, keeps the last good checkpoint and records ``"status": "failed"`` in results.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.training.builder import build, build_trainer
from experiments.training.errors import ConfigurationError, TrainingFailed
from experiments.training.replicas import build_replicated, replica_count, write_replica_jobs


def run_dir_for_resume(resume: str | None, default: str) -> str:
    """Hydra run directory: the resumed run's own directory, else ``default``."""
    if not resume:
        return default
    path = Path(resume).expanduser()
    if path.suffix == ".ckpt":  # <run>/checkpoints/<name>.ckpt
        return str(path.parent.parent)
    return str(path)


OmegaConf.register_new_resolver("run_dir_for_resume", run_dir_for_resume, replace=True)



OmegaConf.register_new_resolver("run_dir_for_resume", run_dir_for_resume, replace=True)


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

    from experiments.training.checkpointing import CheckpointError, check_checkpoint, resolve_resume
    from experiments.training.loggers import drop_rows_after

    try:
        path = resolve_resume(cfg.resume)
        check_checkpoint(path, model)
    except CheckpointError as error:
        raise ConfigurationError(str(error)) from None
    step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    drop_rows_after(output_dir / "csv" / "metrics.csv", step)
    return path


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and write ``results.json``; returns the results."""
    os.environ.setdefault("WANDB_MODE", "offline")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    check_writable(output_dir)

    from experiments.training.callbacks import NonFiniteLossError

    replicated = replica_count(cfg) > 1
    model, datamodule = build_replicated(cfg) if replicated else build(cfg)
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
        if replicated:  # the model keeps each replica's best weights itself
            best = ""
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
            if replicated:
                from experiments.training.replica_wandb import publish_replica_runs

                directories = write_replica_jobs(output_dir, cfg, results, write_results)
                finish_wandb()  # the process's own run first: then one run per replica
                publish_replica_runs(cfg, directories)
            summary = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
            print(f"results: {summary} ({results['wall_time_s']:.1f} s) -> {output_dir}")
            if not all(math.isfinite(v) for v in metrics.values()):
                print("warning: some test metrics are not finite", file=sys.stderr)
        return results
    finally:
        finish_wandb()
