"""BilevelModule outside the hypergradient: the inner training it runs, carried over and
restarted, against ``torch.optim``; the digits data; one clear line for each bad input."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalight.bilevel import BilevelModule, Distill, HyperLR, Reweight, mean_ci95
from metalight.data.digits import DigitsDataModule, NoisyDigitsDataModule, flip_labels, load_digits
from metalight.data.task import Task, TaskBatch
from metalight.models import MLP

K, B, N = 3, 5, 30


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _outer_step_batch(seed: int) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, N, (K * B,), generator=g)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    task = Task(x[index], y[index], x[:7], y[:7], index)
    return TaskBatch.stack([task])


SGD = functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9, weight_decay=0.01)


def test_inner_training_carries_over_like_torch_optim() -> None:
    # Uniform example weights: the inner loop is plain SGD with momentum on the mean loss,
    # continued (weights and momentum) from one outer step to the next.
    module = Reweight(_model(), num_train=N, inner_optim=SGD, inner_steps=K).double()
    reference = _model()
    opt = SGD(reference.parameters())
    for seed in (1, 2):
        batch = _outer_step_batch(seed)
        module.training_step(batch, 0)
        xs = batch.support_x[0].view(K, B, 4)
        ys = batch.support_y[0].view(K, B)
        for step in range(K):
            opt.zero_grad()
            F.cross_entropy(reference(xs[step]), ys[step]).backward()
            opt.step()
    assert module.inner_age == 2
    for got, want in zip(module.inner_params, reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
    momenta = [opt.state[p]["momentum_buffer"] for p in reference.parameters()]
    for got, want in zip(module.inner_state.momentum_buffer, momenta):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # The module's own weights are the starting point, never trained.
    for got, want in zip(module.model.parameters(), _model().parameters()):
        assert torch.equal(got, want)


def test_hyper_lr_starts_as_the_configured_optimizer_and_learns_per_layer() -> None:
    # Built in float64 throughout: a rate stored as a float32 logarithm is off by ~1e-8.
    model, default = _model(), torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        module = HyperLR(
            model, inner_optim=SGD, inner_steps=K, learn_weight_decay=False, schedule=3
        )
    finally:
        torch.set_default_dtype(default)
    reference = _model()
    opt = SGD(reference.parameters())
    batch = _outer_step_batch(3)
    loss = module.training_step(batch, 0)
    xs, ys = batch.support_x[0].view(K, B, 4), batch.support_y[0].view(K, B)
    for step in range(K):
        opt.zero_grad()
        F.cross_entropy(reference(xs[step]), ys[step]).backward()
        opt.step()
    for got, want in zip(module.inner_params, reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
    loss.backward()
    # One rate per layer and piece of the schedule, each with its own hypergradient.
    assert module.log_lr.grad is not None and module.log_lr.grad.shape == (2, 3)
    assert bool((module.log_lr.grad != 0).all())
    assert module.log_weight_decay.grad is None


def test_restart_every_starts_again_from_the_model_weights() -> None:
    module = Reweight(
        _model(), num_train=N, inner_optim=SGD, inner_steps=K, restart_every=2
    ).double()
    start = [p.detach().clone() for p in module.model.parameters()]
    for seed in (1, 2):
        module.training_step(_outer_step_batch(seed), 0)
    assert module.inner_age == 2
    trained = [p.clone() for p in module.inner_params]
    module.training_step(_outer_step_batch(3), 0)
    assert module.inner_age == 1
    # The third outer step ran from the start again: the same as a fresh module's first.
    fresh = Reweight(_model(), num_train=N, inner_optim=SGD, inner_steps=K).double()
    fresh.training_step(_outer_step_batch(3), 0)
    for got, want, before in zip(module.inner_params, fresh.inner_params, trained):
        assert torch.equal(got, want) and not torch.equal(got, before)
    assert all(torch.equal(a, b) for a, b in zip(module.model.parameters(), start))


def test_random_restarts_are_seeded_and_leave_the_global_generator_alone() -> None:
    a = Distill(_model(), num_classes=3, per_class=1, input_shape=[4], seed=5).double()
    b = Distill(_model(), num_classes=3, per_class=1, input_shape=[4], seed=5).double()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = a.fresh_inner(7), b.fresh_inner(7)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    other = a.fresh_inner(8)
    assert not torch.equal(first[0], other[0])


def test_mean_ci95_matches_students_t() -> None:
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0])
    # sd = 1.2910, t(0.975, 3) = 3.182: 3.182 * 1.2910 / 2
    assert mean == 2.5 and abs(half - 3.182 * (5 / 3) ** 0.5 / 2) < 1e-12


# ---------------------------------------------------------------------------------- data
sklearn = pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")


def test_digits_splits_are_disjoint_fixed_and_shaped() -> None:
    dm = DigitsDataModule(inner_steps=4, batch_size=8, val_batch_size=16, seed=3)
    x, _ = load_digits()
    assert x.shape == (1797, 64) and float(x.max()) == 1.0 and float(x.min()) == 0.0
    rows = {tuple(r.tolist()) for r in x}
    seen = []
    for split, size in (("train", 1097), ("val", 300), ("test", 400)):
        sx, sy = dm.split_tensors(split)
        assert sx.shape == (size, 64) and sy.shape == (size,)
        seen.append({tuple(r.tolist()) for r in sx})
        assert seen[-1] <= rows
    assert not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    again = DigitsDataModule(seed=9)
    assert torch.equal(again.split_tensors("test")[0], dm.split_tensors("test")[0])
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (1, 4 * 8, 64) and batch.query_x.shape == (1, 16, 64)
    train_x, train_y = dm.split_tensors("train")
    index = batch.info[0]
    assert torch.equal(batch.support_x[0], train_x[index])
    assert torch.equal(batch.support_y[0], train_y[index])
    # Each inner minibatch is drawn without replacement.
    assert all(len(set(chunk.tolist())) == 8 for chunk in index.view(4, 8))
    test = next(iter(dm.test_dataloader()))
    assert torch.equal(test.query_x[0], dm.split_tensors("test")[0])


def test_noisy_digits_flip_exactly_the_fraction_and_only_training_labels() -> None:
    clean = DigitsDataModule()
    noisy = NoisyDigitsDataModule(noise=0.4, noise_seed=1)
    _, y_clean = clean.split_tensors("train")
    _, y_noisy = noisy.split_tensors("train")
    flipped = y_clean != y_noisy
    assert int(flipped.sum()) == round(0.4 * 1097)
    assert noisy.noisy_mask is not None and torch.equal(noisy.noisy_mask, flipped)
    for split in ("val", "test"):
        assert torch.equal(noisy.split_tensors(split)[1], clean.split_tensors(split)[1])
    again = NoisyDigitsDataModule(noise=0.4, noise_seed=1)
    assert torch.equal(again.split_tensors("train")[1], y_noisy)
    _, mask = flip_labels(y_clean, 0.4, seed=2)
    assert not torch.equal(mask, flipped)


def test_missing_scikit_learn_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"^the digits data .*: pip install scikit-learn$"):
        load_digits()


# ---------------------------------------------------------------------------- bad inputs
def _hyper(**kwargs: object) -> BilevelModule:
    return HyperLR(_model(), **kwargs)  # type: ignore[arg-type]


BAD = [
    (lambda: _hyper(inner_steps=0), ValueError, "inner_steps must be an integer >= 1"),
    (lambda: _hyper(truncate=0), ValueError, "truncate must be null or an integer >= 1"),
    (lambda: _hyper(restart_every=0), ValueError, "restart_every must be null"),
    (lambda: _hyper(init="zeros"), ValueError, "init must be 'fixed' or 'random'"),
    (lambda: _hyper(schedule=50, inner_steps=20), ValueError, "schedule must be an integer"),
    (
        lambda: _hyper(inner_optim=functools.partial(torch.optim.LBFGS, lr=1.0)),
        TypeError,
        "inner_optim builds a LBFGS, which has no differentiable functional version",
    ),
    (lambda: Reweight(_model(), num_train=0), ValueError, "num_train must be the number"),
    (
        lambda: Reweight(_model(), num_train=3).example_weights(torch.tensor([5])),
        IndexError,
        "training example 5 has no weight: num_train is 3",
    ),
    (lambda: Distill(_model(), eval_models=1), ValueError, "eval_models must be an integer >= 2"),
    (lambda: DigitsDataModule(train_size=1500), ValueError, "exceeds the 1797 digits"),
    (lambda: DigitsDataModule(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
    (lambda: NoisyDigitsDataModule(noise=1.5), ValueError, "noise must be a fraction in [0, 1]"),
    (
        lambda: _hyper(inner_steps=4).training_step(
            TaskBatch.stack([_outer_step_batch(1)[0]] * 2), 0
        ),
        ValueError,
        "set data.meta_batch_size to the number of devices",
    ),
    (
        lambda: _hyper(inner_steps=4).training_step(_outer_step_batch(1), 0),
        ValueError,
        "not a multiple of inner_steps (4)",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), BAD)
def test_bad_input_gets_one_clear_line(make, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        make()
    text = str(info.value).strip("'\"")
    assert message in text and "\n" not in text


def test_a_resume_on_another_number_of_processes_is_refused(tmp_path: Path) -> None:
    def run(ckpt_path: object = None) -> L.Trainer:
        data = DigitsDataModule(
            inner_steps=2, batch_size=4, val_batch_size=8, train_batches_per_epoch=3
        )
        module = HyperLR(MLP(in_features=64, hidden=[8], out_features=10), inner_steps=2)
        trainer = L.Trainer(
            max_steps=2 if ckpt_path else 1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    run().save_checkpoint(tmp_path / "one.ckpt")
    checkpoint = torch.load(tmp_path / "one.ckpt", weights_only=True)
    entry = checkpoint["bilevel_inner"]
    assert entry["age"] == 1
    # As a two-process run saves it: each process's inner training under "ranks".
    checkpoint["bilevel_inner"] = {**entry, "ranks": [entry, entry]}
    torch.save(checkpoint, tmp_path / "two.ckpt")
    message = (
        "holds the inner training of 2 processes, this run has 1: resume with trainer.devices=2"
    )
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "two.ckpt")
