"""Real Lightning Trainer runs (CPU, tiny budgets) of every algorithm on sinusoid regression."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from metalight.algorithms import ANIL, FOMAML, IMAML, MAML, MetaSGD, Reptile
from metalight.data import SinusoidDataModule, Task, TaskBatch
from metalight.lightning import MetaLearningModule
from metalight.models import MLP


class BlobTasks(torch.utils.data.IterableDataset):
    """3-way classification of Gaussian blobs at random centres: a tiny few-shot problem."""

    def __init__(self, n_batches: int, tasks: int, seed: int) -> None:
        self.n_batches, self.tasks, self.seed = n_batches, tasks, seed

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n_batches):
            batch = []
            for _ in range(self.tasks):
                centers = torch.randn(3, 2, generator=g) * 3
                sy = torch.arange(3).repeat_interleave(2)
                qy = torch.arange(3).repeat_interleave(4)
                batch.append(
                    Task(
                        centers[sy] + torch.randn(6, 2, generator=g) * 0.5,
                        sy,
                        centers[qy] + torch.randn(12, 2, generator=g) * 0.5,
                        qy,
                        torch.arange(3),
                    )
                )
            yield TaskBatch.stack(batch)


def blob_tasks(n_batches: int, tasks: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(BlobTasks(n_batches, tasks, seed), batch_size=None)


def trainer(steps: int, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        inference_mode=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def sinusoid(**kwargs: Any) -> SinusoidDataModule:
    defaults: dict[str, Any] = dict(
        shots=10,
        queries=10,
        meta_batch_size=10,
        train_batches_per_epoch=50,
        test_episodes=100,
        seed=0,
    )
    defaults.update(kwargs)
    return SinusoidDataModule(**defaults)


def sgd(lr: float) -> functools.partial:
    return functools.partial(torch.optim.SGD, lr=lr)


def adam(lr: float) -> functools.partial:
    return functools.partial(torch.optim.Adam, lr=lr)


def fit_and_test(module: MetaLearningModule, steps: int, **kwargs: Any) -> dict[str, float]:
    torch.manual_seed(0)
    data = sinusoid(**kwargs)
    t = trainer(steps)
    t.fit(module, datamodule=data)
    (results,) = t.test(module, datamodule=data, verbose=False)
    return results


def test_maml_sinusoid_few_hundred_iterations() -> None:
    torch.manual_seed(0)
    module = MAML(
        MLP(),
        inner_optim=sgd(0.01),
        inner_steps=1,
        eval_inner_steps=10,
        eval_report_steps=[1],
        outer_optim=adam(1e-2),
    )
    results = fit_and_test(module, 300)
    pre, one, ten = (
        results["test/loss_pre"],
        results["test/loss_step1"],
        results["test/loss_post"],
    )
    print(
        f"MAML sinusoid after 300 meta-iterations: MSE pre {pre:.3f}, "
        f"1 step {one:.3f}, 10 steps {ten:.3f} (+- {results['test/loss_post_ci95']:.3f})"
    )
    assert one < 0.6 * pre
    assert ten < 0.4 * pre
    assert results["test/episodes"] == 100


ALGORITHMS = {
    "fomaml": lambda: FOMAML(
        MLP(), inner_optim=sgd(0.01), inner_steps=1, eval_inner_steps=5, outer_optim=adam(1e-2)
    ),
    "anil": lambda: ANIL(
        MLP(), inner_optim=sgd(0.05), inner_steps=3, eval_inner_steps=5, outer_optim=adam(1e-2)
    ),
    "meta_sgd": lambda: MetaSGD(
        MLP(), inner_lr=0.01, inner_steps=1, eval_inner_steps=1, outer_optim=adam(1e-2)
    ),
    "reptile": lambda: Reptile(
        MLP(), inner_optim=sgd(0.01), inner_steps=5, eval_inner_steps=5, outer_optim=adam(1e-2)
    ),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_algorithm_learns_to_adapt(name: str) -> None:
    torch.manual_seed(0)
    results = fit_and_test(ALGORITHMS[name](), 150)
    pre, post = results["test/loss_pre"], results["test/loss_post"]
    print(f"{name}: MSE pre {pre:.3f}, post {post:.3f}")
    assert post < 0.75 * pre


def test_imaml_learns_to_adapt_on_few_shot_classification() -> None:
    # Sinusoid MSE on a ReLU net has a strongly indefinite support Hessian, which makes the
    # implicit system (I + H / lam) indefinite; cross-entropy is the setting iMAML targets.
    torch.manual_seed(0)
    module = IMAML(
        MLP(2, (32, 32), 3),
        reg_lambda=2.0,
        cg_steps=5,
        inner_optim=sgd(0.3),
        inner_steps=5,
        eval_inner_steps=5,
        outer_optim=adam(3e-3),
    )
    trainer(100).fit(module, blob_tasks(100, 4, seed=1))
    (results,) = trainer(1, limit_val_batches=None).validate(
        module, blob_tasks(25, 4, seed=2), verbose=False
    )
    print("imaml blobs:", {k: round(v, 3) for k, v in results.items()})
    assert results["val/loss_post"] < 0.75 * results["val/loss_pre"]
    assert results["val/acc_post"] > results["val/acc_pre"] + 0.2


def test_eval_without_inference_mode_false_says_what_to_set() -> None:
    module = MAML(MLP(), inner_steps=1)
    t = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=1,
    )
    with pytest.raises(RuntimeError, match=r"inference_mode=False"):
        t.test(module, datamodule=sinusoid(test_episodes=10), verbose=False)


def test_validate_reports_pre_post_and_confidence_interval_for_classification() -> None:
    module = MAML(MLP(2, (16,), 3), inner_optim=sgd(0.5), inner_steps=1, eval_inner_steps=10)
    loader = blob_tasks(4, 2, seed=0)
    (results,) = trainer(1, limit_val_batches=None).validate(module, loader, verbose=False)
    assert set(results) >= {
        "val/loss_pre",
        "val/loss_post",
        "val/acc_pre",
        "val/acc_post",
        "val/acc_post_ci95",
        "val/episodes",
    }
    assert results["val/episodes"] == 8
    assert results["val/acc_post"] > results["val/acc_pre"]
    assert 0 < results["val/acc_post_ci95"] < 0.5


def meta_gradient(module: MetaLearningModule, batch: TaskBatch) -> list[torch.Tensor]:
    """The meta-gradient of one batch at the module's current weights (its training step)."""
    module.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    grads = [p.grad.detach().clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return grads


def sgd_step_by_trainer(
    batches: list[TaskBatch], dtype: torch.dtype, **options: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
    """Weights before and after one outer SGD step taken by a Trainer, and each batch's
    meta-gradient at the starting weights."""
    torch.manual_seed(0)
    module = MAML(MLP().to(dtype), inner_optim=sgd(0.01), inner_steps=2, outer_optim=sgd(0.1))
    before = [p.detach().clone() for p in module.parameters()]
    grads = [meta_gradient(module, batch) for batch in batches]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer(1, **options).fit(module, loader)
    return before, [p.detach().clone() for p in module.parameters()], grads


def sine_batches(n: int, dtype: torch.dtype) -> list[TaskBatch]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        x = torch.rand(4, 2, 10, 1, generator=g, dtype=dtype) * 10 - 5
        amp = torch.rand(4, 1, 1, 1, generator=g, dtype=dtype) * 4 + 1
        y = amp * torch.sin(x)
        batches.append(TaskBatch(x[:, 0], y[:, 0], x[:, 1], y[:, 1], amp.reshape(4, 1)))
    return batches


@pytest.mark.parametrize("max_norm", [0.1, 1e6], ids=["clipped", "under-the-norm"])
def test_gradient_norm_clipping_of_the_meta_gradient(max_norm: float) -> None:
    (batch,) = sine_batches(1, torch.float64)
    before, after, (g,) = sgd_step_by_trainer([batch], torch.float64, gradient_clip_val=max_norm)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g]))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    assert (coef < 1.0) == (max_norm == 0.1)
    for p0, p1, gi in zip(before, after, g, strict=True):
        torch.testing.assert_close(p1, p0 - 0.1 * coef * gi)


def test_gradient_value_clipping_of_the_meta_gradient() -> None:
    (batch,) = sine_batches(1, torch.float64)
    before, after, (g,) = sgd_step_by_trainer(
        [batch], torch.float64, gradient_clip_val=0.05, gradient_clip_algorithm="value"
    )
    assert any(bool((gi.abs() > 0.05).any()) for gi in g)  # the clip does something
    for p0, p1, gi in zip(before, after, g, strict=True):
        torch.testing.assert_close(p1, p0 - 0.1 * gi.clamp(-0.05, 0.05))


def test_accumulated_meta_gradients_are_averaged() -> None:
    batches = sine_batches(2, torch.float64)
    before, after, (g1, g2) = sgd_step_by_trainer(batches, torch.float64, accumulate_grad_batches=2)
    assert not all(torch.allclose(a, b) for a, b in zip(g1, g2))
    for p0, p1, a, b in zip(before, after, g1, g2, strict=True):
        torch.testing.assert_close(p1, p0 - 0.1 * (a + b) / 2)


def test_bf16_mixed_meta_step_is_close_to_float32() -> None:
    (batch,) = sine_batches(1, torch.float32)
    before, after, (g,) = sgd_step_by_trainer([batch], torch.float32, precision="bf16-mixed")
    updates = [p1 - p0 for p0, p1 in zip(before, after, strict=True)]
    expected = [-0.1 * gi for gi in g]
    for u, e in zip(updates, expected, strict=True):
        # bf16 keeps 8 bits of mantissa: a few percent of the update's scale.
        torch.testing.assert_close(u, e, rtol=0.05, atol=0.05 * float(e.abs().max()))
    # ... and it did run in bf16: not the float32 step.
    assert not all(torch.equal(u, e) for u, e in zip(updates, expected, strict=True))


def test_gradient_accumulation_equals_one_big_meta_batch() -> None:
    """Two sub-batches of 4 tasks accumulated give the step of one meta-batch of 8 (SGD)."""
    torch.manual_seed(0)
    model = MLP()
    data = sinusoid(meta_batch_size=8, train_batches_per_epoch=1)
    data_half = sinusoid(meta_batch_size=4, train_batches_per_epoch=2)
    full = MAML(MLP(), inner_optim=sgd(0.01), outer_optim=sgd(0.1))
    full.model.load_state_dict(model.state_dict())
    half = MAML(MLP(), inner_optim=sgd(0.01), outer_optim=sgd(0.1))
    half.model.load_state_dict(model.state_dict())
    trainer(1).fit(full, datamodule=data)
    trainer(1, accumulate_grad_batches=2).fit(half, datamodule=data_half)
    for a, b in zip(full.parameters(), half.parameters()):
        torch.testing.assert_close(a, b)


def test_outer_scheduler_is_stepped() -> None:
    module = MAML(
        MLP(),
        inner_optim=sgd(0.01),
        outer_optim=adam(1e-2),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
    )
    t = trainer(4)
    t.fit(module, datamodule=sinusoid(meta_batch_size=2))
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


def test_checkpoint_holds_everything_learned_and_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MAML(MLP(), inner_optim=sgd(0.01), inner_steps=1, learn_inner_lr="per_layer")
    data = sinusoid(meta_batch_size=4, train_batches_per_epoch=5)
    t = trainer(5, default_root_dir=tmp_path, max_epochs=1)
    t.fit(module, datamodule=data)
    ckpt = tmp_path / "final.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert any(k.startswith("inner_lrs.") for k in state["state_dict"])
    assert state["optimizer_states"][0]["state"]  # Adam moments of the outer loop
    learned = [lr.detach().item() for lr in module.inner_lrs]
    assert any(abs(lr - 0.01) > 1e-6 for lr in learned)

    torch.manual_seed(1)  # another initialisation: the checkpoint must replace it
    restored = MAML(MLP(), inner_optim=sgd(0.01), inner_steps=1, learn_inner_lr="per_layer")
    t2 = trainer(10, default_root_dir=tmp_path, max_epochs=2)
    t2.fit(
        restored, datamodule=sinusoid(meta_batch_size=4, train_batches_per_epoch=5), ckpt_path=ckpt
    )
    assert t2.global_step == 10

    # The resumed run is the uninterrupted one, bit for bit (weights, rates, Adam moments and
    # the task stream all came back).
    torch.manual_seed(0)
    straight = MAML(MLP(), inner_optim=sgd(0.01), inner_steps=1, learn_inner_lr="per_layer")
    trainer(10, default_root_dir=tmp_path, max_epochs=2).fit(
        straight, datamodule=sinusoid(meta_batch_size=4, train_batches_per_epoch=5)
    )
    for (name, a), b in zip(restored.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_meta_sgd_refuses_an_inner_optimizer_and_learns_per_parameter_rates() -> None:
    with pytest.raises(ValueError, match=r"MetaSGD's inner optimizer is SGD with learned rates"):
        MetaSGD(MLP(), inner_optim=functools.partial(torch.optim.Adam, lr=0.1))
    module = MetaSGD(MLP(), inner_lr=0.05)
    assert module.learn_inner_lr == "per_parameter"
    rates = [p for n, p in module.named_parameters() if not n.startswith("model.")]
    assert len(rates) == len(list(module.model.parameters()))
    assert all(torch.equal(r, torch.full_like(r, 0.05)) for r in rates)
