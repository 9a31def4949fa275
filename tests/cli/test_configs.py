"""Every recipe and every config-group option composes with Hydra and instantiates; bad
values get a clear ConfigError."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metalight.algorithms import ANIL, FOMAML, IMAML, MAML, MetaSGD, Reptile
from metalight.bilevel import Distill, HyperLR, Reweight
from metalight.lightning import MetaLearningModule
from metalight.optim.functional import BY_TORCH_CLASS
from metalight.run import (
    ConfigError,
    build,
    build_datamodule,
    build_module,
    config_dir,
    list_recipes,
    recipes_dir,
    validate_config,
)
from metalight.run.build import build_loggers, tensorboard_available

RECIPES = [recipe.name for recipe in list_recipes()]
ALGORITHMS = {
    "maml": MAML,
    "fomaml": FOMAML,
    "anil": ANIL,
    "meta_sgd": MetaSGD,
    "reptile": Reptile,
    "imaml": IMAML,
}
BILEVEL = {"hyper_lr": HyperLR, "reweight": Reweight, "distill": Distill}
# One inner_optim config per built-in differentiable optimizer, named as its functional core.
INNER_OPTIMIZERS = sorted(core.name for core in BY_TORCH_CLASS.values())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_the_required_recipes_and_groups_exist() -> None:
    assert set(RECIPES) >= {*ALGORITHMS, "omniglot_maml_5w1s", "omniglot_maml_5w5s"}
    assert _options("inner_optim") == sorted(INNER_OPTIMIZERS)
    assert _options("algorithm") == sorted(ALGORITHMS)
    assert _options("model") == ["conv4", "mlp", "resnet12"]
    assert _options("data") == [
        "digits",
        "episodes",
        "image_folder",
        "mini_imagenet",
        "noisy_digits",
        "omniglot",
        "sinusoid",
    ]
    assert _options("trainer") == ["cpu", "ddp", "gpu", "slurm"]
    for group in ("logger", "callbacks", "paths", "outer_optim"):
        assert _options(group)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_file_names_its_paper_and_expected_result(name: str) -> None:
    path = recipes_dir() / f"{name}.yaml"
    assert path.read_text().startswith("# @package _global_\n")
    info = OmegaConf.load(path).recipe
    assert info.name == name
    assert info.description and info.paper and info.expected
    assert "arxiv.org" in info.paper
    assert f"`{name}`" in (recipes_dir() / "README.md").read_text()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_instantiates(
    name: str, compose_train, tmp_path: Path, synthetic_omniglot_dir: Path
) -> None:
    overrides = [f"+recipe={name}", f"paths.run_dir={tmp_path}"]
    if name.startswith("omniglot"):
        overrides.append(f"data.root={synthetic_omniglot_dir}")
    cfg = compose_train(overrides)
    assert cfg.recipe.name == name
    validate_config(cfg)
    components = build(cfg)
    if name in BILEVEL:
        assert type(components.module) is BILEVEL[name]
    else:
        assert isinstance(components.module, MetaLearningModule)
        algorithm = name if name in ALGORITHMS else "maml"
        assert type(components.module) is ALGORITHMS[algorithm]
    assert components.trainer.max_steps == cfg.trainer.max_steps
    assert components.trainer.checkpoint_callback is not None


def test_maml_recipe_follows_the_papers_sinusoid_protocol(compose_train) -> None:
    cfg = compose_train(["+recipe=maml"])
    assert cfg.data._target_.endswith("SinusoidDataModule")
    assert (cfg.data.shots, cfg.data.meta_batch_size, cfg.data.test_episodes) == (10, 25, 600)
    assert cfg.data.eval_query_grid is True
    assert cfg.inner_optim._target_ == "torch.optim.SGD" and cfg.inner_optim.lr == 0.01
    assert (cfg.algorithm.inner_steps, cfg.algorithm.eval_inner_steps) == (1, 10)
    assert list(cfg.algorithm.eval_report_steps) == [1]
    assert cfg.outer_optim._target_ == "torch.optim.Adam" and cfg.outer_optim.lr == 0.001
    assert list(cfg.model.hidden) == [40, 40] and cfg.model.in_features == 1
    assert cfg.num_threads == 1


@pytest.mark.parametrize("shots", [1, 5])
def test_omniglot_recipes_follow_the_reference_protocol(compose_train, shots: int) -> None:
    cfg = compose_train([f"+recipe=omniglot_maml_5w{shots}s"])
    data = cfg.data
    assert list(data.sets) == ["images_background_small1", "images_background_small2"]
    assert data.split == "alphabet" and data.train_rotations is True
    assert set(data.train_alphabets) == {
        "Balinese",
        "Early_Aramaic",
        "Korean",
        "Japanese_(katakana)",
        "Sanskrit",
        "Tagalog",
    }
    assert set(data.test_alphabets) == {"Greek", "Latin"}
    assert (data.ways, data.shots, data.queries, data.meta_batch_size) == (5, shots, 15, 16)
    assert data.image_size == 28
    assert cfg.model._target_.endswith("Conv4")
    assert (cfg.model.hidden, cfg.model.batch_norm, cfg.model.out_features) == (64, "batch", 5)
    assert cfg.inner_optim.lr == 0.4
    assert (cfg.algorithm.inner_steps, cfg.algorithm.eval_inner_steps) == (1, 3)
    assert cfg.outer_optim.lr == 0.001


def test_train_yaml_has_an_ordered_defaults_list() -> None:
    defaults = OmegaConf.load(config_dir() / "train.yaml").defaults
    groups = [next(iter(d)) if not isinstance(d, str) else d for d in defaults]
    assert groups == [
        "paths",
        "data",
        "model",
        "inner_optim",
        "outer_optim",
        "algorithm",
        "trainer",
        "logger",
        "callbacks",
        "_self_",
        "debug",
        "hparams_search",
    ]


@pytest.mark.parametrize("optimizer", INNER_OPTIMIZERS)
def test_every_inner_optimizer_runs_a_meta_step(optimizer: str, compose_train) -> None:
    cfg = compose_train([f"inner_optim={optimizer}", "data.meta_batch_size=2"])
    assert cfg.inner_optim._partial_ is True
    module = build_module(cfg)
    batch = next(iter(build_datamodule(cfg).train_dataloader()))
    loss = module.training_step(batch, 0)
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in module.meta_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_option_builds(algorithm: str, compose_train) -> None:
    module = build_module(compose_train([f"algorithm={algorithm}"]))
    assert type(module) is ALGORITHMS[algorithm]


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "meta_sgd"])
def test_unroll_policies_are_chosen_from_the_command_line(algorithm: str, compose_train) -> None:
    overrides = [
        f"algorithm={algorithm}",
        "algorithm.inner_steps=3",
        "algorithm.truncate=2",
        "algorithm.checkpoint_unroll=true",
        "algorithm.vectorize_tasks=false",
        "data.meta_batch_size=2",
    ]
    module = build_module(compose_train(overrides))
    assert module.policy.checkpoint is True and module.policy.truncate == 2
    assert module.vectorize_tasks is False
    loss = module.training_step(
        next(iter(build_datamodule(compose_train(overrides)).train_dataloader())), 0
    )
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in module.meta_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert build_module(compose_train([f"algorithm={algorithm}"])).vectorize_tasks == "auto"


@pytest.mark.parametrize("model", ["conv4", "resnet12"])
def test_image_models_build_for_omniglot(model: str, compose_train) -> None:
    cfg = compose_train([f"model={model}", "data=omniglot", "model.in_channels=1"])
    network = instantiate(cfg.model)
    assert network(torch.zeros(2, 1, 28, 28)).shape == (2, 5)


@pytest.mark.parametrize(
    ("overrides", "target"),
    [
        (["data=omniglot"], "OmniglotDataModule"),
        (["data=mini_imagenet"], "MiniImageNetDataModule"),
        (
            ["data=image_folder", "data.train_root=a", "data.val_root=b", "data.test_root=null"],
            "ImageFolderDataModule",
        ),
        (["data=episodes", "data.root=somewhere"], "EpisodesDataModule"),
        ([], "SinusoidDataModule"),
    ],
)
def test_every_data_option_builds(overrides: list[str], target: str, compose_train) -> None:
    assert type(build_datamodule(compose_train(overrides))).__name__ == target


def test_trainer_options(compose_train, tmp_path: Path) -> None:
    ddp = compose_train(["trainer=ddp", f"paths.run_dir={tmp_path}"]).trainer
    assert (ddp.strategy, ddp.devices, ddp.inference_mode) == ("ddp", 2, False)
    gpu = compose_train(["trainer=gpu"]).trainer
    assert gpu.accelerator == "gpu" and gpu.inference_mode is False
    trainer = build(compose_train(["trainer.max_steps=7", f"paths.run_dir={tmp_path}"])).trainer
    assert trainer.max_steps == 7


def test_loggers_follow_the_logger_group(compose_train, tmp_path: Path) -> None:
    run = f"paths.run_dir={tmp_path}"
    expected = {"CSVLogger", *({"TensorBoardLogger"} if tensorboard_available() else set())}
    assert {type(x).__name__ for x in build_loggers(compose_train([run]))} == expected
    assert [type(x).__name__ for x in build_loggers(compose_train(["logger=csv", run]))] == [
        "CSVLogger"
    ]
    assert build_loggers(compose_train(["logger=none", run])) == []


def test_no_checkpoint_callback_means_no_checkpointing(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(["callbacks=none", f"paths.run_dir={tmp_path}"])
    assert build(cfg).trainer.checkpoint_callback is None


BAD_VALUES = [
    (["algorithm.inner_steps=abc"], "algorithm.inner_steps must be an integer >= 0"),
    (["algorithm.inner_steps=-1"], "algorithm.inner_steps must be an integer >= 0"),
    (["algorithm.eval_report_steps=[20]"], "must lie in 0..10"),
    (["inner_optim.lr=-0.1"], "inner_optim.lr must be a learning rate > 0"),
    (["inner_optim.lr=fast"], "inner_optim.lr must be a learning rate > 0"),
    (["outer_optim.lr=0"], "outer_optim.lr must be a learning rate > 0"),
    (["data.shots=0"], "data.shots must be an integer >= 1"),
    (["data.meta_batch_size=2.5"], "data.meta_batch_size must be an integer >= 1"),
    (["data=omniglot", "model=conv4", "data.ways=1"], "data.ways must be an integer >= 2"),
    (["data=omniglot", "model=conv4", "model.out_features=3"], "must equal data.ways (5)"),
    (["data=omniglot", "model=conv4", "data.eval_ways=20"], "data.eval_ways (20) must equal"),
    (["data=mini_imagenet", "model=conv4"], "add model.in_channels=3"),
    (["data=omniglot"], "model=mlp takes vectors but data=omniglot gives images"),
    (["model=conv4"], "model=conv4 takes images but data=sinusoid gives 1-d inputs"),
    (["data=omniglot", "model=conv4", "data.root=/no/such/dir"], "data.root=/no/such/dir"),
    (["data=image_folder", "model=conv4", "model.in_channels=3"], "data.train_root is not set"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt does not exist"),
    (["trainer.inference_mode=true"], "trainer.inference_mode must be false"),
    (["trainer.max_steps=-1"], "training would never stop"),
    (["trainer=ddp"], "data.meta_batch_size (25) must be divisible by trainer.devices (2)"),
    (["seed=abc"], "seed must be an integer"),
    (["num_threads=0"], "num_threads must be an integer >= 1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES)
def test_bad_values_get_a_clear_message(overrides: list[str], message: str, compose_train):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(compose_train(overrides))


def test_missing_data_root_says_which_override_sets_it(compose_train) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(compose_train(["data=omniglot", "model=conv4", "paths.data_dir=/nope"]))
    assert "data.root=/nope/omniglot does not exist" in str(info.value)
    assert "set data.root=PATH" in str(info.value)
    assert "data.download=true" in str(info.value)


def test_metalight_run_exports_its_public_surface_only() -> None:
    import inspect

    import metalight.run

    public = {
        name
        for name, value in vars(metalight.run).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(metalight.run.__all__)
    assert metalight.run.RunInterrupted.__module__ == "metalight.run.train"
