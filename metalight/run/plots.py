"""Pictures of a run: meta-training curves from the metrics CSV, and sinusoid test tasks
before and after adaptation (as in Figure 2 of the MAML paper).

Figures are drawn with Matplotlib's object API on the Agg canvas, so nothing here touches
``pyplot``'s global state or needs a display.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from metalight.data.datamodule import SinusoidDataModule
from metalight.data.sinusoid import SinusoidTasks
from metalight.lightning.checkpoint_io import atomic_write
from metalight.lightning.module import MetaLearningModule, NonFiniteError

__all__ = [
    "plot_sinusoid_tasks",
    "plot_training_curves",
    "read_metrics",
    "training_curves_figure",
    "validation_curve_keys",
]


def read_metrics(csv_path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Read Lightning's ``metrics.csv`` into ``{metric: [(step, value), ...]}``.

    Empty cells (metrics not logged on that row) are skipped.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = path.write_text("epoch,step,train/meta_loss\\n0,9,1.5\\n0,19,\\n")
        >>> read_metrics(path)
        {'train/meta_loss': [(9, 1.5)]}
    """
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, text in row.items():
                if key in ("step", "epoch") or text in (None, ""):
                    continue
                series.setdefault(key, []).append((step, float(text)))
    return series


def _save_figure(fig: Figure, out: Path) -> None:
    # Rendered in memory, then written atomically: a full disk leaves no half picture.
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format=out.suffix.lstrip(".") or "png")
    atomic_write(out, buffer.getvalue())


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def validation_curve_keys(series: dict[str, list[tuple[int, float]]]) -> list[str]:
    """The validation metrics the training-curves picture draws: means, not their CIs or
    the episode counts (``val/episodes``, ``val/episodes_total``, ``val/diverged``).

    Example:
        >>> validation_curve_keys({"val/acc_post": [], "val/acc_post_ci95": [],
        ...     "val/diverged": [], "val/episodes_total": [], "train/acc": []})
        ['val/acc_post']
    """
    counts = {"val/episodes", "val/episodes_total", "val/diverged"}
    return sorted(
        k for k in series if k.startswith("val/") and "_ci95" not in k and k not in counts
    )


def plot_training_curves(
    csv_path: str | os.PathLike[str], out_path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Draw the meta-training loss and the validation metrics against the meta-iteration.

    Args:
        csv_path: Lightning's ``metrics.csv``.
        out_path: the PNG to write.
        title: the figure title.

    Returns:
        ``out_path`` (a figure saying so when no training step was logged yet).

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "m.csv").write_text("step,train/meta_loss\\n0,2.0\\n1,1.0\\n")
        >>> plot_training_curves(folder / "m.csv", folder / "curves.png").name
        'curves.png'
    """
    series = read_metrics(csv_path)
    train = series.get("train/meta_loss", [])
    out = Path(out_path)
    if not train:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        ax.text(
            0.5,
            0.5,
            "no training step logged yet\n(trainer.log_every_n_steps)",
            ha="center",
            va="center",
        )
        ax.set_axis_off()
        _save_figure(fig, out)
        return out
    fig = training_curves_figure(series, title)
    _save_figure(fig, out)
    return out


def training_curves_figure(series: dict[str, list[tuple[int, float]]], title: str = "") -> Figure:
    """The figure of :func:`plot_training_curves` for metrics read by :func:`read_metrics`:
    the meta-training loss (and, for classification, the query accuracy after adaptation on
    a second axis) and the validation means.

    Example:
        >>> fig = training_curves_figure({"train/meta_loss": [(0, 2.0), (1, 1.0)],
        ...     "train/acc": [(0, 0.3), (1, 0.6)]})
        >>> [line.get_label() for ax in fig.axes for line in ax.get_lines()]
        ['per logged step', 'mean of 1', 'query accuracy (mean)']
    """
    train = series.get("train/meta_loss", [])
    pairs = [(k, series[k]) for k in validation_curve_keys(series)]
    fig = Figure(figsize=(11 if pairs else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if pairs else 1, squeeze=False)[0]
    steps, values = zip(*train, strict=True)
    ax = axes[0]
    ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label="per logged step")
    window = max(1, len(values) // 20)
    ax.plot(steps, _smooth(list(values), window), color="tab:blue", label=f"mean of {window}")
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set(xlabel="meta-iteration", ylabel="query loss after adaptation", title="meta-training")
    accuracy_points = series.get("train/acc", [])
    if accuracy_points:
        # Classification: the query accuracy after adaptation, on its own axis.
        acc_steps, acc_values = zip(*accuracy_points, strict=True)
        twin = ax.twinx()
        twin.plot(
            acc_steps,
            _smooth(list(acc_values), max(1, len(acc_values) // 20)),
            color="tab:green",
            label="query accuracy (mean)",
        )
        twin.set(ylabel="query accuracy after adaptation")
        twin.legend(loc="center right")
    ax.legend()
    ax.grid(alpha=0.3)
    if pairs:
        ax = axes[1]
        accuracy = any("acc" in k for k, _ in pairs)
        for key, points in pairs:
            if accuracy and "acc" not in key:
                continue
            xs, ys = zip(*points, strict=True)
            style = "--" if key.endswith("_pre") else "-"
            ax.plot(xs, ys, style, marker="o", markersize=3, label=key.removeprefix("val/"))
        ax.set(
            xlabel="meta-iteration",
            ylabel="accuracy" if accuracy else "loss",
            title="validation (pre: before adaptation, post: after)",
        )
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def _adapted_curves(
    module: MetaLearningModule, task: object, grid: Tensor, steps: int
) -> dict[int, Tensor]:
    curves: dict[int, Tensor] = {}

    def record(done: int, predict: Callable[[Tensor], Tensor]) -> None:
        if done == 1 or done == steps:
            with torch.no_grad():
                curves[done] = predict(grid).detach().cpu()

    with torch.enable_grad():
        module.adapt(task, steps, create_graph=False, on_step=record)  # type: ignore[arg-type]
    return curves


def plot_sinusoid_tasks(
    module: MetaLearningModule,
    datamodule: SinusoidDataModule,
    out_path: str | os.PathLike[str],
    num_tasks: int = 4,
    steps: int | None = None,
) -> Path:
    """Draw test tasks: the true sinusoid, the support points, and the model's prediction
    before adaptation, after one inner step and after ``steps`` steps.

    Args:
        module: the meta-trained algorithm.
        datamodule: the sinusoid data (its fixed test tasks are drawn).
        out_path: the PNG to write.
        num_tasks: how many test tasks to draw.
        steps: inner steps (default: the module's ``eval_inner_steps``).

    With ``nan_policy="skip"`` a task whose adaptation is not finite is drawn without its
    adapted curves (as training and testing skip it); otherwise the error is raised.

    Returns:
        ``out_path``.

    Example:
        >>> import tempfile, pathlib
        >>> from metalight.algorithms import MAML
        >>> from metalight.models import MLP
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "tasks.png"
        >>> data = SinusoidDataModule(test_episodes=4, meta_batch_size=4)
        >>> plot_sinusoid_tasks(MAML(MLP(), eval_inner_steps=2), data, out).name
        'tasks.png'
    """
    stream = datamodule.eval_stream("test")
    if stream is None:
        raise ValueError("the data module has no test split to draw tasks from")
    batch = next(iter(stream))
    sampler = datamodule.samplers["test"] if datamodule.samplers else None
    low, high = sampler.x_range if isinstance(sampler, SinusoidTasks) else (-5.0, 5.0)
    steps = module.eval_inner_steps if steps is None else steps
    device = next(module.parameters()).device
    grid = torch.linspace(low, high, 200).unsqueeze(1)
    count = min(num_tasks, len(batch))
    columns = min(count, 2)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(5.5 * columns, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for index in range(count):
        task = batch[index]
        ax = axes[index]
        truth = SinusoidTasks.function(grid, task.info)
        with torch.no_grad():
            before = module.model(grid.to(device)).cpu()
        try:
            curves = _adapted_curves(module, task.to(device), grid.to(device), steps)
        except NonFiniteError:
            # As training and testing do with nan_policy="skip": leave the task's
            # adaptation out rather than fail.
            if module.nan_policy != "skip":
                raise
            curves = {}
            skipped = True
        else:
            skipped = False
        ax.plot(grid, truth, color="black", linewidth=2, label="ground truth")
        ax.plot(grid, before, ":", color="tab:green", label="before adaptation")
        if 1 in curves and steps != 1:
            ax.plot(grid, curves[1], "--", color="tab:orange", label="after 1 step")
        if steps in curves:
            label = f"after {steps} step" + ("s" if steps != 1 else "")
            ax.plot(grid, curves[steps], color="tab:red", label=label)
        ax.scatter(
            task.support_x,
            task.support_y,
            marker="^",
            color="tab:purple",
            zorder=3,
            label=f"support (K={task.support_x.shape[0]})",
        )
        amplitude, phase = (float(v) for v in task.info[:2])
        title = f"test task {index}: amplitude {amplitude:.2f}, phase {phase:.2f}"
        if skipped:
            title += "\n(adaptation not finite: skipped)"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if index == 0:
            ax.legend(fontsize="small")
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.suptitle("Sinusoid test tasks before and after adaptation")
    out = Path(out_path)
    _save_figure(fig, out)
    return out
