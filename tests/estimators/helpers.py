"""Shared helpers of the estimator tests: softmax Jacobian, linear and quadratic problems with
exact (enumerated) gradients, per-row estimates in one call, the standard-error check, and the
numerical-safety harness (estimators built from their configs, extreme and masked logits)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from hydra.utils import instantiate
from torch import Tensor

from estimators import Estimator, Marginalization


def jacobian(p: Tensor) -> Tensor:
    """Softmax Jacobian ``diag(p) - p p^T``: ``[..., K]`` -> ``[..., K, K]`` (symmetric)."""
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def linear_cost(w: Tensor) -> Callable[[Tensor], Tensor]:
    """``f(z) = sum_{n,k} z_nk w_nk``: ``[S, B, N, K]`` -> ``[S, B]``; ``grad_z f = w``."""
    return lambda z: (z * w).sum(dim=(-1, -2))


class Recorder:
    """Wraps ``f`` and keeps the (detached) samples it was called with."""

    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        self.f = f
        self.inputs: list[Tensor] = []

    def __call__(self, z: Tensor) -> Tensor:
        self.inputs.append(z.detach())
        return self.f(z)


def logits_gradient(estimator: Estimator, logits: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    """Per-row gradient estimates ``[B, N, K]`` w.r.t. a fresh leaf copy of ``logits``."""
    leaf = logits.detach().clone().requires_grad_()
    output = estimator(leaf, f)
    (grad,) = torch.autograd.grad(output.surrogate.mean(), leaf)
    return grad * leaf.shape[0]


class Quadratic:
    """``f(z) = (sum z * w - t)^2`` per row, with per-row decoder weights ``w [R*B, N, K]``."""

    def __init__(self, batch: int = 2, n: int = 2, k: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(batch, n, k, generator=g, dtype=torch.float64)  # [B, N, K]
        self.w = torch.randn(batch, n, k, generator=g, dtype=torch.float64)  # [B, N, K]
        self.t = torch.randn(batch, generator=g, dtype=torch.float64)  # [B]

    def f_for(self, w: Tensor, t: Tensor) -> Callable[[Tensor], Tensor]:
        return lambda z: ((z * w).sum(dim=(-1, -2)) - t).pow(2)  # [S, R*B]

    def exact(self) -> tuple[Tensor, Tensor]:
        """Exact per-row gradients w.r.t. (logits, w) of ``E_q[f]``, by enumeration."""
        logits = self.logits.clone().requires_grad_()
        w = self.w.clone().requires_grad_()
        out = Marginalization()(logits, self.f_for(w, self.t))
        grad_logits, grad_w = torch.autograd.grad(out.surrogate.sum(), [logits, w])
        return grad_logits, grad_w

    def estimates(self, estimator: Estimator, replicas: int) -> tuple[Tensor, Tensor]:
        """``replicas`` independent estimates per row: ``[R, B, N, K]`` for logits and w."""
        logits = self.logits.repeat(replicas, 1, 1).requires_grad_()  # [R*B, N, K]
        w = self.w.repeat(replicas, 1, 1).requires_grad_()  # [R*B, N, K]
        out = estimator(logits, self.f_for(w, self.t.repeat(replicas)))
        grads = torch.autograd.grad(out.surrogate.sum(), [logits, w])
        return grads[0].unflatten(0, (replicas, -1)), grads[1].unflatten(0, (replicas, -1))

    def assert_unbiased(self, estimator: Estimator, replicas: int) -> None:
        """``replicas`` estimates per row of the (logits, w) gradients: every coordinate's mean
        within 5 SE of the enumerated gradient (:func:`assert_mean_matches`)."""
        exact_logits, exact_w = self.exact()
        grad_logits, grad_w = self.estimates(estimator, replicas)
        assert_mean_matches(grad_logits, exact_logits)
        assert_mean_matches(grad_w, exact_w)

    def gradient_at_sample(self, estimator: Estimator) -> tuple[Tensor, Tensor, Tensor]:
        """One estimate ``[B, N, K]``, the one-hot sample ``[B, N, K]`` f saw, and
        ``grad_z f`` there: ``2 (z.w - t) w``."""
        f = Recorder(self.f_for(self.w, self.t))
        grad = logits_gradient(estimator, self.logits, f)
        z = f.inputs[0][0]  # [B, N, K]
        upstream = 2 * ((z * self.w).sum((-1, -2)) - self.t)[:, None, None] * self.w
        return grad, z, upstream


def assert_mean_matches(samples: Tensor, exact: Tensor, z: float = 5.0) -> None:
    """``|mean - exact| <= z * SE + 1e-9`` per coordinate, ``SE = sd / sqrt(R)``."""
    mean = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    gap = (mean - exact).abs()
    assert torch.all(gap <= z * standard_error + 1e-9), (gap / standard_error).max()


def build(
    compose_config, name: str, overrides: list[str] | None = None, n: int = 2, k: int = 4
) -> Estimator:
    """The estimator of ``conf/estimator/<name>.yaml`` prepared for N = n, K = k."""
    cfg = compose_config([f"estimator={name}", *(overrides or [])])
    estimator = instantiate(cfg.estimator, _convert_="all")
    estimator.prepare(n, k, None)
    return estimator


def check_safe(estimator: Estimator, base: Tensor, autocast: bool = False) -> None:
    """Run ``estimator`` on ``base`` logits (with ``-inf`` masked classes) and a small linear
    decoder: value, surrogate and every gradient finite; masked classes 0 in every input of f and
    0 in the logits' gradient. ``autocast``: bfloat16 logits under CPU autocast."""
    base = base.clone().requires_grad_()
    masked = torch.isinf(base.detach())  # [B, N, K]
    decoder = torch.nn.Linear(base.shape[1] * base.shape[2], 3)

    def f(z: Tensor) -> Tensor:
        assert torch.all(z.detach()[:, masked] == 0)  # never sampled, never relaxed into
        return decoder(z.flatten(-2)).float().pow(2).sum(-1)  # [S, B]

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = base.to(torch.bfloat16) if autocast else base
        output = estimator(logits, f)
        loss = output.surrogate.mean()
    loss.backward()
    assert torch.isfinite(output.value).all() and torch.isfinite(output.surrogate).all()
    assert base.grad is not None and torch.isfinite(base.grad).all()
    assert torch.all(base.grad[masked] == 0)
    for p in [*decoder.parameters(), *estimator.parameters()]:
        assert p.grad is None or torch.isfinite(p.grad).all()


def extreme_logits() -> torch.Tensor:
    """Logits up to +-1e4 with -inf (masked) classes, some variables with one live class."""
    return torch.tensor(
        [
            [[1e4, -1e4, 0.0, -math.inf], [-1e4, -1e4, -1e4, 1e4]],
            [[0.0, 0.0, -math.inf, -math.inf], [3.0, -math.inf, 1e4, 1e4]],
            [[-1e4, 1e4, -math.inf, 1e4], [0.0, 1.0, 2.0, 3.0]],
        ]
    )  # [B=3, N=2, K=4]
