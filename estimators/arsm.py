"""ARSM: augment-REINFORCE-swap-merge (Yin, Yue & Zhou 2019, "ARSM: Augment-REINFORCE-Swap-Merge
Estimator for Gradient Backpropagation Through Categorical Variables", ICML).

Augment: a categorical sample is ``z = argmin_k (log pi_k - phi_k)`` with ``pi ~ Dirichlet(1_K)``
(``-log pi`` is Gumbel up to a shared shift, so z ~ Cat(softmax(phi))). Swap: for classes
``m != j``, the pseudo action ``z^{m<->j}`` is that argmin after swapping ``pi_m`` and ``pi_j``
(``z^{m<->m} = z``). Merge (ARSM, averaging the swap estimator over the reference class):
with ``F[m, j] = f(z^{m<->j})`` (symmetric) and ``F_bar[m] = (1/K) sum_j F[m, j]``,

    grad_{phi_c} E[f(z)] = E_pi[ sum_m (F[m, c] - F_bar[m]) (1/K - pi_m) ],

unbiased: the paper's merged (ARSM) estimator, which the authors' code computes as
``(F - mean(F)) @ (1/K - pi)``. For N variables (the paper's multivariate case, as in the authors'
VAE code) every variable has its own ``pi_n`` and a swap ``m <-> j`` is applied to all variables
at once, so
``F[m, j] = f(z^{m<->j})`` is one joint configuration and
``grad_{phi_{n,c}} = sum_m (F[m, c] - F_bar[m]) (1/K - pi_{n,m})``.

Cost: f at z and at every *distinct* pseudo action. Most swaps leave z unchanged (a swap can only
move an argmin it touches or beats), so f is evaluated at ``z`` (with gradient, for the decoder)
and, in a second call without gradient, only at the swaps ``m < j`` that change it: at most
``K(K-1)/2`` per sample (all of them for N = 20, K = 10; about N K for large K);
``metrics["f_evaluations"]`` reports the mean number per example. Which swaps change z is decided
from O(K^2) race comparisons per variable, and their pseudo actions from the three smallest races
(the authors' "fast version" uses a similar shortcut). The count depends on the data, so one host
synchronisation per step reads it (not ``torch.compile``-friendly).

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


class Races:
    """The race ``r = log pi - phi`` of ``[..., K]`` variables and what the swaps need from it.

    ``z`` the argmin ``[...]``, ``low``/``low_index`` the three smallest races and their classes
    ``[..., 3]`` (``+inf`` padding for K < 3) and ``partner [..., K]``: the pseudo action of the
    swap ``z <-> p`` for every p (``z`` itself at ``p = z``).
    """

    def __init__(self, log_pi: Tensor, phi: Tensor) -> None:
        self.log_pi, self.phi = log_pi, phi  # [..., K] each (phi broadcastable)
        race = log_pi - phi  # [..., K], +inf for masked classes
        kept = min(3, race.shape[-1])
        low, low_index = race.topk(kept, dim=-1, largest=False)  # [..., kept]
        if kept < 3:  # pad: no third (or second) class outside a pair
            pad = 3 - kept
            low = torch.cat([low, low.new_full((*low.shape[:-1], pad), math.inf)], dim=-1)
            low_index = torch.cat([low_index, low_index[..., :1].expand(*low.shape[:-1], pad)], -1)
        self.low, self.low_index = low, low_index  # [..., 3] each
        self.z = low_index[..., 0]  # [...]
        # Swap z <-> p: z's race becomes log pi_p - phi_z, p's becomes log pi_z - phi_p, and the
        # smallest race outside {z, p} is the second smallest, or the third when p is second.
        phi = phi.expand_as(log_pi)
        at_z = log_pi - phi.gather(-1, self.z.unsqueeze(-1))  # [..., K]
        at_p = log_pi.gather(-1, self.z.unsqueeze(-1)) - phi  # [..., K]
        classes = torch.arange(race.shape[-1], device=race.device)  # [K]
        second = classes == low_index[..., 1:2]  # [..., K], p is the second smallest
        other = torch.where(second, low[..., 2:3], low[..., 1:2])  # [..., K]
        other_index = torch.where(second, low_index[..., 2:3], low_index[..., 1:2])  # [..., K]
        best = torch.where(at_z <= at_p, self.z.unsqueeze(-1), classes)  # [..., K]
        partner = torch.where(torch.minimum(at_z, at_p) < other, best, other_index)  # [..., K]
        self.partner = torch.where(classes == self.z.unsqueeze(-1), self.z.unsqueeze(-1), partner)

    def changes(self) -> Tensor:
        """``[..., K (m), K (j)]``: whether the swap ``m <-> j`` moves the argmin.

        A swap that does not touch z moves it iff one of its two new races beats the minimum;
        one that does (row and column z) iff ``partner`` differs from z. O(K^2) comparisons, no
        pseudo action is built.
        """
        swapped = self.log_pi.unsqueeze(-2) - self.phi.unsqueeze(-1)  # [..., K, K]: [m, j]
        moves = torch.minimum(swapped, swapped.transpose(-1, -2)) < self.low[..., :1, None]
        classes = torch.arange(self.log_pi.shape[-1], device=self.log_pi.device)  # [K]
        is_z = classes == self.z.unsqueeze(-1)  # [..., K]
        partner_moves = self.partner != self.z.unsqueeze(-1)  # [..., K]
        row, col = is_z.unsqueeze(-1), is_z.unsqueeze(-2)  # [..., K, 1], [..., 1, K]
        touched = (row & partner_moves.unsqueeze(-2)) | (col & partner_moves.unsqueeze(-1))
        return torch.where(row | col, touched, moves)  # [..., K, K]


def pair_actions(races: Races, sample: Tensor, example: Tensor, m: Tensor, j: Tensor) -> Tensor:
    """Pseudo actions of the swaps ``m <-> j`` of sample ``sample`` of example ``example``.

    ``races`` of ``[S, B, N, K]`` variables; ``sample, example, m, j [P]`` -> ``[P, N]``: every
    variable's argmin after swapping ``pi_m`` and ``pi_j`` in all variables at once.
    """
    num_variables = races.log_pi.shape[-2]
    variable = torch.arange(num_variables, device=m.device).unsqueeze(0)  # [1, N]
    at = (sample.unsqueeze(1), example.unsqueeze(1), variable)  # index [P, N]
    log_pi, phi = races.log_pi, races.phi.expand_as(races.log_pi)  # [S, B, N, K]
    z = races.z[at]  # [P, N]
    m, j = m.unsqueeze(1).expand_as(z), j.unsqueeze(1).expand_as(z)  # [P, N] each
    at_m = log_pi[(*at, j)] - phi[(*at, m)]  # [P, N], m's new race
    at_j = log_pi[(*at, m)] - phi[(*at, j)]  # [P, N], j's new race
    best = torch.where(at_m <= at_j, m, j)  # [P, N]
    untouched = torch.where(torch.minimum(at_m, at_j) < races.low[(*at, 0)], best, z)
    touched = races.partner[(*at, torch.where(m == z, j, m))]  # [P, N]
    action = torch.where((m == z) | (j == z), touched, untouched)  # [P, N]
    return torch.where(m == j, z, action)  # [P, N]


def one_hot(classes: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[...]`` class indices -> ``[..., K]`` one-hot of ``dtype``."""
    out = torch.zeros((*classes.shape, num_classes), dtype=dtype, device=classes.device)
    return out.scatter_(-1, classes.unsqueeze(-1), 1.0)


class ARSM(Estimator):
    """ARSM (Yin et al. 2019) with ``num_samples`` (S) independent Dirichlet draws per example."""

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        batch, num_variables, num_classes = logits.shape
        samples, device = self.num_samples, logits.device
        dtype = sampling_dtype(logits)
        phi = logits.detach().to(dtype)  # [B, N, K]
        log_pi = dirichlet_log_pi((samples, *phi.shape), device, dtype)  # [S, B, N, K]
        with torch.no_grad():
            races = Races(log_pi, phi.unsqueeze(0))
            upper = torch.ones(num_classes, num_classes, dtype=torch.bool, device=device)
            upper = upper.triu(diagonal=1)  # [K, K], pairs m < j
            changed = races.changes().any(dim=2) & upper  # [S, B, K, K]
            # The swaps that change z, listed per example: (example, sample, m, j).
            example, cell = changed.permute(1, 0, 2, 3).reshape(batch, -1).nonzero(as_tuple=True)
            counts = torch.bincount(example, minlength=batch)  # [B]
            count = int(counts.max().item()) if example.numel() else 0  # host sync: U
            slot = torch.arange(example.numel(), device=device) - (counts.cumsum(0) - counts)[
                example
            ]  # [P], position of the swap among its example's
            sample = cell // num_classes**2
            m, j = (cell // num_classes) % num_classes, cell % num_classes  # [P] each
            actions = pair_actions(races, sample, example, m, j)  # [P, N]
            packed = races.z[0].unsqueeze(0).repeat(count, 1, 1)  # [U, B, N], padding: a sample
            packed[slot, example] = actions
        cost = f(one_hot(races.z, num_classes, dtype))  # [S, B], carries the decoder's gradient
        with torch.no_grad():
            base = cost.detach().to(dtype).t()  # [B, S]
            table = base[..., None, None].repeat(1, 1, num_classes, num_classes)  # [B, S, K, K]
            if count:
                extra = f(one_hot(packed, num_classes, dtype)).to(dtype)  # [U, B]
                table[example, sample, m, j] = extra[slot, example]
            table = torch.where(upper, table, table.transpose(-1, -2))  # F symmetric, F[m, m]
            centred = table - table.mean(dim=-1, keepdim=True)  # [B, S, K (m), K (c)]
            weights = 1.0 / num_classes - log_pi.exp().permute(1, 0, 2, 3)  # [B, S, N, K (m)]
            grad = torch.einsum("bsnm,bsmc->bnc", weights, centred) / samples  # [B, N, K]
            grad = torch.where(torch.isfinite(phi), grad, torch.zeros_like(grad))  # masked: 0
        encoder = (gradient_only(logits.to(dtype)) * grad).sum(dim=(-1, -2))  # [B], value 0
        surrogate = cost.mean(0) + encoder.to(cost.dtype)  # [B]
        return EstimatorOutput(
            surrogate=surrogate,
            value=cost.detach().mean(0),
            metrics={"f_evaluations": float(samples) + example.numel() / batch},
        )
