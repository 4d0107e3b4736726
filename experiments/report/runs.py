"""Reading run directories: the one reader behind the sweep report and the published-numbers
table. A *job* is one run directory (``.hydra/``, ``results.json``, ``csv/metrics.csv``, the
gradient probe's ``probe.jsonl``) and its *variant* is its identity as a comparison arm
(:func:`variant_of`).

A *sweep* is a Hydra multirun directory (``multirun/<date>/<time>/`` with ``multirun.yaml`` and
one numbered folder per job); a single run directory (with ``results.json`` or ``.hydra/``) is
accepted too. Every job the sweep planned is listed: ``ok`` (``results.json`` with finite test
metrics), ``failed`` (its folder exists but it wrote no usable results) or ``missing`` (planned in
``multirun.yaml`` but never started). Nothing here needs wandb or the network.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.report.sweep_command import recorded_overrides, rerun_command
from experiments.training.run_state import count_resumes

Series = tuple[list[float], list[float]]  # (steps, values)

# Choices that name the variant of a job; other config groups only describe the setup.
VARIANT_CHOICES = ("estimator", "estimator/baseline")
ARM_GROUP = "experiment/compare_arms"
IGNORED_OVERRIDE_KEYS = {"seed", ARM_GROUP, *VARIANT_CHOICES}
REPLICA_PREFIX = "replica_"  # a run with replicas=R has one job directory per replica in it
ERROR_PATTERN = re.compile(r"error|exception|traceback|killed", re.IGNORECASE)


@dataclass
class Job:
    """One Hydra job of a sweep and everything the report reads from its directory."""

    directory: Path
    sweep: Path
    number: int | None
    status: str = "failed"  # ok | failed | missing
    reason: str = ""
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    config: DictConfig | None = None
    results: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Series] = field(default_factory=dict)
    probe: list[dict[str, Any]] = field(default_factory=list)
    variant: str = ""

    @property
    def seed(self) -> int | None:
        """The job's seed (results first, then config, then overrides)."""
        value = self.results.get("seed")
        if value is None and self.config is not None:
            value = self.config.get("seed")
        if value is None:
            value = override_values(self.overrides).get("seed")
        try:
            return None if value is None else int(value)
        except (TypeError, ValueError):
            return None

    @functools.cached_property
    def plain_config(self) -> dict[str, Any]:
        """The saved config as plain containers, interpolations left unresolved (``{}`` if none)."""
        if self.config is None:
            return {}
        plain = OmegaConf.to_container(self.config, resolve=False)
        return {str(key): value for key, value in plain.items()} if isinstance(plain, dict) else {}

    def select(self, key: str, default: object = None) -> Any:
        """The saved config's value at a dotted ``key`` (unresolved), else ``default``."""
        node: object = self.plain_config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def resumes(self) -> int:
        """How many times the job was resumed (after a kill, preemption or requeue)."""
        return count_resumes(self.directory)

    @property
    def last_step(self) -> int:
        """Training steps the job's metrics reach (the last logged step + 1; 0 if none)."""
        steps = [steps[-1] for steps, _ in self.curves.values() if steps]
        return int(max(steps)) + 1 if steps else 0

    @property
    def process(self) -> Path:
        """The run directory of the process that trained the job: its own, or for one replica of
        a run with ``replicas=R`` the run's (its R replicas share one wall clock)."""
        if self.directory.name.startswith(REPLICA_PREFIX):
            return self.directory.parent
        return self.directory

    @property
    def name(self) -> str:
        """A short name: sweep folder / job number."""
        suffix = "" if self.number is None else f"/{self.number}"
        if self.directory.name.startswith(REPLICA_PREFIX):  # one replica of a replicated run
            suffix += f"/{self.directory.name}"
        return f"{self.sweep.name}{suffix}"


# -------- Small readers -------------------------------------------------------------------------
def override_values(overrides: Iterable[str]) -> dict[str, str]:
    """``["+a/b=x", "seed=1"]`` -> ``{"a/b": "x", "seed": "1"}`` (leading ``+``/``~`` dropped)."""
    values: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key.lstrip("+~")] = value
    return values


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_yaml(path: Path) -> Any:
    """An OmegaConf node from ``path``, or None when missing or unreadable."""
    try:
        return OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - a broken file is reported as missing data, not a crash
        return None


def to_float(text: str) -> float | None:
    """A CSV cell as a float (None when empty or not a number)."""
    try:
        return float(text) if text not in ("", None) else None
    except ValueError:
        return None


def read_curves(path: Path) -> dict[str, Series]:
    """Lightning's ``metrics.csv`` as ``{column: (steps, values)}`` (empty cells skipped)."""
    curves: dict[str, Series] = {}
    try:
        with path.open(newline="") as stream:
            for row in csv.DictReader(stream):
                step = to_float(row.get("step", ""))
                if step is None:
                    continue
                for column, cell in row.items():
                    value = to_float(cell)
                    if column in ("step", "epoch") or column is None or value is None:
                        continue
                    steps, values = curves.setdefault(column, ([], []))
                    steps.append(step)
                    values.append(value)
    except OSError:
        return {}
    return curves


def read_probe(path: Path) -> list[dict[str, Any]]:
    """The gradient probe's JSON lines (``docs/gradients.md``); unreadable lines are skipped."""
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row and "estimator" in row:
            rows.append(row)
    return rows


def failure_reason(directory: Path) -> str:
    """The last error-looking line of the job's log files, else a generic reason."""
    for log in sorted(directory.glob("*.log")) + sorted(directory.glob("*.err")):
        try:
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
        except OSError:
            continue
        hits = [line for line in lines if line and ERROR_PATTERN.search(line)]
        if hits:
            return hits[-1][:300]
    return "no results.json (the job raised or was killed; see the sweep's console output)"


# -------- Jobs ----------------------------------------------------------------------------------
def literal(config: DictConfig | None, key: str) -> str | None:
    """``config[key]`` when it is a plain value (interpolations cannot be resolved offline)."""
    if config is None or key not in config or OmegaConf.is_interpolation(config, key):
        return None
    value = config.get(key)
    return None if value is None else str(value)


def load_job(directory: Path, sweep: Path, number: int | None) -> Job:
    """Read one job directory."""
    job = Job(directory=directory, sweep=sweep, number=number)
    hydra_dir = directory / ".hydra"
    overrides = read_yaml(hydra_dir / "overrides.yaml")
    job.overrides = [str(o) for o in overrides] if overrides is not None else []
    hydra_cfg = read_yaml(hydra_dir / "hydra.yaml")
    choices = OmegaConf.select(hydra_cfg, "hydra.runtime.choices") if hydra_cfg else None
    if choices is not None:
        job.choices = {str(k): str(v) for k, v in choices.items() if v is not None}
    job.config = read_yaml(hydra_dir / "config.yaml")
    results = read_json(directory / "results.json")
    if results is not None:
        job.results = results
        job.choices.update({k: str(results[k]) for k in VARIANT_CHOICES if k in results})
    job.curves = read_curves(directory / "csv" / "metrics.csv")
    probe_key = "callbacks.gradient_probe.filename"
    probe_file = OmegaConf.select(job.config, probe_key) if job.config is not None else None
    job.probe = read_probe(directory / str(probe_file or "probe.jsonl"))
    test_values = [v for k, v in job.results.items() if k.startswith("test/")]
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in test_values)
    if results is None:
        job.status, job.reason = "failed", failure_reason(directory)
    elif results.get("status", "completed") != "completed":
        job.status = "failed"
        job.reason = str(results.get("failure") or f"status {results.get('status')!r}")
    elif not test_values or not finite:
        job.status, job.reason = "failed", "non-finite or missing test metrics in results.json"
    else:
        job.status = "ok"
    return job


def is_job_dir(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / ".hydra").is_dir()


def replica_dirs(path: Path) -> list[Path]:
    """The ``replica_<r>/`` job directories of a run trained with ``replicas=R`` (in replica
    order), or ``[]``: such a run is read as its R replicas, never as a job itself."""
    found = [p for p in path.glob(f"{REPLICA_PREFIX}*") if is_job_dir(p)]
    return sorted(found, key=lambda p: int(p.name[len(REPLICA_PREFIX):] or 0))


def find_jobs(roots: Sequence[Path]) -> list[Job]:
    """Every run directory (a folder with ``.hydra/config.yaml``) at or below ``roots``; a run
    with replicas counts as its ``replica_<r>/`` directories."""
    jobs: list[Job] = []
    for root in roots:
        configs = [root / ".hydra" / "config.yaml", *sorted(root.rglob(".hydra/config.yaml"))]
        for config in dict.fromkeys(configs):
            directory = config.parent.parent
            if config.is_file() and not replica_dirs(directory):
                jobs.append(load_job(directory, directory.parent, None))
    return jobs


def job_dirs(sweep: Path) -> list[tuple[Path, int | None]]:
    """Job folders of a sweep (numbered ones by number, then any others), or the run itself."""
    if is_job_dir(sweep) and not (sweep / "multirun.yaml").is_file():
        return [(replica, None) for replica in replica_dirs(sweep)] or [(sweep, None)]
    found: list[tuple[Path, int | None]] = []
    for child in sorted(p for p in sweep.iterdir() if p.is_dir()):  # by name
        number = int(child.name) if child.name.isdigit() else None
        if number is not None or is_job_dir(child):
            found.extend((job, number) for job in replica_dirs(child) or [child])
    return sorted(found, key=lambda item: (item[1] is None, item[1] or 0))  # stable


# -------- The jobs a sweep planned (multirun.yaml), mirroring Hydra's BasicSweeper --------------
def group_options(config_sources: Sequence[Any], group: str) -> list[str]:
    """Names of the yaml options of a config group in the sweep's file config sources."""
    names: set[str] = set()
    for source in config_sources:
        if str(source.get("schema")) != "file":
            continue
        folder = Path(str(source.get("path"))) / group
        names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def planned_overrides(sweep: Path) -> list[list[str]] | None:
    """Each planned job's overrides, in job-number order; None when it cannot be worked out."""
    master = read_yaml(sweep / "multirun.yaml")
    if master is None:
        return None
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import Glob

        params = OmegaConf.select(master, "hydra.sweeper.params") or {}
        task = recorded_overrides(master, "hydra.overrides.task")
        sources = OmegaConf.select(master, "hydra.runtime.config_sources") or []
        arguments = [f"{k}={v}" for k, v in params.items()] + [str(t) for t in task]
        lists: dict[str, list[str]] = {}
        for override in OverridesParser.create().parse_overrides(arguments):
            key = override.get_key_element()
            if override.is_sweep_override():
                value = override.value()
                if isinstance(value, Glob):
                    items = value.filter(group_options(sources, override.key_or_group))
                else:
                    items = list(override.sweep_string_iterator())
                lists[key] = [f"{key}={item}" for item in items]
            else:
                lists[key] = [f"{key}={override.get_value_element_as_str()}"]
        return [list(combination) for combination in itertools.product(*lists.values())]
    except Exception:  # noqa: BLE001 - an unusual sweeper: fall back to the folders found
        return None


# -------- Variants ------------------------------------------------------------------------------
def variant_of(job: Job) -> str:
    """The job's comparison arm: the config's ``variant`` (the compare sweeps set it), else the
    estimator option (``score_function/<baseline>``; ``annealed_straight_through`` for
    straight-through with an exponential temperature, as Jang et al. 2017 Table 1 name it), else
    the sweep arm's name, else ``unknown``."""
    variant = literal(job.config, "variant")
    if variant:
        return variant
    estimator = job.choices.get("estimator")
    if estimator == "score_function":
        return f"{estimator}/{job.choices.get('estimator/baseline', 'none')}"
    annealed = job.choices.get("estimator/temperature") == "exponential"
    if estimator == "straight_through" and annealed:
        return "annealed_straight_through"
    if estimator:
        return estimator
    return override_values(job.overrides).get(ARM_GROUP) or "unknown"


def assign_variants(jobs: Sequence[Job]) -> None:
    """Label each job: its base variant plus the other overrides that differ between jobs."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for key, value in override_values(job.overrides).items():
            values.setdefault(key, set()).add(value)
    # A key set in only some jobs varies too (absent counts as a value).
    varying = sorted(
        key
        for key, seen in values.items()
        if key not in IGNORED_OVERRIDE_KEYS
        and (len(seen) > 1 or any(key not in override_values(j.overrides) for j in jobs))
    )
    for job in jobs:
        given = override_values(job.overrides)
        extra = [f"{key}={given[key]}" for key in varying if key in given]
        job.variant = " ".join([variant_of(job), *extra])


def needs_rerun(job: Job) -> bool:
    """Whether rerunning the sweep would change the job (missing, killed or raised; a job whose
    results.json records a failure fails the same way again and is skipped)."""
    return job.status == "missing" or (job.status == "failed" and not job.results)


def load_sweeps(paths: Sequence[Path]) -> list[Job]:
    """Every planned job of every sweep (or run) directory, labelled by variant."""
    jobs: list[Job] = []
    for sweep in paths:
        if not sweep.is_dir():
            raise FileNotFoundError(f"no such sweep or run directory: {sweep}")
        found = [load_job(directory, sweep, number) for directory, number in job_dirs(sweep)]
        planned = planned_overrides(sweep)
        numbers = {job.number for job in found}
        for number, overrides in enumerate(planned or []):
            if number not in numbers:
                found.append(
                    Job(
                        directory=sweep / str(number),
                        sweep=sweep,
                        number=number,
                        status="missing",
                        reason="planned in multirun.yaml but never started",
                        overrides=overrides,
                        choices={k: v for k, v in override_values(overrides).items()
                                 if k in VARIANT_CHOICES},
                    )
                )
        command = rerun_command(sweep)
        for job in found:
            if command is not None and needs_rerun(job):
                job.reason = f"{job.reason}; to finish the sweep: {command}"
        jobs.extend(sorted(found, key=lambda j: (j.number is None, j.number or 0)))
    assign_variants(jobs)
    return jobs
