"""IndeCateR: the CatLog-derivative trick for independent categorical variables (De Smet, Sansone &
Zuidberg Dos Martires 2023, "Differentiable Sampling of Categorical Distributions Using the
CatLog-Derivative Trick", NeurIPS).

For ``q(z) = prod_n q_n(z_n)`` the CatLog-derivative trick (specialised to independent
variables) Rao-Blackwellizes the score function one variable at a time:

    grad E_q[f(z)] = sum_n E_{z_{-n}} [ sum_{k=1}^K grad q_n(k) f(z_{-n}, z_n = k) ]

and IndeCateR (the paper's "Independent Categorical REINFORCE" estimator) estimates the outer
expectation with S samples
``z^s ~ q``:

    g = (1/S) sum_s sum_n sum_k grad q_n(k) f(z^s_{-n}, z_n = k).

It is unbiased; with ``N = 1`` the inner sum is the exact gradient, whatever the sample. The price
is ``S * N * K`` evaluations of f per step (every sample with each variable set to each class),
reported as ``metrics["f_evaluations"]``.

The same evaluations give a Rao-Blackwellized ``value``: for every n, ``sum_k q_n(k)
f(z^s_{-n}, k)`` is an unbiased estimate of ``E_q[f]`` from one-hot configurations; ``value`` is
their mean over n and s (exact for N = 1), and the decoder gets the gradient of that mean (weights
detached), also unbiased. Classes with probability zero (logit ``-inf``) are never passed to f:
their configuration is replaced by the sample itself, with weight ``q_n(k) = 0`` and no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import Estimator, EstimatorOutput, Objective
from estimators.sampling import sample_one_hot, sampling_dtype


def single_variable_changes(hard: Tensor, possible: Tensor) -> Tensor:
    """Every sample with one variable set to one class.

    ``hard [S, B, N, K]`` one-hot, ``possible [B, N, K]`` (classes that may be visited) ->
    ``[S, N, K, B, N, K]``: entry ``[s, n, k]`` is ``hard[s]`` with variable n set to class k (left
    as sampled where class k of variable n is not possible).
    """
    num_samples, batch, num_variables, num_classes = hard.shape
    eye_k = torch.eye(num_classes, dtype=hard.dtype, device=hard.device)  # [K, K]
    own = hard.permute(0, 2, 1, 3).unsqueeze(2)  # [S, N, 1, B, K]
    allowed = possible.permute(1, 2, 0).unsqueeze(0).unsqueeze(-1)  # [1, N, K, B, 1]
    replaced = torch.where(allowed, eye_k.view(1, 1, num_classes, 1, num_classes), own)
    # replaced: [S, N, K, B, K], the new one-hot of variable n
    which = torch.eye(num_variables, dtype=torch.bool, device=hard.device)  # [N, N]
    which = which.view(1, num_variables, 1, 1, num_variables, 1)  # [1, N, 1, 1, N, 1]
    return torch.where(
        which, replaced.unsqueeze(4), hard.view(num_samples, 1, 1, batch, num_variables, -1)
    )  # [S, N, K, B, N, K]


class IndeCateR(Estimator):
    """IndeCateR (De Smet et al. 2023) with ``num_samples`` (S) samples; ``S * N * K``
    calls of f per example."""

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        batch, num_variables, num_classes = logits.shape
        probs = torch.softmax(logits.to(sampling_dtype(logits)), dim=-1)  # [B, N, K]
        hard = sample_one_hot(logits, self.num_samples)  # [S, B, N, K], no gradient
        possible = probs.detach() > 0  # [B, N, K]
        configs = single_variable_changes(hard, possible)  # [S, N, K, B, N, K]
        count = self.num_samples * num_variables * num_classes
        cost = f(configs.reshape(count, batch, num_variables, num_classes))  # [S*N*K, B]
        cost = cost.view(self.num_samples, num_variables, num_classes, batch).permute(0, 3, 1, 2)
        cost = cost.to(probs.dtype)  # [S, B, N, K]: f(z^s with z_n = k)
        weights = probs.detach().unsqueeze(0)  # [1, B, N, K]
        # Encoder: sum_{n,k} grad q_n(k) f(z_{-n}, k), averaged over samples.
        encoder = (probs * cost.detach().mean(0)).sum(dim=(-1, -2))  # [B]
        # Decoder and value: mean over n and s of sum_k q_n(k) f(z_{-n}, k).
        rao_blackwellized = (weights * cost).sum(-1).mean(dim=(0, -1))  # [B]
        return EstimatorOutput(
            surrogate=encoder + rao_blackwellized,
            value=rao_blackwellized.detach(),
            metrics={"f_evaluations": float(count)},
        )
