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

import csv
import os
import secrets
import string
import struct
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


# The transaction log wandb writes for a run (``run-<id>.wandb``): a 7-byte header, then records
# in 32 KiB blocks, each record split into chunks with a 7-byte header (CRC32C: uint32, length:
# uint16, type: uint8 = full 1, first 2, middle 3, last 4; a block's tail shorter than a header
# is padding). Each record is a ``wandb_internal_pb2.Record``.
BLOCK_BYTES = 32768
CHUNK_HEADER = struct.Struct("<IHB")
STEP_KEY = "trainer/global_step"  # the x axis Lightning's WandbLogger logs with every row


def wandb_records(path: Path) -> list[bytes]:
    """The serialized records of a ``.wandb`` file; a torn last record (a killed writer) is
    dropped."""
    data = path.read_bytes()
    records: list[bytes] = []
    pending = b""
    position = 7
    while position + CHUNK_HEADER.size <= len(data):
        left = BLOCK_BYTES - position % BLOCK_BYTES
        if left < CHUNK_HEADER.size:
            position += left
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, position)
        if kind == 0:  # zero padding to the block's end
            position += left
            continue
        chunk = data[position + CHUNK_HEADER.size:position + CHUNK_HEADER.size + length]
        position += CHUNK_HEADER.size + length
        if len(chunk) < length:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def recorded_steps(directory: Path, run_id: str) -> set[int]:
    """The ``trainer/global_step`` values of every history row that the job's earlier offline
    segments (``<run dir>/wandb/offline-run-*/run-<id>.wandb``) wrote to disk."""
    from wandb.proto import wandb_internal_pb2

    steps: set[int] = set()
    for path in directory.glob(f"wandb/offline-run-*/run-{run_id}.wandb"):  # also "-<id>-1"
        for serialized in wandb_records(path):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(serialized)
            if record.WhichOneof("record_type") != "history":
                continue
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == STEP_KEY:
                    steps.add(int(float(item.value_json)))
    return steps


def backfill_history(loggers: list[Any], directory: Path, run_id: str, before_step: int) -> int:
    """Log to the job's offline wandb run the ``csv/metrics.csv`` rows at steps below
    ``before_step`` (the resumed checkpoint's) that no earlier segment wrote to disk: a SIGKILLed
    process takes wandb's buffered records with it. Returns how many rows were logged. Only in
    offline mode (online, the server may hold rows the local file lacks)."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    metrics_csv = directory / "csv" / "metrics.csv"
    if not wandb_loggers or os.environ.get("WANDB_MODE") != "offline" or not metrics_csv.is_file():
        return 0
    recorded = recorded_steps(directory, run_id)
    with metrics_csv.open(newline="") as stream:
        rows = [row for row in csv.DictReader(stream)
                if row.get("step") and int(row["step"]) < before_step
                and int(row["step"]) not in recorded]
    for row in rows:
        values = {key: float(value) for key, value in row.items() if key != "step" and value}
        for logger in wandb_loggers:
            logger.log_metrics(values, step=int(row["step"]))
    return len(rows)
