"""The stateless view: fast weights, history, buffers, modes, tied and frozen weights, RNNs."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from metalight import innerloop_ctx
from metalight.functional import functional_call, make_functional, monkeypatch
from metalight.patch import buffer_sync


class EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def embed_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) * self.head.weight.sum()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 3, bias=False)
        self.decode = nn.Linear(3, 4, bias=False)
        self.out = nn.Linear(4, 4)
        self.decode.weight = nn.Parameter(self.embed.weight.detach().T.contiguous())
        self.tied = nn.Linear(4, 3, bias=False)
        self.tied.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.decode(self.embed(x) + self.tied(x)))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_view_matches_module_and_never_mutates_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    before = snapshot(model)
    x = torch.randn(5, 1, 6, 6)
    fmodel = monkeypatch(model)
    out = fmodel(x)
    assert_unchanged(model, before)
    # The view computed exactly what the module computes (the module then moves its stats).
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    for _ in range(3):
        fmodel.update_params([p * 1.1 for p in fmodel.parameters()])
        fmodel(x)
    assert_unchanged(model, snapshot(model))


def test_fast_weights_history_and_params_kwarg() -> None:
    model = nn.Linear(3, 2)
    fmodel = monkeypatch(model, copy_initial_weights=False)
    x = torch.randn(4, 3)
    p0 = list(fmodel.parameters())
    assert all(a is b for a, b in zip(p0, model.parameters(), strict=True))
    p1 = [p * 2 for p in p0]
    out = fmodel(x, params=p1)
    torch.testing.assert_close(out, x @ (2 * model.weight).T + 2 * model.bias)
    assert fmodel.fast_params is p1 or all(
        a is b for a, b in zip(fmodel.fast_params, p1, strict=True)
    )
    assert [t is s for t, s in zip(fmodel.parameters(time=0), p0, strict=True)] == [True, True]
    assert all(a is b for a, b in zip(fmodel.parameters(time=1), p1, strict=True))
    assert fmodel.init_fast_params is not None
    assert all(a is b for a, b in zip(fmodel.init_fast_params, p0, strict=True))
    with pytest.raises(ValueError, match=r"only 2 steps .*\(times 0\.\.1\)"):
        list(fmodel.parameters(time=5))
    names = [n for n, _ in fmodel.named_parameters()]
    assert names == ["weight", "bias"]


def test_gradient_through_history_reaches_module() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    fmodel = monkeypatch(model, detach_initial_weights=False)
    for _ in range(2):
        loss = fmodel(x).pow(2).mean()
        grads = torch.autograd.grad(loss, fmodel.fast_params, create_graph=True)
        fmodel.update_params([p - 0.3 * g for p, g in zip(fmodel.fast_params, grads, strict=True)])
    fmodel(x).sum().backward()

    # The same computation by hand.
    w, b = (p.detach().clone().requires_grad_() for p in model.parameters())
    params = [w, b]
    for _ in range(2):
        loss = (x @ params[0].T + params[1]).pow(2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - 0.3 * g for p, g in zip(params, grads, strict=True)]
    (x @ params[0].T + params[1]).sum().backward()
    torch.testing.assert_close(model.weight.grad, w.grad)
    torch.testing.assert_close(model.bias.grad, b.grad)


def test_copy_initial_weights_semantics() -> None:
    model = nn.Linear(2, 1)
    x = torch.randn(3, 2)
    detached = monkeypatch(model)  # higher's default: copy_initial_weights=True
    detached(x).sum().backward()
    assert model.weight.grad is None
    assert detached.parameters(time=0).__next__().grad is not None
    alias = monkeypatch(model, copy_initial_weights=True, detach_initial_weights=False)
    alias(x).sum().backward()
    assert model.weight.grad is not None


def test_direct_assignment_is_tracked() -> None:
    torch.manual_seed(2)
    model = EncoderHead()
    fmodel = monkeypatch(model, copy_initial_weights=False)
    x = torch.randn(4, 3)
    mask = torch.tensor([[1.0, 0, 1, 0, 1], [0, 1, 0, 1, 0]])
    fmodel.head.weight = fmodel.head.weight * mask
    assert len(list(fmodel.parameters(time=0))) == 4
    out = fmodel(x)
    expected = model.encoder(x) @ (model.head.weight * mask).T + model.head.bias
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    # Masked entries got no gradient: the assignment is part of the graph.
    assert torch.all(model.head.weight.grad[mask == 0] == 0)
    assert torch.any(model.head.weight.grad[mask == 1] != 0)
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        fmodel.head.weight = torch.zeros(3)


def test_submodule_calls_and_methods_use_fast_weights() -> None:
    torch.manual_seed(3)
    model = EncoderHead()
    fmodel = monkeypatch(model)
    x = torch.randn(4, 3)
    new = [p + 1 for p in fmodel.parameters()]
    fmodel.update_params(new)
    enc_w, enc_b, head_w, _ = new
    torch.testing.assert_close(fmodel.encoder(x), torch.tanh(x @ enc_w.T + enc_b))
    torch.testing.assert_close(fmodel.encoder[0](x), x @ enc_w.T + enc_b)
    torch.testing.assert_close(
        fmodel.embed_scaled(x), torch.tanh(x @ enc_w.T + enc_b) * head_w.sum()
    )
    assert fmodel.head.weight is head_w
    assert [n for n, _ in fmodel.head.named_parameters()] == ["weight", "bias"]
    assert len(fmodel.encoder) == 2


def test_batchnorm_buffers_stay_per_unroll_and_modes() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = snapshot(model)
    x = torch.randn(8, 3) * 3 + 1
    fmodel = monkeypatch(model)
    fmodel(x)
    assert_unchanged(model, before)
    running = dict(fmodel.named_buffers())["1.running_mean"]
    assert not torch.equal(running, before["1.running_mean"])
    # eval on the view uses its running stats and leaves the module in train mode.
    fmodel.eval()
    assert model.training and not fmodel.training
    out = fmodel(x)
    bn = model[1]
    h = model[0](x)
    buffers = dict(fmodel.named_buffers())
    expected = (h - buffers["1.running_mean"]) / torch.sqrt(buffers["1.running_var"] + bn.eps)
    torch.testing.assert_close(out, expected * bn.weight + bn.bias)
    assert model.training and model[1].training
    fmodel.train()
    assert fmodel.training
    # Only when asked do the unroll's statistics reach the module.
    fmodel.copy_buffers_to_module()
    torch.testing.assert_close(model[1].running_mean, buffers["1.running_mean"])
    other = monkeypatch(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    buffer_sync(model, other)
    torch.testing.assert_close(dict(other.named_buffers())["1.running_mean"], model[1].running_mean)


def test_module_eval_mode_is_followed_by_default() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.9))
    model.eval()
    fmodel = monkeypatch(model)
    x = torch.randn(5, 3)
    torch.testing.assert_close(fmodel(x), model(x))


def test_tied_weights_share_one_fast_weight() -> None:
    torch.manual_seed(5)
    model = Tied().double()
    n_unique = len(list(model.parameters()))
    fmodel = monkeypatch(model, copy_initial_weights=False)
    assert len(fmodel.fast_params) == n_unique
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(fmodel(x), model(x))
    new = [p * 0.5 for p in fmodel.fast_params]
    fmodel.update_params(new)
    out = fmodel(x)
    shared = new[[n for n, _ in model.named_parameters()].index("embed.weight")]
    assert fmodel.tied.weight is shared
    # The tied submodule called alone sees the same fast weight.
    torch.testing.assert_close(fmodel.tied(x), x @ shared.T)
    out.sum().backward()
    assert model.embed.weight.grad is not None


def test_partially_used_and_frozen_parameters() -> None:
    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    model["used"].bias.requires_grad_(False)
    fmodel = monkeypatch(model)
    assert len(fmodel.fast_params) == 4
    out = fmodel.used(torch.ones(1, 2))
    grads = torch.autograd.grad(out.sum(), fmodel.fast_params[0])
    assert grads[0].shape == (2, 2)
    assert not fmodel.fast_params[1].requires_grad


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_modules(cls: type[nn.RNNBase]) -> None:
    torch.manual_seed(6)
    model = cls(3, 4, num_layers=2, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    fmodel = monkeypatch(model, copy_initial_weights=False)
    torch.testing.assert_close(fmodel(x)[0], model(x)[0])
    fmodel.update_params([p * 0.9 for p in fmodel.fast_params])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    torch.testing.assert_close(fmodel(x)[0], model(x)[0])


def test_track_higher_grads_false_keeps_only_ends() -> None:
    model = nn.Linear(2, 1)
    fmodel = monkeypatch(model, track_higher_grads=False)
    for k in range(4):
        fmodel.update_params([p.detach() + k for p in fmodel.fast_params])
    assert len(list(fmodel.parameters(time=0))) == 2
    with pytest.raises(ValueError, match="track_higher_grads=False"):
        list(fmodel.parameters(time=2))


def test_bad_fast_weights_are_named() -> None:
    model = nn.Linear(3, 2)
    fmodel = monkeypatch(model)
    with pytest.raises(ValueError, match=r"expected 2 fast weights.*got 1"):
        fmodel.update_params([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"'bias' has shape \(3,\).*shape \(2,\)"):
        fmodel(torch.zeros(1, 3), params=[torch.zeros(2, 3), torch.zeros(3)])
    empty = make_functional(model)
    with pytest.raises(ValueError, match="holds no fast weights"):
        empty(torch.zeros(1, 3))
    out = empty(torch.zeros(1, 3), params=list(model.parameters()))
    assert out.shape == (1, 2)


def test_layout_cache_follows_replaced_parameters() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    first = monkeypatch(model, copy_initial_weights=False)
    assert first.fast_params[0] is model[0].weight
    model[0].weight = nn.Parameter(torch.zeros(3, 2))
    model[1] = nn.Linear(3, 2)
    second = monkeypatch(model, copy_initial_weights=False)
    assert second.fast_params[0] is model[0].weight
    assert second(torch.ones(4, 2)).shape == (4, 2)
    assert [p.shape for p in second.fast_params][2] == (2, 3)


def _shared_model() -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(7)
    proj = nn.Linear(4, 4)
    return nn.Sequential(proj, nn.Tanh(), nn.Linear(4, 4), proj).double(), proj


def test_module_object_used_twice_is_never_left_with_fast_weights() -> None:
    model, proj = _shared_model()
    own = [proj.weight, proj.bias]
    before = snapshot(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # a second context fails when the first left fast weights behind
        with innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(fmodel(x).pow(2).mean())
            assert model[0].weight is own[0] and model[3].bias is own[1]
        assert model[0].weight is own[0] and model[3].weight is own[0]
        assert model[0].weight.grad_fn is None and model[3].bias.grad_fn is None
        assert_unchanged(model, before)
    # New weights given with params= reach both places the module object is used.
    new = [p * 0.5 for p in fmodel.parameters(time=0)]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), new, strict=True):
            p.copy_(q)
    torch.testing.assert_close(fmodel(x, params=new), twin(x), rtol=0, atol=0)
    assert_unchanged(model, before)


def test_error_inside_forward_restores_the_module() -> None:
    model, proj = _shared_model()
    before = snapshot(model)
    fmodel = monkeypatch(model)
    fmodel.update_params([p + 1 for p in fmodel.parameters()])
    with pytest.raises(RuntimeError):
        fmodel(torch.zeros(2, 3, dtype=torch.float64))
    assert model[0].weight is proj.weight and model[3].weight is proj.weight
    assert proj.weight.grad_fn is None
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(3, 3), nn.Tanh()),
        lambda: nn.Linear(3, 3),
        lambda: nn.LSTM(3, 3),
        lambda: nn.GRU(3, 3),
        lambda: nn.RNN(3, 3),
        lambda: nn.LSTMCell(3, 3),
        lambda: nn.GRUCell(3, 3),
    ],
    ids=["Sequential", "Linear", "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell"],
)
def test_fast_params_can_be_assigned_like_higher(make) -> None:
    model = make()
    fmodel = monkeypatch(model)
    start = list(fmodel.fast_params)
    new = [p * 2 for p in start]
    fmodel.fast_params = iter(new)  # any iterable, as in higher
    assert all(a is b for a, b in zip(fmodel.fast_params, new, strict=True))
    assert len(fmodel._fast_params) == 2
    assert all(a is b for a, b in zip(fmodel.parameters(time=0), start, strict=True))
    assert all(a is b for a, b in zip(fmodel.parameters(time=1), new, strict=True))
    assert all(a is b for a, b in zip(fmodel.init_fast_params, start, strict=True))
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in fmodel.named_parameters()] == names
    assert all(p is q for (_, p), q in zip(fmodel.named_parameters(time=1), new, strict=True))
    with pytest.raises(ValueError, match=f"expected {len(new)} fast weights"):
        fmodel.fast_params = new[:1]


def test_track_higher_grads_can_be_assigned() -> None:
    fmodel = monkeypatch(nn.Sequential(nn.Linear(2, 2)))
    assert fmodel.track_higher_grads
    fmodel.track_higher_grads = False
    assert fmodel.track_higher_grads is False
    for k in range(3):
        fmodel.fast_params = [p.detach() + k for p in fmodel.fast_params]
    assert len(fmodel._fast_params) == 2  # only the initial and the latest weights are kept
    with pytest.raises(AttributeError, match="whole functional model"):
        fmodel[0].fast_params = list(fmodel.fast_params)
    with pytest.raises(AttributeError, match="cannot set 'speed'"):
        fmodel.speed = 1


def test_rnn_module_keeps_its_own_flat_weights() -> None:
    torch.manual_seed(8)
    model = nn.LSTM(3, 4, num_layers=2).double()
    flat = list(model._flat_weights)
    fmodel = monkeypatch(model)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    fmodel.update_params([p * 0.5 for p in fmodel.parameters()])
    out = fmodel(x)[0]
    assert all(a is b for a, b in zip(model._flat_weights, flat, strict=True))
    assert all(w.grad_fn is None for w in model._flat_weights)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(out, twin(x)[0], rtol=0, atol=0)


def test_parametrized_modules() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(3, 4)),
        parametrizations.spectral_norm(nn.Linear(4, 4)),
        parametrizations.orthogonal(nn.Linear(4, 2)),
    ).double()
    names = [n for n, _ in model.named_parameters()]
    assert "0.parametrizations.weight.original0" in names
    before = snapshot(model)
    x = torch.randn(6, 3, dtype=torch.float64)
    fmodel = monkeypatch(model)
    twin = copy.deepcopy(model)
    # Train mode: spectral norm's power iteration moves the view's own u/v, as it moves the
    # module's in a forward pass; the module's stay where they were.
    for _ in range(2):
        torch.testing.assert_close(fmodel(x), twin(x), rtol=0, atol=0)
    buffers = dict(fmodel.named_buffers())
    u_name = "1.parametrizations.weight.0._u"
    torch.testing.assert_close(buffers[u_name], twin[1].parametrizations.weight[0]._u)
    assert_unchanged(model, before)
    # Eval mode: no power iteration, the view's u/v stay.
    fmodel.eval()
    u = buffers[u_name].clone()
    fmodel(x)
    assert torch.equal(dict(fmodel.named_buffers())[u_name], u)
    fmodel.copy_buffers_to_module()
    assert torch.equal(model[1].parametrizations.weight[0]._u, u)


def test_buffer_reassigned_in_forward_stays_in_the_view() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls = self.calls + 1  # a new tensor, not an in-place update
            return self.lin(x)

    model = Counter()
    fmodel = monkeypatch(model)
    fmodel(torch.ones(1, 2))
    fmodel(torch.ones(1, 2))
    assert dict(fmodel.named_buffers())["calls"].item() == 2
    assert model.calls.item() == 0


def test_replaying_a_view_state_runs_on_copies_and_gives_the_view_back() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).double()
    fmodel = monkeypatch(model)
    x = torch.randn(4, 2, dtype=torch.float64)
    state = fmodel.view_state()
    assert state.modes == {"": True, "0": True, "1": True, "2": True}
    before = [b.clone() for b in state.buffers]
    fmodel(x)
    fmodel[1].eval()
    moved = dict(fmodel.named_buffers())
    assert not torch.equal(moved["1.running_mean"], before[0])
    with fmodel.replaying(state):
        # The state's buffers and modes (BatchNorm in train mode again), on copies.
        assert fmodel[1].training
        assert torch.equal(dict(fmodel.named_buffers())["1.running_mean"], before[0])
        fmodel(x)
        assert not torch.equal(dict(fmodel.named_buffers())["1.running_mean"], before[0])
    assert all(torch.equal(a, b) for a, b in zip(state.buffers, before, strict=True))
    assert all(b is moved[n] for n, b in fmodel.named_buffers())
    assert not fmodel[1].training and fmodel[0].training
    # The module's own modes and buffers were never touched.
    assert model[1].training and torch.equal(model[1].running_mean, torch.zeros(3).double())
    other = monkeypatch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="replaying needs a ViewState taken from this view"):
        other.replaying(state).__enter__()
    with pytest.raises(AttributeError, match="whole functional model"):
        fmodel[1].view_state()


def test_layout_follows_a_module_object_added_again() -> None:
    proj = nn.Linear(3, 3)
    model = nn.Sequential(proj, nn.Tanh())
    monkeypatch(model)(torch.ones(1, 3))
    model.append(proj)  # no new parameter object, but a new place for one
    fmodel = monkeypatch(model)
    new = [p * 2 for p in fmodel.parameters()]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), new, strict=True):
            p.copy_(q)
    torch.testing.assert_close(fmodel(torch.ones(1, 3), params=new), twin(torch.ones(1, 3)))
    assert fmodel[2].weight is new[0]


def test_layout_cache_does_not_keep_models_alive() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2))
    monkeypatch(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_functional_call_for_any_structure() -> None:
    model, proj = _shared_model()
    before = snapshot(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(4, 4, dtype=torch.float64)
    # Given under its second name, the weight reaches both places.
    out = functional_call(model, {"3.weight": w}, (x,))
    h = torch.tanh(x @ w.T + proj.bias) @ model[2].weight.T + model[2].bias
    torch.testing.assert_close(out, h @ w.T + proj.bias)
    assert_unchanged(model, before)
    assert model[0].weight is proj.weight and model[3].weight is proj.weight
    with pytest.raises(KeyError, match=r"'3\.scale' is neither a parameter nor a buffer"):
        functional_call(model, {"3.scale": w}, x)
    # Batched over a leading dimension with vmap, as the task-vectorised unroll does.
    ws = torch.stack([w, 2 * w])
    outs = torch.func.vmap(lambda v: functional_call(model, {"0.weight": v}, (x,)))(ws)
    torch.testing.assert_close(outs[1], functional_call(model, {"0.weight": 2 * w}, (x,)))
    assert_unchanged(model, before)
    # A None buffer: BatchNorm normalises with batch statistics and updates nothing.
    bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    bn_before = snapshot(bn)
    stats = {f"1.{n}": None for n in ("running_mean", "running_var", "num_batches_tracked")}
    functional_call(bn, stats, (torch.randn(4, 2),))
    assert_unchanged(bn, bn_before)
    assert bn[1].running_mean is not None


def test_hook_computed_weight_is_put_back() -> None:
    # The deprecated weight_norm recomputes a plain ``weight`` attribute in a pre-hook: after
    # a view call it must not hold a tensor computed from fast weights.
    with pytest.warns(FutureWarning):
        layer = nn.utils.weight_norm(nn.Linear(3, 2).double())
    model = nn.Sequential(layer)
    weight = layer.weight
    fmodel = monkeypatch(model)
    new = [p * 2 for p in fmodel.parameters()]
    out = fmodel(torch.ones(1, 3, dtype=torch.float64), params=new)
    assert layer.weight is weight
    bias, g, v = new  # named_parameters(): bias, weight_g, weight_v
    expected = g * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, torch.ones(1, 3, dtype=torch.float64) @ expected.T + bias)


def test_state_dict_of_tied_and_parametrized_weights_loads_into_a_copy() -> None:
    # Tied weights appear under both keys with the same fast weight, a parametrization's
    # stored tensors under their own keys: a copy loading the view's state_dict computes
    # what the view computes, and the module itself is untouched.
    torch.manual_seed(0)
    emb, out = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    out.weight = emb.weight
    model = nn.Sequential(emb, nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)), out)
    model = model.double()
    before = copy.deepcopy(model.state_dict())
    fmodel = monkeypatch(model)
    fmodel.update_params([p * 1.5 + 0.25 for p in fmodel.parameters()])
    state = fmodel.state_dict()
    assert list(state) == list(model.state_dict())
    assert state["0.weight"].data_ptr() == state["2.weight"].data_ptr()
    copied = copy.deepcopy(model)
    copied.load_state_dict(state)
    x = torch.tensor([[1, 2, 4]])
    torch.testing.assert_close(copied(x), fmodel(x), rtol=0, atol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
