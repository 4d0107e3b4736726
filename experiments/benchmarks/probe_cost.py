"""Cost of the gradient probe per gradient sample, relative to one training step.

``python -m experiments.benchmarks.probe_cost [--samples 256] [--chunk-size 32] [--repeats 7]``

The 20x10 categorical VAE (784-512-256-(20x10)-256-512-784) on 784-dimensional binary data,
batch 100, in one process. Interleaved: each repeat times ``--steps`` training steps (zero_grad,
objective, backward, Adam step) and then one probe of ``--samples`` gradient samples (statistics
included). Prints the median training step, the median probe cost per sample and their ratio.
Each gradient sample is inherently about one forward and backward pass, so the floor is near 1.0.
``--loop-samples N`` also times the plain loop on N samples for comparison.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable

import torch

from estimators import GumbelSoftmax, ScoreFunction, STGumbelSoftmax
from estimators.base import Estimator
from experiments.benchmarks.timing import timed
from experiments.probe.sampler import GradientSampler
from models import CategoricalVAE

ESTIMATORS: dict[str, Callable[[], Estimator]] = {
    "st_gumbel_softmax": STGumbelSoftmax,
    "gumbel_softmax": GumbelSoftmax,
    "score_function": ScoreFunction,
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per repeat")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="st_gumbel_softmax")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--loop-samples", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CategoricalVAE(ESTIMATORS[args.estimator](), image_shape=(28, 28)).to(device)
    x = torch.bernoulli(torch.full((args.batch_size, 784), 0.3, device=device))  # [B, 784]
    batch = (x, torch.zeros(args.batch_size, dtype=torch.long, device=device))
    optimizer = model.configure_optimizers()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.objective(batch, model.estimator)
        loss.backward()
        optimizer.step()

    sampler = GradientSampler(model, batch)

    def probe(samples: int, method: str) -> None:
        sampler.probe(model.estimator, samples, args.chunk_size, method=method, seed=0)

    for _ in range(3):  # warm-up (allocator, first-call overheads)
        train_step()
    probe(args.chunk_size, "vmap")
    steps: list[float] = []
    per_sample: list[float] = []
    loop_per_sample: list[float] = []
    for _ in range(args.repeats):
        steps.extend(timed(train_step, device) for _ in range(args.steps))
        per_sample.append(timed(lambda: probe(args.samples, "vmap"), device) / args.samples)
        if args.loop_samples:
            seconds = timed(lambda: probe(args.loop_samples, "loop"), device)
            loop_per_sample.append(seconds / args.loop_samples)
    step = statistics.median(steps)
    sample = statistics.median(per_sample)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"device={device} threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"torch={torch.__version__} python={platform.python_version()} "
        f"load_avg_1min={load[0]:.2f}"
    )
    print(
        f"20x10 VAE, batch {args.batch_size}, {args.estimator}; {args.repeats} interleaved repeats "
        f"of {args.steps} training steps + one probe of {args.samples} samples "
        f"(chunk {args.chunk_size})"
    )
    print(f"training step (median):        {step * 1e3:8.2f} ms")
    print(f"probe per gradient sample:      {sample * 1e3:8.2f} ms  ratio {sample / step:.2f}")
    figures = {"step_s": step, "vmap_per_sample_s": sample, "vmap_ratio": sample / step}
    if loop_per_sample:
        loop = statistics.median(loop_per_sample)
        print(f"loop per gradient sample:       {loop * 1e3:8.2f} ms  ratio {loop / step:.2f}")
        figures.update({"loop_per_sample_s": loop, "loop_ratio": loop / step})
    return figures


if __name__ == "__main__":
    main()
