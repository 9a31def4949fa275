"""Dataset distillation: a few synthetic training examples learned through training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.bilevel.module import BilevelModule, InnerBatch, SplitSource, mean_ci95
from metalight.data.streams import derive_seed

__all__ = ["Distill"]


class Distill(BilevelModule):
    """Learns ``per_class`` synthetic examples per class (and the inner learning rate).

    After Wang, Zhu, Torralba & Efros, 2018, "Dataset Distillation"
    (https://arxiv.org/abs/1811.10959): every inner step trains on the whole synthetic set;
    the outer loss is the loss of the trained network on real examples. By default every
    outer step starts from a fresh random initialisation (``restart_every=1, init="random"``),
    so the synthetic data must work for any starting weights.

    The method is scored by training ``eval_models`` fresh random networks on the synthetic
    examples for ``inner_steps`` steps with the learned rate; the baseline trains the same
    networks for the same steps on ``per_class`` random real training examples per class,
    with a learning rate chosen from ``baseline_lrs`` on the validation split. Both report
    the mean test accuracy with a 95% CI over the networks.

    Args:
        model: the network trained in the inner loop.
        num_classes: the number of classes.
        per_class: synthetic examples per class.
        input_shape: the shape of one input (e.g. ``[64]`` for flattened 8x8 digits).
        learn_lr: learn the inner learning rate too.
        eval_models: networks trained in the evaluation of the method and the baseline.
        baseline_lrs: the baseline's learning-rate grid.
        image_shape: how to draw one input as an image in ``distilled_images.png`` (None:
            no picture).
        **kwargs: :class:`~metalight.bilevel.BilevelModule` arguments.

    Example:
        >>> import torch
        >>> from metalight.bilevel import Distill
        >>> module = Distill(torch.nn.Linear(64, 10), per_class=2, input_shape=[64])
        >>> module.images.shape, module.labels[:4].tolist()
        (torch.Size([20, 64]), [0, 0, 1, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int = 10,
        per_class: int = 1,
        input_shape: Sequence[int] = (64,),
        learn_lr: bool = True,
        eval_models: int = 10,
        baseline_lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
        image_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("restart_every", 1)
        kwargs.setdefault("init", "random")
        super().__init__(model, **kwargs)
        for name, value in (("num_classes", num_classes), ("per_class", per_class)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(eval_models, int) or eval_models < 2:
            raise ValueError(
                f"eval_models must be an integer >= 2 (the CI is over them), got {eval_models!r}"
            )
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "distill"))
        count = num_classes * per_class
        self.images = nn.Parameter(torch.randn(count, *input_shape, generator=generator))
        self.labels: Tensor
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(per_class))
        self.log_lr = nn.Parameter(
            torch.tensor(float(self.base_hparams["lr"])).log(), requires_grad=learn_lr
        )
        self.num_classes = num_classes
        self.per_class = per_class
        self.eval_models = eval_models
        self.baseline_lrs = [float(lr) for lr in baseline_lrs]
        self.image_shape = list(image_shape) if image_shape is not None else None

    def inner_loss(self, params: list[Tensor], batch: InnerBatch, step: int) -> Tensor:
        """Cross-entropy on the whole synthetic set (the real batch is not used)."""
        return F.cross_entropy(self.predict(params, self.images), self.labels)

    def inner_hparams(self, step: int) -> list[dict[str, Any]]:
        """The learned learning rate for every weight."""
        return [dict(self.base_hparams, lr=self.log_lr.exp())] * len(self.inner_names)

    def _eval_starts(self) -> list[list[Tensor]]:
        return [
            self.fresh_inner(derive_seed(self.seed, "eval", i)) for i in range(self.eval_models)
        ]

    def _train_on(
        self, start: list[Tensor], x: Tensor, y: Tensor, lr: Tensor | float
    ) -> list[Tensor]:
        batch = InnerBatch(x, y, torch.arange(len(y)))
        hp = [dict(self.base_hparams, lr=lr)] * len(self.inner_names)
        return self.fit_plain(start, lambda step: batch, self.inner_steps, hp)

    def _summarise(self, runs: list[dict[str, float]]) -> dict[str, float]:
        acc, half = mean_ci95([r["acc"] for r in runs])
        loss = sum(r["loss"] for r in runs) / len(runs)
        return {"acc": acc, "acc_ci95": half, "loss": loss, "models": float(len(runs))}

    def evaluate_method(self, splits: SplitSource) -> dict[str, float]:
        """Fresh networks trained on the synthetic examples with the learned rate."""
        test = splits.split_tensors("test")
        images, labels = self.images.detach(), self.labels
        lr = self.log_lr.detach().exp()
        runs = [
            self.score(self._train_on(s, images, labels, lr), *test) for s in self._eval_starts()
        ]
        self._save_picture()
        return {**self._summarise(runs), "lr": float(lr)}

    def real_examples(self, x: Tensor, y: Tensor, model_index: int) -> tuple[Tensor, Tensor]:
        """``per_class`` random real training examples per class (seeded by the model)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "real", model_index))
        picks = []
        for c in range(self.num_classes):
            members = (y == c).nonzero().flatten().cpu()
            order = torch.randperm(len(members), generator=generator)[: self.per_class]
            picks.append(members[order])
        index = torch.cat(picks).to(y.device)
        return x[index], y[index]

    def evaluate_baseline(self, splits: SplitSource) -> dict[str, float] | None:
        """Random real examples of the same count, with a grid-searched learning rate."""
        x, y = splits.split_tensors("train")
        val, test = splits.split_tensors("val"), splits.split_tensors("test")
        starts = self._eval_starts()
        subsets = [self.real_examples(x, y, i) for i in range(len(starts))]
        best: tuple[float, float, list[list[Tensor]]] | None = None
        for lr in self.baseline_lrs:
            trained = [
                self._train_on(s, *subset, lr) for s, subset in zip(starts, subsets, strict=True)
            ]
            acc = sum(self.score(p, *val)["acc"] for p in trained) / len(trained)
            if best is None or acc > best[0]:
                best = (acc, lr, trained)
        assert best is not None
        runs = [self.score(p, *test) for p in best[2]]
        return {**self._summarise(runs), "lr": best[1], "val_acc": best[0]}

    def _save_picture(self) -> Path | None:
        trainer = self._trainer
        if self.image_shape is None or trainer is None or not trainer.is_global_zero:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        images = self.images.detach().cpu().reshape(-1, *self.image_shape)
        cols = self.num_classes
        rows = self.per_class
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
        for i, image in enumerate(images):
            ax = axes[i % rows][i // rows]
            ax.imshow(image.numpy(), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            if i % rows == 0:
                ax.set_title(str(int(self.labels[i])), fontsize=8)
        fig.suptitle(
            f"{len(images)} distilled examples, lr {float(self.log_lr.detach().exp()):.3g}"
        )
        path = Path(trainer.default_root_dir) / "distilled_images.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
