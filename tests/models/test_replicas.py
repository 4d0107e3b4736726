"""R replicas of a VAE trained as one module (models.replicas) against R single models.

The exact comparisons feed each single model the uniforms that its replica drew: every random
number catgrad's estimators and evaluation use comes from ``torch.rand`` (or ``torch.randn``), and
under ``vmap(randomness="different")`` a draw of shape ``s`` takes the numbers of one unbatched
draw of shape ``[R, *s]``, replica r getting row r. Estimators trained by a loop over the replicas
(RELAX, REBAR, ARSM) draw replica 0's numbers, then replica 1's, ...: chunk r of the recorded
draws is replica r's.
Statistical assertions use fixed seeds and tolerances derived from standard errors (comments).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor

from estimators import Marginalization, ScoreFunction
from estimators.baselines import LeaveOneOutBaseline, MovingAverageBaseline
from models.replicas import ReplicatedModel
from models.vae import CategoricalVAE
from tests.conftest import CONFIG_DIR

N, K, D, B = 2, 3, 16, 12
ESTIMATOR_OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "estimator").glob("*.yaml"))
BASELINE_OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "estimator" / "baseline").glob("*.yaml"))
CASES = [[f"estimator={o}"] for o in ESTIMATOR_OPTIONS] + [
    ["estimator=score_function", f"estimator/baseline={name}", "estimator.num_samples=2"]
    for name in BASELINE_OPTIONS
]


def vae(estimator: torch.nn.Module, seed: int) -> CategoricalVAE:
    """A small VAE seeded as a run with ``seed`` (the estimator is built before, as the builder
    does)."""
    L.seed_everything(seed, verbose=False)
    return CategoricalVAE(
        estimator, image_shape=(4, 4), num_variables=N, num_classes=K, encoder_hidden=[8],
        decoder_hidden=[8], eval_samples=4, iwae_samples=6, iwae_chunk_size=4,
    )


def build_pair(make_estimator: Callable[[], torch.nn.Module], seeds: list[int]
               ) -> tuple[ReplicatedModel, list[CategoricalVAE]]:
    """A replicated model of ``seeds`` and, separately, one single model per seed."""
    replicated = ReplicatedModel([vae(make_estimator(), seed) for seed in seeds])
    singles = [vae(make_estimator(), seed) for seed in seeds]
    return replicated, singles


def batch(seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(B, D, generator=generator).bernoulli(generator=generator)  # [B, D]
    return x, torch.zeros(B)


class MatchedNoise:
    """Records the shapes ``torch.rand`` and ``torch.randn`` are asked for (replicated pass),
    then replays to a single model (``replay(r)``) what replica r drew: row r of one
    ``[R, *shape]`` draw per call (vmapped replicas) or, with ``sequential``, chunk r of the
    numbers the replicated pass drew (replicas looped over one after another)."""

    FUNCTIONS = ("rand", "randn")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, replicas: int, sequential: bool = False
                 ) -> None:
        self.monkeypatch, self.replicas, self.sequential = monkeypatch, replicas, sequential
        self.original = {name: getattr(torch, name) for name in self.FUNCTIONS}
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.outputs: dict[str, list[Tensor]] = {name: [] for name in self.FUNCTIONS}

    def record(self) -> None:
        for name in self.FUNCTIONS:
            def recording(shape, *args, name=name, **kwargs):  # type: ignore[no-untyped-def]
                self.shapes.append((name, tuple(shape)))
                output = self.original[name](shape, *args, **kwargs)
                if self.sequential:  # a plain tensor (under vmap it would be a batched one)
                    self.outputs[name].append(output)
                return output

            self.monkeypatch.setattr(torch, name, recording)

    def replay(self, replica: int, seed: int) -> None:
        torch.manual_seed(seed)
        draws: dict[str, list[Tensor]] = {name: [] for name in self.FUNCTIONS}
        if self.sequential:
            for name, outputs in self.outputs.items():
                assert len(outputs) % self.replicas == 0, (name, len(outputs))
                per_replica = len(outputs) // self.replicas
                draws[name] = outputs[replica * per_replica:(replica + 1) * per_replica]
        else:
            for name, shape in self.shapes:
                draws[name].append(self.original[name]((self.replicas, *shape))[replica])
        for name in self.FUNCTIONS:
            queue = iter(draws[name])
            self.monkeypatch.setattr(torch, name, lambda shape, *a, q=queue, **k: next(q))


def gradients(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------
# Exact: each replica is the single run of its seed
# ------------------------------------------------------------------------------------------------
def test_replica_r_starts_from_the_weights_of_the_run_seeded_seed_plus_r() -> None:
    replicated, singles = build_pair(lambda: ScoreFunction(baseline=MovingAverageBaseline()),
                                     [5, 6, 7])
    for name, stacked in replicated.model.state_dict().items():
        for r, single in enumerate(singles):
            assert torch.equal(stacked[r], single.state_dict()[name]), (name, r)
    assert not torch.equal(replicated.model.encoder[0].weight[0],
                           replicated.model.encoder[0].weight[1])


def check_replicas_against_singles(replicated: ReplicatedModel, singles: list, batch: object,
                                   monkeypatch: pytest.MonkeyPatch) -> MatchedNoise:
    """One step: with matched noise, replica r's loss, gradients (model and estimator
    parameters) and estimator state after the step equal those of ``singles[r]``. Tolerance
    1e-5 relative: float32 sums taken in another order by the batched kernels (observed <= 1e-6).
    Returns the noise record."""
    count = replicated.num_replicas
    noise = MatchedNoise(monkeypatch, count, sequential=not replicated.vectorized_training)
    noise.record()
    torch.manual_seed(11)
    model = replicated.model
    model.estimator.set_step(0)
    losses, _ = replicated.objectives(batch)
    losses.sum().backward()  # [R] -> one backward for all replicas
    stacked_grads = gradients(model)
    assert losses.shape == (count,)
    for r, single in enumerate(singles):
        noise.replay(r, 11)
        single.estimator.set_step(0)
        loss, _ = single.objective(batch, single.estimator)
        loss.backward()
        torch.testing.assert_close(losses[r], loss, rtol=1e-5, atol=1e-5)
        single_grads = gradients(single)
        assert set(single_grads) == set(stacked_grads)
        for name, grad in single_grads.items():
            torch.testing.assert_close(stacked_grads[name][r], grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name, r=r: f"{n} replica {r}: {m}")
        for name, buffer in single.estimator.named_buffers():
            torch.testing.assert_close(model.estimator.get_buffer(name)[r], buffer)
    return noise


@pytest.mark.parametrize("overrides", CASES, ids=" ".join)
def test_every_estimator_gives_each_replica_its_single_run_gradient_and_state(
    compose_config, monkeypatch, overrides
) -> None:
    """R = 3 VAEs, each estimator config (see :func:`check_replicas_against_singles`)."""
    cfg = compose_config(overrides)
    make = lambda: instantiate(cfg.estimator, _convert_="all")  # noqa: E731
    replicated, singles = build_pair(make, [0, 1, 2])
    noise = check_replicas_against_singles(replicated, singles, batch(0), monkeypatch)
    assert bool(noise.shapes) != (overrides == ["estimator=marginalization"])  # noise drawn?


def test_marginalization_training_curves_of_replicas_and_single_runs_agree() -> None:
    """30 Adam steps on the same batches, no estimator noise: replica r's losses and weights
    follow the single model of seed r. Tolerance 1e-4 relative: float32 rounding (~6e-8 per
    operation) differs between batched and unbatched matrix products and Adam's normalised steps
    carry it along; observed differences stay below 1e-5 after 30 steps."""
    replicated, singles = build_pair(lambda: Marginalization(), [3, 4, 5])
    optimizer = replicated.configure_optimizers()
    single_optimizers = [single.configure_optimizers() for single in singles]
    model = replicated.model
    for step in range(30):
        x = batch(step)
        losses, _ = replicated.per_replica(lambda b: model.objective(b, model.estimator), x)
        losses.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        for r, (single, opt) in enumerate(zip(singles, single_optimizers, strict=True)):
            loss, _ = single.objective(x, single.estimator)
            loss.backward()
            opt.step()
            opt.zero_grad()
            torch.testing.assert_close(losses[r].detach(), loss.detach(), rtol=1e-4, atol=1e-4)
    for r, single in enumerate(singles):
        for name, parameter in single.named_parameters():
            torch.testing.assert_close(model.get_parameter(name)[r].detach(), parameter.detach(),
                                       rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Statistical: unbiased per replica, independent across replicas
# ------------------------------------------------------------------------------------------------
def logits_bias_gradient(replicated: ReplicatedModel, x: tuple[Tensor, Tensor]) -> Tensor:
    """One draw of every replica's gradient w.r.t. the encoder's output bias ``[R, N*K]``."""
    model = replicated.model
    replicated.zero_grad()
    losses, _ = replicated.per_replica(lambda b: model.objective(b, model.estimator), x)
    losses.sum().backward()
    return model.encoder[-1].bias.grad.clone()  # [R, N*K]


def test_score_function_gradients_are_unbiased_for_each_of_four_replicas() -> None:
    """R = 4 replicas with different weights; the mean of M = 400 score-function gradients
    (leave-one-out baseline, S = 4) of each replica's logits bias matches that replica's exact
    gradient (marginalization, same weights). Each of the 4 x 6 coordinates must lie within 4
    standard errors (s / sqrt(M)); under the null a coordinate leaves that band with probability
    6e-5, all 24 together ~0.2%. The replicas' exact gradients are more than 8 standard errors
    apart, so a replica whose mean matched another replica's gradient would fail."""
    seeds, draws = [0, 1, 2, 3], 400
    exact_model = ReplicatedModel([vae(Marginalization(), seed) for seed in seeds])
    sampled = ReplicatedModel(
        [vae(ScoreFunction(4, LeaveOneOutBaseline()), seed) for seed in seeds]
    )
    x = batch(0)
    exact = logits_bias_gradient(exact_model, x)  # [R, N*K]
    torch.manual_seed(0)
    samples = torch.stack([logits_bias_gradient(sampled, x) for _ in range(draws)])  # [M, R, NK]
    error = samples.mean(0) - exact  # [R, N*K]
    standard_error = samples.std(0) / math.sqrt(draws)  # [R, N*K]
    assert (standard_error > 0).all()
    assert (error.abs() < 4 * standard_error).all(), (error / standard_error)
    for r in range(1, 4):
        assert (exact[0] - exact[r]).abs().max() > 8 * standard_error.max()


def test_replicas_draw_independent_estimator_noise() -> None:
    """R = 4 identical replicas (all built with seed 0): their estimates of E_q[f] differ only
    by estimator noise. Over M = 400 draws the correlation of any two replicas' estimates has
    standard error ~ 1 / sqrt(M) = 0.05 under independence; shared noise would give exactly 1.
    Every one of the 6 pairs must stay within 4 standard errors (0.2) of 0."""
    draws = 400
    replicated = ReplicatedModel([vae(ScoreFunction(), 0) for _ in range(4)])
    model = replicated.model
    x = batch(0)
    torch.manual_seed(0)
    with torch.no_grad():
        values = torch.stack([
            replicated.per_replica(lambda b: model.objective(b, model.estimator), x)[1]["value"]
            for _ in range(draws)
        ])  # [M, R]
    correlation = torch.corrcoef(values.T)  # [R, R]
    off_diagonal = correlation[~torch.eye(4, dtype=torch.bool)]
    assert values.std(0).min() > 0
    assert off_diagonal.abs().max() < 4 / math.sqrt(draws), correlation
