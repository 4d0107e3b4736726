"""Small network builders shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def mlp(
    input_dim: int, hidden: Sequence[int], output_dim: int, activation: str = "relu"
) -> nn.Sequential:
    """``input_dim -> hidden[0] -> ... -> output_dim`` with ``activation`` between linear layers."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"model.activation={activation!r} is unknown: choose one of {', '.join(ACTIVATIONS)}"
        )
    widths = [input_dim, *hidden, output_dim]
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(
            f"network widths {list(widths)} are invalid: every layer size must be an integer >= 1"
        )
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
