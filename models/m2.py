"""M2, the semi-supervised generative model of Kingma et al. (2014), with an estimator for y.

``p(y) p(z) p(x|y,z)`` with a uniform categorical label y, Gaussian z and Bernoulli pixels (Eq. 2),
inferred by a classifier ``q(y|x)`` and a Gaussian ``q(z|x,y)`` (Eq. 4). Training minimizes, in
nats per example, ``w_l * mean_l[-L(x,y)] + alpha * mean_l[-log q(y|x)] + mean_u[-U(x)]`` (Eq. 6,
7 and 9): the expectation over the unlabelled y in ``-U(x) = E_q(y|x)[-L~(x,y)] + KL(q(y|x)||p(y))``
is the injected estimator's job, every other term is exact or reparameterized.

docs/m2.md has the derivation ("Objective and the unit of α": the units of ``alpha`` and ``w_l``,
the schedule of labelled steps), the cost of a step and the logged metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from estimators.base import Estimator, EstimatorOutput
from estimators.sampling import enumerate_one_hot
from estimators.validation import require_int, require_number
from models.base import EstimatorModel, OptimizerFactory, SchedulerFactory
from models.categorical import categorical_kl
from models.m2_networks import SplitInputMLP, init_hidden_normal
from models.networks import mlp
from models.vae import bernoulli_nll

Batch = tuple[Tensor, Tensor]
SemiSupervisedBatch = dict[str, Batch]

# Decoder rows (z samples x labels x images) per call in ``M2.evaluate``: bounds its memory to
# about EVALUATION_ROWS * D floats (~100 MB for MNIST) whatever ``eval_z_samples`` and the batch.
EVALUATION_ROWS = 1 << 15


def gaussian_kl(mean: Tensor, log_variance: Tensor) -> Tensor:
    """``KL(N(mean, diag exp(log_variance)) || N(0, I))`` over the last axis: ``[..., Z] -> [...]``.

    Kingma & Welling (2014), Appendix B: ``-1/2 sum(1 + log s^2 - m^2 - s^2)``.
    """
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).sum(-1)


def require_semi_supervised(n_labels: int | None) -> None:
    """Refuse ``n_labels=None`` (a datamodule that is not semi-supervised) in one line."""
    if n_labels is None:
        raise ValueError(
            "model=m2 trains on labelled and unlabelled batches but the datamodule is not "
            "semi-supervised (it has no n_labels): use datamodule=semi_digits or semi_mnist, "
            "or experiment=m2_digits"
        )


def require_init_std(hidden_init_std: float | None) -> float | None:
    """``model.hidden_init_std``: ``None`` (PyTorch's initialization) or a positive number."""
    if hidden_init_std is None:
        return None
    return require_number(
        "model.hidden_init_std",
        hidden_init_std,
        inclusive=False,
        hint=" (0.001 is Pyro's SS-VAE) or null for PyTorch's default initialization",
    )


class M2(EstimatorModel):
    """Kingma et al. (2014)'s M2 with the expectation over the unlabelled y left to ``estimator``.

    Args:
        estimator: gradient estimator of ``E_q(y|x)[f(y)]`` (any of ``conf/estimator``).
        image_shape: (H, W) of the images, from the datamodule.
        num_classes: K, the number of labels (the datamodule's ``num_labels``).
        n_labels: labelled training examples of the datamodule; ``None`` (a datamodule that is
            not semi-supervised) is refused with a one-line error. Recorded as hyperparameter.
        latent_dim: dimension of the Gaussian z (50 in the paper).
        classifier_hidden, encoder_hidden, decoder_hidden: hidden widths of the MLPs of q(y|x),
            q(z|x,y) and p(x|y,z) (the paper: one layer of 500; the speed benchmark: 500-500).
        activation: ``softplus`` (the paper) or ``relu`` / ``tanh`` / ``elu``.
        hidden_init_std: ``None`` = PyTorch's default initialization; a number ``s`` = weights and
            biases of every hidden layer drawn from ``N(0, s^2)`` (output layers keep the default;
            Pyro's SS-VAE uses 0.001).
        alpha: weight of ``mean_l[-log q(y|x)]`` relative to per-example mean bounds (see the
            docs/m2.md, "Objective and the unit of α": 0.1 here is Kingma's ``0.1 * N`` in Eq. 9
            with summed losses).
        labelled_weight: weight ``w_l`` of ``mean_l[-L(x,y)]``: 1 by default; ``N_l / N_u`` is
            Kingma's Eq. 9, where every example weighs the same (docs/m2.md, same section).
        labelled_every_n_steps: 1 = labelled and unlabelled terms in every step; n > 1 = every
            n-th step labelled only, the others unlabelled only, as Pyro's SS-VAE trains
            (docs/m2.md, "Schedule").
        eval_z_samples: z samples per label for the exact-in-y evaluation bound.
        grid_columns: columns (shared z) of ``conditional_samples.png``.
    """

    prior_logits: Tensor  # buffer [1, K], uniform p(y)

    def __init__(
        self,
        estimator: Estimator,
        image_shape: Sequence[int],
        num_classes: int = 10,
        n_labels: int | None = None,
        latent_dim: int = 50,
        classifier_hidden: Sequence[int] = (500,),
        encoder_hidden: Sequence[int] = (500,),
        decoder_hidden: Sequence[int] = (500,),
        activation: str = "softplus",
        hidden_init_std: float | None = None,
        alpha: float = 0.1,
        labelled_weight: float = 1.0,
        labelled_every_n_steps: int = 1,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        compile: bool | str = False,
        eval_z_samples: int = 1,
        grid_columns: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["estimator", "optimizer", "lr_scheduler"])
        require_semi_supervised(n_labels)
        self.num_classes = require_int("model.num_classes", num_classes)
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes={num_classes} is invalid: use K >= 2")
        self.alpha = require_number("model.alpha", alpha)
        self.labelled_weight = require_number(
            "model.labelled_weight",
            labelled_weight,
            hint=" (N_labels / N_unlabelled weighs every example alike, as Kingma's Eq. 9 does)",
        )
        init_std = require_init_std(hidden_init_std)
        self.labelled_every_n_steps = require_int(
            "model.labelled_every_n_steps", labelled_every_n_steps
        )
        self.image_shape = tuple(int(s) for s in image_shape)
        self.input_dim = math.prod(self.image_shape)
        self.latent_dim = require_int("model.latent_dim", latent_dim)
        self.eval_z_samples = require_int("model.eval_z_samples", eval_z_samples)
        self.grid_columns = require_int("model.grid_columns", grid_columns)
        hidden = (classifier_hidden, encoder_hidden, decoder_hidden)
        self._build_networks(*hidden, activation, init_std)
        self._attach_estimator_and_optimizer(
            estimator,
            latent_shape=(1, self.num_classes),  # N = 1 variable: the label
            feature_dim=self.input_dim,
            optimizer=optimizer,
            default_lr=3e-4,
            lr_scheduler=lr_scheduler,
            compile=compile,
        )
        self._grid_pending = False

    def _build_networks(
        self,
        classifier_hidden: Sequence[int],
        encoder_hidden: Sequence[int],
        decoder_hidden: Sequence[int],
        activation: str,
        init_std: float | None,
    ) -> None:
        """The three MLPs, the uniform prior p(y) and the evaluation accuracies."""
        K, D, Z = self.num_classes, self.input_dim, self.latent_dim
        self.classifier = mlp(D, list(classifier_hidden), K, activation)  # q(y|x)
        self.encoder = SplitInputMLP(D, K, encoder_hidden, 2 * Z, activation)  # q(z|x,y)
        self.decoder = SplitInputMLP(Z, K, decoder_hidden, D, activation)  # p(x|y,z)
        if init_std is not None:
            for network in (self.classifier, self.encoder, self.decoder):
                init_hidden_normal(network, init_std)
        self.register_buffer("prior_logits", torch.zeros(1, K))  # [N=1, K], uniform p(y)
        self.val_accuracy = MulticlassAccuracy(num_classes=K, average="micro")  # of q(y|x)
        self.test_accuracy = MulticlassAccuracy(num_classes=K, average="micro")
        # of the generative classifier argmin_y f(y) (``evaluate``)
        self.val_generative_accuracy = MulticlassAccuracy(num_classes=K, average="micro")
        self.test_generative_accuracy = MulticlassAccuracy(num_classes=K, average="micro")

    # --------------------------------------------------------------------------------------------
    # The model
    # --------------------------------------------------------------------------------------------
    def classify(self, x: Tensor) -> Tensor:
        """Logits of q(y|x): ``x [B, D] -> [B, K]``."""
        return self.classifier(x)

    def standard_normal(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The reparameterization noise ``eps ~ N(0, I)`` (a hook for tests to fix it)."""
        return torch.randn(shape, device=like.device, dtype=like.dtype)

    def label_cost(self, x: Tensor, x_projected: Tensor, y: Tensor, num_z: int = 1) -> Tensor:
        """``f(y) = -L~(x,y) = E_q(z|x,y)[-log p(x|y,z)] + KL(q(z|x,y)||p(z))`` (Eq. 6 without
        ``log p(y)``), the estimator's cost.

        ``x [B, D]``; ``x_projected [B, H]`` the x-part of the encoder's first layer
        (``self.encoder.project_a(x)``, computed once); one-hot or relaxed labels
        ``y [S, B, 1, K]`` (or ``[S, B, K]``) -> ``[S, B]``, averaging ``num_z`` reparameterized
        samples of z per label.
        """
        if y.dim() == 4:
            y = y.squeeze(-2)  # [S, B, K] (an expanded view stays one: see m2_networks)
        y = y.to(x_projected.dtype)
        mean, log_variance = self.encoder(x_projected, y).chunk(2, dim=-1)  # [S, B, Z] each
        eps = self.standard_normal((num_z, *mean.shape), like=mean)  # [M, S, B, Z]
        z = mean + (0.5 * log_variance).exp() * eps  # [M, S, B, Z]
        pixel_logits = self.decoder(self.decoder.project_a(z), y)  # [M, S, B, D]
        reconstruction = bernoulli_nll(pixel_logits, x).mean(0)  # [S, B]
        return reconstruction + gaussian_kl(mean, log_variance)  # [S, B]

    def labelled_terms(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``-L(x,y) [B]`` (Eq. 6, one z sample), ``-log q(y|x) [B]`` and the logits ``[B, K]``."""
        y_one_hot = F.one_hot(y, self.num_classes).to(x.dtype).unsqueeze(0)  # [1, B, K]
        cost = self.label_cost(x, self.encoder.project_a(x), y_one_hot)[0]  # [B]
        neg_log_prior = -self.prior_logits.log_softmax(-1)[0, y].to(cost.dtype)  # [B], log K
        logits = self.classify(x)  # [B, K]
        classification = F.cross_entropy(logits, y, reduction="none")  # [B]
        return cost + neg_log_prior, classification, logits

    def kl_y(self, logits: Tensor) -> Tensor:
        """``KL(q(y|x) || p(y))`` per example: logits ``[B, 1, K]`` -> ``[B]`` (>= float32)."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return categorical_kl(logits.to(dtype), self.prior_logits.to(dtype))

    def unlabelled_terms(
        self, x: Tensor, estimator: Estimator
    ) -> tuple[EstimatorOutput, Tensor, Tensor]:
        """``estimator``'s output for ``E_q(y|x)[f(y)]``, ``KL(q(y|x)||p(y)) [B]`` and the
        logits ``[B, 1, K]``. ``surrogate + kl`` has the estimator's gradient of ``-U(x)``
        (Eq. 7)."""
        logits = self.classify(x).unsqueeze(1)  # [B, 1, K]
        x_projected = self.encoder.project_a(x)  # [B, H], once for every label and sample
        output = estimator(logits, partial(self.label_cost, x, x_projected), features=x)
        return output, self.kl_y(logits), logits

    # --------------------------------------------------------------------------------------------
    # Lightning hooks
    # --------------------------------------------------------------------------------------------
    @staticmethod
    def split_batch(batch: Any) -> tuple[Batch | None, Batch | None]:
        """``(labelled, unlabelled)`` of a semi-supervised batch (``None`` for a part a scheduled
        step leaves out); an error for other batches."""
        if (
            not isinstance(batch, dict)
            or not batch
            or not set(batch) <= {"labelled", "unlabelled"}
        ):
            raise TypeError(
                "M2 trains on {'labelled': (x, y), 'unlabelled': (x, y)} batches (the "
                "CombinedLoader of datamodules.SemiSupervisedDataModule), got "
                f"{type(batch).__name__}: use datamodule=semi_digits or semi_mnist"
            )
        return batch.get("labelled"), batch.get("unlabelled")

    def training_batch(self, batch: SemiSupervisedBatch, step: int) -> SemiSupervisedBatch:
        """The scheduled part of ``batch`` (:meth:`scheduled_part`)."""
        return self.scheduled_part(batch, step)

    def scheduled_part(self, batch: SemiSupervisedBatch, step: int) -> SemiSupervisedBatch:
        """The part of ``batch`` that optimizer step ``step`` trains on: all of it when
        ``labelled_every_n_steps = 1``, else only the labelled part on steps ``0, n, 2n, ...``
        and only the unlabelled part on the others."""
        n = self.labelled_every_n_steps
        if n == 1:
            return batch
        part = "labelled" if step % n == 0 else "unlabelled"
        return {part: batch[part]}

    def objective(
        self, batch: SemiSupervisedBatch, estimator: Estimator
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The training loss of ``batch`` under ``estimator`` (Eq. 9 in per-example units).

        The gradient of the returned scalar is ``estimator``'s estimate of the gradient of
        ``w_l * mean_l[-L] + alpha * mean_l[-log q(y|x)] + mean_u[-U]`` (the terms of the parts
        ``batch`` has: a scheduled step may hold one). Training uses ``self.estimator``;
        gradient probes pass others.
        """
        labelled_batch, unlabelled_batch = self.split_batch(batch)
        losses: list[Tensor] = []  # differentiable terms
        values: list[Tensor] = []  # their values (a surrogate's value is not the bound's)
        metrics: dict[str, Tensor | float] = {}
        if labelled_batch is not None:
            labelled, classification, _ = self.labelled_terms(*labelled_batch)  # [B_l] each
            losses.append(
                self.labelled_weight * labelled.mean() + self.alpha * classification.mean()
            )
            metrics["labelled_neg_elbo"] = labelled.detach().mean()
            metrics["classification"] = classification.detach().mean()
            values.append(losses[-1].detach())
        if unlabelled_batch is not None:
            # surrogate [B_u], kl_y [B_u]
            output, kl_y, _ = self.unlabelled_terms(unlabelled_batch[0], estimator)
            losses.append((output.surrogate + kl_y).mean())
            value = output.value.mean()
            kl_mean = kl_y.detach().mean()
            metrics.update(
                unlabelled_value=value, kl_y=kl_mean, unlabelled_neg_elbo=value + kl_mean
            )
            metrics.update(output.metrics)
            values.append(value + kl_mean)
        loss = sum(losses[1:], losses[0])  # `+` promotes dtypes (bf16 autocast), stack would not
        metrics["loss"] = sum(values[1:], values[0])
        return loss, metrics

    def batch_size(self, batch: SemiSupervisedBatch) -> int:
        labelled, unlabelled = self.split_batch(batch)
        part = unlabelled if unlabelled is not None else labelled
        assert part is not None  # split_batch refuses an empty batch
        return int(part[0].shape[0])

    @torch.no_grad()
    def evaluate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Classifier logits ``[B, K]``, ``-U(x) [B]`` with the exact sum over the K labels, and
        the per-label costs ``f(y) = -L~(x, y) [K, B]`` (``eval_z_samples`` z per label, drawn
        in chunks of at most ``EVALUATION_ROWS`` decoder rows).

        ``argmin_y f(y)`` is the *generative* classifier ``argmax_y p(x|y)``'s bound (p(y) is
        uniform): where it disagrees with ``q(y|x)`` the unlabelled term pulls the classifier
        towards it, so its accuracy shows whether the generative model has learnt the classes.
        """
        K, B, M = self.num_classes, x.shape[0], self.eval_z_samples
        logits = self.classify(x)  # [B, K]
        labels = enumerate_one_hot(1, K, x.device, x.dtype).unsqueeze(1).expand(K, B, 1, K)
        x_projected = self.encoder.project_a(x)  # [B, H]
        per_call = max(1, EVALUATION_ROWS // (K * B))  # z samples per decoder call
        sizes = [min(per_call, M - start) for start in range(0, M, per_call)]  # sum to M
        chunk_means = [self.label_cost(x, x_projected, labels, num_z=size) for size in sizes]
        # [K, B]: chunk means weighted by their sizes = the mean over all M z samples
        costs = torch.stack([size * mean for size, mean in zip(sizes, chunk_means, strict=True)])
        costs = costs.sum(0) / M
        probs = logits.softmax(-1).to(costs.dtype)  # [B, K]
        expectation = (probs.T * costs).sum(0)  # [B], exact: the K labels
        return logits, expectation + self.kl_y(logits.unsqueeze(1)), costs

    def _evaluation_step(
        self,
        batch: Batch,
        split: str,
        accuracy: MulticlassAccuracy,
        generative_accuracy: MulticlassAccuracy,
    ) -> None:
        x, y = batch
        logits, neg_elbo, costs = self.evaluate(x)
        accuracy(logits, y)
        generative_accuracy(-costs.T, y)  # scores [B, K]: the highest is argmin_y f(y)
        size = x.shape[0]
        self.log(f"{split}/accuracy", accuracy, on_epoch=True, batch_size=size, prog_bar=True)
        self.log(
            f"{split}/generative_accuracy", generative_accuracy, on_epoch=True, batch_size=size
        )
        self.log(f"{split}/neg_elbo", neg_elbo.mean(), batch_size=size, prog_bar=True)

    def evaluation_metrics(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        """Batch means of what ``<stage>`` logs, without logging or metric state (replicas):
        the accuracies are the fraction right in the batch, whose mean weighted by batch size
        is the micro-averaged accuracy the metrics accumulate."""
        x, y = batch
        logits, neg_elbo, costs = self.evaluate(x)  # [B, K], [B], [K, B]
        return {
            "accuracy": (logits.argmax(-1) == y).to(neg_elbo.dtype).mean(),
            "generative_accuracy": (costs.argmin(0) == y).to(neg_elbo.dtype).mean(),
            "neg_elbo": neg_elbo.mean(),
        }

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "val", self.val_accuracy, self.val_generative_accuracy)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._grid_pending = True
        self._evaluation_step(batch, "test", self.test_accuracy, self.test_generative_accuracy)

    def on_test_epoch_end(self) -> None:
        if self.trainer.is_global_zero and self._grid_pending:
            self.save_conditional_grid(
                Path(self.trainer.default_root_dir) / "conditional_samples.png"
            )
        self._grid_pending = False

    @torch.no_grad()
    def conditional_samples(self, columns: int, seed: int = 0) -> Tensor:
        """Decoder means ``[K, columns, D]``: row k is class k, column j uses ``z_j ~ N(0, I)``."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(columns, self.latent_dim, generator=generator)  # [C, Z]
        z = z.to(self.prior_logits.device).expand(self.num_classes, -1, -1)  # [K, C, Z]
        labels = torch.eye(self.num_classes, device=z.device)  # [K, K]
        y = labels.unsqueeze(1).expand(-1, columns, -1)  # [K, C, K]
        dtype = self.decoder.a_layer.weight.dtype
        pixel_logits = self.decoder(self.decoder.project_a(z.to(dtype)), y.to(dtype))  # [K, C, D]
        return torch.sigmoid(pixel_logits)

    def save_conditional_grid(self, path: Path) -> None:
        """Write the conditional generation grid (one row per class) as a PNG."""
        from torchvision.utils import save_image

        images = self.conditional_samples(self.grid_columns)  # [K, C, D]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.float().reshape(-1, 1, *self.image_shape), path, nrow=self.grid_columns)
