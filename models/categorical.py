"""Closed-form quantities of factorized categorical distributions ``[..., N, K]``."""

from __future__ import annotations

import torch
from torch import Tensor


def categorical_kl(q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """``KL(q || p) = sum_n sum_k q_nk (log q_nk - log p_nk)`` per example.

    ``q_logits [B, N, K]``, ``p_logits`` broadcastable to it (``[N, K]`` for a prior) -> ``[B]``.
    Terms with ``q_nk = 0`` contribute 0 (no ``0 * -inf`` NaN for masked classes).
    """
    log_q = q_logits.log_softmax(dim=-1)  # [B, N, K]
    log_p = p_logits.log_softmax(dim=-1).expand_as(log_q)  # [B, N, K]
    q = log_q.exp()
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))  # [B, N, K]
    return terms.sum(dim=(-1, -2))  # [B]


def categorical_entropy(logits: Tensor) -> Tensor:
    """``H(q) = -sum_n sum_k q log q``: ``[B, N, K]`` -> ``[B]``."""
    log_q = logits.log_softmax(dim=-1)
    q = log_q.exp()
    return -torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(dim=(-1, -2))
