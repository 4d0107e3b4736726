"""Statistics of gradient samples: per-group trace of the covariance, SNR and bias against an
exact gradient (definitions in docs/gradients.md), accumulated chunk by chunk in float64."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class GroupStats:
    """Statistics of one parameter group over ``num_samples`` gradient samples.

    The bias fields are None when no exact gradient was given. Non-finite values are kept as they
    are (``log10_trace_cov = -inf`` for a zero-variance estimator; ``snr = nan`` for 0/0).
    """

    num_coordinates: int
    trace_cov: float
    log10_trace_cov: float
    mean_grad_sq_norm: float
    snr: float
    exact_grad_sq_norm: float | None = None
    bias_norm: float | None = None
    mse: float | None = None
    cosine: float | None = None


@dataclass
class ProbeResult:
    """Per-group statistics of one estimator at one point, and how they were obtained."""

    num_samples: int
    method: str  # "vmap" | "loop"
    seconds: float
    groups: dict[str, GroupStats] = field(default_factory=dict)
    temperature: float | None = None

    def metrics(self) -> dict[str, float | None]:
        """Flat ``{"<group>/<metric>": value}`` (plus ``seconds``), for loggers and tables."""
        flat: dict[str, float | None] = {"seconds": self.seconds}
        if self.temperature is not None:
            flat["temperature"] = self.temperature
        for group, stats in self.groups.items():
            for name, value in asdict(stats).items():
                flat[f"{group}/{name}"] = None if value is None else float(value)
        return flat

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per group: ``group``, ``num_samples``, ``method``, ``temperature``,
        ``seconds`` and the :class:`GroupStats` fields."""
        return [
            {
                "group": group,
                "num_samples": self.num_samples,
                "method": self.method,
                "temperature": self.temperature,
                "seconds": self.seconds,
                **asdict(stats),
            }
            for group, stats in self.groups.items()
        ]



class Moments:
    """Running per-coordinate mean and summed squared deviation of one gradient tensor.

    Chunks ``[C, ...]`` are merged with Chan, Golub & LeVeque's parallel update, so only the mean
    (in float64) and one scalar are kept. Deviations are taken from the chunk's mean (never the
    cancellation-prone ``sum g^2 - C mean^2``); on the CPU one sample at a time through a reused
    buffer that stays in cache (``torch.var_mean`` over the sample axis, and large temporaries,
    cost more than the gradients themselves there). With an exact gradient it also keeps, per
    sample, the dot product with it and the squared norm (for cosines).
    """

    def __init__(self, exact: Tensor | None) -> None:
        self.count = 0
        self.shape = torch.Size()
        self.dtype = torch.float32
        self.mean: Tensor | None = None  # [P] float64
        self.sum_sq_dev = 0.0
        self.exact = None if exact is None else exact.detach().flatten()  # [P]
        self.dots: list[Tensor] = []  # [C] per chunk
        self.sq_norms: list[Tensor] = []  # [C] per chunk

    def mean_vector(self) -> Tensor:
        """The running mean, flat ``[P]`` float64 (after at least one update)."""
        if self.mean is None:
            raise RuntimeError("no gradient samples were accumulated")
        return self.mean

    def mean_tensor(self) -> Tensor:
        """The running mean with the gradient tensor's shape and dtype."""
        return self.mean_vector().to(self.dtype).reshape(self.shape)

    def update(self, chunk: Tensor) -> None:
        size = chunk.shape[0]
        self.shape, self.dtype = chunk.shape[1:], chunk.dtype
        flat = chunk.detach().reshape(size, -1)  # [C, P]
        mean = flat.sum(0).div_(size)  # [P]
        if flat.device.type == "cpu":
            buffer = torch.empty_like(mean)  # [P]
            squares = flat.new_empty(size)  # [C]
            for index in range(size):
                torch.sub(flat[index], mean, out=buffer)
                torch.dot(buffer, buffer, out=squares[index])
            chunk_sq_dev = float(squares.double().sum())
        else:
            chunk_sq_dev = float((flat - mean).pow(2).sum(dtype=torch.float64))
        mean = mean.double()
        if self.mean is None:
            self.mean, self.sum_sq_dev = mean, chunk_sq_dev
        else:
            total = self.count + size
            delta = mean - self.mean  # [P]
            self.sum_sq_dev += chunk_sq_dev + float(delta.pow(2).sum()) * self.count * size / total
            self.mean = self.mean + delta * (size / total)
        self.count += size
        if self.exact is not None:
            self.dots.append((flat @ self.exact.to(flat.dtype)).double())  # [C]
            self.sq_norms.append(torch.linalg.vector_norm(flat, dim=1).double().pow(2))  # [C]


def group_stats(moments: Sequence[Moments]) -> GroupStats:
    """Combine the moments of a group's tensors into :class:`GroupStats`."""
    count = moments[0].count
    means = [m.mean_vector() for m in moments]  # [P_j] float64 each
    coordinates = sum(mean.numel() for mean in means)
    sum_sq_dev = math.fsum(m.sum_sq_dev for m in moments)
    trace = sum_sq_dev / (count - 1)
    mean_sq = math.fsum(float(mean.pow(2).sum()) for mean in means)
    stats = GroupStats(
        num_coordinates=coordinates,
        trace_cov=trace,
        log10_trace_cov=math.log10(trace) if trace > 0 else -math.inf,
        mean_grad_sq_norm=mean_sq,
        snr=ratio(mean_sq, trace),
    )
    exacts = [m.exact for m in moments]
    if all(exact is not None for exact in exacts):
        exact_vectors = [exact.double() for exact in exacts if exact is not None]  # [P_j] each
        exact_sq = math.fsum(float(exact.pow(2).sum()) for exact in exact_vectors)
        bias_sq = math.fsum(
            float((mean - exact).pow(2).sum())
            for mean, exact in zip(means, exact_vectors, strict=True)
        )
        dots = torch.stack([torch.cat(m.dots) for m in moments]).sum(0)  # [S]
        sq_norms = torch.stack([torch.cat(m.sq_norms) for m in moments]).sum(0)  # [S]
        norms = sq_norms.sqrt() * math.sqrt(exact_sq)  # [S]
        cosines = torch.where(norms > 0, dots / norms, torch.nan)  # [S]
        stats.exact_grad_sq_norm = exact_sq
        stats.bias_norm = math.sqrt(bias_sq)
        # mean_s ||g_s - g*||^2 = (population variance) + ||mean - g*||^2, exactly.
        stats.mse = sum_sq_dev / count + bias_sq
        stats.cosine = float(cosines.mean())
    return stats


def ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan
