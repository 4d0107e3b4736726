"""RELAX (Grathwohl, Choi, Wu, Roeder & Duvenaud 2018, "Backpropagation through the Void", ICLR) for
categorical variables, with REBAR (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein 2017) as its
special case without a learned network (``conf/estimator/rebar.yaml``).

Notation, per categorical variable with logits ``theta`` and ``log p = log_softmax(theta)``:
``z = log p + G`` (Gumbel perturbation), ``b = H(z)`` (one-hot argmax, an exact sample of q),
``z_tilde ~ p(z | b)`` reparameterized by top-down conditional Gumbel sampling
(:func:`estimators.gumbel_rao.conditional_gumbel`). Grathwohl et al. Eq. (8) / Algorithm 2:

    g_hat = [f(b) - c(z_tilde)] * dlog q(b)/dtheta + dc(z)/dtheta - dc(z_tilde)/dtheta

is unbiased for ``d E_q[f(b)] / dtheta`` for any differentiable control variate ``c``, because
``z`` and ``z_tilde`` have the same distribution. Here (Grathwohl et al., Section 3.3; Tucker et
al., Eq. 5 for REBAR)

    c(z) = eta * f(softmax(z / lambda)) + r_rho(softmax(z / lambda))

with learnable ``eta``, ``log lambda`` and, for RELAX, a small MLP ``r_rho`` on the flattened
relaxed sample (bounded input, so huge logits cannot blow it up; its last layer starts at zero).
REBAR is ``r_rho = 0``. ``dlog q(b)/dtheta = b - softmax(theta)``.

Gradients, all through the single ``surrogate`` of the contract:

* encoder: ``g_hat`` is computed inside the estimator with ``torch.autograd.grad(...,
  create_graph=True)`` w.r.t. ``logits`` and injected as ``(gradient_only(logits) * g_hat.detach())
  .sum()`` (value exactly 0, gradient ``g_hat`` through ``logits``);
* decoder (parameters of f): ``f(b)`` enters the surrogate as is, so they get ``d f(b)``; the
  control variate never reaches them;
* control variate ``phi = (eta, log lambda, rho)``: trained to minimize the variance of ``g_hat``
  (Grathwohl et al., Eq. 6): since ``E[g_hat]`` does not depend on ``phi``,
  ``dVar/dphi = dE||g_hat||^2/dphi``. That gradient ``g_phi = d mean_B ||g_hat||^2 / dphi`` is
  computed with a second ``torch.autograd.grad`` and injected as
  ``sum_phi (phi * g_phi.detach()).sum() - (phi * g_phi).sum().detach()`` (value 0), which leaves
  the encoder's and decoder's gradients untouched. It is skipped inside ``frozen()`` and in eval
  mode (probes then measure the estimator without paying for a double backward).

When ``logits`` does not require grad or grad is disabled (evaluation), only ``f(b)`` is computed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from estimators.base import Estimator, EstimatorOutput, Objective
from estimators.gumbel_rao import conditional_gumbel
from estimators.sampling import gumbel_noise, one_hot_argmax, perturbed_logits, sampling_dtype
from estimators.straight_through import gradient_only


class RELAX(Estimator):
    """RELAX / REBAR for categorical latents (see the module docstring).

    Args:
        num_samples: S samples ``b`` per example; ``g_hat`` is their average.
        temperature: initial ``lambda > 0`` of the relaxation ``softmax(z / lambda)``.
        eta: initial scale ``eta`` of the relaxed control variate (0 gives score function plus
            the learned network only).
        learn_temperature, learn_eta: train ``log lambda`` / ``eta`` on the variance.
        hidden: width of the learned network ``r_rho`` (RELAX); None for REBAR.
    """

    def __init__(
        self,
        num_samples: int = 1,
        temperature: float = 0.5,
        eta: float = 1.0,
        learn_temperature: bool = True,
        learn_eta: bool = True,
        hidden: int | None = 64,
    ) -> None:
        super().__init__(num_samples)
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not (0 < temperature < math.inf)
        ):
            raise ValueError(
                f"estimator.temperature={temperature!r} is invalid: it must be a number > 0"
            )
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not math.isfinite(eta):
            raise ValueError(f"estimator.eta={eta!r} is invalid: it must be a finite number")
        if hidden is not None and (
            not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1
        ):
            raise ValueError(
                f"estimator.hidden={hidden!r} is invalid: use an integer >= 1, or null for REBAR"
            )
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(temperature)), requires_grad=learn_temperature
        )
        self.eta = nn.Parameter(torch.tensor(float(eta)), requires_grad=learn_eta)
        self.hidden = hidden
        self.network: nn.Module | None = None

    def prepare(self, num_variables: int, num_classes: int, feature_dim: int | None) -> None:
        """Build ``r_rho``: ``[N * K] -> hidden -> 1``, its output layer zero-initialized."""
        if self.hidden is not None and self.network is None:
            output = nn.Linear(self.hidden, 1)
            nn.init.zeros_(output.weight)
            nn.init.zeros_(output.bias)
            self.network = nn.Sequential(
                nn.Linear(num_variables * num_classes, self.hidden), nn.Tanh(), output
            )

    def control_variate(self, z: Tensor, f: Objective) -> Tensor:
        """``c(z) = eta * f(softmax(z / lambda)) + r_rho(..)``: ``z [S, B, N, K]`` -> ``[S, B]``."""
        # Masked classes (z = -inf) are divided as 0 and put back, so that d(z / lambda)/dlambda
        # is 0 there instead of -inf * 0 = NaN.
        finite = torch.isfinite(z)  # [S, B, N, K]
        scaled = torch.where(finite, z, torch.zeros_like(z)) / self.log_temperature.exp()
        relaxed = torch.softmax(torch.where(finite, scaled, z), dim=-1)  # [S, B, N, K]
        c = self.eta * f(relaxed)  # [S, B]
        if self.hidden is not None:
            if self.network is None:
                raise RuntimeError("RELAX with a network must be prepared: call prepare(N, K, D)")
            flat = relaxed.flatten(-2).to(self.eta.dtype)  # [S, B, N * K]
            c = c + self.network(flat).squeeze(-1)  # [S, B]
        return c

    def estimate(self, logits: Tensor, f: Objective, features: Tensor | None) -> EstimatorOutput:
        dtype = sampling_dtype(logits)
        log_probs = logits.to(dtype).log_softmax(dim=-1)  # [B, N, K]
        shape = (self.num_samples, *log_probs.shape)
        z = perturbed_logits(log_probs, self.num_samples)  # [S, B, N, K], log p + G
        hard = one_hot_argmax(z.detach())  # [S, B, N, K], b = H(z)
        cost = f(hard)  # [S, B]; carries the decoder's gradient
        metrics: dict[str, Tensor | float] = {
            "temperature": self.log_temperature.detach().exp(),
            "eta": self.eta.detach().clone(),
        }
        output = EstimatorOutput(cost.mean(0), cost.detach().mean(0), metrics)  # [B], [B]
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return output  # evaluation: no encoder gradient to estimate

        z_tilde = conditional_gumbel(
            log_probs, hard, gumbel_noise(shape, logits.device).to(dtype)
        )  # [S, B, N, K], z_tilde ~ p(z | b), differentiable in logits
        c_z = self.control_variate(z, f)  # [S, B]
        c_tilde = self.control_variate(z_tilde, f)  # [S, B]
        (cv_grad,) = torch.autograd.grad(
            (c_z - c_tilde).sum(), logits, create_graph=True, allow_unused=True
        )  # [B, N, K]: sum over samples of dc(z)/dtheta - dc(z_tilde)/dtheta
        if cv_grad is None:
            cv_grad = torch.zeros_like(logits)
        score = hard - log_probs.detach().exp()  # [S, B, N, K] = dlog q(b)/dtheta
        weight = cost.detach() - c_tilde  # [S, B], depends on phi
        g_hat = (weight[..., None, None] * score).mean(0) + cv_grad / self.num_samples  # [B,N,K]
        squared_norm = g_hat.pow(2).sum(dim=(-1, -2))  # [B]
        metrics["grad_squared_norm"] = squared_norm.detach().mean()

        encoder_term = (gradient_only(logits) * g_hat.detach()).sum(dim=(-1, -2))  # [B], value 0
        output.surrogate = output.surrogate + encoder_term
        phi = [p for p in self.parameters() if p.requires_grad]
        if self.updates_state and phi and squared_norm.requires_grad:
            phi_grads = torch.autograd.grad(
                squared_norm.mean(), phi, retain_graph=True, allow_unused=True
            )
            phi_term = sum(
                ((p - p.detach()) * g.detach()).sum()
                for p, g in zip(phi, phi_grads, strict=True)
                if g is not None
            )  # scalar, value 0, gradient d mean_B ||g_hat||^2 / dphi
            output.surrogate = output.surrogate + phi_term
        return output

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, temperature={self.log_temperature.exp().item():.3g}, "
            f"eta={self.eta.item():.3g}, hidden={self.hidden}"
        )
