"""metalight: gradient-based meta-learning on PyTorch Lightning.

The differentiable unroll engine keeps higher's API, so ``import metalight as higher`` runs
code written for facebookresearch/higher:

Example:
    >>> import torch
    >>> import metalight as higher
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
    >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
    ...     _ = diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
    ...     meta_loss = torch.nn.functional.mse_loss(fmodel(x), y)
    >>> meta_loss.backward()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metalight import optim, patch, utils
    from metalight.functional import FunctionalModule, make_functional, monkeypatch
    from metalight.optim import (
        DifferentiableOptimizer,
        apply_trainable_opt_params,
        create_diff_optim,
        get_diff_optim,
        get_trainable_opt_params,
        register_optim,
    )
    from metalight.unroll import UnrollPolicy, innerloop_ctx

# Imported on first use, so that `import metalight.data` in a DataLoader worker does not
# pay for the engine (and the engine does not pay for Lightning).
_LAZY = {
    "optim": ("metalight.optim", None),
    "patch": ("metalight.patch", None),
    "utils": ("metalight.utils", None),
    "FunctionalModule": ("metalight.functional", "FunctionalModule"),
    "make_functional": ("metalight.functional", "make_functional"),
    "monkeypatch": ("metalight.functional", "monkeypatch"),
    "DifferentiableOptimizer": ("metalight.optim", "DifferentiableOptimizer"),
    "apply_trainable_opt_params": ("metalight.optim", "apply_trainable_opt_params"),
    "create_diff_optim": ("metalight.optim", "create_diff_optim"),
    "get_diff_optim": ("metalight.optim", "get_diff_optim"),
    "get_trainable_opt_params": ("metalight.optim", "get_trainable_opt_params"),
    "register_optim": ("metalight.optim", "register_optim"),
    "innerloop_ctx": ("metalight.unroll", "innerloop_ctx"),
    "UnrollPolicy": ("metalight.unroll", "UnrollPolicy"),
    "load": ("metalight.inference", "load"),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'metalight' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0.dev0"

__all__ = [
    "DifferentiableOptimizer",
    "FunctionalModule",
    "UnrollPolicy",
    "__version__",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "innerloop_ctx",
    "make_functional",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "utils",
]
