"""Replica-steps per CPU-second of ``replicas=R`` against the same run trained alone.

Both are the real training path (``build`` or ``build_replicated``, then ``build_trainer`` with
the configured callbacks and loggers, the always-on ``StepSeeding`` and ``StopOnNonFinite``):
the compare setting on the embedded digits (3 x 4 latents, one hidden layer of 256 units, batch
100, validation every 4 epochs, checkpoints, samples/s, CSV and wandb loggers) without the
gradient probe. R separate runs take R times the CPU of one, so the ratio

    (R * steps / CPU seconds of the R-replica run) / (steps / CPU seconds of one run)

is the speed-up of one R-replica process over R separate runs. Runs alternate (single, replicated,
single, ...) for ``--rounds`` rounds so that other load on a shared machine hits both alike; each
run is timed from step ``--warmup`` to its last step (validations and checkpoint writes in between
included) and the figures are medians over rounds.

    python -m experiments.benchmarks.replicas                       # R = 8, ~2 min on one core
    python -m experiments.benchmarks.replicas --replicas 8 --steps 400 --rounds 3 \\
        estimator=score_function estimator/baseline=moving_average   # Hydra overrides
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from experiments.benchmarks.timing import clocks
from experiments.benchmarks.training_speed import compose, cpu_name

COMPARE_SETTING = [
    "datamodule=digits", "model.num_variables=3", "model.num_classes=4",
    "model.encoder_hidden=[256]", "model.decoder_hidden=[256]", "trainer.max_epochs=-1",
    "trainer.check_val_every_n_epoch=4", "+callbacks.progress_bar.refresh_rate=0",
    "model.iwae_samples=100",
]


class StepClock(L.Callback):
    """(wall, CPU) seconds at the end of step ``warmup`` and of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step == self.warmup:
            self.start = clocks(torch.device("cpu"))
        elif step > self.warmup:
            self.end, self.steps = clocks(torch.device("cpu")), step - self.warmup


def timed_run(overrides: list[str], warmup: int, directory: Path) -> tuple[float, float, int]:
    """Train ``overrides`` (fit only); (wall s, CPU s, steps) from step ``warmup`` to the end."""
    from experiments.training.builder import build, build_trainer
    from experiments.training.job import finish_wandb
    from experiments.training.replicas import build_replicated, replica_count

    cfg = compose(overrides, directory)
    model, datamodule = build_replicated(cfg) if replica_count(cfg) > 1 else build(cfg)
    clock = StepClock(warmup)
    trainer = build_trainer(cfg, directory, extra_callbacks=[clock])
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        finish_wandb()
    assert clock.start is not None and clock.end is not None
    return clock.end[0] - clock.start[0], clock.end[1] - clock.start[1], clock.steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed first steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    base = [*COMPARE_SETTING, f"trainer.max_steps={args.steps}", *args.overrides]
    single_rates, replicated_rates, ratios = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            runs = {}
            for count in (1, args.replicas):
                directory = Path(scratch) / f"{round_}_{count}"
                wall, cpu, steps = timed_run([*base, f"replicas={count}"], args.warmup,
                                             directory)
                runs[count] = count * steps / cpu  # replica-steps per CPU second
                print(f"round {round_}: replicas={count}: {steps} steps in {cpu:.2f} CPU s "
                      f"({wall:.2f} wall s): {runs[count]:.1f} replica-steps per CPU s",
                      flush=True)
            single_rates.append(runs[1])
            replicated_rates.append(runs[args.replicas])
            ratios.append(runs[args.replicas] / runs[1])
    print(f"cpu: {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"WANDB_MODE={os.environ['WANDB_MODE']}, overrides: {' '.join(args.overrides) or '-'}")
    print(f"one run:          {statistics.median(single_rates):8.1f} steps per CPU s (median)")
    print(f"replicas={args.replicas:<3d}     {statistics.median(replicated_rates):8.1f} "
          f"replica-steps per CPU s (median)")
    print(f"speed-up over {args.replicas} separate runs: {statistics.median(ratios):.2f}x "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
