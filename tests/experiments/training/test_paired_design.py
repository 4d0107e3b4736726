"""Common random numbers across the arms of a compare sweep: with the same seed every variant
starts from the same model weights and sees the same first batches (order and binarization
noise), whatever parameters its estimator adds, so the report may pair seeds across variants."""

from __future__ import annotations

import torch

from tests.conftest import CONFIG_DIR, ComposeFn

ARMS = sorted(p.stem for p in (CONFIG_DIR / "experiment" / "compare_arms").glob("*.yaml"))
FIRST_BATCHES = 2


def initial_state(compose_config: ComposeFn, arm: str, seed: int
                  ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], set[str]]:
    """The model's initial weights (the estimator's own parameters apart), the first training
    batches, and the names of the estimator's parameters."""
    from experiments.training.builder import build

    cfg = compose_config(["experiment=compare_estimators", f"+experiment/compare_arms={arm}",
                          f"seed={seed}"])
    model, datamodule = build(cfg)
    own = {f"estimator.{name}" for name in model.estimator.state_dict()}
    weights = {k: v.clone() for k, v in model.state_dict().items() if k not in own}
    batches = []
    for index, (x, _) in enumerate(datamodule.train_dataloader()):
        batches.append(x.clone())
        if index + 1 == FIRST_BATCHES:
            break
    return weights, batches, own


def test_every_arm_starts_from_the_same_weights_and_batches(compose_config: ComposeFn) -> None:
    reference_weights, reference_batches, _ = initial_state(compose_config, ARMS[0], seed=3)
    with_parameters = []
    for arm in ARMS[1:]:
        weights, batches, own = initial_state(compose_config, arm, seed=3)
        if own:
            with_parameters.append(arm)
        assert weights.keys() == reference_weights.keys(), arm
        for key, value in weights.items():
            assert torch.equal(value, reference_weights[key]), (arm, key)
        assert all(torch.equal(a, b) for a, b in zip(batches, reference_batches, strict=True)), arm
    # The property is only tested if some arm has parameters of its own (learned baselines,
    # RELAX's control variate) created between the model's layers and the data.
    assert {"relax", "score_function_learned"} <= set(with_parameters)


def test_another_seed_gives_other_weights_and_batches(compose_config: ComposeFn) -> None:
    weights_0, batches_0, _ = initial_state(compose_config, "gumbel_softmax", seed=0)
    weights_1, batches_1, _ = initial_state(compose_config, "gumbel_softmax", seed=1)
    assert any(not torch.equal(weights_0[k], weights_1[k]) for k in weights_0)
    assert not torch.equal(batches_0[0], batches_1[0])


def test_replica_r_of_every_arm_starts_from_the_same_weights_and_batches(
    compose_config: ComposeFn
) -> None:
    """The compare sweep trains its seeds as replicas (one job per arm, ``replicas`` in the
    experiment): replica r of every arm has the same initial weights (replica axis included) and
    all read the same batches, so the report may still pair replica r across arms. Checked for
    the arms whose estimators own parameters (built between the model's layers and the data)."""
    from experiments.training.replicas import build_replicated

    states = []
    for arm in (ARMS[0], "relax", "score_function_learned"):
        cfg = compose_config(["experiment=compare_estimators", f"+experiment/compare_arms={arm}"])
        assert "seed" not in cfg.hydra.sweeper.params
        assert cfg.seed == 0 and cfg.replicas == 5
        model, datamodule = build_replicated(cfg)
        weights = {k: v for k, v in model.model.state_dict().items()
                   if not k.startswith("estimator.")}  # [R, ...] each
        x, _ = next(iter(datamodule.train_dataloader()))
        states.append((weights, x))
    reference_weights, reference_batch = states[0]
    first = reference_weights["encoder.0.weight"]  # [R, hidden, D]
    assert all(not torch.equal(first[0], first[r]) for r in range(1, 5))  # replicas differ
    for weights, x in states[1:]:
        assert weights.keys() == reference_weights.keys()
        for key, value in weights.items():
            assert torch.equal(value, reference_weights[key]), key
        assert torch.equal(x, reference_batch)
