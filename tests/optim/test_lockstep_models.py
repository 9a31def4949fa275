"""Every differentiable optimizer steps real models in lockstep with ``torch.optim``.

The product of the shared optimizer table with a table of models (MLP, conv net with
BatchNorm, tied weights, a partially used parameter, an LSTM), in float64, with and
without higher-order tracking. Also k-step meta-gradients under ``gradcheck``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn

import metalight
from tests.optim_table import OPTIMIZER_CASES, OptimCase

STEPS = 20


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 6)
        self.out.weight = self.mid.weight  # shared, used twice per forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


class PartlyUsed(nn.Module):
    """An embedding of which only some rows are used, and a layer never used."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.used(torch.tanh(self.embed(idx))).sum(1)


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class ModelCase(NamedTuple):
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]
    out_dim: int


MODEL_CASES = [
    ModelCase(
        "mlp",
        lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
        lambda g: torch.randn(6, 4, generator=g, dtype=torch.float64),
        3,
    ),
    ModelCase(
        "conv_bn",
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 3),
        ),
        lambda g: torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64),
        3,
    ),
    ModelCase("tied", TiedNet, lambda g: torch.randn(6, 4, generator=g, dtype=torch.float64), 6),
    ModelCase("partly_used", PartlyUsed, lambda g: torch.randint(0, 5, (6, 2), generator=g), 3),
    ModelCase("lstm", LSTMNet, lambda g: torch.randn(4, 5, 3, generator=g, dtype=torch.float64), 2),
]


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Non-quadratic, so gradients keep changing shape and size across steps.
    return torch.log1p((out - target).pow(2)).mean() + 0.1 * torch.tanh(out).sum()


def batches(case: ModelCase, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [
        (case.inputs(g), torch.randn(1, case.out_dim, generator=g, dtype=torch.float64))
        for _ in range(n)
    ]


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("model_case", MODEL_CASES, ids=[m.id for m in MODEL_CASES])
@pytest.mark.parametrize("opt_case", OPTIMIZER_CASES, ids=[c.id for c in OPTIMIZER_CASES])
def test_lockstep_with_torch_optim(opt_case: OptimCase, model_case: ModelCase, track: bool) -> None:
    torch.manual_seed(0)
    model = model_case.build().double()
    ref = copy.deepcopy(model)
    opt = opt_case.torch_cls(model.parameters(), **opt_case.kwargs)
    ref_opt = opt_case.torch_cls(ref.parameters(), **opt_case.kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with metalight.innerloop_ctx(model, opt, track_higher_grads=track) as (fmodel, diffopt):
        for x, y in batches(model_case, STEPS):
            diffopt.step(loss_fn(fmodel(x), y))
            ref_opt.zero_grad(set_to_none=True)
            loss_fn(ref(x), y).backward()
            ref_opt.step()
        for (name, p), q in zip(ref.named_parameters(), fmodel.parameters(), strict=True):
            torch.testing.assert_close(q, p, msg=lambda m, n=name: f"{n}: {m}")
        for (name, b), c in zip(ref.named_buffers(), fmodel.buffers(), strict=True):
            torch.testing.assert_close(c, b, msg=lambda m, n=name: f"buffer {n}: {m}")
        if track:
            # The unroll is differentiable end to end and its meta-gradient finite.
            meta = loss_fn(fmodel(x), y)
            grads = torch.autograd.grad(meta, list(fmodel.parameters(time=0)), allow_unused=True)
            assert all(g is None or torch.isfinite(g).all() for g in grads)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the unroll changed the module's {k}"


def _meta_loss_fn(opt_case: OptimCase, steps: int = 3) -> tuple[Callable, list[torch.Tensor]]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    opt = opt_case.torch_cls(model.parameters(), **opt_case.kwargs)
    g = torch.Generator().manual_seed(7)
    data = [
        (
            torch.randn(4, 2, generator=g, dtype=torch.float64),
            torch.randn(4, 1, generator=g, dtype=torch.float64),
        )
        for _ in range(steps + 1)
    ]

    def meta_loss(*init: torch.Tensor) -> torch.Tensor:
        fmodel = metalight.make_functional(model)
        fmodel.update_params(list(init))
        diffopt = metalight.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        for x, y in data[:steps]:
            diffopt.step(loss_fn(fmodel(x), y))
        x, y = data[steps]
        return loss_fn(fmodel(x), y)

    init = [p.detach().clone().requires_grad_() for p in model.parameters()]
    return meta_loss, init


@pytest.mark.parametrize("opt_case", OPTIMIZER_CASES, ids=[c.id for c in OPTIMIZER_CASES])
def test_gradcheck_three_step_meta_gradient(opt_case: OptimCase) -> None:
    meta_loss, init = _meta_loss_fn(opt_case)
    assert torch.autograd.gradcheck(meta_loss, init, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("torch_cls", "kwargs", "learn"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5}, ["lr", "momentum"]),
        (torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.9)}, ["lr", "betas", "eps"]),
        (torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9}, ["lr", "alpha"]),
    ],
    ids=["sgd", "adam", "rmsprop"],
)
def test_gradcheck_learnable_hyperparameters(torch_cls: type, kwargs: dict, learn: list) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    opt = torch_cls(model.parameters(), **kwargs)
    g = torch.Generator().manual_seed(8)
    data = [
        (
            torch.randn(4, 2, generator=g, dtype=torch.float64),
            torch.randn(4, 1, generator=g, dtype=torch.float64),
        )
        for _ in range(4)
    ]
    leaves = []
    for key in learn:
        value = kwargs.get(key, opt.defaults[key])
        values = value if isinstance(value, tuple) else (value,)
        leaves.extend(
            torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for v in values
        )

    def meta_loss(*hyper: torch.Tensor) -> torch.Tensor:
        it = iter(hyper)
        override = {}
        for key in learn:
            value = kwargs.get(key, opt.defaults[key])
            override[key] = [
                tuple(next(it) for _ in value) if isinstance(value, tuple) else next(it)
            ]
        with metalight.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
            for x, y in data[:3]:
                diffopt.step(loss_fn(fmodel(x), y))
            return loss_fn(fmodel(data[3][0]), data[3][1])

    assert torch.autograd.gradcheck(meta_loss, tuple(leaves), eps=1e-7, atol=1e-5, rtol=1e-4)


def test_no_nan_meta_gradient_through_adam_with_zero_gradient() -> None:
    """A conv bias right before batch-statistics BatchNorm has an exactly zero gradient."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 2),
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    with metalight.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        loss = loss_fn(fmodel(x), y)
        bias_grad = torch.autograd.grad(loss, fmodel.fast_params[1], retain_graph=True)[0]
        assert torch.all(bias_grad.abs() < 1e-12)
        for _ in range(3):
            diffopt.step(loss_fn(fmodel(x), y))
        loss_fn(fmodel(x), y).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


class ZeroGrad(nn.Module):
    """``dead`` enters the loss multiplied by zero: its gradient is exactly 0, not None."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.dead = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + 0.0 * self.dead.sum()


@pytest.mark.parametrize(
    "opt_case",
    [c for c in OPTIMIZER_CASES if c.torch_cls not in (torch.optim.SGD, torch.optim.ASGD)],
    ids=lambda c: c.id,
)
def test_exactly_zero_gradient_gives_finite_meta_gradient(opt_case: OptimCase) -> None:
    model = ZeroGrad().double()
    opt = opt_case.torch_cls(model.parameters(), **opt_case.kwargs)
    x = torch.randn(5, 3, dtype=torch.float64)
    with metalight.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(loss_fn(fmodel(x), torch.zeros(5, 1, dtype=torch.float64)))
        loss_fn(fmodel(x), torch.ones(5, 1, dtype=torch.float64)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
