"""Checks of a run's configuration at start-up, before anything on disk is touched.

Each failure raises :class:`~metalight.run.errors.ConfigError` with one line naming the key
and the override that fixes it, instead of an error deep inside a constructor or a crash
after minutes of training.

Checks of one argument live in the constructors (the data module, the model, the algorithm,
the optimizers): :func:`validate_config` builds them once, with their own checks, and names
the config key of the argument they refuse, so the command and the Python API cannot drift
apart. What no constructor can see is checked here: pairs of keys (model and data), paths,
the Trainer settings and the number of processes.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
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


def _check_folder(key: str, value: Any, purpose: str) -> None:
    """A folder that will be created or written to: not a file, under a writable folder."""
    path = Path(str(value)).expanduser().absolute()
    fix = f"set {key} to a folder you can write to ({purpose})"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value} is a file, not a folder: {fix}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={value} lies under {existing}, which is a file: {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: {existing} is not writable: {fix}")


def _check_data(cfg: DictConfig) -> None:
    if _class_name(cfg, "data") == "EpisodesDataModule" and _get(cfg, "ckpt_path") in (
        None,
        _ABSENT,
    ):
        raise ConfigError(
            "data=episodes holds fixed test episodes only and cannot train; train with another "
            "data option (omniglot, image_folder, ...), then test with metalight eval "
            "ckpt_path=CKPT data=episodes data.root=DIR"
        )
    # The same bounds as the data modules' own checks (check_positive): kept here for the
    # config-key wording, and tested against the constructors for every boundary value.
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
        # Not a constructor check: one-way classification has nothing to learn.
        _int(cfg, "data.ways", 2)
        _int(cfg, "data.eval_ways", 2, optional=True)
    if data_class in _ROOTS:
        _check_root(cfg, data_class)
    cache = _get(cfg, "data.cache_dir")
    if cache not in (None, _ABSENT, ""):
        _check_folder("data.cache_dir", cache, "decoded images are cached there; or null")


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
    if data_class == "ImageFolderDataModule":
        _check_held_out_roots(cfg)


def _check_held_out_roots(cfg: DictConfig) -> None:
    # Without these folders the run would fail after its first epoch (validation) or after
    # all of training (test): a forgotten folder is refused now, with the key to set; null
    # is the explicit "no held-out classes" (train skips that split and says so).
    for split, uses in (("val", "validation after every epoch"), ("test", "the final test")):
        key = f"data.{split}_root"
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=True)
        except MissingMandatoryValue:
            value = _ABSENT
        if value is _ABSENT or value == "":
            if split == "val" and _get(cfg, "trainer.limit_val_batches") == 0:
                continue
            raise ConfigError(
                f"{key} is not set: data=image_folder needs held-out classes for {uses}; "
                f"add {key}=PATH, a folder of class folders other than data.train_root, or "
                f"{key}=null to train on every class without {uses}"
            )
        if value is None:
            continue
        if not Path(str(value)).expanduser().is_dir():
            raise ConfigError(
                f"{key}={value} does not exist (looked in {Path(str(value)).resolve()}); set "
                f"{key}=PATH to a folder of class folders"
            )


def _check_algorithm(cfg: DictConfig) -> None:
    # Each argument's own bounds are the algorithm constructor's (see _check_constructors);
    # this check relates two of them, with the evaluation steps spelt out.
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
    _positive(cfg, "algorithm.inner_lr", "a learning rate > 0")
    first_order = _get(cfg, "algorithm.first_order")
    if first_order is not _ABSENT and not isinstance(first_order, bool):
        raise ConfigError(f"algorithm.first_order must be true or false, got {_show(first_order)}")


def _factory_groups(cfg: DictConfig) -> list[str]:
    uses_inner = "inner_optim" in (cfg.get("algorithm") or {})
    groups = ["inner_optim"] if uses_inner else []
    return [*groups, "outer_optim", "scheduler"]


def _check_sequences(group: str, node: DictConfig, cfg: DictConfig) -> None:
    """Values whose default is a tuple (Adam's betas, Rprop's etas) need as many entries:
    torch indexes them before it checks them ("list index out of range")."""
    try:
        parameters = inspect.signature(_locate(str(node["_target_"]))).parameters
    except (ImportError, ValueError, TypeError):
        return  # building it below reports an unknown target
    for name, parameter in parameters.items():
        default = parameter.default
        if not isinstance(default, tuple) or name not in node:
            continue
        value = _get(cfg, f"{group}.{name}")
        numbers = isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        )
        if not numbers or len(value) != len(default):
            raise ConfigError(
                f"{group}.{name} must be a list of {len(default)} numbers, got {_show(value)}; "
                f"e.g. {group}.{name}=[{','.join(str(v) for v in default)}] (the default)"
            )


def _locate(path: str) -> Any:
    from hydra.utils import get_object

    return get_object(path)


def _check_optimizers(cfg: DictConfig) -> None:
    if "inner_optim" in _factory_groups(cfg):
        _positive(cfg, "inner_optim.lr", "a learning rate > 0 (the inner step size)")
    _positive(cfg, "outer_optim.lr", "a learning rate > 0", eg="0.001")
    for group in _factory_groups(cfg):
        node = OmegaConf.select(cfg, group, default=None)
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(
                f"{group} must be a config with a _target_ (a class path) and _partial_: true, "
                f"got {_show(_get(cfg, group))}"
            )
        if node.get("_partial_") is not True:
            given = "the optimizer" if group == "scheduler" else "the parameters"
            plus = "" if "_partial_" in node else "+"
            raise ConfigError(
                f"{group} ({node['_target_']}) must be a partial config: the algorithm gives it "
                f"{given} when training starts; add {plus}{group}._partial_=true"
            )
        _check_sequences(group, node, cfg)
    # Build them once on a stand-in parameter: the constructors check their own values.
    built: dict[str, Any] = {}
    for group in _factory_groups(cfg):
        node = OmegaConf.select(cfg, group, default=None)
        if node is None:
            continue
        argument = built["outer_optim"] if group == "scheduler" else [torch.zeros(1)]
        try:
            built[group] = instantiate(node, _convert_="all")(argument)
        except (InstantiationException, ValueError, TypeError, KeyError, IndexError) as err:
            cause = err.__cause__ if isinstance(err, InstantiationException) else err
            cause = cause or err
            # A KeyError's text is the repr of its argument: quotes and escaped newlines.
            text = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
            detail = " ".join(str(text).split())
            raise ConfigError(
                f"{group} ({node['_target_']}) refuses its values: {detail}; fix the "
                f"{group}.* value it names"
            ) from None


def _world_size(cfg: DictConfig) -> int | None:
    """The number of training processes the Trainer will start, when it can be told."""
    devices = _get(cfg, "trainer.devices")
    nodes = _get(cfg, "trainer.num_nodes")
    nodes = nodes if _is_int(nodes) and nodes >= 1 else 1
    if isinstance(devices, str):
        text = devices.strip()
        if text.lstrip("-").isdigit():
            devices = int(text)
        elif "," in text:
            devices = [d for d in text.split(",") if d.strip()]
    if isinstance(devices, list):
        count = len(devices)
    elif _is_int(devices) and devices >= 1:
        count = devices
    elif devices in (-1, "auto"):
        accelerator = str(_get(cfg, "trainer.accelerator"))
        gpus = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        count = torch.cuda.device_count() if gpus else 1
    else:
        return None
    return count * nodes


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
    accumulate = _get(cfg, "trainer.accumulate_grad_batches")
    if accumulate is not _ABSENT and (not _is_int(accumulate) or accumulate < 1):
        raise ConfigError(
            f"trainer.accumulate_grad_batches must be an integer >= 1 (meta-batches per outer "
            f"step), got {_show(accumulate)}; e.g. trainer.accumulate_grad_batches=1"
        )
    clip = _get(cfg, "trainer.gradient_clip_val")
    if clip not in (None, _ABSENT):
        number = isinstance(clip, int | float) and not isinstance(clip, bool)
        if not number or not math.isfinite(clip) or clip <= 0:
            raise ConfigError(
                f"trainer.gradient_clip_val must be a number > 0 (the largest meta-gradient "
                f"norm kept), got {_show(clip)}; e.g. trainer.gradient_clip_val=10, or "
                "trainer.gradient_clip_val=null for no clipping"
            )
    _check_world_size(cfg)


def _check_world_size(cfg: DictConfig) -> None:
    # Whatever the strategy ("auto" included): more than one process splits every batch.
    processes = _world_size(cfg)
    if processes is None or processes < 2:
        return
    devices = _get(cfg, "trainer.devices")
    nodes = _get(cfg, "trainer.num_nodes")
    if _is_int(nodes) and nodes > 1:
        what = f"the number of processes (trainer.devices x trainer.num_nodes = {processes})"
    else:
        what = f"trainer.devices ({devices if _is_int(devices) else processes})"
    keys = ["meta_batch_size", "eval_meta_batch_size", "test_episodes"]
    if _get(cfg, "trainer.limit_val_batches") != 0:
        keys.insert(2, "val_episodes")
    for key in keys:
        value = _get(cfg, f"data.{key}")
        if _is_int(value) and value % processes:
            raise ConfigError(
                f"data.{key} ({value}) must be divisible by {what}: the tasks are split "
                f"evenly over the processes; e.g. data.{key}="
                f"{max(processes, value - value % processes)}"
            )


_SEED_MAX = 2**32 - 1  # numpy's (and so Lightning's) seed range


def _check_run(cfg: DictConfig) -> None:
    seed = _get(cfg, "seed")
    if (
        seed is not _ABSENT
        and seed is not None
        and (not _is_int(seed) or not 0 <= seed <= _SEED_MAX)
    ):
        raise ConfigError(
            f"seed must be an integer in 0..{_SEED_MAX}, got {_show(seed)}; e.g. seed=0"
        )
    _int(cfg, "num_threads", 1, optional=True, eg=1)
    ckpt = _get(cfg, "ckpt_path")
    if ckpt not in (None, _ABSENT):
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt} does not exist (looked for {path.resolve()}); give the path "
                "of a .ckpt file, e.g. runs/RUN/checkpoints/last.ckpt"
            )
    if _get(cfg, "paths.run_dir") in (None, _ABSENT, ""):
        output = _get(cfg, "paths.output_dir")
        if output not in (None, _ABSENT, ""):
            _check_folder("paths.output_dir", output, "every run gets a new folder in it")


# --- the constructors' own checks, named by config key ----------------------------------------
_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")
_ARGUMENT = re.compile(r"^([A-Za-z_]\w*)\b")


def _source_key(node: DictConfig, name: str, key: str) -> str:
    """The key the user sets: ``data.seed`` is ``${seed}``, so ``seed``."""
    raw = node._get_node(name)
    value = raw._value() if raw is not None else None  # type: ignore[union-attr]
    match = _INTERPOLATION.match(value) if isinstance(value, str) else None
    return match.group(1) if match else key


def _named(cfg: DictConfig, group: str, err: BaseException) -> ConfigError:
    from metalight.data._validation import DataArgumentError
    from metalight.run.errors import format_error

    cause = err.__cause__ if isinstance(err, InstantiationException) else err
    if not isinstance(cause, ValueError | TypeError) or cause is None:
        return ConfigError(format_error(err))
    message = " ".join(str(cause).split())
    if isinstance(cause, DataArgumentError) and cause.arguments:
        names = list(cause.arguments)
    else:
        match = _ARGUMENT.match(message)
        names = [match.group(1)] if match else []
    node = OmegaConf.select(cfg, group, default=None)
    for name in names:
        if isinstance(node, DictConfig) and name in node:
            key = _source_key(node, name, f"{group}.{name}")
            if message.startswith(name):
                return ConfigError(key + message[len(name) :])
            return ConfigError(f"{key}: {message}")
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return ConfigError(f"{group} ({target}) refuses its values: {message}")


def _check_constructors(cfg: DictConfig) -> None:
    """Builds the data module, the model and the algorithm (none reads or writes a file
    before ``setup``), so their own argument checks run now, before training."""
    try:
        instantiate(cfg.data, _convert_="all")
    except (InstantiationException, ValueError, TypeError) as err:
        raise _named(cfg, "data", err) from None
    try:
        model = instantiate(cfg.model, _convert_="all")
    except (InstantiationException, ValueError, TypeError) as err:
        raise _named(cfg, "model", err) from None
    try:
        instantiate(cfg.algorithm, model=model, _convert_="all")
    except (InstantiationException, ValueError, TypeError) as err:
        raise _named(cfg, "algorithm", err) from None


def validate_config(cfg: DictConfig) -> None:
    """Check a composed ``train`` configuration; raise on the first problem.

    Nothing is read from or written to disk but the checks of paths, so a refused run leaves
    every existing file as it was.

    Args:
        cfg: the composed configuration (``configs/train.yaml`` plus overrides).

    Raises:
        ConfigError: naming the key, the bad value and the override that fixes it.

    Example:
        >>> from omegaconf import OmegaConf
        >>> validate_config(OmegaConf.create({"seed": "abc"}))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        metalight.run.errors.ConfigError: seed must be an integer in 0..4294967295, got the ...
    """
    _check_run(cfg)
    _check_pairing(cfg)
    _check_data(cfg)
    _check_algorithm(cfg)
    _check_trainer(cfg)
    _check_optimizers(cfg)
    if all(cfg.get(group) is not None for group in ("data", "model", "algorithm")):
        _check_constructors(cfg)
