"""R independent replicas of one model trained as one module: seeds as a batch dimension.

:class:`ReplicatedModel` takes R models built alike (replica r built after seeding with
``seed + r``, so it starts from exactly the weights a single run with that seed would have) and
stacks every parameter and buffer along a new leading replica axis ``[R, ...]``, in place, in the
first model (the *template*). The model code stays written for one replica: each training,
validation and test step runs the model's own methods under ``torch.func.vmap`` over a
``torch.func.functional_call`` that swaps in one replica's slice (``randomness="different"``: each
replica draws its own estimator noise from the step-seeded global generator). Estimators that
cannot run under vmap (:data:`LOOPED_ESTIMATORS`) train with a Python loop over the replicas
instead, each call on one replica's slices: the same functional call, only not batched.

Contracts:

* Estimator state is per replica because the estimator is a submodule of the model: moving
  averages and learned baselines are stacked like the weights, so one replica's samples never
  enter another's baseline.
* The loss handed to Lightning is the *sum* of the per-replica losses; replicas share no
  parameter, so replica r's parameters receive exactly the gradient of replica r's loss. Adam is
  elementwise, so one optimizer over the stacked tensors updates each replica as its own run
  would (global-norm gradient clipping would mix replicas: the builder refuses it).
* All replicas read the same batches (they differ in initialisation and estimator noise).
* Validation logs ``replica_<r>/val/<metric>`` and their mean as ``val/<metric>`` (what the
  checkpoint callback monitors); each replica's best weights by ``val/neg_elbo`` are kept in
  ``self.best`` (saved in checkpoints), and testing evaluates replica r on its own best weights,
  as a single run tests its best checkpoint. Test metrics are ``replica_<r>/test/<metric>``.
* A model takes part when it implements ``evaluation_metrics(batch, stage)`` (per-batch means,
  no logging) and everything its ``objective`` does can be vmapped (no ``.item()``, no
  data-dependent Python branches, in-place updates only of its own buffers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from models.base import EstimatorModel

REPLICA_PREFIX = "replica_"
MONITOR = "neg_elbo"  # the validation metric that selects each replica's best weights


def replica_key(replica: int, name: str) -> str:
    """The logged name of replica ``replica``'s metric ``name``: ``replica_3/test/neg_elbo``."""
    return f"{REPLICA_PREFIX}{replica}/{name}"


# Estimators whose training estimate cannot run under vmap, with the reason (by class name):
# their training step loops over the replicas (``ReplicatedModel.vectorized_training``).
LOOPED_ESTIMATORS = {
    "RELAX": "it calls torch.autograd.grad inside its estimate (for the encoder gradient and the "
    "variance objective of its control variate), which vmap hides: the control variate would get "
    "no gradient",
    "ARSM": "the number of its pseudo actions depends on the sample (a data-dependent shape, "
    "which vmap cannot batch)",
}


def vectorizable(estimator: nn.Module) -> bool:
    """Whether ``estimator``'s training estimate can run under ``vmap`` (not a subclass of a
    class named in :data:`LOOPED_ESTIMATORS`)."""
    return not any(cls.__name__ in LOOPED_ESTIMATORS for cls in type(estimator).__mro__)


def unsupported(model: EstimatorModel) -> str | None:
    """Why ``model`` cannot be replicated yet (``"model ToyProblem is not supported yet: ..."``), or
    None. A model must state its evaluation metrics without logging (``evaluation_metrics``)."""
    if type(model).evaluation_metrics is EstimatorModel.evaluation_metrics:
        return (f"model {type(model).__name__} is not supported yet (it has no "
                f"evaluation_metrics): use replicas=1")
    return None


def stack_into(template: nn.Module, replicas: Sequence[nn.Module]) -> None:
    """Replace every parameter and buffer of ``template`` by the stack ``[R, ...]`` of the same
    tensor in each of ``replicas`` (``template`` may be one of them). Persistence is kept."""
    for name, _ in list(template.named_parameters()):
        owner, _, attribute = name.rpartition(".")
        module = template.get_submodule(owner)
        stacked = torch.stack([r.get_parameter(name).detach() for r in replicas])  # [R, ...]
        trained = template.get_parameter(name).requires_grad  # frozen ones stay frozen
        setattr(module, attribute, nn.Parameter(stacked, requires_grad=trained))
    for name, _ in list(template.named_buffers()):
        owner, _, attribute = name.rpartition(".")
        module = template.get_submodule(owner)
        module._buffers[attribute] = torch.stack([r.get_buffer(name) for r in replicas])


def unstack_into(module: nn.Module, replica: int) -> None:
    """Replace every stacked ``[R, ...]`` parameter and buffer of ``module`` by a copy of its
    slice ``replica`` (the inverse of :func:`stack_into` for one replica)."""
    for name, parameter in list(module.named_parameters()):
        owner, _, attribute = name.rpartition(".")
        sliced = parameter.detach()[replica].clone()  # [...]
        setattr(module.get_submodule(owner), attribute,
                nn.Parameter(sliced, requires_grad=parameter.requires_grad))
    for name, buffer in list(module.named_buffers()):
        owner, _, attribute = name.rpartition(".")
        module.get_submodule(owner)._buffers[attribute] = buffer[replica].clone()  # [...]


class ReplicatedModel(L.LightningModule):
    """R replicas of an :class:`EstimatorModel`, trained and evaluated at once (module docstring).
    """

    best_score: Tensor  # [R] buffer: best validation metric of each replica so far

    def __init__(self, replicas: Sequence[EstimatorModel]) -> None:
        super().__init__()
        if len(replicas) < 2:
            raise ValueError(f"replicas={len(replicas)}: a replicated model needs R >= 2")
        template = replicas[0]
        problem = unsupported(template)
        if problem is not None:
            raise ValueError(f"replicas={len(replicas)} with {problem}")
        self.num_replicas = len(replicas)
        self.vectorized_training = vectorizable(template.estimator)
        stack_into(template, replicas)
        self.model = template
        self._views: list[EstimatorModel] = []  # replica(r)'s single models, built on first use
        self.best = copy.deepcopy(template).requires_grad_(False)
        self.register_buffer("best_score", torch.full((self.num_replicas,), torch.inf))
        self._sums: dict[str, Tensor] = {}  # validation: metric -> [R] sum weighted by batch
        self._count = 0
        self._test_state: dict[str, Tensor] | None = None

    # --------------------------------------------------------------------------------------------
    # Running the model's methods once per replica
    # --------------------------------------------------------------------------------------------
    def forward(self, function: Callable[..., Any], *args: Any) -> Any:
        """Call ``function(*args)``: the target of ``functional_call`` in :meth:`per_replica`."""
        return function(*args)

    def per_replica(
        self, function: Callable[..., Any], *args: Any, state: dict[str, Tensor] | None = None,
        vectorized: bool = True,
    ) -> Any:
        """``function(*args)`` (a method of ``self.model``) for every replica.

        Tensors it returns gain a leading replica axis ``[R, ...]``; Python numbers become
        tensors ``[R]``. The weights are ``state`` (names of ``self.model``'s parameters and
        buffers -> stacked tensors), by default the current ones. ``vectorized``: all replicas
        in one ``vmap`` call (the training step: small tensors, where per-operation overhead
        dominates); else one call per replica on its slices (evaluation: large chunks, where
        vmap's batched products, materialised inputs and unfused bias additions cost more than
        R calls).
        """
        weights = stacked_state(self.model) if state is None else state
        state = {f"model.{name}": tensor for name, tensor in weights.items()}

        def one_replica(replica_state: dict[str, Tensor]) -> Any:
            output = functional_call(self, replica_state, (function, *args))
            return tensors_only(output)

        if vectorized:
            return vmap(one_replica, randomness="different")(state)
        outputs = [
            one_replica({name: tensor[r] for name, tensor in state.items()})
            for r in range(self.num_replicas)
        ]
        return stack_outputs(outputs)

    def objectives(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Every replica's training ``objective`` on ``batch`` with its own estimator: losses
        ``[R]`` and metrics ``{name: [R]}``. One vmap call, or with an estimator that cannot be
        vmapped (:data:`LOOPED_ESTIMATORS`) one call per replica: the gradient of ``losses[r]``
        reaches replica r's slices of the stacked weights either way."""
        model = self.model
        return self.per_replica(  # type: ignore[no-any-return]
            lambda b: model.objective(b, model.estimator), batch,
            vectorized=self.vectorized_training,
        )

    def replica(self, replica: int) -> EstimatorModel:
        """A single model (the template's class, weights ``[...]``) holding replica ``replica``'s
        current parameters, buffers and estimator state, e.g. for the gradient probe. A copy,
        refreshed on every call (the same object for a replica); writes to it are not seen by
        the replicated model. It is not a submodule: it is in no checkpoint or optimizer."""
        if not self._views:
            for r in range(self.num_replicas):
                view = copy.deepcopy(self.model)  # LightningModule drops its trainer when copied
                unstack_into(view, r)
                self._views.append(view)
        view = self._views[replica]
        stacked = stacked_state(self.model)
        with torch.no_grad():
            for name, tensor in stacked_state(view).items():
                tensor.copy_(stacked[name][replica])
        view.train(self.model.training)
        return view

    # --------------------------------------------------------------------------------------------
    # Lightning hooks
    # --------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.model.estimator.set_step(self.global_step)
        batch = self.model.training_batch(batch, self.global_step)
        losses, metrics = self.objectives(batch)  # [R], {name: [R]}
        if EstimatorModel.metrics_reach_loggers(self):  # type: ignore[arg-type]
            logged = {
                replica_key(r, f"train/{name}"): value[r]
                for name, value in metrics.items()
                for r in range(self.num_replicas)
            }
            self.log_dict(logged, on_step=True, on_epoch=False,
                          batch_size=self.model.batch_size(batch))
        return losses.sum()

    def _evaluate(
        self, batch: Any, stage: str, state: dict[str, Tensor] | None
    ) -> dict[str, Tensor]:
        model = self.model
        metrics: dict[str, Tensor] = self.per_replica(
            lambda b: model.evaluation_metrics(b, stage), batch, state=state, vectorized=False
        )  # {name: [R]}
        size = int(batch[0].shape[0])  # evaluation batches are (x, y) for every model
        for name, value in metrics.items():
            for r in range(self.num_replicas):
                self.log(replica_key(r, f"{stage}/{name}"), value[r], batch_size=size)
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._sums, self._count = {}, 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        metrics = self._evaluate(batch, "val", None)
        size = int(batch[0].shape[0])
        for name, value in metrics.items():
            self.log(f"val/{name}", value.mean(), batch_size=size, prog_bar=name == MONITOR)
            self._sums[name] = self._sums.get(name, 0.0) + value.detach() * size  # [R]
        self._count += size

    def on_validation_epoch_end(self) -> None:
        """Keep each replica's weights when its validation metric improved (not while sanity
        checking, as the checkpoint callback)."""
        if self.trainer.sanity_checking or MONITOR not in self._sums or not self._count:
            return
        score = self._sums[MONITOR] / self._count  # [R]
        improved = score < self.best_score  # [R]
        self.best_score.copy_(torch.where(improved, score, self.best_score))
        with torch.no_grad():
            current = stacked_state(self.model)
            for name, tensor in stacked_state(self.best).items():
                tensor.copy_(select_replicas(improved, current[name], tensor))

    def on_test_epoch_start(self) -> None:
        """Test each replica on its best weights by validation, or on its current weights if it
        never had a finite validation score (as a single run without a best checkpoint)."""
        validated = torch.isfinite(self.best_score)  # [R]
        current = stacked_state(self.model)
        self._test_state = {
            name: select_replicas(validated, tensor, current[name])
            for name, tensor in stacked_state(self.best).items()
        }

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self._test_state)

    def on_test_epoch_end(self) -> None:
        self._test_state = None

    def configure_optimizers(self) -> Any:
        return self.model.configure_optimizers()


def stacked_state(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``module`` by name (the stacked ``[R, ...]`` tensors)."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def select_replicas(mask: Tensor, chosen: Tensor, other: Tensor) -> Tensor:
    """Replica r of ``chosen`` where ``mask [R]`` is set, else of ``other`` (both ``[R, ...]``)."""
    return torch.where(mask.reshape(-1, *[1] * (chosen.dim() - 1)), chosen, other)  # [R, ...]


def stack_outputs(outputs: list[Any]) -> Any:
    """The per-replica outputs (same structure of tensors) stacked leafwise: ``[R, ...]``."""
    first = outputs[0]
    if isinstance(first, dict):
        return {key: stack_outputs([output[key] for output in outputs]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack_outputs(list(parts)) for parts in zip(*outputs, strict=True))
    return torch.stack(outputs)


def tensors_only(output: Any) -> Any:
    """``output`` with every Python number turned into a tensor (vmap returns only tensors)."""
    if isinstance(output, dict):
        return {key: tensors_only(value) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(tensors_only(value) for value in output)
    if isinstance(output, (int, float)):
        return torch.tensor(float(output))
    return output
