"""Tests for the few-shot backbones in :mod:`metalight.models`."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from metalight.models import MLP, MODELS, Conv4, ResNet12, build_model
from metalight.models.resnet12 import DropBlock, drop_block

SMALL = (4, 8, 8, 16)  # ResNet12 channels small enough for fast CPU tests


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# (name, factory, input shape) for small instances of every backbone.
CASES = [
    ("mlp", lambda: MLP(), (6, 1)),
    ("conv4", lambda: Conv4(hidden=8), (6, 1, 28, 28)),
    ("conv4-stride", lambda: Conv4(hidden=8, pool="stride"), (6, 1, 28, 28)),
    ("resnet12", lambda: ResNet12(in_channels=1, channels=SMALL), (6, 1, 28, 28)),
    (
        "resnet12-batch",
        lambda: ResNet12(in_channels=3, channels=SMALL, batch_norm="batch"),
        (6, 3, 32, 32),
    ),
]
CASE_IDS = [case[0] for case in CASES]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- shapes


def test_mlp_shapes_and_defaults() -> None:
    model = MLP()
    assert model(torch.randn(7, 1)).shape == (7, 1)
    assert model.features(torch.randn(7, 1)).shape == (7, 40)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [40, 40, 1]
    wide = MLP(in_features=3, hidden=(16, 8, 4), out_features=2, activation="tanh")
    assert wide(torch.randn(5, 3)).shape == (5, 2)
    assert any(isinstance(m, nn.Tanh) for m in wide.modules())
    assert MLP(in_features=3, hidden=(), out_features=2)(torch.randn(5, 3)).shape == (5, 2)


@pytest.mark.parametrize(
    ("kwargs", "shape", "feature_dim"),
    [
        ({}, (4, 1, 28, 28), 64),  # Omniglot, max-pool: 28 -> 14 -> 7 -> 3 -> 1
        ({"pool": "stride"}, (4, 1, 28, 28), 64 * 2 * 2),  # stride 2: 28 -> 14 -> 7 -> 4 -> 2
        ({"in_channels": 3, "hidden": 32, "image_size": 84}, (2, 3, 84, 84), 32 * 5 * 5),
        (
            {"in_channels": 3, "hidden": 8, "image_size": 84, "pool": "stride"},
            (2, 3, 84, 84),
            8 * 6 * 6,
        ),
    ],
)
def test_conv4_shapes(kwargs: dict, shape: tuple, feature_dim: int) -> None:
    model = Conv4(**kwargs)
    x = torch.randn(shape)
    assert model.feature_dim == feature_dim
    assert model.features(x).shape == (shape[0], feature_dim)
    assert model(x).shape == (shape[0], 5)
    assert Conv4(**kwargs, out_features=20)(x).shape == (shape[0], 20)


@pytest.mark.parametrize(
    ("in_channels", "size"),
    [(3, 32), (1, 28), (3, 84)],
)
def test_resnet12_shapes(in_channels: int, size: int) -> None:
    model = ResNet12(in_channels=in_channels, out_features=5, channels=SMALL)
    x = torch.randn(2, in_channels, size, size)
    assert model.feature_dim == SMALL[-1]
    assert model.features(x).shape == (2, SMALL[-1])
    assert model(x).shape == (2, 5)


def test_resnet12_without_avg_pool() -> None:
    model = ResNet12(channels=SMALL, avg_pool=False, image_size=84)
    assert model.feature_dim == SMALL[-1] * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5
    assert model(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    model = ResNet12(in_channels=1, channels=SMALL, avg_pool=False, image_size=32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


# --------------------------------------------------------------------------- parameter counts


def test_mlp_parameter_count() -> None:
    # 1-40-40-1: (1*40 + 40) + (40*40 + 40) + (40*1 + 1) = 80 + 1640 + 41.
    assert n_params(MLP()) == 1761


def test_conv4_parameter_count() -> None:
    # Conv4(in_channels=1, hidden=64, image_size=28, 5-way), conv layers with bias and
    # affine BatchNorm (weight + bias per channel):
    #   block 1:    conv 1*64*3*3 + 64 = 640,      BN 2*64 = 128  ->    768
    #   blocks 2-4: conv 64*64*3*3 + 64 = 36,928,  BN 128         -> 37,056 each, 111,168
    #   head:       28 -> 14 -> 7 -> 3 -> 1, so 64*1*1 features: 64*5 + 5 = 325
    #   total:      768 + 111,168 + 325 = 112,261
    model = Conv4(in_channels=1, out_features=5, hidden=64, image_size=28)
    assert n_params(model) == 112_261
    assert n_params(model.head) == 325
    # Without BatchNorm the 4 * 128 affine parameters disappear.
    assert n_params(Conv4(batch_norm="none")) == 112_261 - 4 * 128


def test_resnet12_parameter_count() -> None:
    # Block(c_in, c): three 3x3 convs without bias (9*c_in*c + 2 * 9*c*c), a 1x1 shortcut
    # (c_in*c) and four BatchNorms (4 * 2*c): 10*c_in*c + 18*c*c + 8*c.
    #   (3, 64): 76,160   (64, 160): 564,480   (160, 320): 2,357,760   (320, 640): 9,425,920
    #   head: 640*5 + 5 = 3,205; total 12,427,525 (MetaOptNet's "12.4M").
    with torch.device("meta"):  # no memory or init cost for 12M parameters
        model = ResNet12()
    assert n_params(model) == 12_427_525
    assert n_params(model.head) == 3205


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=CASE_IDS)
def test_features_head_split_equals_forward(name: str, factory, shape: tuple) -> None:
    model = factory().eval()
    children = dict(model.named_children())
    assert set(children) == {"features", "head"}
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.feature_dim
    x = torch.randn(shape)
    feats = model.features(x)
    assert feats.shape == (shape[0], model.feature_dim)
    torch.testing.assert_close(model.head(feats), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "factory",
    [lambda: Conv4(hidden=8), lambda: ResNet12(in_channels=1, channels=SMALL, batch_norm="batch")],
    ids=["conv4", "resnet12"],
)
def test_batch_statistics_bn(factory) -> None:
    model = factory()
    assert list(model.buffers()) == []
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    assert all(not bn.track_running_stats for bn in bns)
    x = torch.randn(6, 1, 28, 28)
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


def test_running_statistics_bn() -> None:
    model = Conv4(hidden=8, batch_norm="running", bn_momentum=0.5)
    bn = model.features[1]
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.momentum == 0.5
    assert bn.running_mean is not None
    x = torch.randn(6, 1, 28, 28) * 3 + 1
    train_out = model.train()(x)
    assert not torch.allclose(bn.running_mean, torch.zeros(8))
    assert not torch.allclose(model.eval()(x), train_out)
    assert ResNet12(channels=SMALL).features[0].bn1.running_mean is not None


# --------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=CASE_IDS)
def test_functional_call(name: str, factory, shape: tuple) -> None:
    model = factory()
    x = torch.randn(shape)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    # Snapshot the buffers so that running statistics start equal in both calls.
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    expected = model(x)
    got = functional_call(model, {**params, **buffers}, (x,))
    torch.testing.assert_close(got, expected)

    perturbed = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    other = functional_call(model, {**perturbed, **buffers}, (x,))
    assert not torch.allclose(other, expected)
    # The module's own parameters are untouched.
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=CASE_IDS)
def test_second_order_inner_step(name: str, factory, shape: tuple) -> None:
    """A MAML-style differentiable inner step on the head through functional_call."""
    model = factory()
    x = torch.randn(shape)
    params = dict(model.named_parameters())
    feats = model.features(x)
    head = {k: v for k, v in params.items() if k.startswith("head.")}
    loss = functional_call(model.head, {k[5:]: v for k, v in head.items()}, (feats,)).pow(2).mean()
    grads = torch.autograd.grad(loss, list(head.values()), create_graph=True)
    adapted = {**params, **{k: v - 0.1 * g for (k, v), g in zip(head.items(), grads, strict=True)}}
    outer = functional_call(model, adapted, (x,)).pow(2).mean()
    outer.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "factory", "shape"),
    [CASES[0], CASES[1], CASES[4]],
    ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[4]],
)
def test_vmap_over_tasks(name: str, factory, shape: tuple) -> None:
    models = [factory() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(3, *shape)

    def run(p: dict, b: dict, xs: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (xs,))

    out = vmap(run)(params, buffers, x)
    expected = torch.stack([m(xs) for m, xs in zip(models, x, strict=True)])
    torch.testing.assert_close(out, expected)


def test_vmap_running_bn_in_eval_mode() -> None:
    models = [ResNet12(in_channels=1, channels=SMALL).eval() for _ in range(2)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(2, 4, 1, 28, 28)
    out = vmap(lambda p, b, xs: functional_call(base, (p, b), (xs,)))(params, buffers, x)
    expected = torch.stack([m(xs) for m, xs in zip(models, x, strict=True)])
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- float64


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=CASE_IDS)
def test_float64(name: str, factory, shape: tuple) -> None:
    model = factory().double()
    out = model(torch.randn(shape, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    ("pool", "image_size"), [("max", 16), ("stride", 8)], ids=["max", "stride"]
)
def test_conv4_gradcheck(pool: str, image_size: int) -> None:
    model = Conv4(in_channels=1, out_features=3, hidden=4, image_size=image_size, pool=pool)
    model = model.double()
    x = torch.randn(3, 1, image_size, image_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- DropBlock


def test_drop_block_statistics() -> None:
    x = torch.ones(8, 16, 20, 20)
    assert torch.equal(drop_block(x, 0.3, 5, training=False), x)
    assert torch.equal(drop_block(x, 0.0, 5), x)
    # With 1x1 blocks DropBlock is dropout: about drop_rate of the units are zeroed and the
    # rest rescaled so that the mean is exactly preserved.
    out = drop_block(x, 0.3, 1)
    assert abs((out == 0).float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(out.mean(), torch.tensor(1.0))
    assert torch.equal(x, torch.ones_like(x))  # input not modified
    # With 5x5 blocks, every zero lies in a fully zeroed 5x5 square inside the map.
    out = drop_block(torch.ones(4, 4, 12, 12), 0.5, 5)
    zero = (out == 0).float()
    # Opening (erosion then dilation) with a 5x5 square leaves exactly the union of the
    # 5x5 zero squares lying inside the map: it must equal the zero pattern itself.
    eroded = -F.max_pool2d(-zero, 5, stride=1)  # 1 where a 5x5 square is all zero
    covered = F.max_pool2d(F.pad(eroded, (4, 4, 4, 4)), 5, stride=1)
    assert zero.sum() > 0
    torch.testing.assert_close(covered, zero)


def test_drop_block_in_resnet12() -> None:
    model = ResNet12(in_channels=1, channels=SMALL, drop_rate=0.2, dropblock_size=3)
    kinds = [type(block.dropout) for block in model.features[:4]]
    assert kinds == [nn.Dropout, nn.Dropout, DropBlock, DropBlock]
    x = torch.randn(4, 1, 28, 28)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    assert all(isinstance(b.dropout, nn.Identity) for b in ResNet12(channels=SMALL).features[:4])


def test_drop_block_gradient_flows() -> None:
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    out = drop_block(x, 0.2, 3)
    out.sum().backward()
    mask = out.detach() / x.detach()
    torch.testing.assert_close(x.grad, mask)


# --------------------------------------------------------------------------- build_model / errors


def test_build_model() -> None:
    assert set(MODELS) == {"mlp", "conv4", "resnet12"}
    assert isinstance(build_model("mlp"), MLP)
    conv = build_model("Conv4", hidden=32, image_size=84, in_channels=3)
    assert isinstance(conv, Conv4)
    assert conv.feature_dim == 800
    assert isinstance(build_model("ResNet-12", channels=[4, 8, 8, 16]), ResNet12)


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="Unknown model name 'vgg16'") as info:
        build_model("vgg16")
    assert "'conv4', 'mlp', 'resnet12'" in str(info.value)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: MLP(activation="swish"), "Unknown activation 'swish'"),
        (lambda: MLP(hidden=(0,)), "positive"),
        (lambda: Conv4(pool="avg"), "Unknown pool 'avg'"),
        (lambda: Conv4(batch_norm="group"), "Unknown batch_norm mode 'group'"),
        (lambda: Conv4(image_size=8), "too small"),
        (lambda: ResNet12(channels=(8, 16, 32)), "4 entries"),
        (lambda: ResNet12(drop_rate=1.0), "drop_rate"),
        (lambda: ResNet12(batch_norm="layer"), "Unknown batch_norm mode"),
        (lambda: ResNet12(avg_pool=False, image_size=8), "too small"),
    ],
)
def test_invalid_arguments(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
