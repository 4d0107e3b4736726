"""The references the training-speed benchmark measures catgrad against, on the same model and
batches: a hand-written PyTorch training loop (:class:`BareLoop`) and the matrix multiplies of
one step alone (:class:`MatmulBound`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from estimators.sampling import one_hot_argmax
from models.networks import mlp


# ------------------------------------------------------------------------------------------------
# The hand-written loop
# ------------------------------------------------------------------------------------------------
class BareLoop:
    """The reference: what a peer writes by hand for the same model, data and estimator."""

    def __init__(self, cfg: DictConfig, train_x: torch.Tensor, device: torch.device) -> None:
        model, temperature = cfg.model, cfg.estimator.temperature
        self.num_variables, self.num_classes = model.num_variables, model.num_classes
        latent = self.num_variables * self.num_classes
        dim = train_x.shape[1]
        torch.manual_seed(cfg.seed)
        self.encoder = mlp(dim, list(model.encoder_hidden), latent).to(device)
        self.decoder = mlp(latent, list(model.decoder_hidden), dim).to(device)
        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=model.optimizer.lr)
        self.x = train_x.to(device)  # [M, D] intensities, on the device once
        self.batch_size = cfg.datamodule.batch_size
        self.tau = lambda t: max(  # Jang et al.'s schedule, t rounded down to the interval
            temperature.tau_min,
            temperature.tau0 * math.exp(-temperature.rate * (t - t % temperature.interval)),
        )
        self.order = torch.randperm(self.x.shape[0], device=device)
        self.position = 0
        self.step_count = 0

    def loss(self, x: torch.Tensor, step: int) -> torch.Tensor:
        batch = x.shape[0]
        logits = self.encoder(x).view(batch, self.num_variables, self.num_classes)  # [B, N, K]
        u = torch.rand_like(logits).clamp(torch.finfo(torch.float32).tiny, 1 - 1e-7)
        scores = logits - torch.log(-torch.log(u))  # logits + Gumbel noise
        soft = torch.softmax(scores / self.tau(step), dim=-1)
        z = one_hot_argmax(scores.detach()) + (soft - soft.detach())  # straight-through
        pixel_logits = self.decoder(z.flatten(1))  # [B, D]
        nll = F.binary_cross_entropy_with_logits(pixel_logits, x, reduction="none").sum(-1)
        log_q = logits.log_softmax(-1)
        kl = (log_q.exp() * (log_q + math.log(self.num_classes))).sum((1, 2))  # to uniform p(z)
        return (nll + kl).mean()

    def next_batch(self) -> torch.Tensor:
        if self.position + self.batch_size > self.x.shape[0]:
            self.order = torch.randperm(self.x.shape[0], device=self.x.device)
            self.position = 0
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return torch.bernoulli(self.x[index])  # dynamic binarization

    def step(self) -> None:
        loss = self.loss(self.next_batch(), self.step_count)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1

    def flops_per_sample(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.loss(self.next_batch(), 0).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() // self.batch_size


# ------------------------------------------------------------------------------------------------
# The matmul bound
# ------------------------------------------------------------------------------------------------
class MatmulBound:
    """Every matrix multiply of one training step, at its shape and memory layout.

    For a linear layer ``y = x W^T + b`` (``x [B, in]``, ``W [out, in]``): forward ``addmm``,
    backward ``grad_W = g^T x`` and, except for the first layer (its input needs no gradient),
    ``grad_x = g W``.
    """

    def __init__(self, networks: list[torch.nn.Sequential], batch: int, device: torch.device):
        self.calls: list[Callable[[], torch.Tensor]] = []
        self.flops = 0
        first = True
        for network in networks:
            for layer in (m for m in network if isinstance(m, torch.nn.Linear)):
                w = layer.weight.detach().clone()  # [out, in]
                b = layer.bias.detach().clone()
                x = torch.randn(batch, w.shape[1], device=device)
                g = torch.randn(batch, w.shape[0], device=device)

                def forward(x: torch.Tensor = x, w: torch.Tensor = w, b: torch.Tensor = b
                            ) -> torch.Tensor:
                    return torch.addmm(b, x, w.t())

                def grad_weight(x: torch.Tensor = x, g: torch.Tensor = g) -> torch.Tensor:
                    return torch.mm(g.t(), x)

                def grad_input(g: torch.Tensor = g, w: torch.Tensor = w) -> torch.Tensor:
                    return torch.mm(g, w)

                self.calls.append(forward)
                self.calls.append(grad_weight)
                count = 2 if first else 3
                if not first:
                    self.calls.append(grad_input)
                self.flops += count * 2 * batch * w.shape[0] * w.shape[1]
                first = False
        self.batch = batch

    def step(self) -> None:
        for call in self.calls:
            call()
