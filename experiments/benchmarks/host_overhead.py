"""Per-step host overhead: catgrad against the hand-written loop where a step is almost all Python.

On a GPU this repository's models are host-bound (the matmuls of the 20x10 VAE are a tenth of the
hand-written step), so what decides catgrad's speed there is the Python around each step:
Lightning's loop and hooks, catgrad's callbacks, logging, checkpointing, finite checks and
reseeding. On a CPU the matmuls of the real model hide that cost; this proxy shrinks the networks
(encoder and decoder hidden [16], batch 100) until a step is mostly host work, and measures it on
any machine.

Each *variant* is one ``trainer.fit`` of catgrad's real path (``build`` and ``build_trainer``, as
``experiments.train`` builds it) with one component switched off; inside every fit the bare loop
is interleaved block by block (``training_speed.Interleave``), so load from other jobs hits both
alike. The variants run round-robin ``--rounds`` times; the table gives, per variant, medians over
all its blocks of catgrad's and the bare loop's milliseconds per step and of the per-block ratio
catgrad/bare in throughput (1.0: as fast as the hand-written loop), and the component's cost:
(catgrad/bare time ratio of ``defaults`` - that of the variant) x the bare loop's ms per step.

    python -m experiments.benchmarks.host_overhead                 # ~3 min on 2 cores
    python -m experiments.benchmarks.host_overhead --variants defaults lightning_only --rounds 3
    python -m experiments.benchmarks.host_overhead model.optimizer.fused=false   # Hydra overrides
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from experiments.benchmarks.references import BareLoop
from experiments.benchmarks.training_speed import Interleave, compose, cpu_name, data_overrides
from experiments.training.builder import build, build_trainer
from experiments.training.job import finish_wandb  # also registers the run-directory resolver

TINY_NETWORKS = ["model.encoder_hidden=[16]", "model.decoder_hidden=[16]"]
NO_CHECKPOINTS = ["~callbacks.model_checkpoint", "~callbacks.last_checkpoint",
                  "+trainer.enable_checkpointing=false"]
NO_PROGRESS_BAR = ["~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]
NO_SAMPLES_PER_S = ["~callbacks.samples_per_second"]
NO_LOGGERS = ["~logger"]

# name -> (Hydra overrides, always-on callbacks to drop after build_trainer)
VARIANTS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "defaults": ([], ()),
    "no_progress_bar": (NO_PROGRESS_BAR, ()),
    "no_samples_per_s": (NO_SAMPLES_PER_S, ()),
    "no_checkpoints": (NO_CHECKPOINTS, ()),
    "no_wandb": (["logger=csv_only"], ()),
    "no_loggers": (NO_LOGGERS, ()),
    "no_finite_checks": ([], ("StopOnNonFinite",)),
    "no_reseeding": ([], ("StepSeeding",)),
    "lightning_only": ([*NO_PROGRESS_BAR, *NO_SAMPLES_PER_S, *NO_CHECKPOINTS, *NO_LOGGERS],
                       ("StopOnNonFinite", "StepSeeding")),
}


def build_variant(name: str, overrides: list[str], steps: int, run_dir: Path
                  ) -> tuple[DictConfig, Any, Any, Any]:
    """The config, model, datamodule and Trainer as ``experiments.train`` builds them for
    ``steps`` steps, with variant ``name``'s components switched off."""
    extra, dropped = VARIANTS[name]
    cfg = compose([*overrides, *extra, f"trainer.max_steps={steps}", "trainer.max_epochs=-1"],
                  run_dir)
    model, datamodule = build(cfg)
    trainer = build_trainer(cfg, run_dir)
    trainer.callbacks = [c for c in trainer.callbacks if type(c).__name__ not in dropped]
    return cfg, model, datamodule, trainer


def fit_variant(name: str, overrides: list[str], args: argparse.Namespace, run_dir: Path
                ) -> list[dict[str, float]]:
    """One interleaved ``trainer.fit`` of ``name``: its blocks (catgrad and bare rates)."""
    steps = args.warmup + args.block * args.blocks
    cfg, model, datamodule, trainer = build_variant(name, overrides, steps, run_dir)
    timer = Interleave(args.block, args.warmup, time.perf_counter())
    trainer.callbacks = [timer, *trainer.callbacks]
    device = timer.device = trainer.strategy.root_device
    timer.bare = BareLoop(cfg, datamodule.splits.train[0], device)
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        finish_wandb()
    return timer.rows


def per_step_ms(rate: float, batch_size: int) -> float:
    return 1000.0 * batch_size / rate


def summarize(rows: dict[str, list[dict[str, float]]], batch_size: int) -> dict[str, Any]:
    """Per variant and clock: medians of ms/step of both loops, of the throughput ratio
    catgrad/bare, and the component's cost in ms/step against ``defaults``."""
    out: dict[str, Any] = {}
    for clock in ("", "_cpu"):
        bare_ms = statistics.median(per_step_ms(r["bare" + clock], batch_size)
                                    for blocks in rows.values() for r in blocks)
        time_ratio = {name: statistics.median(r["bare" + clock] / r["catgrad" + clock]
                                              for r in blocks) for name, blocks in rows.items()}
        for name, blocks in rows.items():
            entry = out.setdefault(name, {})
            entry[f"catgrad_ms{clock}"] = statistics.median(
                per_step_ms(r["catgrad" + clock], batch_size) for r in blocks)
            entry[f"bare_ms{clock}"] = statistics.median(
                per_step_ms(r["bare" + clock], batch_size) for r in blocks)
            entry[f"ratio{clock}"] = statistics.median(
                r["catgrad" + clock] / r["bare" + clock] for r in blocks)
            if "defaults" in time_ratio:
                entry[f"cost_ms{clock}"] = (time_ratio["defaults"] - time_ratio[name]) * bare_ms
    return out


def print_table(variants: dict[str, Any]) -> None:
    print(f"{'variant':<18}{'catgrad ms':>11}{'bare ms':>9}{'ratio':>7}{'CPU ratio':>10}"
          f"{'cost ms':>9}   (ratio: catgrad/bare throughput; cost: what defaults pay for it)")
    for name, v in variants.items():
        cost = f"{v['cost_ms']:>9.2f}" if "cost_ms" in v and name != "defaults" else f"{'':>9}"
        print(f"{name:<18}{v['catgrad_ms']:>11.2f}{v['bare_ms']:>9.2f}{v['ratio']:>7.2f}"
              f"{v['ratio_cpu']:>10.2f}{cost}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for catgrad's path")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2, help="round-robin passes over variants")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per fit")
    parser.add_argument("--block", type=int, default=200, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps of each loop")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, default=Path("outputs/benchmark/host_overhead.json"))
    args = parser.parse_args(argv)
    for key in ("rounds", "blocks", "block", "warmup"):
        if getattr(args, key) < 1:
            parser.error(f"--{key}={getattr(args, key)} is invalid: use an integer >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    overrides = [*data_overrides(), *TINY_NETWORKS, *args.overrides]
    root = Path(tempfile.mkdtemp(prefix="catgrad-host-overhead-"))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in args.variants}
    for round_index in range(args.rounds):
        for name in args.variants:
            rows[name] += fit_variant(name, overrides, args, root / f"{name}-{round_index}")
    batch_size = compose(overrides, root / "config").datamodule.batch_size
    variants = summarize(rows, batch_size)
    results = {
        "device": cpu_name(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0], "overrides": overrides, "rounds": args.rounds,
        "block_steps": args.block, "variants": variants, "rows": rows,
    }
    print_table(variants)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.json}")
    return results


if __name__ == "__main__":
    main()
