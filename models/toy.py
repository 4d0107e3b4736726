"""The toy problem with a known answer: minimize ``E_{z ~ Cat(softmax theta)}[||z - t||^2]``.

The REBAR/RELAX toy (Tucker et al. 2017; Grathwohl et al. 2018: ``E_{b ~ Bern(sigmoid theta)}
[(b - 0.499)^2]``) generalized to N independent variables of K classes. ``theta [N, K]`` are the
logits (one parameter tensor, no encoder); ``t [N, K]`` is a fixed target; ``f(z) = ||z - t||^2``
summed over variables and classes. For one-hot ``z = e_k`` the cost is ``c_nk = 1 - 2 t_nk +
||t_n||^2``, linear in ``z``, so everything is known in closed form:

* ``E[f] = sum_n sum_k p_nk c_nk`` with ``p = softmax(theta)`` (:meth:`ToyProblem.exact_cost`);
* ``dE/dtheta_nk = p_nk (c_nk - sum_j p_nj c_nj)`` (:meth:`ToyProblem.exact_gradient`).

Relaxed samples are not one-hot (``||y||^2 < 1``), so relaxed estimators see a different,
quadratic function: their bias is visible here. The default target ``t_k = linspace(0.499, 0.501)``
makes the classes nearly indistinguishable (for K = 2 it is the RELAX toy up to a factor 2 and a
relabelling), which is what makes the problem hard for high-variance estimators.

The model follows catgrad's protocol (``objective(batch, estimator)``), so it trains through
``experiments.train`` (``model=toy datamodule=toy``) and is probed like any other model. A batch of
B examples is B independent copies of the problem: the loss averages B gradient samples. The
estimator gets no per-example features (``prepare(N, K, None)``; a learned baseline is a constant).
Logged: ``train/value`` (the estimator's discrete estimate of ``E[f]``), ``train/exact_cost``,
``{val,test}/exact_cost`` and, under the name every catgrad model reports (the checkpoint monitor,
``results.json``), ``{val,test}/neg_elbo`` = the exact cost (there is no ELBO here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from estimators.base import Estimator
from estimators.validation import require_int
from models.base import EstimatorModel, OptimizerFactory


def default_target(num_variables: int, num_classes: int) -> Tensor:
    """``t_nk = 0.499 + 0.002 k / (K - 1)`` for every variable: ``[N, K]``."""
    return torch.linspace(0.499, 0.501, num_classes).expand(num_variables, -1).clone()


class ToyProblem(EstimatorModel):
    """``min_theta E_{z ~ Cat(softmax theta)}[||z - t||^2]``; see the module docstring."""

    target: Tensor  # [N, K] buffer

    def __init__(
        self,
        estimator: Estimator,
        num_variables: int = 1,
        num_classes: int = 10,
        target: Sequence[float] | Sequence[Sequence[float]] | None = None,
        init_logits: float = 0.0,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["estimator", "optimizer"])
        require_int("model.num_variables", num_variables)
        require_int("model.num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"model.num_classes={num_classes} is invalid: use K >= 2")
        self.num_variables = num_variables
        self.num_classes = num_classes
        if target is None:
            t = default_target(num_variables, num_classes)  # [N, K]
        else:
            t = torch.as_tensor(target, dtype=torch.float32)
            if t.shape not in ((num_classes,), (num_variables, num_classes)):
                raise ValueError(
                    f"model.target has shape {list(t.shape)}: give K={num_classes} values or an "
                    f"[N={num_variables}, K={num_classes}] nested list"
                )
            t = t.expand(num_variables, num_classes).clone()  # [N, K]
        self.register_buffer("target", t)
        self.theta = nn.Parameter(torch.full((num_variables, num_classes), float(init_logits)))
        self._attach_estimator_and_optimizer(
            estimator,
            latent_shape=(num_variables, num_classes),
            feature_dim=None,
            optimizer=optimizer,
            default_lr=1e-2,
        )

    # --------------------------------------------------------------------------------------------
    def cost(self, z: Tensor) -> Tensor:
        """``f(z) = ||z - t||^2``: one-hot or relaxed ``z [S, B, N, K]`` -> ``[S, B]``."""
        return (z - self.target.to(z.dtype)).pow(2).sum(dim=(-1, -2))

    def class_costs(self) -> Tensor:
        """``c_nk = f`` restricted to variable n at class k, up to the other variables: ``[N, K]``.

        ``||e_k - t_n||^2 = 1 - 2 t_nk + ||t_n||^2``.
        """
        t = self.target  # [N, K]
        return 1.0 - 2.0 * t + t.pow(2).sum(-1, keepdim=True)  # [N, K]

    def exact_cost(self) -> Tensor:
        """``E_q[f]`` in closed form (a scalar)."""
        p = self.theta.softmax(-1)  # [N, K]
        return (p * self.class_costs().to(p.dtype)).sum()  # differentiable in theta

    def exact_gradient(self) -> Tensor:
        """``d E_q[f] / d theta``: ``p_nk (c_nk - sum_j p_nj c_nj)``, ``[N, K]`` (no autograd)."""
        with torch.no_grad():
            p = self.theta.softmax(-1)  # [N, K]
            c = self.class_costs().to(p.dtype)  # [N, K]
            return p * (c - (p * c).sum(-1, keepdim=True))

    # --------------------------------------------------------------------------------------------
    def objective(
        self, batch: tuple[Tensor, Tensor], estimator: Estimator
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Loss whose gradient is ``estimator``'s estimate of ``d E_q[f] / d theta`` averaged over
        the batch's B independent copies; metrics ``value`` and ``exact_cost``."""
        x, _ = batch  # [B, ...], only its size is used
        logits = self.theta.unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, N, K]
        output = estimator(logits, self.cost, features=None)
        metrics: dict[str, Tensor | float] = {
            "value": output.value.mean(),
            "exact_cost": self.exact_cost().detach(),
            **output.metrics,
        }
        return output.surrogate.mean(), metrics

    def _evaluate(self, split: str, batch: tuple[Tensor, Tensor]) -> None:
        exact = self.exact_cost().detach()
        size = batch[0].shape[0]
        self.log(f"{split}/exact_cost", exact, batch_size=size)
        self.log(f"{split}/neg_elbo", exact, batch_size=size, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

