"""A module reloaded from a checkpoint in a fresh process is the trained module.

``load_from_checkpoint`` must restore what the constructor was given (the inner optimizer's
class and hyperparameters, the policies, the step counts) and what training learned (the
weights and inner learning rates): the reloaded module adapts bit for bit as the original.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from metalight.algorithms import ANIL, MAML, MetaSGD
from metalight.data import Task
from metalight.lightning import MetaLearningModule
from metalight.lightning.factories import build_factory, describe_factory
from metalight.models import MLP
from tests.lightning.test_training import blob_tasks

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: nothing but the checkpoint and the architecture is shared.
RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from metalight import algorithms
    from metalight.data import Task
    from metalight.models import MLP
    from tests.lightning.test_reload import summary

    torch.manual_seed(123)  # not the trainer's seed: the checkpoint must not depend on it
    for case in json.loads(sys.argv[1]):
        cls = getattr(algorithms, case["cls"])
        module = cls.load_from_checkpoint(case["ckpt"], model=MLP(2, (16,), 3))
        task = Task(**torch.load(case["task"]))
        torch.save(summary(module, task), case["out"])
    """
)


def fit(module: MetaLearningModule, steps: int = 3) -> MetaLearningModule:
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        inference_mode=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, blob_tasks(steps, 2, seed=0))
    return module


def summary(module: MetaLearningModule, task: Task) -> dict[str, Any]:
    adaptation = module.adapt(task, module.eval_inner_steps, create_graph=False)
    return {
        "fast": [p.detach() for p in adaptation.fast_params],
        "predictions": adaptation.predict(task.query_x).detach(),
        "inner": [
            type(module.inner_optimizer).__name__,
            {
                k: v
                for k, v in module.inner_optimizer.defaults.items()
                if isinstance(v, (int, float, bool, tuple, str, type(None)))
            },
        ],
        "policy": [module.policy.first_order, module.policy.truncate, module.policy.checkpoint],
        "options": [
            module.learn_inner_lr,
            module.multi_step_loss,
            module.nan_policy,
            module.vectorize_tasks,
            module.inner_steps,
            module.eval_inner_steps,
            module.adaptable_parameters(),
        ],
        "inner_lrs": [lr.detach() for lr in module.inner_lrs],
    }


def test_reloaded_module_adapts_bit_for_bit_in_a_fresh_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    modules = {
        # Adam with non-default betas and MAML++'s per-step rates: a default SGD(lr=0.01)
        # after reloading would adapt visibly differently.
        "MAML": MAML(
            MLP(2, (16,), 3),
            inner_optim=functools.partial(torch.optim.Adam, lr=0.05, betas=(0.8, 0.95)),
            inner_steps=2,
            eval_inner_steps=3,
            learn_inner_lr="per_layer_per_step",
            multi_step_loss=True,
            truncate=1,
            nan_policy="off",
            vectorize_tasks=False,
        ),
        "MetaSGD": MetaSGD(MLP(2, (16,), 3), inner_lr=0.3, inner_steps=1, eval_inner_steps=2),
        "ANIL": ANIL(
            MLP(2, (16,), 3),
            inner_optim=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9, nesterov=True),
            inner_steps=2,
            first_order=True,
            checkpoint_unroll=True,
        ),
    }
    task = next(iter(blob_tasks(1, 1, seed=7)))[0]
    torch.save(dataclasses.asdict(task), tmp_path / "task.pt")
    cases, want = [], {}
    for name, module in modules.items():
        fit(module)
        trainer = module.trainer
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
        want[name] = summary(module, task)
        cases.append(
            {
                "cls": name,
                "ckpt": str(tmp_path / f"{name}.ckpt"),
                "task": str(tmp_path / "task.pt"),
                "out": str(tmp_path / f"{name}.out"),
            }
        )
    subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(cases)], check=True, cwd=ROOT, timeout=120
    )
    for name in modules:
        got = torch.load(tmp_path / f"{name}.out")
        assert got["inner"] == want[name]["inner"], name
        assert got["policy"] == want[name]["policy"], name
        assert got["options"] == want[name]["options"], name
        for key in ("fast", "predictions", "inner_lrs"):
            values = got[key] if isinstance(got[key], list) else [got[key]]
            expected = want[name][key] if isinstance(want[name][key], list) else [want[name][key]]
            assert len(values) == len(expected)
            for a, b in zip(values, expected):
                assert a.dtype == b.dtype and torch.equal(a, b), (name, key)
    # Training moved the learned rates away from their start: the checkpoint held them.
    assert not torch.equal(want["MAML"]["inner_lrs"][0], torch.full((3,), 0.05))


def test_a_factory_that_a_checkpoint_cannot_hold_is_explained_on_load(tmp_path: Path) -> None:
    module = fit(
        MAML(MLP(2, (16,), 3), inner_optim=lambda params: torch.optim.SGD(params, lr=0.2)), 1
    )
    module.trainer.save_checkpoint(tmp_path / "lambda.ckpt")
    with pytest.raises(
        ValueError,
        match=r"the checkpoint holds no usable inner_optim: it was <function .*<lambda>.*; "
        r"pass inner_optim=\.\.\. to load_from_checkpoint",
    ):
        MAML.load_from_checkpoint(tmp_path / "lambda.ckpt", model=MLP(2, (16,), 3))
    restored = MAML.load_from_checkpoint(
        tmp_path / "lambda.ckpt",
        model=MLP(2, (16,), 3),
        inner_optim=functools.partial(torch.optim.SGD, lr=0.2),
    )
    assert restored.inner_optimizer.defaults["lr"] == 0.2


def test_factory_descriptions_round_trip() -> None:
    adam = functools.partial(torch.optim.Adam, lr=0.1, betas=(0.5, 0.6))
    description = describe_factory(adam)
    assert description == {
        "_target_": "torch.optim.adam.Adam",
        "_partial_": True,
        "lr": 0.1,
        "betas": (0.5, 0.6),
    }
    rebuilt = build_factory(description, "inner_optim")
    assert rebuilt.func is torch.optim.Adam and rebuilt.keywords == adam.keywords
    assert describe_factory(torch.optim.SGD) == {
        "_target_": "torch.optim.sgd.SGD",
        "_partial_": True,
    }
    # A Hydra partial built without _convert_ holds OmegaConf containers: saved as lists.
    from omegaconf import OmegaConf

    hydra_adam = functools.partial(torch.optim.Adam, betas=OmegaConf.create([0.5, 0.6]))
    saved = describe_factory(hydra_adam)
    assert saved is not None and type(saved["betas"]) is list and saved["betas"] == [0.5, 0.6]
    tensor_lr = functools.partial(torch.optim.SGD, lr=torch.tensor(0.1))
    assert set(describe_factory(tensor_lr)) == {"_unsaved_"}
    with pytest.raises(ValueError, match=r"inner_optim: cannot import 'torch\.optim\.Nope'"):
        build_factory({"_target_": "torch.optim.Nope", "_partial_": True}, "inner_optim")


def test_a_checkpoint_without_its_inner_optimizer_is_flagged(tmp_path: Path) -> None:
    # As saved before checkpoints held the inner optimizer.
    module = fit(MAML(MLP(2, (16,), 3), inner_optim=functools.partial(torch.optim.SGD, lr=0.2)), 1)
    module.trainer.save_checkpoint(tmp_path / "old.ckpt")
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=False)
    del checkpoint["hyper_parameters"]["inner_optim"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match=r"does not record its inner optimizer .* adapts with "):
        MAML.load_from_checkpoint(tmp_path / "old.ckpt", model=MLP(2, (16,), 3))


def _scaled_sgd(scale: float, params: Any, lr: float = 0.1) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr * scale)


def test_a_partial_with_positional_arguments_is_described_and_rebuilt() -> None:
    factory = functools.partial(_scaled_sgd, 0.5, lr=0.2)
    description = describe_factory(factory)
    assert description == {
        "_target_": f"{__name__}._scaled_sgd",
        "_partial_": True,
        "_args_": [0.5],
        "lr": 0.2,
    }
    # Through JSON, as a checkpoint's hyperparameters travel.
    rebuilt = build_factory(json.loads(json.dumps(description)), "inner_optim")
    weight = torch.nn.Parameter(torch.zeros(1))
    assert rebuilt([weight]).param_groups[0]["lr"] == factory([weight]).param_groups[0]["lr"]
    assert rebuilt([weight]).param_groups[0]["lr"] == pytest.approx(0.1)
