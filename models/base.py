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

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module.__setattr__``, except for Lightning's ``_current_fx_name`` (a plain string
        attribute), which is stored directly.

        Lightning sets it twice around every hook it calls, ~44 times per training step; each
        ``nn.Module.__setattr__`` (its parameter, buffer and submodule bookkeeping) took 10.9 us
        against 0.92 us stored directly (timeit, one loaded CPU core): ~0.4 ms of a host-bound step.
        """
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _attach_estimator_and_optimizer(
        self,
        estimator: Estimator,
        latent_shape: tuple[int, int],
        feature_dim: int | None,
        optimizer: OptimizerFactory | None,
        default_lr: float,
        lr_scheduler: SchedulerFactory | None = None,
        compile: bool | str = False,
    ) -> None:
        """The tail every model's constructor shares; call it last in ``__init__``.

        Sets ``self.optimizer_factory`` to ``optimizer`` (default: Adam with ``default_lr``),
        ``self.scheduler_factory`` to ``lr_scheduler`` and ``self.compile_objective`` to the
        ``torch.compile`` mode of ``compile`` (:func:`compile_mode`; None: eager),
        then registers ``estimator`` as ``self.estimator`` and calls
        ``estimator.prepare(N, K, feature_dim)`` with ``latent_shape = (N, K)``: N categorical
        variables of K classes, ``feature_dim`` the width of the per-example features the model
        passes to the estimator (``None``: no features).
        """
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=default_lr)
        self.scheduler_factory = lr_scheduler
        self.compile_objective = compile_mode(compile)
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

    compile_objective: str | None = None  # model.compile's torch.compile mode; None: eager
    _compiled_objective: Callable[..., tuple[Tensor, dict[str, Any]]] | None = None

    def training_objective(self) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
        """``objective``, or with ``model.compile`` set its ``torch.compile``d version (in that
        mode: ``default``; ``reduce-overhead``, which replays the step's kernels as CUDA graphs on
        a GPU; ``max-autotune``, which also tunes matmul kernels).

        Compiled once, on the first training step (which then takes ~10-30 s longer on a CPU):
        inductor fuses the elementwise work of the forward and the backward (sampling, softmax,
        BCE, KL) around the matmuls. The temperature reaches the graph as a tensor buffer
        (``estimators.base.TemperedEstimator``), so the annealing schedule does not recompile
        it. Inductor draws its random numbers differently from eager (still from the seeded
        global generator: a compiled run is reproducible and resumes exactly, but its samples
        differ from an eager run's). Evaluation and gradient probes stay eager.
        """
        if self.compile_objective is None:
            return self.objective
        if self._compiled_objective is None:
            self._compiled_objective = torch.compile(self.objective, mode=self.compile_objective)
        return self._compiled_objective

    def training_batch(self, batch: Any, step: int) -> Any:
        """The part of ``batch`` that optimizer step ``step`` trains on (default: all of it)."""
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.steps_per_batch > 1:
            self.training_steps(batch)  # steps and logs itself (manual optimization)
            return None
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

    # Optimizer steps per Lightning batch (top-level ``steps_per_batch``): set_steps_per_batch.
    steps_per_batch: int = 1
    # Called with the global step before every optimizer step of a group (StepSeeding's reseed).
    step_hooks: tuple[Callable[[int], None], ...] = ()

    def set_steps_per_batch(self, steps: int) -> None:
        """Train ``steps`` optimizer steps per Lightning batch (a group of ``steps`` consecutive
        batches, ``datamodules.tensor_data.BatchGroups``); above 1 under manual optimization
        (:meth:`training_steps`). 1: Lightning's automatic optimization, one step per batch."""
        self.steps_per_batch = steps
        self.automatic_optimization = steps == 1

    def training_steps(self, group: list[Any]) -> None:
        """One optimizer step per batch of ``group``, each exactly as a Lightning batch of its own
        would run it: ``step_hooks`` (reseeding), ``estimator.set_step``, the objective,
        ``manual_backward`` (Lightning's ``on_before_backward``/``on_after_backward`` hooks), the
        optimizer step (``on_before_optimizer_step``: the finite checks) and ``zero_grad``, the
        learning-rate scheduler's step; stops at ``trainer.max_steps``.

        Rows reach the loggers at the steps and with the values of one step per batch: the
        logger's step (Lightning's ``_batches_that_stepped``) follows the global step; a row due
        before the group's last step is written at once, the last step's by Lightning after the
        batch (with the callbacks' metrics, e.g. ``train/samples_per_s``).
        """
        trainer = self.trainer
        loop = trainer.fit_loop.epoch_loop
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        max_steps = trainer.max_steps
        for index, item in enumerate(group):
            step = self.global_step
            loop._batches_that_stepped = step  # the logger's step, as with one step per batch
            for hook in self.step_hooks:
                hook(step)
            self.estimator.set_step(step)
            batch = self.training_batch(item, step)
            loss, metrics = self.training_objective()(batch, self.estimator)
            self.manual_backward(loss)
            optimizer.step()  # type: ignore[union-attr]
            optimizer.zero_grad()  # type: ignore[union-attr]
            if scheduler is not None:
                scheduler.step()  # type: ignore[union-attr]
            last = index == len(group) - 1 or (max_steps >= 0 and self.global_step >= max_steps)
            if self.metrics_reach_loggers():
                values = {f"train/{name}": value for name, value in metrics.items()}
                if last:
                    self.log_dict(values, on_step=True, on_epoch=False,
                                  batch_size=self.batch_size(batch))
                else:
                    write_row(trainer, values, step)
            if last:
                return None
        return None

    def metrics_reach_loggers(self) -> bool:
        """Whether step metrics logged now are written: :func:`metrics_reach_loggers`."""
        return metrics_reach_loggers(self._trainer)

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


def write_row(trainer: L.Trainer, metrics: dict[str, Any], step: int) -> None:
    """Hand ``metrics`` to the loggers as the row of ``step``, with the values ``self.log``
    would give them (0-d tensors of torch's default dtype) and the epoch."""
    dtype = torch.get_default_dtype()
    values: dict[str, Any] = {
        name: value.detach().to(dtype) if isinstance(value, Tensor)
        else torch.tensor(value, dtype=dtype)
        for name, value in metrics.items()
    }
    values["epoch"] = trainer.current_epoch
    trainer._logger_connector.log_metrics(values, step=step)


def metrics_reach_loggers(trainer: L.Trainer | None) -> bool:
    """Whether step metrics logged now (during a training batch) are written, i.e. every
    ``trainer.log_every_n_steps`` steps; always true outside a trainer.

    On other steps ``self.log`` would only be overwritten, at ~0.5 ms of Python per call;
    skipping it there writes exactly the same rows. (Lightning's own LearningRateMonitor and
    ThroughputMonitor ask the same question.)
    """
    if trainer is None:
        return True
    fast_dev_run = getattr(trainer, "fast_dev_run", False)
    return bool(trainer._logger_connector.should_update_logs or fast_dev_run)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(compile: bool | str) -> str | None:
    """``model.compile``'s ``torch.compile`` mode: false -> None (eager), true -> ``default``, a
    mode of :data:`COMPILE_MODES` -> itself; anything else is a one-line ``ValueError``."""
    if compile is False:
        return None
    if compile is True:
        return "default"
    if isinstance(compile, str) and compile in COMPILE_MODES:
        return compile
    raise ValueError(
        f"model.compile={compile!r} is invalid: use false, true (= default) or a torch.compile "
        f"mode: {', '.join(COMPILE_MODES)}"
    )
