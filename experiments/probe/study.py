"""Gradient study: ``python -m experiments.probe.study [run_dir=<training run>] [overrides]``.

Composes ``conf/gradients.yaml``. Builds the model of a training run (``run_dir``: its
``.hydra/config.yaml`` and ``checkpoints/last.ckpt``, or ``checkpoint=<file>``) or a fresh one
from the ``model``/``estimator``/``datamodule`` groups, takes the first training batch, and
probes every estimator of ``estimators`` (relaxed ones, those with a temperature schedule, at each
constant ``tau`` of ``temperatures``) with :mod:`experiments.probe`: same parameters, same batch,
same exact gradient (when ``K^N <= probe.exact_max_configurations``), same random numbers.

Writes to the output directory (``outputs/gradients/<date>/<time>`` unless ``hydra.run.dir``):

* ``gradients.json``: ``{"step", "checkpoint", "model", "datamodule", "rows": [...]}``, one row per
  (estimator, tau, group) with the fields of ``probe.jsonl`` (``docs/gradients.md``);
* ``gradients.csv``: the same rows;
* ``gradients.png``: log10 tr Cov and the bias norm of ``plot_group`` per estimator, against tau
  for the relaxed ones (the others as horizontal lines).

Configuration mistakes stop the study before any work with one line on stderr (exit code 2).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import CombinedLoader
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from estimators.base import Estimator, TemperedEstimator
from estimators.temperature import ConstantTemperature
from experiments.probe.callback import finite_or_none
from experiments.probe.sampler import GradientSampler, ProbeResult
from experiments.training.builder import build
from experiments.training.errors import ConfigurationError

Variant = tuple[str, float | None, Estimator]  # (name, constant tau or None, estimator)


# ------------------------------------------------------------------------------------------------
# The model to probe
# ------------------------------------------------------------------------------------------------
def run_config(cfg: DictConfig) -> tuple[DictConfig, str, Path | None]:
    """``(config with model/estimator/datamodule/seed, the model estimator's name, checkpoint)``.

    From ``cfg.run_dir`` when given (the run's own composed config), else from ``cfg``.
    """
    checkpoint = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else None
    if cfg.run_dir is None:
        name = str(HydraConfig.get().runtime.choices.get("estimator") or "model")
        source: DictConfig = cfg
    else:
        run_dir = Path(cfg.run_dir).expanduser()
        config_file = run_dir / ".hydra" / "config.yaml"
        if not config_file.is_file():
            raise ConfigurationError(
                f"run_dir={cfg.run_dir!r} has no .hydra/config.yaml: give the output directory "
                f"of an experiments.train run"
            )
        source = OmegaConf.load(config_file)  # type: ignore[assignment]
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        choice = None
        if hydra_file.is_file():
            choice = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices.estimator")
        name = str(choice or "model")
        checkpoint = checkpoint or run_dir / "checkpoints" / "last.ckpt"
    selected = OmegaConf.create(
        {key: source[key] for key in ("model", "estimator", "datamodule", "seed")}
    )
    return selected, name, checkpoint


def load_checkpoint(model: torch.nn.Module, path: Path) -> int:
    """Load a Lightning checkpoint's weights into ``model``; return its global step."""
    if not path.is_file():
        raise ConfigurationError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else repr(error)
        raise ConfigurationError(
            f"checkpoint {path} cannot be loaded into this model ({reason}): probe with the "
            f"run's model and estimator config (run_dir=<run>)"
        ) from None
    return int(checkpoint.get("global_step", 0))


def first_batch(datamodule: Any, device: torch.device) -> Any:
    """The first training batch (seeded) on ``device``."""
    loader = datamodule.train_dataloader()
    batch = next(iter(loader))
    if isinstance(loader, CombinedLoader):
        batch = batch[0]  # (batch, batch_idx, dataloader_idx)
    return apply_to_collection(batch, Tensor, lambda t: t.to(device))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigurationError(f"device={name!r} is unknown: use auto, cpu or cuda")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------
# The estimators to probe
# ------------------------------------------------------------------------------------------------
def is_relaxed(estimator: Estimator) -> bool:
    """Whether ``estimator`` has a temperature schedule (a :class:`TemperedEstimator`: the
    Gumbel-Softmax family; RELAX's learned temperature is a parameter, not a schedule)."""
    return isinstance(estimator, TemperedEstimator)


def variants(estimators: Mapping[str, Estimator], temperatures: Sequence[float]) -> list[Variant]:
    """Each estimator once; relaxed ones once per constant temperature (copies)."""
    out: list[Variant] = []
    for name, estimator in estimators.items():
        if not is_relaxed(estimator) or not temperatures:
            out.append((name, None, estimator))
            continue
        for tau in temperatures:
            copy_ = copy.deepcopy(estimator)
            copy_.temperature = ConstantTemperature(float(tau))  # type: ignore[assignment]
            out.append((name, float(tau), copy_))
    return out


def result_rows(name: str, tau: float | None, result: ProbeResult) -> list[dict[str, Any]]:
    """The probe's per-group rows with the estimator's name and the swept tau (JSON-safe)."""
    return [
        {
            "estimator": name,
            "tau": tau,
            **{k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()},
        }
        for row in result.rows()
    ]


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------
def write_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any], directory: Path) -> None:
    """``gradients.json`` (metadata and rows) and ``gradients.csv`` (rows)."""
    (directory / "gradients.json").write_text(json.dumps({**meta, "rows": list(rows)}, indent=1))
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with (directory / "gradients.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: Sequence[dict[str, Any]], group: str, path: Path) -> None:
    """log10 tr Cov and bias norm of ``group`` per estimator; relaxed ones against tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["group"] == group]
    swept = sorted({row["tau"] for row in rows if row["tau"] is not None})
    names = list(dict.fromkeys(row["estimator"] for row in rows))
    panels = (
        ("log10_trace_cov", f"log10 tr Cov[g] ({group})"),
        ("bias_norm", "‖E g − g*‖ (dotted: noise floor √(tr Cov/S))"),
    )
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (metric, label) in zip(axes, panels, strict=True):
        available = [row for row in rows if row.get(metric) is not None]
        if not available:
            axis.text(
                0.5,
                0.5,
                f"no {metric}\n(no exact gradient within budget)",
                ha="center",
                va="center",
                transform=axis.transAxes,
            )
            axis.set_axis_off()
            continue
        for index, name in enumerate(names):
            color = f"C{index % 10}"
            own = [row for row in available if row["estimator"] == name]
            if not own:
                continue
            flat = own[0]["tau"] is None or not swept
            if flat:
                axis.axhline(own[0][metric], color=color, linestyle="--", label=name)
            else:
                taus = [r["tau"] for r in own]
                axis.plot(taus, [r[metric] for r in own], "o-", color=color, label=name)
            if metric == "bias_norm":  # dotted: sqrt(tr Cov / S), the noise floor of the bias
                floors = [math.sqrt(r["trace_cov"] / r["num_samples"]) for r in own]
                if flat:
                    axis.axhline(floors[0], color=color, linestyle=":", linewidth=0.8)
                else:
                    axis.plot(taus, floors, ":", color=color, linewidth=0.8)
        if swept:
            axis.set_xscale("log")
            axis.set_xlabel("temperature τ (relaxed estimators; dashed: τ-free)")
        if metric == "bias_norm":
            axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------
def study(cfg: DictConfig, output_dir: Path) -> list[dict[str, Any]]:
    """Probe every variant at one point; write table and plot to ``output_dir``; return rows."""
    selected, model_estimator_name, checkpoint = run_config(cfg)
    torch.manual_seed(int(selected.seed))
    model, datamodule = build(selected)
    step = load_checkpoint(model, checkpoint) if checkpoint is not None else 0
    device = pick_device(str(cfg.device))
    model.to(device)
    sampler = GradientSampler(model, first_batch(datamodule, device), cfg.probe.groups)
    try:
        probed = dict(instantiate(cfg.estimators, _convert_="all"))
        for estimator in probed.values():
            sampler.prepare(estimator)
    except Exception as error:  # a bad estimator config: one line
        raise ConfigurationError(f"estimators: {error}") from error
    todo = variants(probed, list(cfg.temperatures or []))
    if cfg.include_model_estimator and checkpoint is not None:
        todo.append((f"run_{model_estimator_name}", None, model.estimator))
    exact = sampler.exact_gradient(
        int(cfg.probe.exact_max_configurations),
        int(cfg.probe.exact_samples),
        int(cfg.probe.chunk_size),
        str(cfg.probe.method),
        seed=int(selected.seed),
    )
    rows: list[dict[str, Any]] = []
    for name, tau, estimator in todo:
        estimator.set_step(step)
        result = sampler.probe(
            estimator,
            int(cfg.probe.num_samples),
            int(cfg.probe.chunk_size),
            exact,
            str(cfg.probe.method),
            seed=int(selected.seed),
        )
        rows.extend(result_rows(name, tau, result))
        stats = result.groups[cfg.plot_group] if cfg.plot_group in result.groups else None
        summary = "" if stats is None else f"log10 tr Cov={stats.log10_trace_cov:.3f}"
        if stats is not None and stats.bias_norm is not None:
            summary += f" bias={stats.bias_norm:.4g}"
        tau_text = "" if tau is None else f" tau={tau:g}"
        print(f"{name}{tau_text}: {summary} ({result.method}, {result.seconds:.2f} s)")
    meta = {
        "step": step,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "exact_gradient": exact is not None,
        "model": OmegaConf.to_container(selected.model, resolve=True),
        "datamodule": OmegaConf.to_container(selected.datamodule, resolve=True),
        "seed": int(selected.seed),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_table(rows, meta, output_dir)
    plot(rows, str(cfg.plot_group), output_dir / "gradients.png")
    print(f"gradients: {len(rows)} rows -> {output_dir}")
    return rows


@hydra.main(version_base="1.3", config_path="../../conf", config_name="gradients")
def main(cfg: DictConfig) -> None:
    try:
        study(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
