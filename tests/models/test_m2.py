"""M2 (Kingma et al. 2014): the objective against hand-written float64 references, the batched
marginalization, unbiasedness of sampled estimators for y, and the semi-supervised datamodule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules import BinaryImageDataModule, Splits, SyntheticDataModule
from datamodules.semi_supervised import SemiSupervisedDataModule, balanced_subset
from estimators import LeaveOneOutBaseline, Marginalization, NoBaseline, ScoreFunction
from estimators.base import Estimator
from models.m2 import M2

K, Z, SHAPE = 3, 2, (2, 3)  # a tiny M2: 6 pixels, 3 classes, z of 2, one hidden layer of 4


def tiny_m2(
    estimator: Estimator | None = None, alpha: float = 0.1, labelled_weight: float = 1.0
) -> M2:
    torch.manual_seed(0)
    model = M2(
        estimator or Marginalization(),
        image_shape=SHAPE,
        num_classes=K,
        n_labels=K,
        latent_dim=Z,
        classifier_hidden=[4],
        encoder_hidden=[4],
        decoder_hidden=[4],
        alpha=alpha,
        labelled_weight=labelled_weight,
    )
    return model.double()


def fix_noise(model: M2, eps: Tensor | None) -> None:
    """Make ``eps`` deterministic: the given ``[1, K, B, Z]`` tensor, or zeros (z = mean)."""

    def noise(shape: tuple[int, ...], like: Tensor) -> Tensor:
        if eps is None:
            return torch.zeros(shape, dtype=like.dtype)
        return eps.expand(shape)

    model.standard_normal = noise  # type: ignore[method-assign]


def data(batch: int = 5, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(
        torch.full((batch, math.prod(SHAPE)), 0.5, dtype=torch.float64), generator=generator
    )
    return x, torch.randint(K, (batch,), generator=generator)


# ------------------------------------------------------------------------------------------------
# Hand-written reference: concatenated inputs, explicit formulas, a Python loop over labels.
# ------------------------------------------------------------------------------------------------
def reference_neg_elbo(model: M2, x: Tensor, label: int, eps: Tensor) -> Tensor:
    """``-L(x, y=label) [B]`` (Kingma et al. 2014, Eq. 6) with ``z = mu + sigma * eps [B, Z]``."""
    y = F.one_hot(torch.full((x.shape[0],), label), K).double()  # [B, K]
    enc, dec = model.encoder, model.decoder
    w1 = torch.cat([enc.a_layer.weight, enc.b_layer.weight], dim=1)  # [H, D + K]
    h = F.softplus(torch.cat([x, y], dim=1) @ w1.T + enc.a_layer.bias)  # [B, H]
    out = enc.rest[1][0]
    mean, log_var = (h @ out.weight.T + out.bias).chunk(2, dim=1)  # [B, Z]
    z = mean + torch.exp(0.5 * log_var) * eps  # [B, Z]
    v1 = torch.cat([dec.a_layer.weight, dec.b_layer.weight], dim=1)  # [H, Z + K]
    g = F.softplus(torch.cat([z, y], dim=1) @ v1.T + dec.a_layer.bias)  # [B, H]
    last = dec.rest[1][0]
    p = torch.sigmoid(g @ last.weight.T + last.bias)  # [B, D]
    log_px = (x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(1)  # [B]
    log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    log_qz = (-0.5 * eps**2 - 0.5 * math.log(2 * math.pi) - 0.5 * log_var).sum(1)
    kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(1)
    # The analytic KL and the single-sample log q - log p agree only in expectation; M2 uses the KL.
    assert log_qz.shape == log_pz.shape
    return -log_px + kl + math.log(K)  # -log p(y) = log K


def reference_probs(model: M2, x: Tensor) -> Tensor:
    first, last = model.classifier[0], model.classifier[2]
    return torch.softmax(F.softplus(x @ first.weight.T + first.bias) @ last.weight.T + last.bias, 1)


def test_unlabelled_marginalization_matches_hand_written_float64() -> None:
    """-U(x) = sum_y q(y|x) (-L(x,y)) - H(q(y|x)) (Eq. 7), value and gradient, in float64."""
    model = tiny_m2()
    x, _ = data()
    eps = torch.randn(1, K, x.shape[0], Z, dtype=torch.float64)  # one z noise per label
    fix_noise(model, eps)
    output, kl_y, _ = model.unlabelled_terms(x, model.estimator)
    ours = output.surrogate + kl_y  # [B]

    q = reference_probs(model, x)  # [B, K]
    neg_l = torch.stack([reference_neg_elbo(model, x, k, eps[0, k]) for k in range(K)], 1)
    entropy = -(q * q.log()).sum(1)
    reference = (q * neg_l).sum(1) - entropy  # [B]

    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(output.value + kl_y, reference.detach(), rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    grads = torch.autograd.grad(ours.sum(), params)
    expected = torch.autograd.grad(reference.sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("labelled_weight", [1.0, 0.02])
def test_objective_is_labelled_plus_alpha_classification_plus_unlabelled(
    labelled_weight: float,
) -> None:
    model = tiny_m2(alpha=0.7, labelled_weight=labelled_weight)
    fix_noise(model, None)  # z = mean: every term deterministic
    (x_l, y_l), (x_u, _) = data(4, seed=2), data(6, seed=3)
    batch = {"labelled": (x_l, y_l), "unlabelled": (x_u, torch.full((6,), -1))}
    loss, metrics = model.objective(batch, model.estimator)

    zeros = torch.zeros(x_l.shape[0], Z, dtype=torch.float64)
    labelled = torch.stack(
        [reference_neg_elbo(model, x_l[i : i + 1], int(y_l[i]), zeros[:1])[0] for i in range(4)]
    )
    classification = -reference_probs(model, x_l)[torch.arange(4), y_l].log()
    q = reference_probs(model, x_u)
    neg_l = torch.stack(
        [
            reference_neg_elbo(model, x_u, k, torch.zeros(6, Z, dtype=torch.float64))
            for k in range(K)
        ],
        1,
    )
    unlabelled = (q * neg_l).sum(1) + (q * q.log()).sum(1)
    expected = labelled_weight * labelled.mean() + 0.7 * classification.mean() + unlabelled.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["loss"], expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["classification"], classification.mean(), rtol=1e-12, atol=0)

    # A scheduled step holds one part (labelled_every_n_steps > 1): only that part's terms.
    labelled_only, _ = model.objective({"labelled": batch["labelled"]}, model.estimator)
    want_labelled = labelled_weight * labelled.mean() + 0.7 * classification.mean()
    torch.testing.assert_close(labelled_only, want_labelled, rtol=1e-12, atol=1e-12)
    unlabelled_only, _ = model.objective({"unlabelled": batch["unlabelled"]}, model.estimator)
    torch.testing.assert_close(unlabelled_only, unlabelled.mean(), rtol=1e-12, atol=1e-12)


def test_labelled_every_n_steps_alternates_the_parts() -> None:
    model = tiny_m2()
    batch = {"labelled": data(4, seed=2), "unlabelled": data(6, seed=3)}
    assert model.scheduled_part(batch, 7) is batch  # n = 1: both parts in every step
    model.labelled_every_n_steps = 3
    parts = [list(model.scheduled_part(batch, step)) for step in range(7)]
    assert parts == [["labelled"], ["unlabelled"], ["unlabelled"]] * 2 + [["labelled"]]


def test_marginalization_is_one_batched_pass_with_the_x_path_once() -> None:
    """All K labels in one call of f; the x-part of q(z|x,y)'s first layer computed once, on [B, D];
    the label part of both first layers on the K distinct labels only (not K x B rows)."""
    model = tiny_m2()
    x, _ = data(batch=7)
    calls: dict[str, list[tuple[int, ...]]] = {
        "encoder_x": [],
        "encoder_y": [],
        "decoder_y": [],
        "f": [],
    }
    model.encoder.a_layer.register_forward_hook(
        lambda m, i, o: calls["encoder_x"].append(tuple(i[0].shape))
    )
    model.encoder.b_layer.register_forward_hook(
        lambda m, i, o: calls["encoder_y"].append(tuple(i[0].shape))
    )
    model.decoder.b_layer.register_forward_hook(
        lambda m, i, o: calls["decoder_y"].append(tuple(i[0].shape))
    )
    cost = model.label_cost

    def counted(*args: Tensor, **kwargs: int) -> Tensor:
        calls["f"].append(tuple(args[2].shape))
        return cost(*args, **kwargs)

    model.label_cost = counted  # type: ignore[method-assign]
    model.unlabelled_terms(x, model.estimator)
    assert calls == {
        "encoder_x": [(7, 6)],
        "encoder_y": [(K, 1, K)],
        "decoder_y": [(K, 1, K)],
        "f": [(K, 7, 1, K)],
    }


@pytest.mark.parametrize(
    "estimator",
    [
        ScoreFunction(num_samples=1, baseline=NoBaseline()),
        ScoreFunction(num_samples=2, baseline=LeaveOneOutBaseline()),
    ],
    ids=["score_function", "score_function_rloo"],
)
def test_sampled_estimators_are_unbiased_for_the_m2_gradient(estimator: Estimator) -> None:
    """The score-function gradient of -U (every parameter) is unbiased for the exact one.

    Each of G = 40 groups averages n = 50 independent estimates (the 3 examples repeated 50 times
    in one batch: rows draw independent labels), so the group means are independent with the
    estimator's mean. Tolerance: 6 standard errors of the mean of the G group means (Student t
    with 39 dof: P(|t| > 6) < 1e-6 per coordinate, < 1e-4 over ~80 coordinates; the seed is
    fixed, so the test is deterministic)."""
    model = tiny_m2(estimator)
    fix_noise(model, None)  # f(y) deterministic: the only randomness is the draw of y
    x, _ = data(batch=3)
    params = list(model.parameters())

    def gradient(est: Estimator, inputs: Tensor) -> Tensor:
        output, kl_y, _ = model.unlabelled_terms(inputs, est)
        grads = torch.autograd.grad((output.surrogate + kl_y).mean(), params)
        return torch.cat([g.flatten() for g in grads])

    exact = gradient(Marginalization(), x)
    torch.manual_seed(123)
    groups, replicates = 40, 50
    means = torch.stack([gradient(estimator, x.repeat(replicates, 1)) for _ in range(groups)])
    standard_error = means.std(0) / math.sqrt(groups)
    error = (means.mean(0) - exact).abs()
    assert (error <= 6 * standard_error + 1e-10).all(), (error / standard_error).max()
    assert (standard_error > 0).sum() > 20  # the test has power: most coordinates are random


def test_test_metrics_are_exact_in_y_and_accuracy_is_argmax() -> None:
    model = tiny_m2()
    fix_noise(model, None)
    x, y = data(batch=8)
    logits, neg_elbo, costs = model.evaluate(x)
    q = reference_probs(model, x)
    neg_l = torch.stack(
        [reference_neg_elbo(model, x, k, torch.zeros(8, Z, dtype=torch.float64)) for k in range(K)],
        1,
    )  # [B, K], -L(x, y=k) including -log p(y) = log K
    torch.testing.assert_close(
        neg_elbo, (q * neg_l).sum(1) + (q * q.log()).sum(1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(logits.softmax(1), q)
    # The per-label costs are -L~ = -L - log K; their argmin is the generative classifier.
    torch.testing.assert_close(costs.T, neg_l - math.log(K), rtol=1e-12, atol=1e-12)
    assert torch.equal(costs.argmin(0), neg_l.argmin(1))


def test_evaluation_in_z_chunks_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """``evaluate`` draws its ``eval_z_samples`` in chunks of at most ``EVALUATION_ROWS`` decoder
    rows; with the same noise (one stream of ``[M, K, B, Z]`` read in order along M) chunks of
    unequal size (3 + 3 + 1) give the one-call result: each chunk's mean is weighted by its size."""
    model = tiny_m2()
    model.eval_z_samples = M = 7
    x, _ = data(batch=4)
    generator = torch.Generator().manual_seed(3)
    stream = torch.randn(M, K, 4, Z, dtype=torch.float64, generator=generator)  # [M, K, B, Z]

    def replay() -> None:
        taken = [0]

        def noise(shape: tuple[int, ...], like: Tensor) -> Tensor:
            start, taken[0] = taken[0], taken[0] + shape[0]
            return stream[start : taken[0]].expand(shape)

        model.standard_normal = noise  # type: ignore[method-assign]

    replay()
    _, neg_elbo, costs = model.evaluate(x)  # one call: 7 * K * 4 = 84 rows
    monkeypatch.setattr("models.m2.EVALUATION_ROWS", 3 * K * 4)  # 3 z samples per call
    replay()
    _, neg_elbo_chunked, costs_chunked = model.evaluate(x)
    torch.testing.assert_close(costs_chunked, costs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(neg_elbo_chunked, neg_elbo, rtol=1e-12, atol=1e-12)
    # The noise mattered (the average over 7 z samples differs from the z = mean result).
    fix_noise(model, None)
    assert not torch.allclose(model.evaluate(x)[2], costs)


def test_generative_accuracy_is_logged_beside_the_classifier_accuracy() -> None:
    """``test/generative_accuracy`` scores argmin_y f(y); it differs from q(y|x)'s accuracy."""
    model = tiny_m2()
    fix_noise(model, None)
    x, y = data(batch=64, seed=4)
    logged: dict[str, object] = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # type: ignore
    model.test_step((x, y), 0)
    _, _, costs = model.evaluate(x)
    want = (costs.argmin(0) == y).double().mean()
    assert abs(float(model.test_generative_accuracy.compute()) - float(want)) < 1e-12
    want_q = (model.classify(x).argmax(1) == y).double().mean()
    assert abs(float(model.test_accuracy.compute()) - float(want_q)) < 1e-12
    assert {"test/accuracy", "test/generative_accuracy", "test/neg_elbo"} <= set(logged)


def test_hidden_init_std_draws_hidden_layers_only() -> None:
    """``hidden_init_std = 0.001`` (Pyro's SS-VAE) sets every hidden layer of the three networks,
    both halves of the split first layers included, to N(0, 0.001^2); output layers keep
    PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The sample std of n draws of N(0, s^2)
    is s * (1 +- 1/sqrt(2n)); the smallest layer (y -> 500: n = 5,000) gives +- 1 %, so the
    10 % tolerance is 10 standard errors."""
    model = M2(Marginalization(), image_shape=(28, 28), n_labels=10, hidden_init_std=1e-3)
    hidden = {
        "classifier": model.classifier[0],
        "encoder x": model.encoder.a_layer,
        "encoder y": model.encoder.b_layer,
        "decoder z": model.decoder.a_layer,
        "decoder y": model.decoder.b_layer,
    }
    for name, layer in hidden.items():
        weight = layer.weight.detach()
        assert abs(float(weight.std()) / 1e-3 - 1) < 0.1, name
        assert float(weight.abs().max()) < 1e-2, name  # 10 s: P < 1e-17 per draw under N(0, s^2)
    # Output layers: default init, weights up to 1/sqrt(500) = 0.045, std 0.045/sqrt(3) = 0.026.
    for layer in (model.classifier[-1], model.encoder.rest[-1][-1], model.decoder.rest[-1][-1]):
        assert 0.02 < float(layer.weight.detach().std()) < 0.03
    default = M2(Marginalization(), image_shape=(28, 28), n_labels=10)
    assert float(default.classifier[0].weight.detach().std()) > 0.01  # 1/sqrt(3 * 784) = 0.0206


def test_conditional_grid_has_one_row_per_class(tmp_path) -> None:
    model = tiny_m2().float()
    images = model.conditional_samples(columns=4)
    assert images.shape == (K, 4, 6) and (images >= 0).all() and (images <= 1).all()
    model.save_conditional_grid(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_model_refuses_a_datamodule_that_is_not_semi_supervised() -> None:
    with pytest.raises(ValueError, match="not semi-supervised.*datamodule=semi_digits"):
        M2(Marginalization(), image_shape=SHAPE, num_classes=K, n_labels=None)
    with pytest.raises(TypeError, match="labelled.*unlabelled"):
        tiny_m2().objective(data(), Marginalization())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# The semi-supervised datamodule
# ------------------------------------------------------------------------------------------------
def semi_synthetic(n_labels: int = 20, seed: int = 0, **kwargs: int) -> SemiSupervisedDataModule:
    base = SyntheticDataModule(num_examples=200, batch_size=32, seed=0)
    return SemiSupervisedDataModule(base, n_labels=n_labels, seed=seed, **kwargs)


def test_labelled_subset_is_balanced_reproducible_and_disjoint() -> None:
    first, again, other = semi_synthetic(seed=0), semi_synthetic(seed=0), semi_synthetic(seed=1)
    for datamodule in (first, again, other):
        datamodule.setup("fit")
    _, y_l = first.labelled
    assert torch.bincount(y_l, minlength=4).tolist() == [5, 5, 5, 5]
    assert torch.equal(first.labelled_index, again.labelled_index)
    assert not torch.equal(first.labelled_index, other.labelled_index)
    x_u, y_u = first.unlabelled
    assert x_u.shape[0] + 20 == first.splits.train[0].shape[0] and (y_u == -1).all()
    assert first.labelled_index.unique().numel() == 20


def test_balanced_subset_counts_per_class() -> None:
    labels = torch.arange(1000) % 10
    index = balanced_subset(labels, 100, 10, seed=4)
    assert torch.bincount(labels[index]).tolist() == [10] * 10
    assert torch.equal(index, balanced_subset(labels, 100, 10, seed=4))


def test_training_batches_are_a_cycling_combined_loader() -> None:
    datamodule = semi_synthetic(n_labels=8, labelled_batch_size=100)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = list(loader)
    assert len(batches) == -(-(200 - 8) // 32)  # one pass over the unlabelled data
    first = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    x_l, y_l = first["labelled"]
    x_u, y_u = first["unlabelled"]
    assert x_l.shape == (8, 64) and x_u.shape == (32, 64)  # labelled batch capped at n_labels
    assert (y_u == -1).all() and (y_l >= 0).all()
    assert set(x_l.unique().tolist()) <= {0.0, 1.0}
    x, y = next(iter(datamodule.val_dataloader()))
    assert x.shape[1] == 64 and (y >= 0).all()


class Unlabelled(BinaryImageDataModule):
    """A dataset whose labels are all -1."""

    def __init__(self, num_labels: int) -> None:
        super().__init__(image_shape=(2, 2), num_labels=num_labels)

    def load_splits(self) -> Splits:
        part = (torch.rand(40, 4), torch.full((40,), -1))
        return Splits(train=part, val=part, test=part)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: semi_synthetic(n_labels=10), "n_labels=10 is not divisible by the 4 classes"),
        (lambda: semi_synthetic(n_labels=400), "n_labels=400 leaves no unlabelled data"),
        (lambda: semi_synthetic(n_labels=0), "n_labels=0 is invalid"),
        (lambda: SemiSupervisedDataModule(Unlabelled(0), n_labels=4), "has no labels"),
        (lambda: SemiSupervisedDataModule(Unlabelled(2), n_labels=4), "labels outside"),
    ],
)
def test_bad_inputs_fail_with_one_line(make, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        make().setup("fit")
    assert "\n" not in str(error.value)


def test_too_few_examples_of_a_class_fails_with_one_line() -> None:
    datamodule = semi_synthetic()
    datamodule.setup("fit")
    fewest = int(torch.bincount(datamodule.splits.train[1]).min())
    with pytest.raises(ValueError, match=f"needs {fewest + 1} examples of class"):
        semi_synthetic(n_labels=4 * (fewest + 1)).setup("fit")


def test_speed_benchmark_runs_and_prints_both_ratios(capsys) -> None:
    from experiments.benchmarks.m2_step import main

    main(
        ["--classes", "3", "--hidden", "8", "--input-dim", "16", "--latent-dim", "2"]
        + ["--rounds", "1", "--steps", "1", "--warmup", "0", "--device", "cpu"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert "time ratio" in lines[1] and "FLOP ratio" in lines[1]
    k, _, _, time_ratio, flop_ratio = lines[2].split()
    assert k == "3" and float(time_ratio[:-1]) > 0 and float(flop_ratio[:-1]) > 1
