"""Closed-form quantities of factorized categorical distributions ``[..., N, K]``.

Classes with logit ``-inf`` (masked) have probability 0 and contribute 0. The log-probabilities
are replaced by 0 there *before* multiplying, because ``torch.where`` alone would still send
``0 * -inf = NaN`` into the backward pass of the unselected branch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _safe_log_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, log q)`` with ``log q`` set to 0 where ``q = 0``."""
    log_q = logits.log_softmax(dim=-1)
    possible = torch.isfinite(log_q)
    return log_q.exp(), torch.where(possible, log_q, torch.zeros_like(log_q))


def categorical_kl(q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """``KL(q || p) = sum_n sum_k q_nk (log q_nk - log p_nk)`` per example.

    ``q_logits [B, N, K]``, ``p_logits`` broadcastable to it (``[N, K]`` for a prior) -> ``[B]``.
    Classes impossible under q contribute 0; p must give positive mass wherever q does.
    """
    q, log_q = _safe_log_softmax(q_logits)  # [B, N, K]
    log_p = p_logits.log_softmax(dim=-1).expand_as(log_q)  # [B, N, K]
    log_p = torch.where(q > 0, log_p, torch.zeros_like(log_p))
    return (q * (log_q - log_p)).sum(dim=(-1, -2))  # [B]


def categorical_entropy(logits: Tensor) -> Tensor:
    """``H(q) = -sum_n sum_k q log q``: ``[B, N, K]`` -> ``[B]``."""
    q, log_q = _safe_log_softmax(logits)
    return -(q * log_q).sum(dim=(-1, -2))
