"""Networks of M2 whose input is the concatenation of two parts, with the first layer split.

M2's encoder q(z|x,y) and decoder p(x|y,z) (Kingma et al. 2014, Eq. 2 and 4) are MLPs on
``[a, b]`` (``[x, y]`` and ``[z, y]``). Their first layer is computed as

    W [a; b] + c = (W_a a + c) + W_b b

so that a part shared by many calls is projected once: with exact marginalization over the label,
the encoder's ``W_x x + c [B, H]`` is computed once per batch and broadcast over the K labels
instead of K times (the ``O(D)`` term of the step cost ``O(D + K (I + G))``; docs/m2.md, "Cost of
a step and the speed benchmark").

:func:`project_broadcast` also skips repeated work when the caller passes a tensor expanded along
the batch axis (stride 0), which is how :class:`estimators.Marginalization` passes the K one-hot
labels ``[K, B, 1, K]``: ``W_y y`` is then computed for the K distinct rows, not K·B.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from models.networks import ACTIVATIONS, mlp


def project_broadcast(layer: nn.Linear, inputs: Tensor) -> Tensor:
    """``layer(inputs)`` for ``inputs [..., B, F]``; ``[..., 1, H]`` when constant along B.

    When ``inputs`` is an expanded view (stride 0 along the batch axis ``-2``) every row of that
    axis is the same, so one row is projected and the result broadcasts in the caller's sum.
    """
    if inputs.dim() >= 2 and inputs.shape[-2] > 1 and inputs.stride(-2) == 0:
        return layer(inputs.narrow(-2, 0, 1))  # [..., 1, H]
    return layer(inputs)  # [..., B, H]


class SplitInputMLP(nn.Module):
    """MLP on ``cat([a, b], -1)`` with the first ``nn.Linear`` split into an a-part and a b-part.

    ``hidden`` are the hidden widths (may be empty: then the network is the split linear map).
    Use :meth:`project_a` once for a shared ``a`` and :meth:`forward` for each ``b``.
    """

    def __init__(
        self, a_dim: int, b_dim: int, hidden: Sequence[int], output_dim: int, activation: str
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation={activation!r} is unknown: choose one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        hidden = list(hidden)
        first = hidden[0] if hidden else output_dim
        self.a_layer = nn.Linear(a_dim, first)  # carries the bias of the first layer
        self.b_layer = nn.Linear(b_dim, first, bias=False)
        self.rest: nn.Module = (
            nn.Sequential(ACTIVATIONS[activation](), mlp(first, hidden[1:], output_dim, activation))
            if hidden
            else nn.Identity()
        )

    def project_a(self, a: Tensor) -> Tensor:
        """First-layer pre-activation contribution of ``a [..., A]``: ``W_a a + c [..., H]``."""
        return self.a_layer(a)

    def forward(self, a_projected: Tensor, b: Tensor) -> Tensor:
        """Output for ``a_projected`` (from :meth:`project_a`) and ``b [..., B, F]`` (broadcast)."""
        return self.rest(a_projected + project_broadcast(self.b_layer, b))  # [..., B, out]


def hidden_linears(network: nn.Module) -> list[nn.Linear]:
    """The linear layers of ``network`` (an :func:`mlp` or a :class:`SplitInputMLP`) that feed an
    activation, i.e. all but the output layer (both halves of a split first hidden layer)."""
    if isinstance(network, SplitInputMLP) and isinstance(network.rest, nn.Identity):
        return []  # no hidden layer: the split layer is the output layer
    linears = [module for module in network.modules() if isinstance(module, nn.Linear)]
    return linears[:-1]


def init_hidden_normal(network: nn.Module, std: float) -> None:
    """Draw the weights and biases of ``network``'s hidden layers from ``N(0, std^2)``; the output
    layer keeps PyTorch's default. With ``std = 0.001`` this is the initialization of Pyro's
    SS-VAE (``examples/vae/utils/custom_mlp.py``): every hidden unit starts at ``softplus(~0)``,
    so each network starts nearly constant in its input."""
    for layer in hidden_linears(network):
        nn.init.normal_(layer.weight, 0.0, std)
        if layer.bias is not None:
            nn.init.normal_(layer.bias, 0.0, std)
