"""The short text printed at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["describe_data", "format_metrics", "format_summary"]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def describe_data(data: Mapping[str, Any]) -> str:
    """One phrase for the data config, e.g. ``omniglot, 5-way 1-shot (15 queries per class)``.

    Example:
        >>> describe_data({"_target_": "metalight.data.SinusoidDataModule", "shots": 10})
        'sinusoid regression, K=10 support points'
        >>> describe_data({"_target_": "metalight.data.DigitsDataModule", "batch_size": 32,
        ...     "train_size": 1097, "val_size": 300, "test_size": 400})
        'digits, 1097 training / 300 validation / 400 test examples, batches of 32'
    """
    target = str(data.get("_target_", "")).rsplit(".", 1)[-1]
    name = target.removesuffix("DataModule").lower() or "data"
    name = {
        "miniimagenet": "mini_imagenet",
        "imagefolder": "image_folder",
        "noisydigits": "digits",
    }.get(name, name)
    if "train_size" in data:  # one supervised problem split three ways (bilevel recipes)
        text = (
            f"{name}, {data.get('train_size')} training / {data.get('val_size')} validation / "
            f"{data.get('test_size')} test examples, batches of {data.get('batch_size')}"
        )
        noise = data.get("noise")
        if noise:
            text += f", {100 * float(noise):g}% of training labels flipped"
        return text
    if "ways" not in data:
        return f"{name} regression, K={data.get('shots')} support points"
    eval_shots = data.get("eval_shots")
    shots = data.get("shots")
    text = f"{name}, {data.get('ways')}-way {shots}-shot ({data.get('queries')} queries per class)"
    if eval_shots not in (None, shots):
        text += f", tested {eval_shots}-shot"
    return text


def format_metrics(metrics: Mapping[str, float], stage: str, eval_steps: int | None) -> str:
    """The pre/post-adaptation line of ``stage`` ("test" or "val"), with the 95% CI.

    Example:
        >>> format_metrics({"test/loss_pre": 4.0, "test/loss_post": 0.5,
        ...     "test/loss_post_ci95": 0.05, "test/loss_step1": 1.2}, "test", 10)
        'MSE before adaptation 4.000 | after 1 step 1.200 | after 10 steps 0.500 ± 0.050 (95% CI)'
        >>> format_metrics({"test/loss_post": 0.6, "test/loss_post_ci95": 0.3,
        ...     "test/episodes": 15, "test/diverged": 5, "test/episodes_total": 20},
        ...     "test", 10)  # doctest: +NORMALIZE_WHITESPACE
        'MSE after 10 steps 0.600 ± 0.300 (95% CI over 15 tasks) | DIVERGED: 5 of 20 episodes
        (NaN/Inf), left out of the means above'
    """
    accuracy = f"{stage}/acc_post" in metrics
    kind = "acc" if accuracy else "loss"

    def show(value: float) -> str:
        return f"{100 * value:.2f}%" if accuracy else f"{value:.3f}"

    def steps_text(count: int | None) -> str:
        if count is None:
            return "after adaptation"
        return f"after {count} step" + ("" if count == 1 else "s")

    parts = []
    if f"{stage}/{kind}_pre" in metrics:
        parts.append(f"before adaptation {show(metrics[f'{stage}/{kind}_pre'])}")
    prefix = f"{stage}/{kind}_step"
    for key in sorted(
        (k for k in metrics if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :])
    ):
        parts.append(f"{steps_text(int(key[len(prefix) :]))} {show(metrics[key])}")
    post = metrics.get(f"{stage}/{kind}_post")
    if post is not None:
        text = f"{steps_text(eval_steps)} {show(post)}"
        ci = metrics.get(f"{stage}/{kind}_post_ci95")
        if ci is not None:
            episodes = metrics.get(f"{stage}/episodes")
            over = f" over {int(episodes)} tasks" if episodes else ""
            text += f" ± {show(ci)} (95% CI{over})"
        parts.append(text)
    label = "accuracy" if accuracy else "MSE"
    line = f"{label} " + " | ".join(parts) if parts else "no metrics"
    return line + _diverged_note(metrics, stage)


def _diverged_note(metrics: Mapping[str, float], stage: str) -> str:
    """Says how many episodes diverged: a mean over fewer episodes than were run is never
    the headline without saying so (the means are over the finite ones)."""
    diverged = metrics.get(f"{stage}/diverged")
    if not diverged or diverged != diverged:  # none, or not logged
        return ""
    total = metrics.get(f"{stage}/episodes_total")
    of = f" of {int(total)}" if total else ""
    return f" | DIVERGED: {int(diverged)}{of} episodes (NaN/Inf), left out of the means above"


def format_summary(results: Mapping[str, Any]) -> str:
    """The end-of-run summary: recipe, data, final metrics with 95% CI, and the run directory.

    A resumed run reports the meta-iterations and the time of this process, and the total; an
    interrupted one where it stopped and the command that resumes it.

    Args:
        results: what :func:`metalight.run.train` or :func:`metalight.run.evaluate` returns.

    Example:
        >>> print(format_summary({"command": "train", "recipe": "maml", "description": "MAML",
        ...     "data": "sinusoid regression, K=10 support points", "steps": 5, "seconds": 3.0,
        ...     "metrics": {}, "run_dir": "runs/x", "eval_inner_steps": 10}))
        metalight train finished
          recipe    maml: MAML
          data      sinusoid regression, K=10 support points
          trained   5 meta-iterations in 3.0s
          test      no metrics
          run dir   runs/x
        >>> print(format_summary({"command": "train", "steps": 2300, "start_step": 2000,
        ...     "seconds": 0.4, "metrics": {}}).splitlines()[3])
          trained   300 meta-iterations in 0.4s (resumed at 2000: 2300 in total)
    """
    interrupted = results.get("interrupted")
    command = results.get("command", "train")
    if interrupted:
        lines = [f"metalight {command} interrupted by {interrupted.get('signal')}"]
    else:
        lines = [f"metalight {command} finished"]
    recipe = results.get("recipe") or "none"
    description = results.get("description")
    lines.append(f"  recipe    {recipe}" + (f": {description}" if description else ""))
    lines.append(f"  data      {results.get('data', '?')}")
    if results.get("checkpoint_evaluated"):
        lines.append(f"  weights   {results['checkpoint_evaluated']}")
    if results.get("steps") is not None:
        lines.append(f"  trained   {_trained(results)}")
    if interrupted:
        saved = interrupted.get("checkpoint")
        where = f"saved in {saved}" if saved else "nothing to save yet"
        lines.append(
            f"  stopped   during {interrupted.get('phase')}, at meta-iteration "
            f"{interrupted.get('step')} ({where})"
        )
        lines.append(f"  resume    {interrupted.get('resume')}")
    else:
        metrics = results.get("metrics", {})
        test = format_metrics(metrics, "test", results.get("eval_inner_steps"))
        lines.append(f"  test      {test}")
        if results.get("baseline"):
            # A baseline that records its own training length (bilevel) is told by it.
            steps = results["baseline"].get("test/inner_steps", results.get("eval_inner_steps"))
            baseline = format_metrics(
                results["baseline"], "test", None if steps is None else int(steps)
            )
            lines.append(f"  baseline  {baseline}")
        if results.get("selection"):
            lines.append(f"  weights   {results['selection']['summary']}")
        if results.get("expected"):
            lines.append(f"  expected  {results['expected']}")
    for kind, where in (results.get("trackers") or {}).items():
        if kind != "csv":  # the CSV file is in the run directory, as always
            lines.append(f"  {kind:<9} {where.get('summary', '')}")
    lines.append(f"  run dir   {results.get('run_dir')}")
    return "\n".join(lines)


def _trained(results: Mapping[str, Any]) -> str:
    total = int(results["steps"])
    start = int(results.get("start_step") or 0)
    done = int(results.get("steps_this_run", total - start))
    plural = "" if done == 1 else "s"
    text = f"{done} meta-iteration{plural} in {_duration(results['seconds'])}"
    if start:
        text += f" (resumed at {start}: {total} in total)"
    return text
