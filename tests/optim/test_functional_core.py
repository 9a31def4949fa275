"""Tests of the pure functional optimizer core against torch.optim."""

from __future__ import annotations

import doctest
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from metalight.optim import functional as F
from metalight.optim.functional import (
    BY_TORCH_CLASS,
    FunctionalOptimizer,
    safe_sqrt,
    state_from_torch,
    state_to_dicts,
)
from tests.optim_table import OPTIMIZER_CASES, OptimCase, functional_hparams

DTYPE = torch.float64
CASE_IDS = [case.id for case in OPTIMIZER_CASES]
_GEN = torch.Generator().manual_seed(1234)
_X = torch.randn(2, generator=_GEN, dtype=DTYPE)
_Y = torch.randn(3, generator=_GEN, dtype=DTYPE)


def make_params(seed: int = 0, *, unused: bool = True) -> list[Tensor]:
    """A matrix, a vector and a 0-d parameter (plus one the loss never uses)."""
    gen = torch.Generator().manual_seed(seed)
    shapes: list[tuple[int, ...]] = [(3, 2), (3,), ()]
    if unused:
        shapes.append((2,))
    return [torch.randn(shape, generator=gen, dtype=DTYPE) for shape in shapes]


def loss_fn(params: Sequence[Tensor]) -> Tensor:
    """A deterministic non-quadratic loss of the first three parameters."""
    w, b, s = params[0], params[1], params[2]
    hidden = torch.tanh(w @ _X + b)
    return (
        (hidden * _Y).sum()
        + 0.3 * torch.sin(s * w).sum()
        + 0.2 * torch.cos(b * s).sum()
        + 0.05 * (w**2).sum()
        + 0.1 * s**2
    )


def functional_of(case: OptimCase) -> tuple[FunctionalOptimizer, dict[str, Any]]:
    fo = BY_TORCH_CLASS[case.torch_cls]
    return fo, functional_hparams(case, fo.defaults)


def functional_step(
    fo: FunctionalOptimizer, hp: dict[str, Any], params: list[Tensor], state: Any
) -> tuple[list[Tensor], Any]:
    """One step with gradients of ``loss_fn`` taken at (detached copies of) ``params``."""
    leaves = [p.detach().requires_grad_() for p in params]
    grads = torch.autograd.grad(loss_fn(leaves), leaves, allow_unused=True)
    return fo.update(list(grads), state, params, **hp)


def torch_step(opt: torch.optim.Optimizer, params: list[Tensor]) -> None:
    opt.zero_grad()
    loss_fn(params).backward()
    opt.step()


def assert_state_matches(
    fo: FunctionalOptimizer,
    hp: dict[str, Any],
    state: Any,
    opt: torch.optim.Optimizer,
    torch_params: list[Tensor],
    init_params: list[Tensor],
) -> None:
    fresh = state_to_dicts(fo.init(init_params, **hp))
    for i, (mine, p) in enumerate(zip(state_to_dicts(state), torch_params, strict=True)):
        theirs = dict(opt.state[p])
        if not theirs:  # torch.optim never touched this parameter: we must still be at init
            theirs = fresh[i]
        assert set(mine) == set(theirs), f"param {i}: keys {set(mine)} != {set(theirs)}"
        for key, value in mine.items():
            expected = theirs[key]
            if key == "step":
                assert isinstance(value, int)
                assert value == (expected.item() if isinstance(expected, Tensor) else expected)
                continue
            assert isinstance(value, Tensor), key
            if expected.dim() == 0:  # torch keeps scalars such as eta/mu in float32
                expected = expected.to(value.dtype)
            torch.testing.assert_close(value, expected, msg=lambda m, i=i, k=key: f"{i}.{k}: {m}")


def assert_params_match(mine: Sequence[Tensor], theirs: Sequence[Tensor]) -> None:
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b.detach())


# --------------------------------------------------------------------------------------------
# Lockstep against torch.optim
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=CASE_IDS)
def test_lockstep_matches_torch(case: OptimCase) -> None:
    fo, hp = functional_of(case)
    init = make_params()
    torch_params = [p.clone().requires_grad_() for p in init]
    opt = case.torch_cls(torch_params, **case.kwargs)
    params = [p.clone() for p in init]
    state = fo.init(params, **hp)
    unused_init_state = state_to_dicts(state)[3]
    for _ in range(25):
        torch_step(opt, torch_params)
        new_params, state = functional_step(fo, hp, params, state)
        assert new_params[3] is params[3]  # grad None: the very same tensor comes back
        params = new_params
    assert_params_match(params, torch_params)
    assert_state_matches(fo, hp, state, opt, torch_params, init)
    # The parameter without a gradient is untouched, and so is its state.
    assert torch.equal(params[3], init[3])
    assert torch.equal(torch_params[3].detach(), init[3])
    for key, value in state_to_dicts(state)[3].items():
        assert value is unused_init_state[key]
    assert all(not torch.equal(p, q) for p, q in zip(params[:3], init[:3], strict=True))


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=CASE_IDS)
def test_branch_from_torch_state(case: OptimCase) -> None:
    fo, hp = functional_of(case)
    init = make_params(seed=1)
    torch_params = [p.clone().requires_grad_() for p in init]
    opt = case.torch_cls(torch_params, **case.kwargs)
    for _ in range(5):
        torch_step(opt, torch_params)
    params = [p.detach().clone() for p in torch_params]
    state = state_from_torch(fo, [opt.state[p] for p in torch_params], params, **hp)
    assert isinstance(state, fo.state_type)
    for mine, p in zip(state_to_dicts(state), torch_params, strict=True):
        for key, value in mine.items():
            theirs = opt.state[p].get(key)
            if isinstance(value, Tensor) and isinstance(theirs, Tensor):
                assert value.data_ptr() != theirs.data_ptr(), f"{key} aliases torch.optim state"
    assert_state_matches(fo, hp, state, opt, torch_params, init)
    for _ in range(10):
        torch_step(opt, torch_params)
        params, state = functional_step(fo, hp, params, state)
    assert_params_match(params, torch_params)
    assert_state_matches(fo, hp, state, opt, torch_params, init)


def test_adam_bias_correction_precision() -> None:
    """Bias corrections must be computed from the integer step in double precision.

    With beta2 = 0.999, ``1 - beta2**t`` is ~1e-3 in the first steps; computing it from a float32
    step (or a float32 beta) shifts every update by ~1e-5 relative, far beyond float64 tolerances.
    """
    kwargs = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}
    init = make_params(seed=2, unused=False)
    torch_params = [p.clone().requires_grad_() for p in init]
    opt = torch.optim.Adam(torch_params, foreach=False, **kwargs)
    params = [p.clone() for p in init]
    state = F.adam.init(params, **kwargs)
    for _ in range(50):
        torch_step(opt, torch_params)
        params, state = functional_step(F.adam, kwargs, params, state)
        assert_params_match(params, torch_params)
    assert state.step == [50, 50, 50]


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in OPTIMIZER_CASES
        if c.id
        in {
            "sgd-nesterov",
            "adam-amsgrad",
            "rmsprop-centered",
            "rprop",
            "adagrad-lr_decay",
            "asgd",
            "nadam",
            "radam",
            "adamax",
            "adadelta",
            "adamw",
        }
    ],
    ids=lambda c: c.id,
)
def test_complex_parameters_match_torch(case: OptimCase) -> None:
    fo, hp = functional_of(case)
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(3, 2, generator=gen, dtype=torch.complex128), torch.randn(2, dtype=DTYPE)]

    def complex_loss(ps: Sequence[Tensor]) -> Tensor:
        z, r = ps
        real = torch.view_as_real(z)
        return torch.tanh(real * r[0]).sum() + (torch.sin(real) * r[1]).sum() + 0.1 * (r**2).sum()

    torch_params = [p.clone().requires_grad_() for p in init]
    opt = case.torch_cls(torch_params, **case.kwargs)
    params = [p.clone() for p in init]
    state = fo.init(params, **hp)
    for _ in range(10):
        opt.zero_grad()
        complex_loss(torch_params).backward()
        opt.step()
        leaves = [p.detach().requires_grad_() for p in params]
        grads = torch.autograd.grad(complex_loss(leaves), leaves)
        params, state = fo.update(list(grads), state, params, **hp)
    assert params[0].is_complex()
    assert_params_match(params, torch_params)
    assert_state_matches(fo, hp, state, opt, torch_params, init)


# --------------------------------------------------------------------------------------------
# Meta-gradients
# --------------------------------------------------------------------------------------------


def unroll(
    fo: FunctionalOptimizer,
    hp: dict[str, Any],
    params: list[Tensor],
    state: Any,
    steps: int,
    loss: Callable[[Sequence[Tensor]], Tensor] = loss_fn,
) -> tuple[list[Tensor], Any]:
    """``steps`` differentiable steps (``create_graph=True``)."""
    for _ in range(steps):
        grads = torch.autograd.grad(loss(params), params, create_graph=True, allow_unused=True)
        params, state = fo.update(list(grads), state, params, **hp)
    return params, state


def meta_loss(params: Sequence[Tensor]) -> Tensor:
    return loss_fn(params) + sum(((p - 0.5) ** 2).sum() for p in params)


def tensorize(hp: dict[str, Any], defaults: dict[str, Any]) -> tuple[list[Tensor], Callable]:
    """Every numeric hyperparameter (defaults included) as a float64 leaf tensor.

    Returns the leaves and a function rebuilding the hyperparameter dict from them. ``eps`` is
    raised to 1e-3 so that gradcheck's finite differences stay inside its smooth region.
    """
    merged = {**defaults, **hp}
    leaves: list[Tensor] = []
    layout: dict[str, Any] = {}
    for key, value in merged.items():
        if isinstance(value, bool):
            layout[key] = value
        elif isinstance(value, tuple):
            layout[key] = tuple(len(leaves) + j for j in range(len(value)))
            leaves.extend(torch.tensor(float(v), dtype=DTYPE) for v in value)
        else:
            value = max(float(value), 1e-3) if key == "eps" else float(value)
            layout[key] = len(leaves)
            leaves.append(torch.tensor(value, dtype=DTYPE))

    def rebuild(values: Sequence[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, slot in layout.items():
            if isinstance(slot, bool):
                out[key] = slot
            elif isinstance(slot, tuple):
                out[key] = tuple(values[j] for j in slot)
            else:
                out[key] = values[slot]
        return out

    return leaves, rebuild


def small_params(seed: int = 3) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes: list[tuple[int, ...]] = [(3, 2), (3,), (), (1,)]
    return [torch.randn(shape, generator=gen, dtype=DTYPE) for shape in shapes]


@pytest.mark.parametrize("warm_steps", [0, 6], ids=["cold", "warm"])
@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=CASE_IDS)
def test_gradcheck_meta_gradient_wrt_params(case: OptimCase, warm_steps: int) -> None:
    """d(loss after 3 steps)/d(initial params); warm starts from a state 6 steps in."""
    fo, hp = functional_of(case)
    start = small_params()
    state = fo.init(start, **hp)
    for _ in range(warm_steps):  # RAdam rectifies from step 6 on
        start, state = functional_step(fo, hp, start, state)
    state = type(state)(*(list(column) for column in state))

    def f(*params: Tensor) -> Tensor:
        final, _ = unroll(fo, hp, list(params), state, steps=3)
        return meta_loss(final)

    inputs = tuple(p.detach().clone().requires_grad_() for p in start)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=CASE_IDS)
def test_gradcheck_meta_gradient_wrt_hyperparameters(case: OptimCase) -> None:
    """d(loss after k steps)/d(every numeric hyperparameter), e.g. lr and Adam's betas."""
    fo, hp = functional_of(case)
    leaves, rebuild = tensorize(hp, dict(fo.defaults))
    start = small_params()
    steps = 8 if fo is F.radam else 3  # let RAdam reach its rectified regime

    def f(*values: Tensor) -> Tensor:
        thp = rebuild(values)
        params = [p.clone().requires_grad_() for p in start]
        final, _ = unroll(fo, thp, params, fo.init(params, **thp), steps=steps)
        return meta_loss(final)

    inputs = tuple(v.requires_grad_() for v in leaves)
    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_meta_gradient_lr_and_adam_betas() -> None:
    start = small_params()

    def f(lr: Tensor, beta1: Tensor, beta2: Tensor) -> Tensor:
        hp = {"lr": lr, "betas": (beta1, beta2)}
        params = [p.clone().requires_grad_() for p in start]
        final, _ = unroll(F.adam, hp, params, F.adam.init(params, **hp), steps=3)
        return meta_loss(final)

    inputs = tuple(torch.tensor(v, dtype=DTYPE, requires_grad=True) for v in (0.05, 0.9, 0.999))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in OPTIMIZER_CASES
        if c.id in {"adam-amsgrad", "rmsprop-centered-momentum", "nadam", "asgd", "sgd-nesterov"}
    ],
    ids=lambda c: c.id,
)
def test_gradgradcheck_meta_gradient(case: OptimCase) -> None:
    """Second-order meta-gradients (e.g. for hypergradient methods) are correct too."""
    fo, hp = functional_of(case)
    start = [torch.randn(2, 2, generator=torch.Generator().manual_seed(7), dtype=DTYPE)]

    def loss(ps: Sequence[Tensor]) -> Tensor:
        return torch.tanh(ps[0] @ ps[0]).sum() + 0.1 * (ps[0] ** 2).sum()

    def f(p: Tensor) -> Tensor:
        final, _ = unroll(fo, hp, [p], fo.init([p], **hp), steps=2, loss=loss)
        return loss(final)

    assert torch.autograd.gradgradcheck(f, (start[0].clone().requires_grad_(),))


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=CASE_IDS)
def test_tensor_hyperparameters_give_the_same_values(case: OptimCase) -> None:
    fo, hp = functional_of(case)
    leaves, rebuild = tensorize(hp, dict(fo.defaults))
    number_hp = rebuild([leaf.item() for leaf in leaves])
    tensor_hp = rebuild([leaf.requires_grad_() for leaf in leaves])
    a = b = make_params(seed=4)
    a_state, b_state = fo.init(a, **number_hp), fo.init(b, **tensor_hp)
    for _ in range(10):
        a, a_state = functional_step(fo, number_hp, a, a_state)
        b, b_state = functional_step(fo, tensor_hp, b, b_state)
    assert_params_match(a, b)


NAN_PRONE = [
    case
    for case in OPTIMIZER_CASES
    if case.torch_cls
    in {
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
        torch.optim.Adadelta,
        torch.optim.RAdam,
        torch.optim.NAdam,
        torch.optim.Adamax,
    }
]


@pytest.mark.parametrize("case", NAN_PRONE, ids=lambda c: c.id)
def test_meta_gradient_finite_with_exactly_zero_gradients(case: OptimCase) -> None:
    """Entries whose gradient is exactly 0 keep a zero second moment; no NaN may come out."""
    fo, hp = functional_of(case)
    leaves, rebuild = tensorize(hp, dict(fo.defaults))
    thp = rebuild([leaf.requires_grad_() for leaf in leaves])
    gen = torch.Generator().manual_seed(6)
    start = [
        torch.randn(3, generator=gen, dtype=DTYPE).requires_grad_(),
        torch.randn(2, generator=gen, dtype=DTYPE).requires_grad_(),
    ]

    def loss(ps: Sequence[Tensor]) -> Tensor:
        p, q = ps
        # p[2] does not enter the loss; q enters with a zero factor: both get exact 0 grads.
        return torch.tanh(p[:2] * 1.5).sum() + (p[:2] ** 2).sum() + 0.0 * q.sum()

    grads = torch.autograd.grad(loss(start), start)
    assert grads[0][2] == 0
    assert torch.all(grads[1] == 0)
    final, _ = unroll(fo, thp, start, fo.init(start, **thp), steps=8, loss=loss)
    out = sum((p**2).sum() for p in final)
    meta_grads = torch.autograd.grad(out, [*start, *leaves], allow_unused=True)
    for g in meta_grads:
        if g is not None:
            assert torch.isfinite(g).all(), meta_grads


def test_safe_sqrt_values_and_gradients() -> None:
    x = torch.tensor([0.0, 1e-300, 0.25, 4.0, float("inf"), -1.0], dtype=DTYPE)
    torch.testing.assert_close(safe_sqrt(x), torch.sqrt(x), equal_nan=True)
    x = torch.tensor([0.0, 0.25, 4.0, 0.0], dtype=DTYPE, requires_grad=True)
    (g,) = torch.autograd.grad(safe_sqrt(x).sum(), x, create_graph=True)
    torch.testing.assert_close(g.detach(), torch.tensor([0.0, 1.0, 0.25, 0.0], dtype=DTYPE))
    (gg,) = torch.autograd.grad(g.sum(), x)
    expected = torch.tensor([0.0, -0.25 * 0.25**-1.5, -0.25 * 4.0**-1.5, 0.0], dtype=DTYPE)
    torch.testing.assert_close(gg, expected)
    # Contrast: the plain square root is not finite at zero.
    (plain,) = torch.autograd.grad(torch.sqrt(x).sum(), x)
    assert not torch.isfinite(plain[0])


# --------------------------------------------------------------------------------------------
# API contract
# --------------------------------------------------------------------------------------------

_IMPLEMENTATION_SWITCHES = {"self", "params", "foreach", "fused", "capturable", "differentiable"}


@pytest.mark.parametrize("torch_cls", list(BY_TORCH_CLASS), ids=lambda c: c.__name__)
def test_defaults_mirror_torch_signature(torch_cls: type[torch.optim.Optimizer]) -> None:
    fo = BY_TORCH_CLASS[torch_cls]
    signature = inspect.signature(torch_cls.__init__)
    expected = {
        name: param.default
        for name, param in signature.parameters.items()
        if name not in _IMPLEMENTATION_SWITCHES
    }
    assert dict(fo.defaults) == expected
    assert not set(fo.defaults) & _IMPLEMENTATION_SWITCHES
    assert fo.state_type is type(fo.init([torch.zeros(2)]))


def test_table_covers_every_optimizer() -> None:
    covered = {case.torch_cls for case in OPTIMIZER_CASES}
    assert covered == set(BY_TORCH_CLASS)
    names = {fo.name for fo in BY_TORCH_CLASS.values()}
    assert names == {
        "sgd",
        "adam",
        "adamw",
        "adadelta",
        "adagrad",
        "adamax",
        "asgd",
        "rmsprop",
        "rprop",
        "radam",
        "nadam",
    }
    for case in OPTIMIZER_CASES:
        _, hp = functional_of(case)
        assert set(case.kwargs) - set(hp) == {"foreach"}, case.id


def _tensors_in(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors_in(item)]
    return []


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=CASE_IDS)
def test_update_never_modifies_inputs(case: OptimCase) -> None:
    fo, hp = functional_of(case)
    leaves, rebuild = tensorize(hp, dict(fo.defaults))
    for thp in (hp, rebuild([leaf.requires_grad_() for leaf in leaves])):
        params = [p.requires_grad_() for p in make_params(seed=8)]
        state = fo.init(params, **thp)
        for _ in range(3):
            grads = list(torch.autograd.grad(loss_fn(params), params, allow_unused=True))
            inputs = _tensors_in([params, grads, list(state), thp])
            snapshot = [(t, t._version, t.detach().clone()) for t in inputs]
            params, state = fo.update(grads, state, params, **thp)
            for t, version, value in snapshot:
                assert t._version == version
                assert torch.equal(t.detach(), value)


def test_state_conversion_round_trip() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=DTYPE))
    opt = torch.optim.Adam([p], lr=0.1, foreach=False)
    assert state_from_torch(F.adam, [opt.state[p]], [p.detach()], lr=0.1).step == [0]
    p.grad = torch.ones_like(p)
    opt.step()
    state = state_from_torch(F.adam, [opt.state[p]], [p.detach()], lr=0.1)
    assert state.step == [1]
    assert type(state.step[0]) is int
    assert state.max_exp_avg_sq == [None]
    (as_dict,) = state_to_dicts(state)
    assert set(as_dict) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(ValueError, match="unexpected state key"):
        state_from_torch(F.sgd, [opt.state[p]], [p.detach()])
    with pytest.raises(ValueError, match="2 state dicts for 1 parameters"):
        state_from_torch(F.adam, [opt.state[p], {}], [p.detach()])


def test_invalid_arguments_raise() -> None:
    params = [torch.zeros(2)]
    state = F.adam.init(params)
    with pytest.raises(TypeError, match="unexpected hyperparameter"):
        F.adam.update([torch.ones(2)], state, params, momentum=0.9)
    with pytest.raises(TypeError, match="unexpected hyperparameter"):
        F.adamw.init(params, decoupled_weight_decay=True)
    with pytest.raises(TypeError, match="Python bool"):
        F.adam.update([torch.ones(2)], state, params, amsgrad=torch.tensor(True))
    with pytest.raises(ValueError, match="2 gradients for 1 parameters"):
        F.adam.update([torch.ones(2), torch.ones(2)], state, params)


def test_one_element_tensor_hyperparameters_keep_parameter_shapes() -> None:
    params = [torch.zeros(()), torch.zeros(2, 3)]
    grads = [torch.ones(()), torch.ones(2, 3)]
    lr = torch.tensor([0.1])
    for fo in BY_TORCH_CLASS.values():
        new, _ = fo.update(grads, fo.init(params, lr=lr), params, lr=lr)
        assert [p.shape for p in new] == [p.shape for p in params], fo.name


_MODULES = [
    "core",
    "sgd",
    "adam",
    "adadelta",
    "adagrad",
    "adamax",
    "asgd",
    "rmsprop",
    "rprop",
    "radam",
    "nadam",
]


@pytest.mark.parametrize("name", ["__init__", *_MODULES])
def test_docstring_examples_run(name: str) -> None:
    module_name = "metalight.optim.functional" + ("" if name == "__init__" else f".{name}")
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=CASE_IDS)
def test_per_element_learning_rate_broadcasts(case: OptimCase) -> None:
    """A learning rate shaped like the parameter (Meta-SGD style) acts elementwise."""
    fo, hp = functional_of(case)
    w0 = make_params(seed=9)[0].requires_grad_()
    lr = float(hp.get("lr", fo.defaults["lr"]))
    scale = torch.tensor([[1.0, 0.5], [2.0, 1.0], [0.0, 1.5]], dtype=DTYPE)

    def loss(ps: Sequence[Tensor]) -> Tensor:
        # Separable, so every entry evolves independently of the others.
        return (torch.tanh(ps[0] * 1.7) * torch.sin(ps[0])).sum() + 0.1 * (ps[0] ** 2).sum()

    per_element_hp = {**hp, "lr": lr * scale}
    per_element = [w0]
    state = fo.init(per_element, **per_element_hp)
    per_element, _ = unroll(fo, per_element_hp, per_element, state, steps=4, loss=loss)
    for row in range(3):
        for col in range(2):
            row_hp = {**hp, "lr": lr * float(scale[row, col])}
            (w,), _ = unroll(fo, row_hp, [w0], fo.init([w0], **row_hp), steps=4, loss=loss)
            torch.testing.assert_close(per_element[0][row, col], w[row, col])
