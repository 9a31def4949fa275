"""Runs of the ``metalight`` command: configs and recipes, building, training, evaluating,
and what a run leaves in its directory (config, checkpoints, metrics, plots, summary).

Example:
    >>> from metalight.run import list_recipes
    >>> "maml" in [recipe.name for recipe in list_recipes()]
    True
"""

from metalight.run.build import (
    Components,
    build,
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    build_trainer,
    tensorboard_available,
)
from metalight.run.errors import ConfigError, format_error, is_user_error
from metalight.run.plots import plot_sinusoid_tasks, plot_training_curves, read_metrics
from metalight.run.resources import (
    Recipe,
    config_dir,
    list_recipes,
    make_run_dir,
    recipes_dir,
    register_recipes,
    register_resolvers,
    reset_run_dirs,
)
from metalight.run.summary import describe_data, format_metrics, format_summary
from metalight.run.train import (
    apply_overrides,
    configure_torch,
    evaluate,
    load_run_config,
    resolve_run_dir,
    train,
)
from metalight.run.validate import validate_config

__all__ = [
    "Components",
    "ConfigError",
    "Recipe",
    "apply_overrides",
    "build",
    "build_callbacks",
    "build_datamodule",
    "build_loggers",
    "build_module",
    "build_trainer",
    "config_dir",
    "configure_torch",
    "describe_data",
    "evaluate",
    "format_error",
    "format_metrics",
    "format_summary",
    "is_user_error",
    "list_recipes",
    "load_run_config",
    "make_run_dir",
    "plot_sinusoid_tasks",
    "plot_training_curves",
    "read_metrics",
    "recipes_dir",
    "register_recipes",
    "register_resolvers",
    "reset_run_dirs",
    "resolve_run_dir",
    "tensorboard_available",
    "train",
    "validate_config",
]
