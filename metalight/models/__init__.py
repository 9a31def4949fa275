"""Standard few-shot learning backbones as plain ``nn.Module`` s.

Every model has two children, ``features`` (the body, returning ``[B, feature_dim]``) and
``head`` (the final ``nn.Linear``), with ``forward(x) == head(features(x))``, so that
algorithms such as ANIL can adapt the head alone. The models keep no Python-side state
that changes in ``forward`` (only BatchNorm running buffers, when enabled), so they work
with ``torch.func.functional_call`` and, for batch-statistics BatchNorm or eval mode, with
``torch.func.vmap``.

Example:
    >>> import torch
    >>> from metalight.models import build_model
    >>> model = build_model("conv4", in_channels=1, out_features=5, image_size=28)
    >>> model(torch.randn(10, 1, 28, 28)).shape
    torch.Size([10, 5])
"""

from collections.abc import Callable
from typing import Any

from torch import nn

from metalight.models.conv4 import Conv4
from metalight.models.mlp import MLP
from metalight.models.resnet12 import ResNet12

__all__ = ["MLP", "MODELS", "Conv4", "ResNet12", "build_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "conv4": Conv4,
    "mlp": MLP,
    "resnet12": ResNet12,
}
"""Model names accepted by :func:`build_model`, mapped to their constructors."""


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by name, for use from configuration files.

    Args:
        name: One of the keys of :data:`MODELS` (``"conv4"``, ``"mlp"``, ``"resnet12"``);
            case-insensitive, and ``"-"`` / ``"_"`` are ignored (``"ResNet-12"`` works).
        **kwargs: Keyword arguments of the model's constructor.

    Returns:
        The constructed model.

    Raises:
        ValueError: If ``name`` is not a known model name; the message lists the known names.

    Example:
        >>> from metalight.models import build_model
        >>> build_model("mlp", hidden=(40, 40)).head
        Linear(in_features=40, out_features=1, bias=True)
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        known = ", ".join(repr(known_name) for known_name in sorted(MODELS))
        raise ValueError(f"Unknown model name {name!r}; known names: {known}.")
    return MODELS[key](**kwargs)
