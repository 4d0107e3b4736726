"""ARSM: augment-REINFORCE-swap-merge (Yin, Yue & Zhou 2019, "ARSM: Augment-REINFORCE-Swap-Merge
Estimator for Gradient Backpropagation Through Categorical Variables", ICML).

Augment: a categorical sample is ``z = argmin_k (log pi_k - phi_k)`` with ``pi ~ Dirichlet(1_K)``
(``-log pi`` is Gumbel up to a shared shift, so z ~ Cat(softmax(phi))). Swap: for classes
``m != j``, the pseudo action ``z^{m<->j}`` is that argmin after swapping ``pi_m`` and ``pi_j``
(``z^{m<->m} = z``). Merge (ARSM, averaging the swap estimator over the reference class):
with ``F[m, j] = f(z^{m<->j})`` (symmetric) and ``F_bar[m] = (1/K) sum_j F[m, j]``,

    grad_{phi_c} E[f(z)] = E_pi[ sum_m (F[m, c] - F_bar[m]) (1/K - pi_m) ],

unbiased, the merged estimator of their Section 2 (the authors' code computes
``(F - mean(F)) @ (1/K - pi)``). For N variables (their Section 3, as in their VAE code) every
variable has its own ``pi_n`` and a swap ``m <-> j`` is applied to all variables at once, so
``F[m, j] = f(z^{m<->j})`` is one joint configuration and
``grad_{phi_{n,c}} = sum_m (F[m, c] - F_bar[m]) (1/K - pi_{n,m})``.

Cost: f at z and at every *distinct* pseudo action. Most swaps leave z unchanged (a swap can only
move an argmin it touches or beats), so f is evaluated only at ``z`` and at the swaps ``m < j``
that change it, at most ``K(K-1)/2 + 1`` per sample (all of them for N = 20, K = 10; about N K
for large K); ``metrics["f_evaluations"]`` reports the mean number per example. The count depends
on the data, so one host synchronisation per step reads it (not ``torch.compile``-friendly).

The decoder gets ``grad f(z)``; the encoder gradient is injected through ``logits`` with a
zero-valued carrier. Masked classes (logit ``-inf``) never win an argmin and their gradient is set
to 0 (their true value; the estimate is unbiased elsewhere).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from estimators.base import Estimator, EstimatorOutput, Objective
from estimators.sampling import sampling_dtype
from estimators.straight_through import gradient_only


def dirichlet_log_pi(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``log pi`` for ``pi ~ Dirichlet(1_K)`` over the last axis, via normalised Exp(1) draws.

    Kept strictly finite: the uniform behind each Exp(1) is clamped inside (0, 1).
    """
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(shape, device=device, dtype=torch.float32).clamp(tiny, 1 - 1e-7)  # [..., K]
    log_e = torch.log(-torch.log(u)).to(dtype)  # [..., K], log Exp(1)
    return log_e - torch.logsumexp(log_e, dim=-1, keepdim=True)  # [..., K]


def pseudo_actions(log_pi: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """The sample ``z [...]`` and all swap pseudo actions ``[..., K (m), K (j)]`` (class indices).

    ``log_pi [..., K]``, ``phi [..., K]`` (``-inf`` for masked classes). The race is
    ``r = log pi - phi``; after swapping m and j only ``r_m = log pi_j - phi_m`` and
    ``r_j = log pi_m - phi_j`` change, so the argmin is the smallest of those two and of the
    smallest race outside {m, j} (one of the three smallest races).
    """
    num_classes = phi.shape[-1]
    race = log_pi - phi  # [..., K], +inf for masked classes
    z = race.argmin(dim=-1)  # [...]
    swapped = log_pi.unsqueeze(-2) - phi.unsqueeze(-1)  # [..., K, K]: [m, j] = log pi_j - phi_m
    at_m, at_j = swapped, swapped.transpose(-1, -2)  # [..., K, K], new races of m and of j
    kept = min(3, num_classes)
    low, low_index = race.topk(kept, dim=-1, largest=False)  # [..., 3]
    classes = torch.arange(num_classes, device=phi.device)  # [K]
    m_index = classes.view(-1, 1).expand(num_classes, num_classes)  # [K, K]
    j_index = classes.view(1, -1).expand(num_classes, num_classes)  # [K, K]
    other = torch.full_like(swapped, math.inf)  # [..., K, K], smallest race outside {m, j}
    other_index = torch.zeros_like(swapped, dtype=torch.long)  # [..., K, K]
    for rank in reversed(range(kept)):  # the smallest candidate not in {m, j} wins
        candidate = low_index[..., rank, None, None]  # [..., 1, 1]
        outside = (candidate != m_index) & (candidate != j_index)  # [..., K, K]
        other = torch.where(outside, low[..., rank, None, None], other)
        other_index = torch.where(outside, candidate, other_index)
    best = torch.where(at_m <= at_j, m_index, j_index)  # [..., K, K]
    best_race = torch.minimum(at_m, at_j)  # [..., K, K]
    swap = torch.where(best_race < other, best, other_index)  # [..., K, K]
    eye = torch.eye(num_classes, dtype=torch.bool, device=phi.device)
    return z, torch.where(eye, z[..., None, None], swap)  # [...], [..., K, K]


class ARSM(Estimator):
    """ARSM (Yin et al. 2019) with ``num_samples`` (S) independent Dirichlet draws per example."""

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        batch, num_variables, num_classes = logits.shape
        samples = self.num_samples
        dtype = sampling_dtype(logits)
        phi = logits.detach().to(dtype)  # [B, N, K]
        log_pi = dirichlet_log_pi((samples, *phi.shape), logits.device, dtype)  # [S, B, N, K]
        with torch.no_grad():
            z, swaps = pseudo_actions(log_pi, phi.unsqueeze(0))  # [S, B, N], [S, B, N, K, K]
            upper = torch.ones(num_classes, num_classes, dtype=torch.bool, device=phi.device)
            upper = upper.triu(diagonal=1)  # [K, K], pairs m < j
            changed = (swaps != z[..., None, None]).any(dim=2) & upper  # [S, B, K, K]
            # Pack the changed pseudo actions of each example into columns of f's sample axis.
            per_example = changed.permute(1, 0, 2, 3).reshape(batch, -1)  # [B, S*K*K]
            count = int(per_example.sum(1).max().item()) if per_example.numel() else 0
            slot = per_example.long().cumsum(1) - 1  # [B, S*K*K], position among the changed
            slot = torch.where(per_example, slot, torch.full_like(slot, count))  # spill slot
            actions = swaps.permute(1, 0, 3, 4, 2).reshape(batch, -1, num_variables)
            packed = z[0].unsqueeze(1).expand(batch, count + 1, num_variables).clone()
            packed.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, num_variables), actions)
            configs = torch.cat([z, packed[:, :count].transpose(0, 1)], dim=0)  # [S+U, B, N]
            one_hot = torch.zeros((*configs.shape, num_classes), dtype=dtype, device=phi.device)
            one_hot.scatter_(-1, configs.unsqueeze(-1), 1.0)  # [S+U, B, N, K]
        cost = f(one_hot)  # [S+U, B]; the first S are f(z) and carry the decoder's gradient
        with torch.no_grad():
            base = cost[:samples].detach().to(dtype)  # [S, B]
            extra = cost[samples:].detach().to(dtype).transpose(0, 1)  # [B, U]
            extra = torch.cat([extra, torch.zeros_like(extra[:, :1])], dim=1)  # [B, U + 1]
            looked_up = extra.gather(1, slot).view(batch, samples, num_classes, num_classes)
            table = torch.where(
                changed.permute(1, 0, 2, 3), looked_up, base.t()[..., None, None]
            )  # [B, S, K, K], upper triangle filled
            table = torch.where(upper, table, table.transpose(-1, -2))  # symmetric
            diagonal = torch.eye(num_classes, dtype=torch.bool, device=phi.device)
            table = torch.where(diagonal, base.t()[..., None, None], table)  # F[m, m] = f(z)
            centred = table - table.mean(dim=-1, keepdim=True)  # [B, S, K (m), K (c)]
            weights = 1.0 / num_classes - log_pi.exp().permute(1, 0, 2, 3)  # [B, S, N, K (m)]
            grad = torch.einsum("bsnm,bsmc->bnc", weights, centred) / samples  # [B, N, K]
            grad = torch.where(torch.isfinite(phi), grad, torch.zeros_like(grad))  # masked: 0
        encoder = (gradient_only(logits.to(dtype)) * grad).sum(dim=(-1, -2))  # [B], value 0
        surrogate = cost[:samples].mean(0) + encoder.to(cost.dtype)  # [B]
        return EstimatorOutput(
            surrogate=surrogate,
            value=cost[:samples].detach().mean(0),
            metrics={"f_evaluations": float(samples) + float(per_example.sum()) / batch},
        )
