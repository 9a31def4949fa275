"""``metalight eval ckpt_path=CKPT data=episodes data.root=DIR``: score fixed episodes.

Every episode of the folder (see :class:`~metalight.data.episodes.FixedEpisodes`) is
adapted to from its support set and scored on its query set, in folder order. The result
is the accuracy of each episode and their mean with a 95% confidence interval; an episode
whose adaptation diverges (NaN or Inf in the inner loop or the outputs) is counted and left
out of the mean, never silently.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from metalight.data.episodes import EpisodesDataModule, FixedEpisodes
from metalight.inference import TrainedModel, adapt, check_classes, load, predict_logits
from metalight.lightning.checkpoint_io import atomic_write
from metalight.lightning.module import MetaLearningModule, NonFiniteError
from metalight.run.errors import ConfigError
from metalight.run.resources import config_dir, make_run_dir
from metalight.run.summary import format_summary

__all__ = [
    "EpisodeScore",
    "episodes_data_config",
    "eval_episodes_command",
    "evaluate_episodes",
    "score_episodes",
    "summarize_scores",
]

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"


@dataclass
class EpisodeScore:
    """The score of one episode.

    Attributes:
        episode: The episode folder's name.
        ways: Number of classes (support class folders).
        support_images: Number of support images.
        query_images: Number of query images.
        accuracy: Fraction of query images predicted right; ``None`` if it diverged.
        diverged: Whether adaptation produced NaN or Inf.
        error: What diverged, for a diverged episode.
    """

    episode: str
    ways: int
    support_images: int
    query_images: int
    accuracy: float | None
    diverged: bool = False
    error: str | None = None


def score_episodes(
    module: MetaLearningModule, episodes: FixedEpisodes, steps: int | None = None
) -> list[EpisodeScore]:
    """Adapts to each episode's support set and scores its query set, in folder order.

    Args:
        module: The meta-trained module (its device is used).
        episodes: The episodes.
        steps: Inner steps (default: the module's ``eval_inner_steps``).

    Raises:
        ValueError: If an episode has more classes than the model has outputs.

    Example:
        >>> scores = score_episodes(trained.module, FixedEpisodes(DIR, trained.transform))  # doctest: +SKIP
        >>> [s.accuracy for s in scores]  # doctest: +SKIP
        [0.8, 1.0, 0.6]
    """  # noqa: E501
    scores = []
    device = module.device
    for name, task in zip(episodes.names, episodes, strict=True):
        task = task.to(device)
        ways = len(task.info)
        sizes = (name, ways, len(task.support_y), len(task.query_y))
        check_classes(module, task.support_x, ways, f"episode {episodes.root / name}")
        try:
            adaptation = adapt(module, task.support_x, task.support_y, steps)
            logits = predict_logits(adaptation, task.query_x)
        except NonFiniteError as err:
            scores.append(EpisodeScore(*sizes, accuracy=None, diverged=True, error=str(err)))
            continue
        if not bool(torch.isfinite(logits).all()):
            error = "non-finite outputs on the query set after adaptation"
            scores.append(EpisodeScore(*sizes, accuracy=None, diverged=True, error=error))
            continue
        # Outputs beyond the episode's classes name no class here (as in predict).
        accuracy = (logits[:, :ways].argmax(-1) == task.query_y).double().mean().item()
        scores.append(EpisodeScore(*sizes, accuracy=accuracy))
    return scores


def summarize_scores(scores: Sequence[EpisodeScore]) -> dict[str, Any]:
    """The mean accuracy over the episodes that adapted, its 95% CI, and the counts.

    The interval is ``1.96 * std / sqrt(n)`` (sample standard deviation), as the test
    metrics of training report it; it is ``None`` for fewer than two scored episodes.

    Example:
        >>> s = summarize_scores([EpisodeScore("a", 5, 5, 5, 0.6),
        ...     EpisodeScore("b", 5, 5, 5, 1.0), EpisodeScore("c", 5, 5, 5, None, True)])
        >>> round(s["mean"], 3), round(s["ci95"], 3), s["scored"], s["diverged"]
        (0.8, 0.392, 2, 1)
    """
    values = [s.accuracy for s in scores if s.accuracy is not None]
    mean = statistics.fmean(values) if values else None
    ci = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {
        "mean": mean,
        "ci95": ci,
        "scored": len(values),
        "diverged": sum(s.diverged for s in scores),
        "episodes": len(scores),
    }


def episodes_data_config(overrides: Sequence[str], trained: TrainedModel) -> DictConfig:
    """``configs/data/episodes.yaml`` with the ``data.*`` overrides, its image settings left
    ``null`` filled in from the training data's transform.

    Raises:
        ConfigError: If ``data.root`` is not given, or the run was not trained on images
            and no image settings are given.
    """
    from metalight.run.train import apply_overrides

    base = OmegaConf.create({"data": OmegaConf.load(config_dir() / "data" / "episodes.yaml")})
    cfg = apply_overrides(base, overrides)
    data = cfg.data
    if OmegaConf.is_missing(data, "root") or not data.root:
        raise ConfigError(
            "data.root is not set: data=episodes needs the folder of episodes; add "
            "data.root=DIR (laid out as DIR/<episode>/support/<class>/<image> and "
            "DIR/<episode>/query/<class>/<image>)"
        )
    settings = trained.transform.config() if trained.transform is not None else None
    for key in ("image_size", "channels", "invert"):
        if data.get(key) is None:
            if settings is None:
                raise ConfigError(
                    f"the run in {trained.run_dir} was not trained on images, so data=episodes "
                    f"cannot take its image settings; give data.{key}=..."
                )
            data[key] = settings[key]
    return cfg


def evaluate_episodes(
    trained: TrainedModel, data: DictConfig, out_dir: Path | None = None
) -> dict[str, Any]:
    """Scores every episode and writes ``results.json`` and ``config.yaml`` to ``out_dir``.

    Args:
        trained: What :func:`metalight.load` returned.
        data: The episodes data config (see :func:`episodes_data_config`).
        out_dir: Where the results go (default: a new ``<run dir>/eval/<time>``).

    Returns:
        The results: ``metrics`` (``test/acc_post``, ``test/acc_post_ci95``,
        ``test/episodes``), ``episodes`` (one :class:`EpisodeScore` dict each, in folder
        order), ``diverged_episodes``, ``files`` and the run's description.
    """
    datamodule = instantiate(data, _convert_="all")
    if not isinstance(datamodule, EpisodesDataModule):
        raise ConfigError(f"data._target_ must build an EpisodesDataModule, got {data._target_}")
    datamodule.setup("test")
    assert datamodule.episodes is not None
    module = trained.module
    scores = score_episodes(module, datamodule.episodes)
    summary = summarize_scores(scores)
    out_dir = out_dir if out_dir is not None else make_run_dir(trained.run_dir / "eval")
    metrics: dict[str, float] = {}
    if summary["mean"] is not None:
        metrics["test/acc_post"] = summary["mean"]
        metrics["test/episodes"] = float(summary["scored"])
    if summary["ci95"] is not None:
        metrics["test/acc_post_ci95"] = summary["ci95"]
    cfg = trained.config
    recipe = cfg.get("recipe") or {}
    results: dict[str, Any] = {
        "command": "eval",
        "recipe": recipe.get("name"),
        "description": recipe.get("description"),
        "data": f"fixed episodes in {datamodule.root} ({len(scores)} episodes)",
        "algorithm": str(cfg.algorithm.get("_target_", "")).rsplit(".", 1)[-1],
        "eval_inner_steps": module.eval_inner_steps,
        "run_dir": str(out_dir),
        "checkpoint_evaluated": str(trained.checkpoint),
        "metrics": metrics,
        "episodes": [asdict(s) for s in scores],
        "diverged_episodes": summary["diverged"],
    }
    saved = copy.deepcopy(cfg)
    with open_dict(saved):
        saved.data = data  # the episodes replace the training data in what was evaluated
    atomic_write(out_dir / CONFIG_FILE, OmegaConf.to_yaml(saved, resolve=True))
    results["files"] = {"config": str(out_dir / CONFIG_FILE)}
    atomic_write(out_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return results


def format_episode_lines(results: dict[str, Any]) -> str:
    """One line per episode, then the count of diverged ones."""
    lines = ["  episodes"]
    scores = results["episodes"]
    width = max((len(s["episode"]) for s in scores), default=0)
    for s in scores:
        shape = f"{s['ways']}-way, {s['support_images']} support, {s['query_images']} query"
        value = "diverged" if s["diverged"] else f"{100 * s['accuracy']:.2f}%"
        lines.append(f"    {s['episode']:<{width}}  {value:>8}  ({shape})")
    diverged = results["diverged_episodes"]
    if diverged:
        lines.append(
            f"  diverged  {diverged} of {len(scores)} episodes (NaN or Inf while adapting; "
            "left out of the mean)"
        )
    return "\n".join(lines)


def eval_episodes_command(args: Sequence[str]) -> int:
    """``metalight eval ckpt_path=CKPT data=episodes data.root=DIR [KEY=VALUE ...]``.

    ``data.*`` values set the episodes' data config; the others override the run's saved
    config (e.g. ``algorithm.eval_inner_steps=20``).
    """
    from metalight.run.train import configure_torch

    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("ckpt_path=")), None)
    if not ckpt:
        raise ConfigError(
            "eval needs a checkpoint: metalight eval ckpt_path=PATH data=episodes data.root=DIR"
        )
    rest = [a for a in args if not a.startswith("ckpt_path=") and a != "data=episodes"]
    data_args = [a for a in rest if a.lstrip("+~").startswith("data.")]
    run_args = [a for a in rest if a not in data_args]
    trained = load(ckpt, overrides=run_args)
    configure_torch(trained.config)
    accelerator = str(OmegaConf.select(trained.config, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        trained.module.to("cuda")
    data = episodes_data_config(data_args, trained).data
    results = evaluate_episodes(trained, data)
    print(format_summary(results), flush=True)
    print(format_episode_lines(results), flush=True)
    return 0
