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
from experiments.training.run_lock import RunLock
from experiments.training.run_state import (
    Plan,
    append_segment,
    check_same_config,
    move_aside,
    original_choices,
    plan_job,
    record_original,
    restore_hydra,
    thread_count_change,
)
from experiments.training.wandb_run import (
    backfill_history,
    job_wandb_id,
    keep_wandb_id,
    log_images,
)


def run_dir_for_resume(resume: str | None, default: str) -> str:
    """Hydra run directory: the resumed run's own directory, else ``default``."""
    if not resume:
        return default
    path = Path(resume).expanduser()
    if path.suffix == ".ckpt":  # <run>/checkpoints/<name>.ckpt
        return str(path.parent.parent)
    return str(path)


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


def global_rank() -> int:
    """This process's rank in a distributed job, from the environment (0 when not distributed),
    known before the trainer exists (Lightning's order of variables)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def checked_resume(cfg: DictConfig, model: Any, plan: Plan, output_dir: Path
                   ) -> tuple[Path | None, int]:
    """The checkpoint to continue from (``resume=`` or the plan's), validated against ``model``,
    and its global step ``g``. Rows a killed process logged at steps ``>= g`` (metrics, probe)
    are dropped: the resumed run logs them again. ``(None, 0)``: a fresh start (the rows of a
    process killed before its first checkpoint are dropped)."""
    from experiments.training.checkpointing import CheckpointError, check_checkpoint, resolve_resume
    from experiments.training.loggers import drop_json_lines_after, drop_rows_after

    try:
        path = resolve_resume(cfg.resume) if cfg.get("resume") else plan.checkpoint
        step = 0 if path is None else int(check_checkpoint(path, model)["global_step"])
    except CheckpointError as error:
        raise ConfigurationError(str(error)) from None
    if global_rank() == 0:
        probe_file = OmegaConf.select(cfg, "callbacks.gradient_probe.filename") or "probe.jsonl"
        drop_rows_after(output_dir / "csv" / "metrics.csv", step - 1)
        drop_json_lines_after(output_dir / str(probe_file), step - 1)
    return path, step


def plan_for(cfg: DictConfig, output_dir: Path) -> Plan:
    """What this start does: ``force=true`` starts over, ``resume=`` resumes, else the directory
    decides (:func:`experiments.training.run_state.plan_job`)."""
    if cfg.get("force"):
        return Plan("start")
    if cfg.get("resume"):
        check_same_config(output_dir, cfg, "the job being resumed")
        return Plan("resume")
    return plan_job(output_dir, cfg)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run this job in its run directory (start, resume or skip) and return its results.

    Rank 0 holds the directory's lock (:mod:`experiments.training.run_lock`) for the whole job;
    the other ranks of a distributed job reach the same plan from the same files."""
    os.environ.setdefault("WANDB_MODE", "offline")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    check_writable(output_dir)
    if global_rank() != 0:
        return run_segment(cfg, output_dir, plan_for(cfg, output_dir))
    with RunLock(output_dir, wait_s=cfg.get("lock_wait_s", 120)):
        try:
            plan = plan_for(cfg, output_dir)
            if plan.action != "start":
                restore_hydra(output_dir)  # Hydra rewrote .hydra/ for this start
            if plan.action == "skip":
                assert plan.results is not None
                print(f"skipped: {output_dir} holds a {plan.results.get('status')} job "
                      f"(results.json); force=true runs it again")
                append_segment(output_dir, "skip", int(plan.results.get("global_step") or 0),
                               current_overrides())
                return plan.results
            return run_segment(cfg, output_dir, plan)
        except ConfigurationError:
            restore_hydra(output_dir)  # a refused start changes nothing
            raise


def current_overrides() -> list[str]:
    return [str(o) for o in HydraConfig.get().overrides.task]


def run_segment(cfg: DictConfig, output_dir: Path, plan: Plan) -> dict[str, Any]:
    """Train (from scratch or a checkpoint), test and write ``results.json``."""
    from lightning.pytorch.callbacks import Timer

    from experiments.training.callbacks import NonFiniteLossError

    replicated = replica_count(cfg) > 1
    model, datamodule = build_replicated(cfg) if replicated else build(cfg)
    if cfg.get("force") and global_rank() == 0:
        moved = move_aside(output_dir)
        if moved is not None:
            print(f"force=true: the previous outputs were moved to {moved}")
    resume_path, start_step = checked_resume(cfg, model, plan, output_dir)
    timer = Timer(duration=None, verbose=False)  # training time summed over segments
    wandb_id = None
    if global_rank() == 0:  # wandb logs on rank 0 only
        wandb_id = job_wandb_id(output_dir, fresh=bool(cfg.get("force")))
    trainer = build_trainer(cfg, output_dir, extra_callbacks=[timer], wandb_id=wandb_id)
    resumes = 0
    if global_rank() == 0:  # the config is valid: this start is part of the job's history
        assert wandb_id is not None
        keep_wandb_id(output_dir, wandb_id)
        if resume_path is None:
            record_original(output_dir, cfg)
        resumes = append_segment(output_dir, "start" if resume_path is None else "resume",
                                 start_step, current_overrides())
        if resume_path is not None and (change := thread_count_change(output_dir)):
            print(change, file=sys.stderr)
        if resume_path is not None:
            lost = backfill_history(trainer.loggers, output_dir, wandb_id, start_step)
            if lost:
                print(f"wandb: logged {lost} rows of csv/metrics.csv that an interrupted segment "
                      f"had not written", file=sys.stderr)
    identity = {"seed": cfg.seed, **(original_choices(output_dir) or choices())}
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
                        "wall_time_s": timer.time_elapsed("train"),
                        "resumes": resumes,
                        **identity,
                    },
                )
            raise TrainingFailed(str(error)) from None
        fitted = time.perf_counter()
        trained_s = timer.time_elapsed("train")
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
            "wall_time_s": trained_s + time.perf_counter() - fitted,
            "global_step": trainer.global_step,
            "checkpoint": best or None,
            "resumed_from": str(resume_path) if resume_path else None,
            "resumes": resumes,
            **identity,
        }
        if trainer.is_global_zero:
            write_results(output_dir, results)
            log_images(trainer.loggers, output_dir)
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

