"""Fully connected backbone, e.g. the sinusoid-regression network of MAML."""

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "MLP"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}
"""Activation names accepted by :class:`MLP`, mapped to module factories."""


class MLP(nn.Module):
    """Multi-layer perceptron split into a ``features`` body and a linear ``head``.

    The default is the network of the MAML sinusoid-regression experiment: 1-40-40-1 with
    ReLU activations (Finn et al., 2017, "Model-Agnostic Meta-Learning for Fast Adaptation
    of Deep Networks", ICML, https://arxiv.org/abs/1703.03400), 1,761 parameters.

    ``features`` is a ``Sequential`` of ``Linear``/activation pairs (an ``Identity`` if
    ``hidden`` is empty) and ``head`` is the last ``Linear``; ``forward(x)`` is
    ``head(features(x))``.

    Args:
        in_features: Size of each input vector.
        hidden: Width of each hidden layer, in order; may be empty.
        out_features: Size of each output vector.
        activation: Hidden-layer activation, one of the keys of :data:`ACTIVATIONS`.

    Raises:
        ValueError: If ``activation`` is unknown or a size is not positive.

    Example:
        >>> import torch
        >>> from metalight.models import MLP
        >>> model = MLP()
        >>> model(torch.randn(10, 1)).shape
        torch.Size([10, 1])
        >>> sum(p.numel() for p in model.parameters())
        1761
    """

    def __init__(
        self,
        in_features: int = 1,
        hidden: Sequence[int] = (40, 40),
        out_features: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            known = ", ".join(repr(name) for name in sorted(ACTIVATIONS))
            raise ValueError(f"Unknown activation {activation!r}; expected one of {known}.")
        widths = [int(in_features), *(int(h) for h in hidden)]
        if any(w <= 0 for w in [*widths, int(out_features)]):
            raise ValueError(
                f"Layer sizes must be positive, got in_features={in_features}, "
                f"hidden={tuple(hidden)}, out_features={out_features}."
            )
        layers: list[nn.Module] = []
        for n_in, n_out in pairwise(widths):
            layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
        self.feature_dim: int = widths[-1]
        self.features: nn.Module = nn.Sequential(*layers) if layers else nn.Identity()
        self.head = nn.Linear(self.feature_dim, int(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape ``[..., in_features]`` to ``[..., out_features]``."""
        return self.head(self.features(x))
