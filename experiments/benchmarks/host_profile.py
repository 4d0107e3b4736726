"""Where a host-bound training step's time goes: one ``trainer.fit`` of a host-overhead variant
(``experiments.benchmarks.host_overhead``: tiny networks, batch 100) under cProfile with the
process's CPU clock, split into the model's work and Lightning's.

    python -m experiments.benchmarks.host_profile                       # lightning_only, 1000 steps
    python -m experiments.benchmarks.host_profile --variant defaults --steps 1000

Printed per training step (CPU ms under cProfile, which inflates Python-heavy parts about 2x
against torch's kernels: compare parts within one run, not with the unprofiled benchmark):
the model's work (``objective``, autograd's backward, ``Adam.step`` without Lightning's closure,
fetching the next batch), catgrad's ``training_step`` around ``objective``, the callback hooks,
Lightning's wrappers of the backward, and the rest of Lightning's loop. The parts that a K-steps-
per-batch loop would amortise are the per-batch ones (hooks, fetch bookkeeping, closure, result
collection); ``backward`` and optimizer-step wrappers run per optimizer step in any case.
Validation is off (``check_val_every_n_epoch=1000``, no sanity check).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import torch

from experiments.benchmarks.host_overhead import TINY_NETWORKS, VARIANTS, build_variant
from experiments.benchmarks.training_speed import data_overrides

NO_VALIDATION = ["trainer.check_val_every_n_epoch=1000", "+trainer.num_sanity_val_steps=0"]


def cumulative(stats: dict, file_suffix: str, function: str) -> float:
    """Summed cumulative seconds of ``function`` in files ending with ``file_suffix``."""
    return sum(entry[3] for (file, _, name), entry in stats.items()
               if file.endswith(file_suffix) and name == function)


def split(stats: dict) -> tuple[float, dict[str, float]]:
    """The epoch loop's total seconds and its parts (seconds) from a ``pstats`` stats dict."""
    objective = cumulative(stats, "models/vae.py", "objective")
    autograd = cumulative(stats, "torch/autograd/graph.py", "_engine_run_backward")
    total = cumulative(stats, "loops/training_epoch_loop.py", "advance")
    parts = {
        "objective (model forward, loss)": objective,
        "autograd backward": autograd,
        "Adam.step without Lightning's closure": (
            cumulative(stats, "torch/optim/adam.py", "step")
            - cumulative(stats, "plugins/precision/precision.py", "_wrap_closure")),
        "next batch (datamodule and fetcher)": cumulative(stats, "loops/fetchers.py",
                                                          "__next__") / 2,  # two nested
        "catgrad training_step without objective": (
            cumulative(stats, "models/base.py", "training_step") - objective),
        "callback hooks": cumulative(stats, "trainer/call.py", "_call_callback_hooks"),
        "Lightning's backward wrappers": (
            cumulative(stats, "strategies/strategy.py", "backward") - autograd),
    }
    parts["rest of Lightning's loop"] = total - sum(parts.values())
    return total, parts


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for catgrad's path")
    parser.add_argument("--variant", default="lightning_only", choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1000, help="training steps profiled")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} is invalid: use an integer >= 1")
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    overrides = [*data_overrides(), *TINY_NETWORKS, *NO_VALIDATION, *args.overrides]
    run_dir = Path(tempfile.mkdtemp(prefix="catgrad-host-profile-"))
    _, model, datamodule, trainer = build_variant(args.variant, overrides, args.steps, run_dir)
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    trainer.fit(model, datamodule=datamodule)
    profiler.disable()
    total, parts = split(pstats.Stats(profiler).stats)  # type: ignore[attr-defined]
    per_step = {name: 1000.0 * seconds / args.steps for name, seconds in parts.items()}
    print(f"{args.variant}: {1000.0 * total / args.steps:.2f} CPU ms per step in the epoch loop "
          f"(under cProfile), load average {os.getloadavg()[0]:.1f}")
    for name, ms in per_step.items():
        print(f"  {name:<42}{ms:7.2f} ms")
    return per_step


if __name__ == "__main__":
    main()
