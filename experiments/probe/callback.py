"""``GradientProbe``: gradient variance, bias and SNR of several estimators along one training run.

Every ``every_n_steps`` optimizer steps (at the start of the step, so step 0 is the initial
parameters), on a fixed probe batch (the first training batch of the run, kept), it measures each
estimator of its list at the run's current parameters with :mod:`experiments.probe`: the
training estimator (``include_train_estimator``) and any others given (``estimators``, a dict of
name -> estimator, e.g. from ``conf/estimator``). All see the same parameters, batch, exact
gradient and random numbers: the "same trajectory" comparison of Tucker et al. (2017).

Outputs:

* to every logger: ``probe/<estimator>/<group>/<metric>`` (finite values only) and
  ``probe/<estimator>/seconds``, at ``step = trainer.global_step``;
* ``<run dir>/probe.jsonl`` (``trainer.default_root_dir``): one JSON object per estimator, group
  and probe step, including non-finite values as ``null``; format in ``docs/gradients.md``.

Probing does not change the run: parameters and ``.grad`` are untouched, estimators are frozen, and
the random state is forked and seeded from ``(seed, step)``, so a run with the probe follows the
same trajectory as one without. Only global rank zero probes.

A replicated run (``replicas=R``, :class:`models.replicas.ReplicatedModel`) is probed replica by
replica, each on a single model holding its current weights and estimator state
(``ReplicatedModel.replica``), with the seed of the single run it stands for (``seed + r``):
rows go to ``<run dir>/replica_<r>/<filename>`` (the replica's job directory) and to the loggers
as ``replica_<r>/probe/...``, so replica r's probe is the probe of the run with seed ``seed + r``
at the same weights. The extra ``estimators`` are shared by the replicas (frozen while probed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from estimators.base import Estimator
from estimators.validation import require_int
from experiments.probe.sampler import METHODS, GradientSampler, ProbeResult, probe_estimators

PROBE_FILE_VERSION = 1
REPLICA_PREFIX = "replica_"  # a replica's job directory and logged names: replica_<r>/
LOGGED_NEVER = frozenset({"num_coordinates"})  # constant per group: in the file, not the loggers


def _clone_batch(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    return require_int(f"callbacks.gradient_probe.{name}", value, minimum)


def finite_or_none(value: float | None) -> float | None:
    """JSON-safe number: None for missing or non-finite values."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


class GradientProbe(L.Callback):
    """Probe estimators every ``every_n_steps`` steps; see the module docstring.

    Args:
        every_n_steps: probe when ``global_step % every_n_steps == 0``.
        num_samples: gradient samples per estimator and probe (S >= 2).
        chunk_size: samples per vmapped chunk (memory ~ chunk_size x parameter count).
        estimators: extra estimators by name (built, e.g., by Hydra from ``conf/estimator``);
            prepared for the model's latent shape on first use.
        include_train_estimator: also probe the model's own ``estimator`` (with its trained state).
        train_estimator_name: its name in the keys (the config uses the ``estimator`` choice).
        groups: parameter groups as name -> list of parameter-name prefixes (None: classifier.*,
            encoder.*, decoder.*); ``logits`` and ``all`` are always measured.
        exact_max_configurations: exact gradient by enumeration when ``K^N`` is at most this
            (0: never).
        exact_samples: marginalization gradients averaged into the reference (more than 1 only
            for objectives with noise besides the estimator's, such as M2's Gaussian z).
        method: ``auto`` (vmap, loop fallback), ``vmap`` or ``loop``.
        seed: probe randomness is seeded from ``(seed, step)``.
        filename: the JSON-lines file in the run directory.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        num_samples: int = 256,
        chunk_size: int = 32,
        estimators: Mapping[str, Estimator] | None = None,
        include_train_estimator: bool = True,
        train_estimator_name: str = "train",
        groups: Mapping[str, Sequence[str]] | None = None,
        exact_max_configurations: int = 1024,
        exact_samples: int = 1,
        method: str = "auto",
        seed: int = 0,
        filename: str = "probe.jsonl",
    ) -> None:
        self.every_n_steps = _positive_int("every_n_steps", every_n_steps)
        self.num_samples = _positive_int("num_samples", num_samples, minimum=2)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        self.exact_max_configurations = _positive_int(
            "exact_max_configurations", exact_max_configurations, minimum=0
        )
        self.exact_samples = _positive_int("exact_samples", exact_samples)
        if method not in METHODS:
            raise ValueError(
                f"callbacks.gradient_probe.method={method!r} is unknown: choose one of {METHODS}"
            )
        self.method = method
        self.extra_estimators: dict[str, Estimator] = dict(estimators or {})
        for name, estimator in self.extra_estimators.items():
            if not isinstance(estimator, Estimator):
                raise ValueError(
                    f"callbacks.gradient_probe.estimators.{name} is a {type(estimator).__name__}, "
                    f"not an Estimator: give an estimator config (_target_: estimators....)"
                )
        if not include_train_estimator and not self.extra_estimators:
            raise ValueError(
                "callbacks.gradient_probe has nothing to probe: set include_train_estimator=true "
                "or give estimators"
            )
        if include_train_estimator and train_estimator_name in self.extra_estimators:
            raise ValueError(
                f"callbacks.gradient_probe: the name {train_estimator_name!r} is used by both the "
                f"training estimator and an entry of estimators; rename one"
            )
        self.include_train_estimator = include_train_estimator
        self.train_estimator_name = str(train_estimator_name)
        self.groups = None if groups is None else {k: list(v) for k, v in groups.items()}
        self.seed = int(seed)
        self.filename = filename
        self._batch: Any = None
        self._samplers: dict[int | None, GradientSampler] = {}  # by replica (None: single run)
        self._last_step: int | None = None

    # --------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batch is None:
            self._batch = _clone_batch(batch)
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._last_step = step
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.probe(trainer, pl_module)

    def estimators_for(self, pl_module: L.LightningModule) -> dict[str, Estimator]:
        """The estimators to probe, by name (the training one first)."""
        named: dict[str, Estimator] = {}
        if self.include_train_estimator:
            named[self.train_estimator_name] = pl_module.estimator  # type: ignore[assignment]
        named.update(self.extra_estimators)
        return named

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule
              ) -> dict[str, ProbeResult]:
        """Probe every estimator now; log and append the rows to the run's file. A replicated
        model is probed once per replica (module docstring); the results are then keyed
        ``replica_<r>/<estimator>``."""
        root = Path(trainer.default_root_dir)
        count = getattr(pl_module, "num_replicas", None)
        if count is None:
            return self.probe_model(trainer, pl_module, None, root / self.filename)
        results: dict[str, ProbeResult] = {}
        for replica in range(count):
            prefix = f"{REPLICA_PREFIX}{replica}/"
            model = pl_module.replica(replica)  # type: ignore[operator]
            own = self.probe_model(trainer, model, replica, root / prefix / self.filename)
            results.update({prefix + name: result for name, result in own.items()})
        return results

    def probe_model(self, trainer: L.Trainer, model: L.LightningModule, replica: int | None,
                    path: Path) -> dict[str, ProbeResult]:
        """Probe ``model`` (the run's, or replica ``replica``'s single model), seeded as the run
        of seed ``seed + replica``; log (keys under ``replica_<r>/`` for a replica) and append
        the rows to ``path``."""
        sampler = self._samplers.get(replica)
        if sampler is None:
            sampler = self._samplers[replica] = GradientSampler(model, self._batch, self.groups)
            for estimator in self.extra_estimators.values():
                sampler.prepare(estimator)
        step = trainer.global_step
        estimators = self.estimators_for(model)
        for estimator in estimators.values():
            estimator.set_step(step)
        results = probe_estimators(
            sampler,
            estimators,
            num_samples=self.num_samples,
            chunk_size=self.chunk_size,
            exact_max_configurations=self.exact_max_configurations,
            method=self.method,
            seed=(self.seed + (replica or 0)) * 1_000_003 + step,
            exact_samples=self.exact_samples,
        )
        prefix = "" if replica is None else f"{REPLICA_PREFIX}{replica}/"
        metrics: dict[str, float] = {}
        for name, result in results.items():
            for key, value in result.metrics().items():
                if value is None or not math.isfinite(value):
                    continue
                if key.split("/")[-1] not in LOGGED_NEVER:
                    metrics[f"{prefix}probe/{name}/{key}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.write_rows(path, step, trainer, results)
        return results

    def write_rows(
        self, path: Path, step: int, trainer: L.Trainer, results: Mapping[str, ProbeResult]
    ) -> None:
        """Append one JSON object per (estimator, group) to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as stream:
            for name, result in results.items():
                for row in result.rows():
                    record = {
                        "version": PROBE_FILE_VERSION,
                        "step": step,
                        "epoch": trainer.current_epoch,
                        "estimator": name,
                        **{
                            key: finite_or_none(value) if isinstance(value, float) else value
                            for key, value in row.items()
                        },
                    }
                    stream.write(json.dumps(record) + "\n")

    # --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
