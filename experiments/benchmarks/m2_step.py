"""Training-step time of M2 with exact marginalization over y against Gumbel-Softmax.

Jang et al. (2017), Figure 5 / Section 4.3: Gumbel-Softmax trains M2 2x faster than marginalization
at k = 10 classes and 9.9x at k = 100 on a GPU (random data). This script times full training steps
(``objective`` + backward + Adam; ``--unlabelled-only``: the unlabelled term alone) of the same
:class:`models.M2` with both estimators, in one
process, on random binary images with random labels, and prints the measured time ratio beside the
ratio of the matrix-multiply FLOPs of the two steps (counted by ``torch.utils.flop_counter``,
forward and backward).

Timings are interleaved: each round times ``--steps`` steps of every (k, estimator) pair, in an
order that alternates between rounds, so that load from other processes on a shared machine hits
both estimators alike; the reported figures are medians over rounds (per-step time, and the ratio
of the two within each round).

    python -m experiments.benchmarks.m2_step          # k = 10 and 100, 784-500-500, z 50
    python -m experiments.benchmarks.m2_step --classes 10 --rounds 5 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from estimators import ConstantTemperature, GumbelSoftmax, Marginalization
from estimators.base import Estimator
from experiments.benchmarks.timing import timed
from models.m2 import M2

ESTIMATORS: dict[str, Callable[[int], Estimator]] = {
    "marginalization": lambda k: Marginalization(max_configurations=max(k, 1024)),
    "gumbel_softmax": lambda k: GumbelSoftmax(temperature=ConstantTemperature(1.0)),
}


def random_batch(
    batch_size: int, input_dim: int, num_classes: int, device: torch.device, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random binary images with random labels: ``{"labelled": (x, y), "unlabelled": (x, -1)}``."""
    generator = torch.Generator().manual_seed(seed)

    def images() -> torch.Tensor:
        return torch.bernoulli(torch.full((batch_size, input_dim), 0.5), generator=generator)

    labels = torch.randint(num_classes, (batch_size,), generator=generator)
    return {
        "labelled": (images().to(device), labels.to(device)),
        "unlabelled": (images().to(device), torch.full((batch_size,), -1, device=device)),
    }


class Step:
    """One model + optimizer + fixed batch; ``__call__`` runs one training step."""

    def __init__(self, args: argparse.Namespace, num_classes: int, estimator: str) -> None:
        torch.manual_seed(args.seed)  # the same initial weights for both estimators
        side = int(args.input_dim**0.5)
        self.model = M2(
            ESTIMATORS[estimator](num_classes),
            image_shape=(side, args.input_dim // side),
            num_classes=num_classes,
            n_labels=num_classes,
            latent_dim=args.latent_dim,
            classifier_hidden=args.hidden,
            encoder_hidden=args.hidden,
            decoder_hidden=args.hidden,
        ).to(args.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-4)
        self.batch = random_batch(
            args.batch_size, self.model.input_dim, num_classes, torch.device(args.device), args.seed
        )
        self.device = torch.device(args.device)
        self.unlabelled_only = args.unlabelled_only

    def loss(self) -> torch.Tensor:
        """The step's loss: M2's full objective, or only the mean unlabelled bound -U(x)."""
        if self.unlabelled_only:
            x, _ = self.batch["unlabelled"]
            output, kl_y, _ = self.model.unlabelled_terms(x, self.model.estimator)
            return (output.surrogate + kl_y).mean()
        return self.model.objective(self.batch, self.model.estimator)[0]

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def flops(self) -> int:
        """Matrix-multiply FLOPs of one step's forward and backward passes."""
        counter = FlopCounterMode(display=False)
        with counter:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss().backward()
        return counter.get_total_flops()

    def seconds_per_step(self, steps: int) -> float:
        return timed(self, self.device, repeats=steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--hidden", type=int, nargs="+", default=[500, 500])
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--input-dim", type=int, default=784)
    parser.add_argument("--batch-size", type=int, default=100, help="labelled and unlabelled")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and pair")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per pair")
    parser.add_argument(
        "--unlabelled-only",
        action="store_true",
        help="time only the unlabelled term (no labelled batch, no classification loss)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    steps = {(k, name): Step(args, k, name) for k in args.classes for name in ESTIMATORS}
    flops = {key: step.flops() for key, step in steps.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[tuple[int, str], list[float]] = {key: [] for key in steps}
    order = list(steps)
    for round_index in range(args.rounds):
        for key in order if round_index % 2 == 0 else reversed(order):
            times[key].append(steps[key].seconds_per_step(args.steps))

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"M2 training step, {args.input_dim}-{'-'.join(map(str, args.hidden))} networks, "
        f"z {args.latent_dim}, batch {'' if args.unlabelled_only else f'{args.batch_size}+'}"
        f"{args.batch_size}{' (unlabelled term only)' if args.unlabelled_only else ''}, {device}, "
        f"{torch.get_num_threads()} threads; medians of {args.rounds} interleaved rounds of "
        f"{args.steps} steps"
    )
    print(f"{'k':>4} {'marg. ms':>9} {'GS ms':>8} {'time ratio':>11} {'FLOP ratio':>11}")
    for k in args.classes:
        marg, gs = times[(k, "marginalization")], times[(k, "gumbel_softmax")]
        ratio = statistics.median(m / g for m, g in zip(marg, gs, strict=True))
        flop_ratio = flops[(k, "marginalization")] / flops[(k, "gumbel_softmax")]
        print(
            f"{k:>4} {1e3 * statistics.median(marg):>9.2f} {1e3 * statistics.median(gs):>8.2f} "
            f"{ratio:>10.2f}x {flop_ratio:>10.2f}x"
        )


if __name__ == "__main__":
    main()
