"""Evaluation metrics never hide a diverged episode, and an empty meta-batch is refused.

With ``nan_policy="off"`` a diverged test episode has a NaN query loss; torchmetrics'
aggregators would drop it silently. The metrics average the finite episodes, count the
diverged ones next to them, and survive an evaluation where every episode diverged.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning as L
import pytest
import torch

from metalight.algorithms import MAML
from metalight.data import TaskBatch
from metalight.lightning import MetaLearningModule
from metalight.models import MLP
from tests.lightning.test_training import BlobTasks

SGD = functools.partial(torch.optim.SGD, lr=0.5)


def episodes(poisoned: set[int]) -> list[TaskBatch]:
    """5 meta-batches of 4 blob episodes; the listed episodes get a NaN support input."""
    batches = list(BlobTasks(5, 4, seed=3))
    for index in poisoned:
        batches[index // 4].support_x[index % 4, 0, 0] = float("nan")
    return batches


def validate(module: MetaLearningModule, batches: list[TaskBatch]) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        inference_mode=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    (results,) = trainer.validate(module, loader, verbose=False)
    return results


def by_hand(module: MetaLearningModule, batches: list[TaskBatch]) -> list[tuple[float, float]]:
    """(query loss, accuracy) after adaptation of every episode, NaN ones included."""
    out = []
    for batch in batches:
        for task in batch:
            adaptation = module.adapt(task, module.eval_inner_steps, create_graph=False)
            with torch.no_grad():
                logits = adaptation.predict(task.query_x)
                loss = torch.nn.functional.cross_entropy(logits, task.query_y)
            out.append((loss.item(), (logits.argmax(-1) == task.query_y).float().mean().item()))
    return out


def test_diverged_episodes_are_counted_next_to_the_mean() -> None:
    torch.manual_seed(0)
    module = MAML(MLP(2, (16,), 3), inner_optim=SGD, eval_inner_steps=3, nan_policy="off")
    poisoned = {1, 6, 7, 12, 19}
    batches = episodes(poisoned)
    results = validate(module, batches)
    scores = by_hand(module, batches)
    finite = [s for i, s in enumerate(scores) if i not in poisoned]
    assert all(math.isnan(scores[i][0]) for i in poisoned)
    assert all(math.isfinite(loss) for loss, _ in finite)
    assert results["val/diverged"] == 5
    assert results["val/episodes"] == 15
    assert results["val/episodes_total"] == 20
    accuracies = torch.tensor([acc for _, acc in finite], dtype=torch.float64)
    assert results["val/acc_post"] == pytest.approx(accuracies.mean().item(), rel=1e-6)
    assert results["val/loss_post"] == pytest.approx(sum(loss for loss, _ in finite) / 15, rel=1e-5)
    ci = 1.96 * accuracies.std().item() / math.sqrt(15)
    assert results["val/acc_post_ci95"] == pytest.approx(ci, rel=1e-6)


def test_every_episode_diverged_logs_nan_means_and_the_counts() -> None:
    module = MAML(MLP(2, (16,), 3), inner_optim=SGD, nan_policy="off")
    results = validate(module, episodes(set(range(20))))
    assert results["val/diverged"] == 20
    assert results["val/episodes"] == 0
    assert results["val/episodes_total"] == 20
    for key in ("loss_pre", "loss_post", "acc_pre", "acc_post", "acc_post_ci95"):
        assert math.isnan(results[f"val/{key}"]), key


def test_skipped_episodes_are_counted_as_diverged() -> None:
    torch.manual_seed(0)
    module = MAML(MLP(2, (16,), 3), inner_optim=SGD, nan_policy="skip")
    with pytest.warns(UserWarning, match=r"skipping val episode") as warned:
        results = validate(module, episodes({2, 9}))
    skipped = [str(w.message)[:32] for w in warned if str(w.message).startswith("skipping")]
    assert skipped == [
        "skipping val episode 2 of batch ",
        "skipping val episode 1 of batch ",
    ]
    assert (results["val/diverged"], results["val/episodes"]) == (2, 18)


def test_regression_logs_no_accuracy() -> None:
    module = MAML(MLP(), inner_optim=SGD, nan_policy="off")
    x = torch.randn(3, 5, 1)
    results = validate(module, [TaskBatch(x, x.sin(), x, x.sin(), torch.zeros(3, 2))])
    assert not any(key.startswith("val/acc") for key in results)
    assert (results["val/episodes"], results["val/diverged"]) == (3, 0)
    assert math.isfinite(results["val/loss_post_ci95"])


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vectorized"])
@pytest.mark.parametrize("nan_policy", ["raise", "skip", "off"])
def test_an_empty_meta_batch_is_refused(vectorize: bool, nan_policy: Any) -> None:
    module = MAML(MLP(), vectorize_tasks=vectorize, nan_policy=nan_policy)
    empty = TaskBatch(*(torch.zeros(0, 5, 1) for _ in range(4)), torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"meta-batch 3 holds no tasks: a meta-step needs"):
        module.training_step(empty, 3)
    if vectorize:
        from metalight.vectorized import vectorized_meta_loss

        with pytest.raises(ValueError, match=r"the meta-batch holds no tasks"):
            vectorized_meta_loss(module, empty)


def test_processes_sharing_the_initial_states_count_their_own_episodes() -> None:
    # ddp_spawn sends the module through torch.multiprocessing, which puts CPU tensors in
    # shared memory: every process starts from one storage. Updates must not write into it.
    from metalight.lightning.metrics import EpisodeMetrics

    mine, other = EpisodeMetrics(), EpisodeMetrics()
    for name in ("sums", "counts", "moments"):
        setattr(other.totals["val"], name, getattr(mine.totals["val"], name))
    for _ in range(3):
        values = {"loss_pre": torch.tensor(1.0), "loss_post": torch.tensor(0.5)}
        mine.record("val", values, classification=False)
    other.record(
        "val", {"loss_pre": torch.tensor(2.0), "loss_post": torch.tensor(1.5)}, classification=False
    )
    assert mine.compute("val")["val/episodes"] == 3
    assert other.compute("val")["val/episodes"] == 1
    assert other.compute("val")["val/loss_post"] == 1.5
