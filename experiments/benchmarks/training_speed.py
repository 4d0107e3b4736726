"""Training speed of catgrad against a hand-written PyTorch loop and the matmul bound.

One process, one model shape: the categorical VAE 20x10 with an MLP 784-512-256 encoder and a
256-512 decoder, batch 100, ST Gumbel-Softmax, on MNIST (``CATGRAD_DATA_DIR``) or, when its files
are absent, generated data of MNIST's shape. Three throughputs, in samples per second:

1. ``bare``: a hand-written loop -- the same networks, tensors in memory, dynamic binarization, the
   same estimator math written inline, Adam, no logging, no host synchronisation. The reference.
2. ``catgrad``: the real training path, built from the composed Hydra config by
   ``experiments.train`` (``build`` and ``build_trainer``): the datamodule, the LightningModule,
   the Trainer with the default callbacks (checkpoints, progress bar, samples/s) and loggers
   (CSV, wandb offline), plus the always-on ``StepSeeding`` and ``StopOnNonFinite``.
3. ``bound``: the model's matmul FLOPs per sample (forward and backward, counted by
   ``torch.utils.flop_counter``) over the sgemm rate measured at the layers' own shapes and
   layouts -- the speed of a step that did nothing but its matrix multiplies.

Interleaving: catgrad trains in one ``trainer.fit``; after every ``--block`` steps a callback stops
its clock and times ``--block`` steps of the bare loop and one step's worth of matmuls, then
catgrad resumes. Other load on a shared machine thus hits all three alike; the figures are medians
over blocks (per block ratios for 2/1 and 2/3). With ``--block`` a multiple of the checkpoint
interval (200), every catgrad block carries its share of checkpoint writes.

Also reported: time to the first training step (in this process from building the components,
and for the command line ``python -m experiments.train`` from process start, in a child process
that trains ``--cli-steps`` steps and tests on one batch), the peak resident memory of that child
and of this process, and the time of ``nll_iwae`` (1000 samples) over ``--eval-images`` test images.

    python -m experiments.benchmarks.training_speed                     # ~3 min on 2 cores
    python -m experiments.benchmarks.training_speed model.compile=true  # Hydra overrides
    python -m experiments.benchmarks.training_speed --threads 1 --rounds 5 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from datamodules.mnist import mnist_files_present
from experiments.benchmarks.references import BareLoop, MatmulBound
from experiments.benchmarks.timing import clocks, synchronize

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MNIST_SHAPE = [
    "datamodule=synthetic", "datamodule.image_shape=[28,28]", "datamodule.num_examples=10000",
    "datamodule.batch_size=100", "datamodule.eval_batch_size=500",
]


def data_overrides() -> list[str]:
    """Real MNIST when ``CATGRAD_DATA_DIR`` has it, else generated data of MNIST's shape."""
    data_dir = os.environ.get("CATGRAD_DATA_DIR")
    if data_dir and mnist_files_present(Path(data_dir)):
        return ["datamodule=mnist", "datamodule.download=false"]
    return MNIST_SHAPE


def compose(overrides: list[str], run_dir: Path) -> DictConfig:
    """``conf/config.yaml`` composed as ``experiments.train`` sees it, run directory ``run_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------
# Interleaving inside catgrad's fit
# ------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


class Interleave(L.Callback):
    """Times catgrad's steps in blocks; between blocks, times the bare loop and the matmuls."""

    bare: BareLoop
    bound: MatmulBound | None = None  # None: time catgrad and the bare loop only
    device: torch.device

    def __init__(self, block: int, warmup: int, built_at: float) -> None:
        self.block, self.warmup, self.built_at = block, warmup, built_at
        self.first_step_s: float | None = None
        self.rows: list[dict[str, float]] = []
        self._mark: tuple[float, float] | None = None  # clocks(): (wall, CPU) seconds

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.built_at

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps done
        if step < self.warmup or (step - self.warmup) % self.block:
            return
        now = clocks(self.device)
        if self._mark is not None:
            row = rates("catgrad", self._mark, now, self.block * self.bare.batch_size)
            row.update(self.timed("bare", self.bare.step))
            if self.bound is not None:
                row.update(self.timed("bound", self.bound.step))
            self.rows.append(row)
        else:  # warm both up once, untimed
            for _ in range(self.warmup):
                self.bare.step()
                if self.bound is not None:
                    self.bound.step()
        self._mark = clocks(self.device)

    def timed(self, name: str, step: Callable[[], None]) -> dict[str, float]:
        start = clocks(self.device)
        for _ in range(self.block):
            step()
        return rates(name, start, clocks(self.device), self.block * self.bare.batch_size)


def rates(name: str, start: tuple[float, float], end: tuple[float, float], samples: int
          ) -> dict[str, float]:
    """Samples per wall second (``name``) and per process-CPU second (``name_cpu``)."""
    return {name: samples / (end[0] - start[0]), f"{name}_cpu": samples / (end[1] - start[1])}


class FirstStepTime(L.Callback):
    """Prints the wall-clock time of the first training batch (for the command-line measure)."""

    def __init__(self) -> None:
        self.done = False

    def on_train_batch_start(self, *args: Any) -> None:
        if not self.done:
            print(f"first_training_step_at={time.time():.3f}", file=sys.stderr, flush=True)
            self.done = True


# Runs the training command and reports its peak RSS. A child forked straight from this (large)
# process would inherit this process's RSS high-water mark through fork/exec; a small
# interpreter in between keeps the measure to the training process (and its own children).
PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', "
    "file=sys.stderr); sys.exit(code)"
)


def run_cli(overrides: list[str], steps: int, run_dir: Path) -> dict[str, float]:
    """``python -m experiments.train`` in a child: seconds to its first step, peak RSS, wall."""
    command = [
        sys.executable, "-c", PEAK_RSS_WRAPPER,
        sys.executable, "-m", "experiments.train", *overrides,
        f"trainer.max_steps={steps}", "++trainer.limit_test_batches=1",
        f"hydra.run.dir={run_dir}",
        "+callbacks.first_step._target_=experiments.benchmarks.training_speed.FirstStepTime",
    ]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
           "WANDB_SILENT": "true"}
    started = time.time()
    child = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    output = child.stdout + child.stderr
    if child.returncode != 0:
        raise RuntimeError(f"experiments.train failed ({child.returncode}):\n{output[-3000:]}")

    def value(key: str) -> float:
        line = next(line for line in output.splitlines() if line.startswith(f"{key}="))
        return float(line.split("=", 1)[1])

    return {
        "cli_first_step_s": value("first_training_step_at") - started,
        "cli_peak_rss_mb": value("peak_rss_kb") / 1024,
        "cli_wall_s": time.time() - started,
    }


def time_nll_iwae(model: Any, test_x: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds for ``model.nll_iwae`` over ``test_x`` in batches of ``batch_size``."""
    model.to(device).eval()  # Lightning's teardown returns the model to the CPU after fit
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, test_x.shape[0], batch_size):
            model.nll_iwae(test_x[first : first + batch_size].to(device))
    synchronize(device)
    return time.perf_counter() - start


def median(rows: list[dict[str, float]], keys: list[str]) -> float:
    """Median over rows of ``row[keys[0]]``, or of the ratio ``row[keys[0]] / row[keys[1]]``."""
    return statistics.median(
        row[keys[0]] / (row[keys[1]] if len(keys) > 1 else 1.0) for row in rows
    )


PATHS = {"bare": "1 bare PyTorch loop (reference)", "catgrad": "2 catgrad (Lightning, defaults)",
         "bound": "3 matmul bound"}


def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Medians over blocks of each rate, and of the per-block ratios 2/1, 2/3 and 1/3."""
    out: dict[str, Any] = {}
    for clock in ("", "_cpu"):
        out[f"samples_per_s{clock}"] = {k: median(rows, [k + clock]) for k in PATHS}
        for a, b in (("catgrad", "bare"), ("catgrad", "bound"), ("bare", "bound")):
            out[f"ratio_{a}_{b}{clock}"] = median(rows, [a + clock, b + clock])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for catgrad's path")
    parser.add_argument("--rounds", type=int, default=6, help="timed blocks of each path")
    parser.add_argument("--block", type=int, default=200, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps of each loop")
    parser.add_argument("--eval-images", type=int, default=500,
                        help="test images for the nll_iwae timing (10000: the whole test set)")
    parser.add_argument("--cli-steps", type=int, default=100,
                        help="steps of the command-line run (0: skip it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default; 1 is far faster under load)")
    parser.add_argument("--json", type=Path, default=Path("outputs/benchmark/benchmark.json"))
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where catgrad's runs write (default: a new temporary directory)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    from experiments.training.builder import build, build_trainer
    from experiments.training.job import finish_wandb

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="catgrad-benchmark-"))
    overrides = [*data_overrides(), *args.overrides]
    steps = args.warmup + args.block * args.rounds
    cfg = compose([*overrides, f"trainer.max_steps={steps}", "trainer.max_epochs=-1"], run_dir)
    built_at = time.perf_counter()
    model, datamodule = build(cfg)  # seeds everything first
    timer = Interleave(args.block, args.warmup, built_at)
    trainer = build_trainer(cfg, run_dir, extra_callbacks=[timer])
    device = timer.device = trainer.strategy.root_device
    bare = timer.bare = BareLoop(cfg, datamodule.splits.train[0], device)
    bound = timer.bound = MatmulBound([bare.encoder, bare.decoder], bare.batch_size, device)
    flops_per_sample = bare.flops_per_sample()
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        finish_wandb()
    rows = timer.rows

    test_x = datamodule.splits.test[0][: args.eval_images]
    eval_s = time_nll_iwae(model, test_x, cfg.datamodule.eval_batch_size, device)
    cli = run_cli(overrides, args.cli_steps, run_dir / "cli") if args.cli_steps else {}

    results: dict[str, Any] = {
        "data": cfg.datamodule._target_.rsplit(".", 1)[-1],
        "overrides": args.overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "blocks": len(rows),
        "block_steps": args.block,
        **summary(rows),
        "flops_per_sample": flops_per_sample,
        "matmul_gflops": median(rows, ["bound_cpu"]) * bound.flops / bound.batch / 1e9,
        "first_step_s": timer.first_step_s,
        "nll_iwae_samples": cfg.model.iwae_samples,
        "nll_iwae_images": test_x.shape[0],
        "nll_iwae_s": eval_s,
        "nll_iwae_s_per_10k_images": eval_s * 10_000 / test_x.shape[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **cli,
        "rows": rows,
    }
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.json}")
    return results


def print_table(r: dict[str, Any]) -> None:
    wall, cpu = r["samples_per_s"], r["samples_per_s_cpu"]
    print(f"{'path':<34}{'samples/s':>11}{'steps/s':>9}{'samples/CPU-s':>15}")
    for key, name in PATHS.items():
        print(f"{name:<34}{wall[key]:>11,.0f}{wall[key] / 100:>9.1f}{cpu[key]:>15,.0f}")
    for clock, label in (("", "wall"), ("_cpu", "CPU ")):
        ratio = {key: r[f"ratio_{key}{clock}"] for key in ("catgrad_bare", "catgrad_bound",
                                                            "bare_bound")}
        print(f"ratios ({label}): 2/1 {ratio['catgrad_bare']:.2f}   "
              f"2/3 {ratio['catgrad_bound']:.2f}   1/3 {ratio['bare_bound']:.2f}")
    print(f"{r['flops_per_sample'] / 1e6:.2f} MFLOP per sample (forward + backward); sgemm at the "
          f"layer shapes: {r['matmul_gflops']:.0f} GFLOP per CPU-second")
    cli = "cli_first_step_s" in r
    print(f"time to first step: {r['first_step_s']:.1f} s in process"
          + (f", {r['cli_first_step_s']:.1f} s from the command line" if cli else ""))
    print(f"peak RSS: {r['peak_rss_mb']:.0f} MB this process (both loops)"
          + (f", {r['cli_peak_rss_mb']:.0f} MB experiments.train" if cli else ""))
    print(f"nll_iwae ({r['nll_iwae_samples']} samples): {r['nll_iwae_s']:.1f} s for "
          f"{r['nll_iwae_images']} images ({r['nll_iwae_s_per_10k_images']:.0f} s per 10,000)")


if __name__ == "__main__":
    main()
