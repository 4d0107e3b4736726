"""``model.compile=true``: the compiled training objective equals the eager one, and an annealed
temperature reaches the compiled graph as a tensor (no recompilation, no stale value)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from estimators import ExponentialTemperature, GumbelSoftmax, Marginalization
from estimators.base import Estimator
from models import CategoricalVAE


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_vae(estimator: Estimator) -> CategoricalVAE:
    torch.manual_seed(0)
    return CategoricalVAE(
        estimator=estimator, image_shape=(2, 3), num_variables=2, num_classes=3,
        encoder_hidden=[8], decoder_hidden=[8], compile=True,
    ).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = (torch.rand(16, 6, generator=generator) < 0.5).double()  # [B, D]
    return x, torch.zeros(16)


def loss_and_grads(model: CategoricalVAE, objective) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = objective(batch(), model.estimator)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compiled_objective_equals_eager_objective() -> None:
    # Marginalization is deterministic: the same loss and gradients up to float64 rounding.
    model = compiled_vae(Marginalization())
    assert model.training_objective() is not model.objective
    eager_loss, eager_grads = loss_and_grads(model, model.objective)
    compiled_loss, compiled_grads = loss_and_grads(model, model.training_objective())
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-10, atol=1e-10)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-8, atol=1e-10)


def test_annealed_temperature_reaches_the_compiled_graph_without_recompiling() -> None:
    schedule = ExponentialTemperature(tau0=1.0, rate=1e-3, tau_min=0.1, interval=10)
    model = compiled_vae(GumbelSoftmax(temperature=schedule))
    # fallback_random: inductor draws eager's random numbers, so with the same seed the compiled
    # loss must equal the eager loss at every step -- which fails if a stale tau is baked in.
    with torch._inductor.config.patch(fallback_random=True):
        for step in (0, 10, 700, 5000):  # tau = 1.0, 0.990, 0.497, 0.1
            model.estimator.set_step(step)
            torch.manual_seed(step)
            compiled_loss, metrics = model.training_objective()(batch(), model.estimator)
            torch.manual_seed(step)
            eager_loss, _ = model.objective(batch(), model.estimator)
            assert float(metrics["temperature"]) == pytest.approx(schedule(step), rel=1e-12)
            torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-10, atol=1e-10)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("given, mode", [
    (False, None), (True, "default"), ("default", "default"),
    ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune"),
])
def test_model_compile_takes_torch_compile_modes(given, mode) -> None:
    model = CategoricalVAE(estimator=Marginalization(), image_shape=(2, 3), num_variables=2,
                           num_classes=3, encoder_hidden=[8], decoder_hidden=[8], compile=given)
    assert model.compile_objective == mode
    assert (model.training_objective() == model.objective) == (mode is None)


@pytest.mark.parametrize("given", ["fast", "true", 1, None])
def test_unknown_compile_setting_is_one_line_naming_the_key(given) -> None:
    with pytest.raises(ValueError, match=r"model\.compile=.* is invalid: use false, true .*"
                                         r"reduce-overhead"):
        CategoricalVAE(estimator=Marginalization(), image_shape=(2, 3), num_variables=2,
                       num_classes=3, compile=given)


def test_reduce_overhead_step_is_one_graph_and_equals_eager() -> None:
    # The mode that replays CUDA graphs on a GPU: the step must be one graph with no host reads
    # (a graph break would split it); on the CPU it runs as inductor code, equal to eager.
    model = compiled_vae(Marginalization())
    model.compile_objective = "reduce-overhead"
    eager_loss, eager_grads = loss_and_grads(model, model.objective)
    compiled_loss, compiled_grads = loss_and_grads(model, model.training_objective())
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-10, atol=1e-10)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-8, atol=1e-10)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
