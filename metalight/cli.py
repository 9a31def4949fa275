"""The ``metalight`` command: meta-train, evaluate and list recipes.

``metalight train`` hands its arguments to Hydra, which composes ``configs/train.yaml``
with the overrides given (``model=conv4``, ``inner_optim.lr=0.1``, ``+recipe=maml``,
``-m`` sweeps, ``--help``, ``--cfg job``), then calls :func:`metalight.run.train`. The
configs are found inside the installed package (a wheel) or at the repository root (a source
checkout); the recipes are registered as the config group ``recipe``.

``metalight eval ckpt_path=PATH`` rebuilds the model from the config saved in the
checkpoint's run directory and tests it on the test episodes.

Errors in what was asked for (an unknown recipe or option, a wrong value, a missing path)
print one line and exit with status 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
``SIGTERM`` and ``SIGINT`` stop a training run after saving the step in progress; it exits
with 143 or 130 and prints the command that resumes it.

Example:
    >>> from metalight.cli import main
    >>> main(["recipes"])  # doctest: +ELLIPSIS
    anil ...
    0
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import metalight

__all__ = ["main"]

_HELP = """\
usage: metalight COMMAND [ARGS...]

Gradient-based meta-learning on PyTorch Lightning.

commands:
  train     meta-train, then test on held-out tasks; writes a run directory
            (config, checkpoints, metrics CSV, plots, results.json) under ./runs
  eval      test a checkpoint on the test episodes: metalight eval ckpt_path=PATH
  predict   adapt to new classes (support=DIR/<class>/<image>) and classify the images
            of query=DIR: metalight predict ckpt_path=PATH support=DIR query=DIR
  recipes   list the recipes (reproductions of paper experiments), one per line

examples:
  metalight train +recipe=maml
  metalight train +recipe=omniglot_maml_5w1s data.root=../shared/data/omniglot
  metalight train model=conv4 data=omniglot data.root=PATH inner_optim=adam inner_optim.lr=0.1
  metalight train -m +recipe=maml,anil
  metalight train +recipe=maml ckpt_path=runs/RUN/checkpoints/last.ckpt     (resume)
  metalight eval ckpt_path=runs/RUN/checkpoints/last.ckpt data.test_episodes=100
  metalight eval ckpt_path=runs/RUN/checkpoints/last.ckpt data=episodes data.root=DIR

`metalight train --help` lists the config groups and their options;
`metalight eval --help` explains eval. HYDRA_FULL_ERROR=1 shows tracebacks of errors.

exit status: 0 done; 2 an error in what was asked for (one line says what); 143 (SIGTERM)
or 130 (Ctrl-C): stopped after saving the step in progress, with the command that resumes
it printed and recorded in results.json
"""

_EVAL_HELP = """\
usage: metalight eval ckpt_path=PATH [KEY=VALUE ...]

Test a checkpoint on the test episodes. The model, data and algorithm are rebuilt from the
config.yaml that `metalight train` saved in the checkpoint's run directory; KEY=VALUE
overrides change single values of it (e.g. data.test_episodes=100, trainer.accelerator=gpu,
algorithm.eval_inner_steps=20). Results go to <run dir>/eval/<time>/ (results.json, and for
sinusoid data a picture of test tasks before and after adaptation).

With data=episodes data.root=DIR it scores fixed episodes stored as folders instead,
DIR/<episode>/support/<class>/<image> and DIR/<episode>/query/<class>/<image>, each in
folder order, and reports the accuracy of each episode and their mean with a 95% CI
(diverged episodes are counted and left out of the mean). The images go through what the
training images went through.
"""

# Lightning's advice that suits big supervised runs but not tiny meta-learning ones, its own
# deprecation noise, and its note that a resumed run checkpoints into a new directory (it
# does by design: runs never share a directory).
_QUIET = (
    ".*does not have many workers.*",
    ".*is smaller than the logging interval.*",
    ".*LeafSpec.*is deprecated.*",
    ".*The dirpath has changed from.*",
)


def _print_recipes() -> int:
    from metalight.run import list_recipes

    recipes = list_recipes()
    width = max((len(r.name) for r in recipes), default=0)
    for recipe in recipes:
        print(f"{recipe.name:<{width}}  {recipe.description}")
    print("\nrun one with: metalight train +recipe=NAME   (details: recipes/README.md)")
    return 0


def _value_of(args: Sequence[str], key: str) -> str | None:
    for arg in args:
        if arg.startswith(f"{key}="):
            return arg.split("=", 1)[1]
    return None


def _eval(args: list[str]) -> int:
    from metalight.run import apply_overrides, evaluate, load_run_config

    if any(a in ("-h", "--help") for a in args):
        print(_EVAL_HELP, end="")
        return 0
    if "data=episodes" in args:
        from metalight.run.episodes_eval import eval_episodes_command

        return eval_episodes_command(args)
    ckpt = _value_of(args, "ckpt_path")
    if not ckpt:
        raise _UsageError("eval needs a checkpoint: metalight eval ckpt_path=PATH")
    cfg, run_dir = load_run_config(ckpt)
    rest = [a for a in args if not a.startswith("ckpt_path=")]
    cfg = apply_overrides(cfg, [*rest, f"paths.run_dir={run_dir}", "ckpt_path=null"])
    evaluate(cfg, ckpt)
    return 0


def _train(args: list[str], argv0: str) -> int:
    from metalight.run import (
        RunInterrupted,
        config_dir,
        register_recipes,
        register_resolvers,
        train,
    )
    from metalight.run.resources import note_created, reset_run_dirs
    from metalight.run.selection import objective
    from metalight.run.train import refuse_used_run_dir

    given = _value_of(args, "hydra.run.dir")
    if given and "${" not in given and not {"-m", "--multirun"} & set(args):
        # Checked before Hydra writes its .hydra/ files into it; a directory Hydra is about
        # to create is this run's, and is removed again if the run fails to start.
        run_dir = Path(given)
        refuse_used_run_dir(run_dir)
        if not run_dir.exists():
            note_created(run_dir)
    register_resolvers()
    register_recipes()
    reset_run_dirs()
    full_argv = [argv0, "train", *args]

    def task(cfg: DictConfig) -> float | None:
        # Lightning's DDP launcher starts the other processes with sys.argv: give it the
        # whole command (with "train") rather than what Hydra parsed.
        sys.argv = full_argv
        try:
            # A hyperparameter search (hparams_search=...) optimises what this returns.
            return objective(cfg, train(cfg))
        except RunInterrupted as stop:  # saved, and reported by train()
            raise SystemExit(stop.exit_code) from None
        except Exception as exc:
            # Reported here, so that Hydra adds no "Error executing job" line of its own.
            if not _report("train", exc):
                raise
            raise SystemExit(2) from None

    entry: Callable[[], None] = hydra.main(
        config_path=str(config_dir()), config_name="train", version_base="1.3"
    )(task)
    saved = sys.argv
    sys.argv = ["metalight train", *args]
    GlobalHydra.instance().clear()
    # Hydra configures logging for the job (console and <run dir>/train.log); called from
    # Python (tests, notebooks) the caller's logging is given back afterwards.
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        entry()
    except SystemExit as stop:  # Hydra's --help, --cfg and argument errors end this way
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return 0


class _UsageError(ValueError):
    """A malformed command line."""


# Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1) in this call of main().
_FULL_ERROR = [False]
_RUN_ENV = ("HYDRA_FULL_ERROR", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``metalight`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for an error in what was asked for, 143 or 130
        when ``SIGTERM`` or ``SIGINT`` stopped training (the step in progress is saved).

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        metalight ...
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    argv0 = sys.argv[0] if sys.argv else "metalight"
    if not args or args[0] in ("-h", "--help", "help"):
        print(_HELP, end="")
        return 0
    if args[0] in ("-V", "--version"):
        print(f"metalight {metalight.__version__}")
        return 0
    command, rest = args[0], args[1:]
    _FULL_ERROR[0] = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Seeding sets these for Lightning's worker and DDP processes; a caller in the same
    # process (tests, notebooks) gets its own values back afterwards.
    saved_env = {key: os.environ.get(key) for key in _RUN_ENV}
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        # Hydra then raises errors instead of printing them, so they are reported below.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            if command == "train":
                return _train(rest, argv0)
            if command == "eval":
                return _eval(rest)
            if command == "predict":
                from metalight.run.predict import predict_command

                return predict_command(rest)
            if command == "recipes":
                return _print_recipes()
            raise _UsageError(
                f"unknown command {command!r}; commands: train, eval, predict, recipes "
                "(metalight --help)"
            )
        except Exception as exc:
            if not _report(command, exc):
                raise
            return 2
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _report(command: str, exc: BaseException) -> bool:
    """Print one line for a user error and return True; False means: let it raise."""
    from metalight.run import format_error, is_user_error

    if _FULL_ERROR[0] or not is_user_error(exc):
        return False
    print(f"metalight {command}: error: {format_error(exc)}", file=sys.stderr, flush=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
