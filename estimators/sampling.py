"""Sampling primitives shared by estimators and models: safe Gumbel noise, Gumbel-max categorical
samples, and enumeration of all one-hot configurations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gumbel_noise(shape: torch.Size | tuple[int, ...], device: torch.device) -> Tensor:
    """Standard Gumbel(0, 1) noise ``g = -log(-log u)`` in float32.

    ``u`` is kept strictly inside (0, 1): ``torch.rand`` can return exactly 0, and float rounding
    can push ``1 - eps`` to 1; either gives an infinite ``g``. float32 is used even under autocast
    because float16/bfloat16 uniforms are too coarse near 0 and 1.
    """
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(shape, device=device, dtype=torch.float32)
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(torch.float32).eps)
    return -torch.log(-torch.log(u))


def perturbed_logits(logits: Tensor, num_samples: int) -> Tensor:
    """``logits + g`` for ``num_samples`` independent Gumbel draws.

    ``[B, N, K]`` -> ``[S, B, N, K]``.

    Computed in float32 at least (float64 logits stay float64; see :func:`gumbel_noise`).
    """
    dtype = sampling_dtype(logits)
    shape = (num_samples, *logits.shape)
    noise = gumbel_noise(shape, logits.device).to(dtype)
    return logits.to(dtype).unsqueeze(0) + noise  # [S, B, N, K]


def sampling_dtype(logits: Tensor) -> torch.dtype:
    """float32, or float64 for float64 logits: never a half-precision type (autocast-safe)."""
    return torch.promote_types(logits.dtype, torch.float32)


def one_hot_argmax(scores: Tensor) -> Tensor:
    """One-hot of the argmax over the last axis, same shape and dtype as ``scores``.

    Built with ``scatter`` rather than ``F.one_hot``: on CPU ``F.one_hot`` validates its indices
    with a data-dependent ``.item()``, which ``torch.func.vmap`` (the batched gradient probe)
    cannot batch.
    """
    index = scores.argmax(dim=-1, keepdim=True)  # [..., 1]
    return torch.zeros_like(scores).scatter(-1, index, 1.0)  # [..., K]


def sample_one_hot(logits: Tensor, num_samples: int) -> Tensor:
    """Exact samples of Cat(softmax(logits)) by the Gumbel-max trick, without gradient.

    ``logits [B, N, K]`` -> one-hot ``[S, B, N, K]`` (see :func:`sampling_dtype`). Classes with
    logit ``-inf`` are never drawn.
    """
    with torch.no_grad():
        return one_hot_argmax(perturbed_logits(logits.detach(), num_samples))


def enumerate_one_hot(
    num_variables: int,
    num_classes: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """All ``K^N`` one-hot configurations of N variables with K classes: ``[K^N, N, K]``.

    Row ``c`` encodes ``c`` in base K, most significant variable first.
    """
    count = num_classes**num_variables
    codes = torch.arange(count, device=device)  # [C]
    powers = num_classes ** torch.arange(num_variables - 1, -1, -1, device=device)  # [N]
    digits = (codes.unsqueeze(1) // powers) % num_classes  # [C, N]
    return F.one_hot(digits, num_classes).to(dtype)  # [C, N, K]


def check_enumeration_budget(num_variables: int, num_classes: int, budget: int) -> int:
    """Return ``K^N`` or raise a one-line ``ValueError`` when it exceeds ``budget``."""
    count = num_classes**num_variables
    if count > budget:
        raise ValueError(
            f"exact enumeration needs K^N = {num_classes}^{num_variables} = {count:.3g} "
            f"configurations (K={num_classes}, N={num_variables}) but the budget is {budget}: "
            f"choose a smaller latent shape, raise max_configurations, or use a sampling estimator"
        )
    return count
