"""Loggers that never lose what a run already wrote."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; this one appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that continues an existing ``metrics.csv`` (a resumed run) instead of
    deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def drop_rows_after(metrics_csv: Path, step: int) -> None:
    """Remove rows logged after ``step`` (by a run killed after its last checkpoint), so that a
    resumed run's rows for those steps are not duplicated. Written atomically."""
    if not metrics_csv.is_file():
        return
    with open(metrics_csv, newline="") as file:
        reader = csv.DictReader(file)
        fields = reader.fieldnames or []
        rows = [row for row in reader if not row.get("step") or int(float(row["step"])) <= step]
    temporary = metrics_csv.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, metrics_csv)




def drop_json_lines_after(path: Path, step: int) -> None:
    """Remove JSON lines whose ``step`` is after ``step`` (gradient-probe rows of a killed
    process), so that a resumed run does not write them twice. Written atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            row_step = None
        if not isinstance(row_step, int) or row_step <= step:
            kept.append(line + "\n")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)
