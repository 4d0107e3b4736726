"""Gradient variance, bias and signal-to-noise ratio of estimators at fixed parameters and batch.

The measurement (definitions in ``docs/gradients.md``):

* A model that follows catgrad's protocol, ``model.objective(batch, estimator) -> (loss, metrics)``
  where the gradient of ``loss`` is ``estimator``'s estimate of the gradient of the training loss,
  is evaluated ``S`` times at its current parameters on one fixed batch; each evaluation draws
  fresh randomness and gives one gradient sample ``g_s``.
* Per parameter group (``logits``; one group per module-name prefix such as ``encoder.`` and
  ``decoder.``; ``all`` = every trainable parameter of the model outside its estimators):

  - ``trace_cov = sum_i Var_s[g_s,i]``, the sum over coordinates of the unbiased (``S - 1``)
    variance *across samples*, and ``log10_trace_cov``;
  - ``mean_grad_sq_norm = ||mean_s g_s||^2``, the squared norm of the mean gradient;
  - ``snr = mean_grad_sq_norm / trace_cov``;
  - with an exact gradient ``g*`` (exact marginalization, when ``K^N`` is within budget):
    ``bias_norm = ||mean_s g_s - g*||``, ``mse = mean_s ||g_s - g*||^2`` and
    ``cosine = mean_s cos(g_s, g*)`` (the direction quality of one gradient sample).

* ``logits`` is the gradient with respect to the logits tensor the model hands the estimator: the
  estimator is wrapped in a tap that adds a zero offset to those logits, so ``d loss / d offset``
  is that gradient. Terms the model computes from the logits itself (the analytic KL) are not
  part of it; they are in the ``encoder`` group.

Two ways to draw the samples, with identical statistics:

* ``vmap``: ``torch.func.vmap`` over samples (``randomness="different"``) of ``torch.func.grad`` of
  a ``torch.func.functional_call``, in chunks of ``chunk_size`` samples. Work that does not depend
  on the sample (the encoder's forward pass) is done once per chunk.
* ``loop``: one ``torch.autograd.grad`` per sample. Used when the estimator cannot be vmapped
  (data-dependent control flow, ``.item()``, in-place state updates): ``method="auto"`` tries
  ``vmap`` and falls back with a warning.

Per-sample gradients are never all kept: each chunk is reduced to per-coordinate means and a summed
squared deviation, merged across chunks with Chan et al.'s parallel update (numerically stable).

A probe changes nothing: parameters are read, never written (no ``.grad`` is touched), the
estimator runs inside ``estimator.frozen()`` (a moving-average baseline keeps its value) and, with a
``seed``, the global random state is forked, so training continues with the same random stream.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from estimators.base import Estimator, TemperedEstimator
from estimators.marginalization import Marginalization
from experiments.probe.statistics import Moments, ProbeResult, group_stats
from experiments.probe.tap import LogitsTap, ObjectiveModule

LOGITS = "logits"
ALL = "all"
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {
    "classifier": ("classifier.",),  # M2's q(y|x)
    "encoder": ("encoder.",),
    "decoder": ("decoder.",),
}
"""Named parameter groups: a group holds every parameter whose name starts with one of its
prefixes. Groups that match no parameter of a model are left out."""

METHODS = ("auto", "vmap", "loop")


def temperature_of(estimator: Estimator) -> float | None:
    """The current temperature of a relaxed estimator (a :class:`TemperedEstimator`), else None."""
    if isinstance(estimator, TemperedEstimator):
        return float(estimator.temperature(estimator.step))
    return None


# ------------------------------------------------------------------------------------------------
# The sampler
# ------------------------------------------------------------------------------------------------
@contextmanager
def forked_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the global generators inside the block and restore their state after it (no-op for
    ``seed=None``)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _random_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_random_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def estimator_parameter_names(model: nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of parameters owned by estimator submodules."""
    owned: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Estimator):
            owned.update(f"{prefix}.{name}" for name, _ in module.named_parameters())
    return owned


class GradientSampler:
    """Gradient samples of ``model``'s training loss on a fixed ``batch``, for any estimator.

    Built once per (model, batch): a discovery pass (no estimator runs) records the shape of the
    logits the model hands its estimator and the size of its per-example features. Parameters are
    the model's trainable ones outside its estimators; ``groups`` maps group names to parameter
    name prefixes (default :data:`DEFAULT_GROUPS`); ``logits`` and ``all`` are always measured
    (``logits`` only when the objective calls the estimator exactly once).
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.model = model
        self.batch = batch
        owned = estimator_parameter_names(model)
        self.params: dict[str, nn.Parameter] = {
            name: p for name, p in model.named_parameters() if p.requires_grad and name not in owned
        }
        if not self.params:
            raise ValueError("the model has no trainable parameters outside its estimator")
        self.device = next(iter(self.params.values())).device
        prefixes = DEFAULT_GROUPS if groups is None else groups
        self.groups: dict[str, list[str]] = {}
        for group, starts in prefixes.items():
            if group in (LOGITS, ALL):
                raise ValueError(f"parameter group name {group!r} is reserved")
            names = [n for n in self.params if any(n.startswith(s) for s in starts)]
            if names:
                self.groups[group] = names
        self.groups[ALL] = list(self.params)
        recorder = LogitsTap(None)
        with torch.no_grad(), forked_rng(0, self.device):  # models may draw noise (M2's z)
            model.objective(batch, recorder)  # type: ignore[operator]
        self.num_calls = recorder.calls
        if recorder.logits_shape is None:
            raise ValueError("the model's objective never called its estimator on this batch")
        self.logits_shape = recorder.logits_shape  # [B, N, K]
        self.logits_dtype = recorder.logits_dtype or torch.float32
        self.feature_dim = recorder.feature_dim
        self.has_logits = self.num_calls == 1
        if self.has_logits:
            self.groups[LOGITS] = [LOGITS]
        self._vmap_failures: dict[type, str] = {}

    # --------------------------------------------------------------------------------------------
    def prepare(self, estimator: Estimator) -> Estimator:
        """Call ``estimator.prepare`` with the model's latent shape and features; move it to the
        model's device. For estimators not built by the model (probe lists)."""
        _, num_variables, num_classes = self.logits_shape
        estimator.prepare(num_variables, num_classes, self.feature_dim)
        return estimator.to(self.device)

    def exact_gradient(
        self,
        max_configurations: int = 1024,
        num_samples: int = 1,
        chunk_size: int = 32,
        method: str = "auto",
        seed: int | None = None,
    ) -> dict[str, Tensor] | None:
        """The exact gradient per tensor by exact marginalization (``[...]`` like the tensor);
        None when ``K^N`` exceeds ``max_configurations``.

        It is exact when the objective has no randomness besides the estimator's. Where it has
        (M2's reparameterized Gaussian z), the result is the mean of ``num_samples``
        marginalization gradients, whose own noise adds to measured biases; with
        ``num_samples=1`` a second draw detects that case and warns.
        """
        marginalization = Marginalization(max_configurations=max_configurations)
        try:
            self.prepare(marginalization)
        except ValueError:
            return None
        draws = max(num_samples, 2)
        _, moments = self._accumulate(marginalization, draws, chunk_size, method, None, seed)
        if num_samples == 1:
            spread = math.fsum(m.sum_sq_dev for m in moments.values())
            size = math.fsum(float(m.mean_vector().pow(2).sum()) for m in moments.values())
            if spread > 1e-8 * size:
                warnings.warn(
                    "gradient probe: the marginalization gradient is random (the objective has "
                    "noise besides the estimator's); biases are measured against a 2-draw mean: "
                    "raise exact_samples",
                    stacklevel=2,
                )
        return {name: m.mean_tensor() for name, m in moments.items()}

    def samples(
        self, estimator: Estimator, num_samples: int, chunk_size: int = 32, method: str = "auto"
    ) -> tuple[str, Iterator[dict[str, Tensor]]]:
        """``(method used, iterator of chunks {tensor name: [C, ...] gradient samples})``.

        The caller is responsible for ``estimator.frozen()`` and random state (see :meth:`probe`).
        ``method="auto"`` tries ``vmap`` on a first chunk and falls back to ``loop``, warning
        once per estimator type.
        """
        if method not in METHODS:
            raise ValueError(f"probe method={method!r} is unknown: choose one of {METHODS}")
        if method == "loop" or (method == "auto" and type(estimator) in self._vmap_failures):
            return "loop", self._loop_chunks(estimator, num_samples, chunk_size)
        chunks = self._vmap_chunks(estimator, num_samples, chunk_size)
        if method == "vmap":
            return "vmap", chunks
        random_state = _random_state(self.device)
        try:
            first = next(chunks)
        except Exception as error:  # anything vmap cannot batch
            _set_random_state(self.device, random_state)  # the loop sees the same noise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            self._vmap_failures[type(estimator)] = reason
            warnings.warn(
                f"gradient probe: {type(estimator).__name__} cannot be vmapped ({reason[:200]}); "
                f"using a loop of {num_samples} backward passes",
                stacklevel=2,
            )
            return "loop", self._loop_chunks(estimator, num_samples, chunk_size)
        return "vmap", _prepend(first, chunks)

    def _chunk_sizes(self, num_samples: int, chunk_size: int) -> Iterator[int]:
        for start in range(0, num_samples, chunk_size):
            yield min(chunk_size, num_samples - start)

    def _vmap_chunks(
        self, estimator: Estimator, num_samples: int, chunk_size: int
    ) -> Iterator[dict[str, Tensor]]:
        module = ObjectiveModule(self.model, LogitsTap(estimator), self.has_logits)
        params = {f"model.{name}": p.detach() for name, p in self.params.items()}

        def loss_of(params: dict[str, Tensor], offset: Tensor) -> Tensor:
            return functional_call(module, params, (self.batch, offset))

        batched = vmap(grad(loss_of, argnums=(0, 1)), in_dims=(None, 0), randomness="different")
        offset_shape = tuple(self.logits_shape) if self.has_logits else ()
        for size in self._chunk_sizes(num_samples, chunk_size):
            offsets = torch.zeros(
                (size, *offset_shape), device=self.device, dtype=self.logits_dtype
            )  # [C, B, N, K] (or [C] without a logits group)
            with torch.enable_grad():
                param_grads, offset_grads = batched(params, offsets)
            chunk = {name[len("model.") :]: value for name, value in param_grads.items()}
            if self.has_logits:
                chunk[LOGITS] = offset_grads  # [C, B, N, K]
            yield chunk

    def _loop_chunks(
        self, estimator: Estimator, num_samples: int, chunk_size: int
    ) -> Iterator[dict[str, Tensor]]:
        tap = LogitsTap(estimator)
        names = list(self.params)
        tensors = list(self.params.values())
        for size in self._chunk_sizes(num_samples, chunk_size):
            collected: dict[str, list[Tensor]] = {name: [] for name in self.groups[ALL]}
            if self.has_logits:
                collected[LOGITS] = []
            for _ in range(size):
                offset = torch.zeros(
                    self.logits_shape,
                    device=self.device,
                    dtype=self.logits_dtype,
                    requires_grad=True,
                )  # [B, N, K]
                tap.offset = offset if self.has_logits else None
                try:
                    with torch.enable_grad():
                        loss, _ = self.model.objective(self.batch, tap)  # type: ignore[operator]
                        inputs = tensors + ([offset] if self.has_logits else [])
                        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                finally:
                    tap.offset = None
                # grads ends with the offset's gradient when there is a logits group
                for name, tensor, value in zip(names, tensors, grads, strict=False):
                    collected[name].append(torch.zeros_like(tensor) if value is None else value)
                if self.has_logits:
                    value = grads[-1]
                    collected[LOGITS].append(torch.zeros_like(offset) if value is None else value)
            yield {name: torch.stack(values) for name, values in collected.items()}

    def _accumulate(
        self,
        estimator: Estimator,
        num_samples: int,
        chunk_size: int,
        method: str,
        exact: Mapping[str, Tensor] | None,
        seed: int | None,
    ) -> tuple[str, dict[str, Moments]]:
        """Draw the samples (frozen estimator, forked random state) into per-tensor moments."""
        moments: dict[str, Moments] = {}
        with ExitStack() as stack:
            stack.enter_context(forked_rng(seed, self.device))
            stack.enter_context(estimator.frozen())
            used, chunks = self.samples(estimator, num_samples, chunk_size, method)
            for chunk in chunks:
                for name, values in chunk.items():
                    if name not in moments:
                        moments[name] = Moments(None if exact is None else exact[name])
                    moments[name].update(values)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return used, moments

    # --------------------------------------------------------------------------------------------
    def probe(
        self,
        estimator: Estimator,
        num_samples: int = 256,
        chunk_size: int = 32,
        exact: Mapping[str, Tensor] | None = None,
        method: str = "auto",
        seed: int | None = None,
    ) -> ProbeResult:
        """Measure ``estimator``: ``num_samples`` gradient samples reduced to per-group stats.

        ``exact`` (from :meth:`exact_gradient`) adds bias, MSE and cosine. ``seed`` forks and seeds
        the global random state for the probe (None: use and advance the current stream). The
        estimator's state, the model's parameters and their ``.grad`` are left unchanged.
        """
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"probe num_samples={num_samples!r} is invalid: use an integer >= 2")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"probe chunk_size={chunk_size!r} is invalid: use an integer >= 1")
        start = time.perf_counter()
        used, moments = self._accumulate(estimator, num_samples, chunk_size, method, exact, seed)
        groups = {
            group: group_stats([moments[name] for name in names])
            for group, names in self.groups.items()
        }
        return ProbeResult(
            num_samples=num_samples,
            method=used,
            seconds=time.perf_counter() - start,
            groups=groups,
            temperature=temperature_of(estimator),
        )


def _prepend(
    first: dict[str, Tensor], rest: Iterator[dict[str, Tensor]]
) -> Iterator[dict[str, Tensor]]:
    yield first
    yield from rest


def probe_estimators(
    sampler: GradientSampler,
    estimators: Mapping[str, Estimator],
    num_samples: int = 256,
    chunk_size: int = 32,
    exact_max_configurations: int = 1024,
    method: str = "auto",
    seed: int | None = None,
    on_result: Callable[[str, ProbeResult], None] | None = None,
    exact_samples: int = 1,
) -> dict[str, ProbeResult]:
    """Probe several estimators at the same parameters and batch, sharing one exact gradient
    (``exact_max_configurations = 0``: none; ``exact_samples``: see
    :meth:`GradientSampler.exact_gradient`).

    Every estimator gets the same ``seed`` (common random numbers across estimators).
    """
    exact = None
    if exact_max_configurations:
        exact = sampler.exact_gradient(
            exact_max_configurations, exact_samples, chunk_size, method, seed
        )
    results: dict[str, ProbeResult] = {}
    for name, estimator in estimators.items():
        result = sampler.probe(estimator, num_samples, chunk_size, exact, method, seed)
        results[name] = result
        if on_result is not None:
            on_result(name, result)
    return results
