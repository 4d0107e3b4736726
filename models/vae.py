"""Categorical VAE (Jang et al. 2017, Section 4.2) with an injected gradient estimator.

Generative model: ``p(z) = prod_n Cat(z_n; prior)`` with N variables of K classes (K = 2 is the
Bernoulli VAE), uniform by default or learned; ``p(x|z) = Bernoulli(decoder(flatten(z)))``.
Inference: ``q(z|x) = prod_n Cat(z_n; softmax(encoder(x)_n))``.

Training minimizes ``E_q[-log p(x|z)] + KL(q(z|x) || p(z))``: the expectation through the injected
estimator (``f(z) = -log p(x|z)``), the KL in closed form. The model never branches on which
estimator it holds.

Metrics, identical for every estimator:

* ``train/value`` (estimator's discrete estimate of ``E_q[-log p(x|z)]``), ``train/kl``,
  ``train/neg_elbo`` (their sum), plus the estimator's own metrics (``train/temperature`` ...).
* ``val/neg_elbo``, ``test/neg_elbo``: discrete negative ELBO with hard samples (exact by
  enumeration when ``K^N <= exact_eval_max_configurations``); ``test/nll_iwae``: the importance-
  weighted bound on ``-log p(x)`` with ``iwae_samples`` samples. All in nats per example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from estimators.base import Estimator, log_probs_of
from estimators.sampling import sample_one_hot, sampling_dtype
from estimators.validation import require_int
from models.base import EstimatorModel, OptimizerFactory, SchedulerFactory
from models.categorical import categorical_kl
from models.evaluation import expected_cost, importance_weighted_bound
from models.networks import mlp


def bernoulli_nll(pixel_logits: Tensor, x: Tensor) -> Tensor:
    """``-log p(x|z)`` summed over pixels: ``pixel_logits [S, B, D]``, ``x [B, D]`` -> ``[S, B]``.
    """
    target = x.to(pixel_logits.dtype).expand_as(pixel_logits)
    return F.binary_cross_entropy_with_logits(pixel_logits, target, reduction="none").sum(-1)


class CategoricalVAE(EstimatorModel):
    def __init__(
        self,
        estimator: Estimator,
        image_shape: Sequence[int],
        num_variables: int = 20,
        num_classes: int = 10,
        encoder_hidden: Sequence[int] = (512, 256),
        decoder_hidden: Sequence[int] = (256, 512),
        activation: str = "relu",
        learned_prior: bool = False,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        compile: bool | str = False,
        eval_samples: int = 100,
        exact_eval_max_configurations: int = 1024,
        iwae_samples: int = 1000,
        iwae_chunk_size: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["estimator", "optimizer", "lr_scheduler"])
        self.num_variables = require_int("model.num_variables", num_variables)
        self.num_classes = require_int("model.num_classes", num_classes)
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes={num_classes} is invalid: use K >= 2")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.input_dim = math.prod(self.image_shape)
        self.eval_samples = require_int("model.eval_samples", eval_samples)
        self.exact_eval_max_configurations = exact_eval_max_configurations
        self.iwae_samples = require_int("model.iwae_samples", iwae_samples)
        self.iwae_chunk_size = require_int("model.iwae_chunk_size", iwae_chunk_size)
        latent_dim = self.num_variables * self.num_classes
        self.encoder = mlp(self.input_dim, list(encoder_hidden), latent_dim, activation)
        self.decoder = mlp(latent_dim, list(decoder_hidden), self.input_dim, activation)
        prior = torch.zeros(self.num_variables, self.num_classes)  # [N, K], uniform
        if learned_prior:
            self.prior_logits = nn.Parameter(prior)
        else:
            self.register_buffer("prior_logits", prior)
        self._attach_estimator_and_optimizer(
            estimator,
            latent_shape=(self.num_variables, self.num_classes),
            feature_dim=self.input_dim,
            optimizer=optimizer,
            default_lr=1e-3,
            lr_scheduler=lr_scheduler,
            compile=compile,
        )
        self._first_test_batch: Tensor | None = None

    def check_datamodule(self, datamodule: L.LightningDataModule) -> None:
        if getattr(datamodule, "n_labels", None) is not None:
            raise ValueError(
                f"model=vae trains on (x, y) batches but {type(datamodule).__name__} is "
                f"semi-supervised: use datamodule=digits, mnist or synthetic (semi_* is for M2)"
            )

    # --------------------------------------------------------------------------------------------
    # The model
    # --------------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """``x [B, D]`` -> logits of q(z|x) ``[B, N, K]``."""
        return self.encoder(x).unflatten(-1, (self.num_variables, self.num_classes))

    def decode(self, z: Tensor) -> Tensor:
        """One-hot or relaxed ``z [..., N, K]`` -> Bernoulli pixel logits ``[..., D]``."""
        return self.decoder(z.flatten(-2))

    def reconstruction_cost(self, x: Tensor, z: Tensor) -> Tensor:
        """The estimator's ``f``: ``-log p(x|z)``, ``z [S, B, N, K]`` -> ``[S, B]``."""
        return bernoulli_nll(self.decode(z), x)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x, z)`` for one-hot ``z [S, B, N, K]`` -> ``[S, B]``."""
        log_prior = log_probs_of(self.prior_logits.to(z.dtype).log_softmax(-1), z)  # [S, B]
        return log_prior - self.reconstruction_cost(x, z).to(z.dtype)

    def kl(self, logits: Tensor) -> Tensor:
        """``KL(q(z|x) || p(z))`` per example ``[B]``."""
        dtype = sampling_dtype(logits)
        return categorical_kl(logits.to(dtype), self.prior_logits.to(dtype))

    # --------------------------------------------------------------------------------------------
    # Lightning hooks
    # --------------------------------------------------------------------------------------------
    def objective(
        self, batch: tuple[Tensor, Tensor], estimator: Estimator
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The training loss of ``batch`` under ``estimator`` and its metrics.

        The gradient of the returned scalar is ``estimator``'s estimate of the gradient of the
        mean negative ELBO. Training uses ``self.estimator``; gradient probes pass others.
        """
        x, _ = batch  # [B, D]
        logits = self.encode(x)  # [B, N, K]
        output = estimator(logits, partial(self.reconstruction_cost, x), features=x)
        kl = self.kl(logits)  # [B]
        loss = (output.surrogate + kl).mean()
        value = output.value.mean()
        kl_mean = kl.detach().mean()
        metrics: dict[str, Tensor | float] = {
            "value": value,
            "kl": kl_mean,
            "neg_elbo": value + kl_mean,
            **output.metrics,
        }
        return loss, metrics

    def neg_elbo(self, x: Tensor) -> Tensor:
        """Discrete negative ELBO per example ``[B]`` (exact when enumerable)."""
        logits = self.encode(x)  # [B, N, K]
        reconstruction = expected_cost(
            logits,
            partial(self.reconstruction_cost, x),
            self.eval_samples,
            self.exact_eval_max_configurations,
        )
        return reconstruction + self.kl(logits)

    def nll_iwae(self, x: Tensor) -> Tensor:
        """Importance-weighted bound on ``-log p(x)`` per example ``[B]``."""
        logits = self.encode(x)
        bound = importance_weighted_bound(
            logits, partial(self.log_joint, x), self.iwae_samples, self.iwae_chunk_size
        )
        return -bound

    def evaluation_metrics(self, batch: tuple[Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        """The batch means logged as ``<stage>/<name>`` (``stage``: ``val`` or ``test``), in the
        order they draw their samples; no logging (``models.replicas`` vmaps this)."""
        x, _ = batch
        metrics = {"neg_elbo": self.neg_elbo(x).mean()}
        if stage == "test":
            metrics["nll_iwae"] = self.nll_iwae(x).mean()
        return metrics

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        metrics = self.evaluation_metrics(batch, "val")
        self.log("val/neg_elbo", metrics["neg_elbo"], batch_size=x.shape[0], prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        if self._first_test_batch is None:
            self._first_test_batch = x[:8].detach()
        for name, value in self.evaluation_metrics(batch, "test").items():
            self.log(f"test/{name}", value, batch_size=x.shape[0])

    def on_test_epoch_end(self) -> None:
        if self.trainer.is_global_zero and self._first_test_batch is not None:
            self.save_image_grids(Path(self.trainer.default_root_dir))
        self._first_test_batch = None

    @torch.no_grad()
    def save_image_grids(self, directory: Path) -> None:
        """Write ``reconstructions.png`` (test images over their reconstructions) and
        ``prior_samples.png`` (decoder means of 64 samples from the prior)."""
        from torchvision.utils import save_image

        assert self._first_test_batch is not None
        x = self._first_test_batch  # [b, D]
        z = sample_one_hot(self.encode(x), 1)[0]  # [b, N, K]
        reconstruction = torch.sigmoid(self.decode(z))  # [b, D]
        prior = self.prior_logits.expand(64, -1, -1)  # [64, N, K]
        samples = torch.sigmoid(self.decode(sample_one_hot(prior, 1)[0]))  # [64, D]
        shape = (-1, 1, *self.image_shape)
        directory.mkdir(parents=True, exist_ok=True)
        save_image(
            torch.cat([x, reconstruction]).float().reshape(shape),
            directory / "reconstructions.png",
            nrow=x.shape[0],
        )
        save_image(samples.float().reshape(shape), directory / "prior_samples.png", nrow=8)
