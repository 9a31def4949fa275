"""Runs of the ``metalight`` command: configs and recipes, building, training, evaluating,
and what a run leaves in its directory (config, checkpoints, metrics, plots, summary).

The names here are the public surface: run a config (:func:`train`, :func:`evaluate`), find
and register the configs and recipes, build a run's parts from a config, and read its
outcome. Everything else lives in the submodules (``metalight.run.build``, ``.summary``,
``.plots``, ...) and may change.

Example:
    >>> from metalight.run import list_recipes
    >>> "maml" in [recipe.name for recipe in list_recipes()]
    True
"""

from metalight.run.build import Components, build, build_datamodule, build_module
from metalight.run.errors import ConfigError, format_error, is_user_error
from metalight.run.resources import (
    Recipe,
    config_dir,
    list_recipes,
    recipes_dir,
    register_recipes,
    register_resolvers,
)
from metalight.run.summary import format_summary
from metalight.run.train import (
    RunInterrupted,
    apply_overrides,
    evaluate,
    load_run_config,
    train,
)
from metalight.run.validate import validate_config

__all__ = [
    "Components",
    "ConfigError",
    "Recipe",
    "RunInterrupted",
    "apply_overrides",
    "build",
    "build_datamodule",
    "build_module",
    "config_dir",
    "evaluate",
    "format_error",
    "format_summary",
    "is_user_error",
    "list_recipes",
    "load_run_config",
    "recipes_dir",
    "register_recipes",
    "register_resolvers",
    "train",
    "validate_config",
]
