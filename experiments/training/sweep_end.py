"""The end of a multirun: one summary line and, when jobs failed or never ran, the one command
that finishes the sweep (README "Resuming and failures").

:class:`SweepEnd` is a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): it remembers
the sweep directory when the multirun starts, in the launching process (with the SLURM and joblib
launchers too). :func:`report_sweep_end` then reads the sweep with the report's reader and
prints::

    sweep /path/multirun/2026-12-01/10-00-00: 3 ok, 1 failed, 0 missing
    to finish the sweep (finished jobs are skipped, interrupted ones resume): python -m ...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_started: list[Path] = []


class SweepEnd(Callback):
    """Records the sweep directory of the multirun this process launches."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _started.append(Path(str(config.hydra.sweep.dir)))


def report_sweep_end() -> int:
    """Print the summary of the sweep this process launched (nothing without one); returns 1
    when jobs failed or are missing, else 0."""
    if not _started:
        return 0
    from experiments.report.runs import load_sweeps, needs_rerun
    from experiments.report.sweep_command import rerun_command

    sweep = _started.pop()
    if not sweep.is_dir():
        return 1
    jobs = load_sweeps([sweep])
    counts = {status: sum(j.status == status for j in jobs) for status in ("ok", "failed",
                                                                           "missing")}
    resumed = sum(j.resumes > 0 for j in jobs)
    print(f"sweep {sweep}: {counts['ok']} ok, {counts['failed']} failed, {counts['missing']} "
          f"missing" + (f" ({resumed} resumed)" if resumed else ""), file=sys.stderr)
    command = rerun_command(sweep, python=Path(sys.executable).name)
    if command is not None and any(needs_rerun(job) for job in jobs):
        print(f"to finish the sweep (finished jobs are skipped, interrupted ones resume): "
              f"{command}", file=sys.stderr)
    return 1 if counts["failed"] or counts["missing"] else 0
