"""Checks of the configuration values users most often get wrong, before anything is built.

Each failure raises :class:`~metalight.run.errors.ConfigError` with a message naming the key
and the override that fixes it, instead of an error deep inside a constructor or a crash
after minutes of training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from metalight.run.errors import ConfigError

__all__ = ["validate_config"]

_ABSENT = object()

# Data modules by class name: (option name, kind, image channels or None).
_DATA = {
    "SinusoidDataModule": ("sinusoid", "regression", None),
    "OmniglotDataModule": ("omniglot", "images", 1),
    "MiniImageNetDataModule": ("mini_imagenet", "images", 3),
    "ImageFolderDataModule": ("image_folder", "images", None),
}
_MODELS = {
    "MLP": ("mlp", "vectors"),
    "Conv4": ("conv4", "images"),
    "ResNet12": ("resnet12", "images"),
}
_ROOTS = {
    "OmniglotDataModule": ("root", "the folder holding the Omniglot zips or folders"),
    "MiniImageNetDataModule": ("root", "the folder holding train.csv, val.csv, test.csv, images/"),
    "ImageFolderDataModule": ("train_root", "a folder of class folders"),
}


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} is not set; give it on the command line: {key}=...") from None
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _class_name(cfg: DictConfig, group: str) -> str | None:
    target = OmegaConf.select(cfg, f"{group}._target_", default=None)
    return str(target).rsplit(".", 1)[-1] if target else None


def _show(value: Any) -> str:
    return f"the text {value!r}" if isinstance(value, str) else repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(cfg: DictConfig, key: str, minimum: int, optional: bool = False, eg: int = 5) -> None:
    value = _get(cfg, key)
    if value is _ABSENT or (optional and value is None):
        return
    if not _is_int(value) or value < minimum:
        null = " or null" if optional else ""
        raise ConfigError(
            f"{key} must be an integer >= {minimum}{null}, got {_show(value)}; "
            f"e.g. {key}={max(eg, minimum)}"
        )


def _positive(cfg: DictConfig, key: str, what: str = "a number > 0", eg: str = "0.01") -> None:
    value = _get(cfg, key)
    if value is _ABSENT:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be {what}, got {_show(value)}; e.g. {key}={eg}")


def _check_pairing(cfg: DictConfig) -> None:
    data_class, model_class = _class_name(cfg, "data"), _class_name(cfg, "model")
    if data_class not in _DATA or model_class not in _MODELS:
        return  # a user-defined class: nothing known to check
    data_name, kind, channels = _DATA[data_class]
    model_name, takes = _MODELS[model_class]
    if kind == "regression":
        if takes != "vectors":
            raise ConfigError(
                f"model={model_name} takes images but data={data_name} gives 1-d inputs; "
                "use model=mlp"
            )
        for key in ("model.in_features", "model.out_features"):
            if _get(cfg, key) not in (1, _ABSENT):
                raise ConfigError(
                    f"{key} must be 1 for data={data_name} (x and y are scalars), got "
                    f"{_show(_get(cfg, key))}"
                )
        return
    if takes != "images":
        raise ConfigError(
            f"model={model_name} takes vectors but data={data_name} gives images; use "
            "model=conv4 or model=resnet12"
        )
    _int(cfg, "data.ways", 2)
    ways = _get(cfg, "data.ways")
    eval_ways = _get(cfg, "data.eval_ways")
    if eval_ways not in (None, _ABSENT, ways):
        raise ConfigError(
            f"data.eval_ways ({eval_ways}) must equal data.ways ({ways}): the model's head has "
            "one output per way; remove data.eval_ways"
        )
    out = _get(cfg, "model.out_features")
    if out is not _ABSENT and out != ways:
        raise ConfigError(
            f"model.out_features ({_show(out)}) must equal data.ways ({ways}); leave "
            "model.out_features at its default ${data.ways}"
        )
    if channels is None:
        channels = _get(cfg, "data.channels")
    in_channels = _get(cfg, "model.in_channels")
    if _is_int(channels) and in_channels is not _ABSENT and in_channels != channels:
        raise ConfigError(
            f"data={data_name} gives {channels}-channel images but model.in_channels is "
            f"{_show(in_channels)}; add model.in_channels={channels}"
        )
    if model_class == "Conv4":
        size = _get(cfg, "model.image_size")
        if not _is_int(size) or size < 16:
            raise ConfigError(
                f"model.image_size must be an integer >= 16 (the side of the square images; "
                f"Conv-4 fixes its feature size from it), got {_show(size)}; set "
                "data.image_size=84 (or 28)"
            )


def _check_data(cfg: DictConfig) -> None:
    for key in ("meta_batch_size", "train_batches_per_epoch", "val_episodes", "test_episodes"):
        _int(cfg, f"data.{key}", 1, eg=25)
    for key in ("shots", "queries"):
        _int(cfg, f"data.{key}", 1)
    for key in ("eval_shots", "eval_queries"):
        _int(cfg, f"data.{key}", 1, optional=True)
    _int(cfg, "data.eval_meta_batch_size", 1, optional=True)
    _int(cfg, "data.num_workers", 0, eg=0)
    data_class = _class_name(cfg, "data")
    if data_class in _DATA and _DATA[data_class][1] == "images":
        _int(cfg, "data.ways", 2)
        _int(cfg, "data.eval_ways", 2, optional=True)
    if data_class in _ROOTS:
        _check_root(cfg, data_class)


def _check_root(cfg: DictConfig, data_class: str) -> None:
    key, holds = _ROOTS[data_class]
    name = _DATA[data_class][0]
    value = _get(cfg, f"data.{key}")
    if value in (None, _ABSENT, ""):
        raise ConfigError(f"data.{key} is not set: data={name} needs {holds}; add data.{key}=PATH")
    if data_class == "OmniglotDataModule" and _get(cfg, "data.download") is True:
        return
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        fix = f"set data.{key}=PATH to {holds}"
        official = {"images_background", "images_evaluation"}
        sets = _get(cfg, "data.sets")
        if data_class == "OmniglotDataModule" and isinstance(sets, list) and set(sets) <= official:
            fix += " (or add data.download=true to download the full Omniglot sets into it)"
        raise ConfigError(f"data.{key}={value} does not exist (looked in {path.resolve()}): {fix}")
    for extra in ("val_root", "test_root"):
        other = _get(cfg, f"data.{extra}") if data_class == "ImageFolderDataModule" else None
        if other not in (None, _ABSENT) and not Path(str(other)).expanduser().is_dir():
            raise ConfigError(
                f"data.{extra}={other} does not exist; fix it or set data.{extra}=null"
            )


def _check_algorithm(cfg: DictConfig) -> None:
    _int(cfg, "algorithm.inner_steps", 0)
    _int(cfg, "algorithm.eval_inner_steps", 0, optional=True, eg=10)
    _int(cfg, "algorithm.truncate", 1, optional=True, eg=1)
    _int(cfg, "algorithm.cg_steps", 1)
    _positive(cfg, "algorithm.reg_lambda", eg="2.0")
    _positive(cfg, "algorithm.inner_lr", "a learning rate > 0")
    eval_steps = _get(cfg, "algorithm.eval_inner_steps")
    if eval_steps in (None, _ABSENT):
        eval_steps = _get(cfg, "algorithm.inner_steps")
    report = _get(cfg, "algorithm.eval_report_steps")
    if report not in (None, _ABSENT):
        if not isinstance(report, list) or not all(_is_int(s) for s in report):
            raise ConfigError(
                f"algorithm.eval_report_steps must be a list of step counts, got {_show(report)};"
                " e.g. algorithm.eval_report_steps=[1]"
            )
        if _is_int(eval_steps) and any(not 0 <= s <= eval_steps for s in report):
            raise ConfigError(
                f"algorithm.eval_report_steps {report} must lie in 0..{eval_steps} (the number "
                "of evaluation inner steps, algorithm.eval_inner_steps)"
            )
    first_order = _get(cfg, "algorithm.first_order")
    if first_order is not _ABSENT and not isinstance(first_order, bool):
        raise ConfigError(f"algorithm.first_order must be true or false, got {_show(first_order)}")


def _check_optimizers(cfg: DictConfig) -> None:
    uses_inner = "inner_optim" in (cfg.get("algorithm") or {})
    if uses_inner:
        _positive(cfg, "inner_optim.lr", "a learning rate > 0 (the inner step size)")
    _positive(cfg, "outer_optim.lr", "a learning rate > 0", eg="0.001")


def _check_trainer(cfg: DictConfig) -> None:
    if _get(cfg, "trainer.inference_mode") is True:
        raise ConfigError(
            "trainer.inference_mode must be false: adapting to each task in validation and test "
            "needs gradients; remove trainer.inference_mode=true"
        )
    steps = _get(cfg, "trainer.max_steps")
    if steps is not _ABSENT and (not _is_int(steps) or (steps < 1 and steps != -1)):
        raise ConfigError(
            f"trainer.max_steps must be a positive integer (meta-iterations) or -1 (no limit), "
            f"got {_show(steps)}; e.g. trainer.max_steps=1000"
        )
    epochs, time = _get(cfg, "trainer.max_epochs"), _get(cfg, "trainer.max_time")
    if steps == -1 and epochs in (-1, None, _ABSENT) and time in (None, _ABSENT):
        raise ConfigError(
            "training would never stop: trainer.max_steps=-1 needs trainer.max_time "
            "(e.g. trainer.max_time=00:00:12:00) or trainer.max_epochs"
        )
    devices = _get(cfg, "trainer.devices")
    strategy = str(_get(cfg, "trainer.strategy"))
    if _is_int(devices) and devices > 1 and "ddp" in strategy:
        for key in ("meta_batch_size", "eval_meta_batch_size", "val_episodes", "test_episodes"):
            value = _get(cfg, f"data.{key}")
            if _is_int(value) and value % devices:
                raise ConfigError(
                    f"data.{key} ({value}) must be divisible by trainer.devices ({devices}): "
                    f"the tasks are split evenly over the processes; e.g. data.{key}="
                    f"{max(devices, value - value % devices)}"
                )


def _check_run(cfg: DictConfig) -> None:
    seed = _get(cfg, "seed")
    if seed is not _ABSENT and not _is_int(seed):
        raise ConfigError(f"seed must be an integer, got {_show(seed)}; e.g. seed=0")
    _int(cfg, "num_threads", 1, optional=True, eg=1)
    ckpt = _get(cfg, "ckpt_path")
    if ckpt not in (None, _ABSENT):
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt} does not exist (looked for {path.resolve()}); give the path "
                "of a .ckpt file, e.g. runs/RUN/checkpoints/last.ckpt"
            )


def validate_config(cfg: DictConfig) -> None:
    """Check a composed ``train`` configuration; raise on the first problem.

    Args:
        cfg: the composed configuration (``configs/train.yaml`` plus overrides).

    Raises:
        ConfigError: naming the key, the bad value and the override that fixes it.

    Example:
        >>> from omegaconf import OmegaConf
        >>> validate_config(OmegaConf.create({"seed": "abc"}))
        Traceback (most recent call last):
        ...
        metalight.run.errors.ConfigError: seed must be an integer, got the text 'abc'; e.g. seed=0
    """
    _check_run(cfg)
    _check_pairing(cfg)
    _check_data(cfg)
    _check_algorithm(cfg)
    _check_optimizers(cfg)
    _check_trainer(cfg)
