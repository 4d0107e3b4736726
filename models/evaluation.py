"""Estimator-independent evaluation of models with categorical latents.

These are the fair metrics every run reports, whatever estimator trained it:

* :func:`expected_cost` -- ``E_q[f(z)]`` with *discrete* samples: exact by enumeration when
  ``K^N`` is within the budget, otherwise a Monte Carlo mean over hard samples. Adding the
  analytic KL gives the discrete negative ELBO.
* :func:`importance_weighted_bound` -- Burda, Grosse & Salakhutdinov (2016), Eq. (8):
  ``log p(x) >= E[log (1/M) sum_m p(x, z_m) / q(z_m|x)]``, computed over chunks of samples with a
  streaming log-sum-exp so memory is bounded by ``chunk_size`` samples at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from estimators.base import log_probs_of
from estimators.sampling import enumerate_one_hot, sample_one_hot, sampling_dtype

MAX_CHUNK_ROWS = 10_000
"""At most this many (sample, example) rows go through ``f`` at once: a chunk of 100 samples of
a 500-image batch made 50,000 rows, ~0.5 GB of decoder temporaries for MNIST (the peak of a
training process); 10,000 rows keep the matrix multiplies as large as they need to be."""


def rows_per_chunk(chunk_size: int, batch: int) -> int:
    """Samples per chunk: ``chunk_size``, fewer when ``chunk_size * batch`` exceeds
    :data:`MAX_CHUNK_ROWS` (never below one)."""
    return max(1, min(chunk_size, MAX_CHUNK_ROWS // max(batch, 1)))


@torch.no_grad()
def expected_cost(
    logits: Tensor,
    f: Callable[[Tensor], Tensor],
    num_samples: int,
    max_configurations: int,
    chunk_size: int = 100,
) -> Tensor:
    """``E_{z~q}[f(z)]`` per example ``[B]``; exact if ``K^N <= max_configurations``."""
    batch, num_variables, num_classes = logits.shape
    chunk_size = rows_per_chunk(chunk_size, batch)
    dtype = sampling_dtype(logits)
    log_probs = logits.to(dtype).log_softmax(dim=-1)  # [B, N, K]
    if num_classes**num_variables <= max_configurations:
        configs = enumerate_one_hot(num_variables, num_classes, logits.device, dtype)  # [C, N, K]
        total = torch.zeros(batch, device=logits.device, dtype=dtype)
        for start in range(0, configs.shape[0], chunk_size):
            chunk = configs[start : start + chunk_size]
            chunk = chunk.unsqueeze(1).expand(-1, batch, -1, -1)  # [c, B, N, K]
            weights = log_probs_of(log_probs, chunk).exp()  # [c, B]
            total = total + (weights * f(chunk).to(dtype)).sum(0)  # [B]
        return total
    total = torch.zeros(batch, device=logits.device, dtype=dtype)
    for start in range(0, num_samples, chunk_size):
        count = min(chunk_size, num_samples - start)
        total = total + f(sample_one_hot(logits, count)).to(dtype).sum(0)  # [B]
    return total / num_samples


@torch.no_grad()
def importance_weighted_bound(
    logits: Tensor,
    log_joint: Callable[[Tensor], Tensor],
    num_samples: int,
    chunk_size: int = 100,
) -> Tensor:
    """Lower bound on ``log p(x)`` per example ``[B]`` with ``num_samples`` samples from q.

    ``log_joint`` maps one-hot ``z [S, B, N, K]`` to ``log p(x, z) [S, B]``.
    """
    chunk_size = rows_per_chunk(chunk_size, logits.shape[0])
    dtype = sampling_dtype(logits)
    log_probs = logits.to(dtype).log_softmax(dim=-1)  # [B, N, K]
    running = torch.full((logits.shape[0],), -math.inf, device=logits.device, dtype=dtype)  # [B]
    for start in range(0, num_samples, chunk_size):
        count = min(chunk_size, num_samples - start)
        z = sample_one_hot(logits, count)  # [c, B, N, K]
        log_weights = log_joint(z).to(dtype) - log_probs_of(log_probs, z)  # [c, B]
        running = torch.logaddexp(running, torch.logsumexp(log_weights, dim=0))
    return running - math.log(num_samples)
