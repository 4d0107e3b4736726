"""A job's wandb run across segments, and its images as wandb media.

Each job has one wandb run id, kept in ``<run dir>/.catgrad/wandb_id``: every segment of the job
(a resume after a kill, a SLURM requeue) gives it to its ``WandbLogger`` (which initialises wandb
with ``resume="allow"``), so ``wandb sync`` and the online UI show one history per job. (Not
through ``WANDB_RUN_ID``: wandb keeps the settings of a process's first run, and every job of a
basic-launcher multirun then logged under the first job's id.) The images a run writes into its
directory (``reconstructions.png``, ``prior_samples.png``, probe figures) are logged as
``wandb.Image`` media at the end.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any

WANDB_ID = Path(".catgrad") / "wandb_id"
ALPHABET = string.ascii_lowercase + string.digits


def job_wandb_id(directory: Path, fresh: bool = False) -> str:
    """The job's wandb run id: the stored one, else (and when ``fresh``: ``force=true`` starts the
    job over) a new one of 8 characters, as wandb's own. :func:`keep_wandb_id` stores it once
    the job has really started."""
    path = directory / WANDB_ID
    if path.is_file() and not fresh:
        stored = path.read_text().strip()
        if stored:
            return stored
    return "".join(secrets.choice(ALPHABET) for _ in range(8))


def keep_wandb_id(directory: Path, run_id: str) -> None:
    path = directory / WANDB_ID
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")


def log_images(loggers: list[Any], directory: Path) -> list[str]:
    """Log the run directory's ``*.png`` files as media of its wandb run(s); returns the keys."""
    from lightning.pytorch.loggers import WandbLogger

    images = sorted(directory.glob("*.png"))
    keys = []
    for logger in loggers:
        if isinstance(logger, WandbLogger) and images:
            for image in images:
                logger.log_image(key=f"images/{image.stem}", images=[str(image)])
                keys.append(f"images/{image.stem}")
    return keys
