"""Meta-gradients in float32 and bfloat16 agree with a float64 reference within the dtype's
precision, and learnable hyperparameters take their parameters' dtype."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metalight

CASES = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.Adam, {"lr": 0.05}),
    (torch.optim.RMSprop, {"lr": 0.01}),
    (torch.optim.Adagrad, {"lr": 0.1}),
]
# Norm-wise relative error allowed: a small multiple of the dtype's machine epsilon (three
# inner steps of a two-layer net measured 1e-7 in float32 and 4e-3..1.3e-2 in bfloat16).
TOLERANCE = {torch.float32: 128 * torch.finfo(torch.float32).eps, torch.bfloat16: 0.0625}


def meta_gradients(dtype: torch.dtype, opt_cls: type, kwargs: dict[str, Any]) -> torch.Tensor:
    """MAML meta-gradient (initial weights and learnable lr) of a 3-step unroll in ``dtype``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(16, 4, generator=g, dtype=torch.float64)
    ys = torch.randn(16, 2, generator=g, dtype=torch.float64)
    model, xs, ys = model.to(dtype), xs.to(dtype), ys.to(dtype)
    opt = opt_cls(model.parameters(), **kwargs)
    lr = metalight.optim.get_trainable_opt_params(opt)["lr"]
    assert lr[0].dtype == dtype
    ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": lr})
    with ctx as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(xs), ys))
        F.mse_loss(fmodel(xs), ys).backward()
    grads = [p.grad for p in model.parameters()] + [lr[0].grad]
    assert all(gr is not None and gr.dtype == dtype for gr in grads)
    return torch.cat([gr.double().reshape(-1) for gr in grads])  # type: ignore[union-attr]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("opt_cls", "kwargs"), CASES, ids=[c[0].__name__ for c in CASES])
def test_low_precision_meta_gradients_match_float64(
    dtype: torch.dtype, opt_cls: type, kwargs: dict[str, Any]
) -> None:
    want = meta_gradients(torch.float64, opt_cls, kwargs)
    got = meta_gradients(dtype, opt_cls, kwargs)
    assert torch.isfinite(got).all()
    tol = TOLERANCE[dtype]
    assert (got - want).norm() <= tol * want.norm()
    # The learning rate's meta-gradient alone (one entry, lost in the norm above).
    assert abs(got[-1] - want[-1]) <= tol * abs(want[-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_trainable_opt_params_follow_the_parameters(dtype: torch.dtype) -> None:
    model = nn.Linear(3, 2).to(dtype)
    opt = torch.optim.Adam(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1
    )
    override = metalight.optim.get_trainable_opt_params(opt)
    leaves = [*override["lr"], *override["eps"], *(b for pair in override["betas"] for b in pair)]
    assert all(t.dtype == dtype and t.requires_grad and t.is_leaf for t in leaves)
    assert [t.item() for t in override["lr"]] == [
        torch.tensor(0.1, dtype=dtype).item(),
        torch.tensor(0.5, dtype=dtype).item(),
    ]
    # A differentiable optimizer's groups give the dtype of its fast weights once stepped.
    fmodel = metalight.monkeypatch(model)
    diffopt = metalight.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    diffopt.step(fmodel(torch.ones(1, 3, dtype=dtype)).sum())
    assert metalight.optim.get_trainable_opt_params(diffopt)["lr"][0].dtype == dtype


def test_trainable_opt_params_follow_the_parameters_device() -> None:
    # The meta device stands in for an accelerator: no data, but a device of its own.
    model = nn.Linear(3, 2, device="meta", dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    override = metalight.optim.get_trainable_opt_params(opt)
    assert {t.device.type for v in override.values() for t in v} == {"meta"}
    assert {t.dtype for v in override.values() for t in v} == {torch.float64}
    # An explicit device wins; the dtype still follows the parameters.
    moved = metalight.optim.get_trainable_opt_params(opt, device="cpu")
    assert moved["lr"][0].device.type == "cpu" and moved["lr"][0].dtype == torch.float64
    assert moved["lr"][0].item() == 0.1 and moved["momentum"][0].item() == 0.9
