"""What every catgrad model shares: the training step around ``objective`` and the optimizers.

A model subclasses :class:`EstimatorModel` and implements

* ``objective(batch, estimator) -> (loss, metrics)``: the gradient of ``loss`` is ``estimator``'s
  estimate of the gradient of the training loss (training passes ``self.estimator``; gradient
  probes pass others), ``metrics`` are logged as ``train/<name>``;

and ends its constructor with :meth:`EstimatorModel._attach_estimator_and_optimizer`, which sets
``self.estimator`` (prepared for the model's latent shape), ``self.optimizer_factory``
(parameters -> optimizer), ``self.scheduler_factory`` (optimizer -> scheduler, or None) and
``self.compile_objective``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from estimators.base import Estimator

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]


class EstimatorModel(L.LightningModule):
    estimator: Estimator
    optimizer_factory: OptimizerFactory
    scheduler_factory: SchedulerFactory | None

    def objective(self, batch: Any, estimator: Estimator) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def _attach_estimator_and_optimizer(
        self,
        estimator: Estimator,
        latent_shape: tuple[int, int],
        feature_dim: int | None,
        optimizer: OptimizerFactory | None,
        default_lr: float,
        lr_scheduler: SchedulerFactory | None = None,
        compile: bool = False,
    ) -> None:
        """The tail every model's constructor shares; call it last in ``__init__``.

        Sets ``self.optimizer_factory`` to ``optimizer`` (default: Adam with ``default_lr``),
        ``self.scheduler_factory`` to ``lr_scheduler`` and ``self.compile_objective`` to
        ``compile`` (anything but a bool is a one-line ``ValueError`` naming ``model.compile``),
        then registers ``estimator`` as ``self.estimator`` and calls
        ``estimator.prepare(N, K, feature_dim)`` with ``latent_shape = (N, K)``: N categorical
        variables of K classes, ``feature_dim`` the width of the per-example features the model
        passes to the estimator (``None``: no features).
        """
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=default_lr)
        self.scheduler_factory = lr_scheduler
        if not isinstance(compile, bool):
            raise ValueError(f"model.compile={compile!r} is invalid: use true or false")
        self.compile_objective = compile
        self.estimator = estimator
        self.estimator.prepare(*latent_shape, feature_dim)

    def evaluation_metrics(self, batch: Any, stage: str) -> dict[str, Tensor]:
        """Batch means of the ``stage`` (``val`` or ``test``) metrics, without logging.

        Optional: a model that implements it can be trained as replicas (``models.replicas``).
        """
        raise NotImplementedError

    def check_datamodule(self, datamodule: L.LightningDataModule) -> None:
        """Raise a one-line ``ValueError`` if this model cannot train on ``datamodule``.

        Called by ``experiments.train`` before any work; the default accepts any datamodule.
        """

    def batch_size(self, batch: Any) -> int:
        """Examples per training batch (for logging); ``(x, y)`` batches by default."""
        return int(batch[0].shape[0])

    compile_objective: bool = False  # model.compile: run the training objective compiled
    _compiled_objective: Callable[..., tuple[Tensor, dict[str, Any]]] | None = None

    def training_objective(self) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
        """``objective``, or with ``model.compile=true`` its ``torch.compile``d version.

        Compiled once, on the first training step (which then takes ~10-30 s longer on a CPU):
        inductor fuses the elementwise work of the forward and the backward (sampling, softmax,
        BCE, KL) around the matmuls. The temperature reaches the graph as a tensor buffer
        (``estimators.base.TemperedEstimator``), so the annealing schedule does not recompile
        it. Inductor draws its random numbers differently from eager (still from the seeded
        global generator: a compiled run is reproducible and resumes exactly, but its samples
        differ from an eager run's). Evaluation and gradient probes stay eager.
        """
        if not self.compile_objective:
            return self.objective
        if self._compiled_objective is None:
            self._compiled_objective = torch.compile(self.objective)
        return self._compiled_objective

    def training_batch(self, batch: Any, step: int) -> Any:
        """The part of ``batch`` that optimizer step ``step`` trains on (default: all of it)."""
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.estimator.set_step(self.global_step)
        batch = self.training_batch(batch, self.global_step)
        loss, metrics = self.training_objective()(batch, self.estimator)
        if self.metrics_reach_loggers():
            self.log_dict(
                {f"train/{name}": value for name, value in metrics.items()},
                on_step=True,
                on_epoch=False,
                batch_size=self.batch_size(batch),
            )
        return loss

    def metrics_reach_loggers(self) -> bool:
        """Whether step metrics logged now are written (every ``trainer.log_every_n_steps``).

        On other steps ``self.log`` would only be overwritten, at ~0.5 ms of Python per call;
        skipping it there writes exactly the same rows. (Lightning's own LearningRateMonitor and
        ThroughputMonitor ask the same question.)
        """
        trainer = self._trainer
        if trainer is None:
            return True
        fast_dev_run = getattr(trainer, "fast_dev_run", False)
        return bool(trainer._logger_connector.should_update_logs or fast_dev_run)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        horizon = getattr(scheduler, "T_max", None)  # the cosine schedule's length in steps
        if horizon is not None and not horizon >= 1:
            raise ValueError(
                f"model.lr_scheduler.T_max={horizon} is invalid: model/lr_scheduler=cosine "
                "anneals over trainer.max_steps; set trainer.max_steps, or "
                "model.lr_scheduler.T_max to the run's number of training steps"
            )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
