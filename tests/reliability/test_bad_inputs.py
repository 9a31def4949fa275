"""Every bad input the project handles, with the error it must raise: one table.

Each row is ``Case(id, run, error, match)``: ``run(ctx)`` feeds the bad input and must raise
``error`` whose message matches the regex ``match`` (searched, as ``pytest.raises`` does).
The messages name the problem and, where the project gives one, the fix. To add a case,
append a row; ``ctx.tmp`` is a fresh folder and ``ctx.checkpoint`` a small saved MAML run.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

import metalight
from metalight.algorithms import ANIL, IMAML, MAML, Reptile
from metalight.data import (
    FewShotDataset,
    ImageFolder,
    MiniImageNet,
    Omniglot,
    SinusoidDataModule,
    SinusoidTasks,
    TaskBatch,
)
from metalight.data.streams import TaskDataLoader, TrainTaskStream
from metalight.lightning import NonFiniteError
from metalight.lightning.checkpoint_io import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
)
from metalight.lightning.strategies import check_strategy
from metalight.models import MLP, Conv4, ResNet12, build_model
from metalight.run import ConfigError, validate_config


@dataclass
class Ctx:
    tmp: Path
    checkpoint: Path  # MAML(MLP(hidden=(8,)), inner_steps=1) after 3 steps of 5 per epoch


@dataclass
class Case:
    id: str
    run: Callable[[Ctx], Any]
    error: type[BaseException]
    match: str


# --- helpers used by the rows ------------------------------------------------------------------
class SignSGD(torch.optim.Optimizer):
    """An optimizer with no differentiable version registered."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never stepped
        pass


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 2)


def inner_step(loss_of: Callable[[Any, nn.Module, torch.Tensor], torch.Tensor]) -> None:
    model = linear()
    x = torch.randn(4, 2)
    with metalight.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(loss_of(fmodel, model, x))


def sinusoid_batch(tasks: int = 3) -> TaskBatch:
    return next(iter(SinusoidDataModule(meta_batch_size=tasks, shots=3).train_dataloader()))


def meta_step(module: MAML, batch: TaskBatch | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip policy's per-task warnings
        module.training_step(batch if batch is not None else sinusoid_batch(), 0)


def with_nan_support(batch: TaskBatch, *tasks: int) -> TaskBatch:
    for t in tasks:
        batch.support_y[t, 0, 0] = float("nan")
    return batch


def on_ranks(world_size: int, **kwargs: Any) -> SinusoidDataModule:
    dm = SinusoidDataModule(**kwargs)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=world_size)  # type: ignore[assignment]
    return dm


def trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        inference_mode=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def resume(path: Path, module: MAML, batches: int = 5, plugins: Any = None) -> None:
    """Continues the saved run from ``path`` with ``module`` (and ``batches`` per epoch)."""
    data = SinusoidDataModule(meta_batch_size=2, train_batches_per_epoch=batches)
    t = trainer(max_steps=4, plugins=plugins)
    t.fit(module, datamodule=data, ckpt_path=path)


def text_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def truncated(ctx: Ctx) -> Path:
    blob = ctx.checkpoint.read_bytes()
    path = ctx.tmp / "cut.ckpt"
    path.write_bytes(blob[: len(blob) // 2])
    return path


def image(path: Path, color: tuple[int, int, int] = (200, 10, 10), size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def image_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for c in range(classes):
        for i in range(per_class):
            image(root / f"class_{c}" / f"{i}.png")
    return root


def with_empty_class(ctx: Ctx) -> Path:
    root = image_folder(ctx.tmp / "data")
    (root / "class_empty").mkdir()
    return root


def with_corrupt_image(ctx: Ctx) -> Path:
    root = image_folder(ctx.tmp / "data")
    (root / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return root


def with_mixed_sizes(ctx: Ctx) -> Path:
    root = image_folder(ctx.tmp / "data")
    image(root / "class_1" / "big.png", size=30)
    return root


def omniglot_zip_with_corrupt_png(ctx: Ctx) -> Path:
    with zipfile.ZipFile(ctx.tmp / "images_background.zip", "w") as archive:
        archive.writestr("images_background/Alpha/character01/0001_01.png", b"not a png")
    return ctx.tmp


def mini_imagenet_without_test_csv(ctx: Ctx) -> Path:
    (ctx.tmp / "train.csv").write_text("filename,label\n")
    return ctx.tmp


def hydra_instantiate(config: dict[str, Any]) -> Any:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.create(config))


SGD = functools.partial(torch.optim.SGD, lr=0.1)

# --- the table ---------------------------------------------------------------------------------
CASES = [
    # Optimizers without a differentiable version, and other engine misuse.
    Case(
        "optimizer-not-registered",
        lambda ctx: metalight.get_diff_optim(SignSGD(linear().parameters()), linear().parameters()),
        ValueError,
        r"no differentiable version of SignSGD is registered \(known: .*SGD.*\)\. Write one by "
        r"subclassing metalight\.optim\.DifferentiableOptimizer .*metalight\.register_optim"
        r"\(SignSGD, YourDifferentiableOptimizer\)",
    ),
    Case(
        "optimizer-builtin-without-differentiable-version",
        lambda ctx: metalight.get_diff_optim(
            torch.optim.LBFGS(linear().parameters()), linear().parameters()
        ),
        ValueError,
        r"no differentiable version of LBFGS is registered",
    ),
    Case(
        # Accepted by the constructor; the error comes with the first meta-step.
        "module-inner-optimizer-not-registered",
        lambda ctx: meta_step(MAML(MLP(hidden=(4,)), inner_optim=SignSGD)),
        ValueError,
        r"no differentiable version of SignSGD is registered",
    ),
    Case(
        "optimizer-not-an-instance",
        lambda ctx: metalight.get_diff_optim(torch.optim.SGD, linear().parameters()),
        TypeError,
        r"get_diff_optim expects a torch\.optim\.Optimizer instance, got type",
    ),
    Case(
        "register-a-non-optimizer",
        lambda ctx: metalight.register_optim(int, object),  # type: ignore[arg-type]
        TypeError,
        r"register_optim: <class 'int'> is not a torch\.optim\.Optimizer subclass",
    ),
    Case(
        "optimizer-of-other-parameters",
        lambda ctx: metalight.get_diff_optim(
            torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1), linear().parameters()
        ),
        ValueError,
        r"not among the reference parameters",
    ),
    Case(
        "fast-weights-wrong-count",
        lambda ctx: metalight.monkeypatch(linear()).update_params([torch.zeros(2, 2)]),
        ValueError,
        r"expected 2 fast weights, one per parameter of Linear in named_parameters\(\) order "
        r"\(weight, bias\), got 1",
    ),
    Case(
        "fast-weights-wrong-shape",
        lambda ctx: metalight.monkeypatch(linear()).update_params(
            [torch.zeros(2, 2), torch.zeros(3)]
        ),
        ValueError,
        r"fast weight for 'bias' has shape \(3,\), the module's parameter has shape \(2,\)",
    ),
    Case(
        "fast-weight-not-a-tensor",
        lambda ctx: metalight.monkeypatch(linear()).update_params([[1.0], torch.zeros(2)]),
        TypeError,
        r"fast weight for 'weight' must be a Tensor, got list",
    ),
    Case(
        "loss-detached-from-fast-weights",
        lambda ctx: inner_step(lambda fm, m, x: F.mse_loss(fm(x).detach(), x)),
        ValueError,
        r"the loss does not depend on the fast weights \(it does not require grad\): compute it "
        r"from the functional model's output",
    ),
    Case(
        "loss-from-the-original-module",
        lambda ctx: inner_step(lambda fm, m, x: F.mse_loss(m(x), x)),
        ValueError,
        r"the loss does not depend on any fast weight: compute it from the functional model's "
        r"output \(fmodel\(x\)\), not from the original module",
    ),
    Case(
        "loss-not-scalar",
        lambda ctx: inner_step(lambda fm, m, x: (fm(x) - x).pow(2)),
        ValueError,
        r"step\(\) needs a scalar loss tensor; reduce it first, e.g\. loss\.mean\(\) \(got Tensor "
        r"of shape \(4, 2\)\)",
    ),
    # MetaLearningModule and algorithm arguments.
    Case(
        "inner-steps-negative",
        lambda ctx: MAML(MLP(), inner_steps=-1),
        ValueError,
        r"inner_steps must be an integer >= 0, got -1",
    ),
    Case(
        "eval-inner-steps-not-int",
        lambda ctx: MAML(MLP(), eval_inner_steps=2.5),  # type: ignore[arg-type]
        ValueError,
        r"eval_inner_steps must be an integer >= 0, got 2\.5",
    ),
    Case(
        "adapt-matches-nothing",
        lambda ctx: MAML(MLP(hidden=(4,)), adapt=["decoder"]),
        ValueError,
        r"adapt='decoder' matches no trainable parameter of MLP; its parameters are: "
        r"features\.0\.weight, features\.0\.bias, head\.weight, head\.bias",
    ),
    Case(
        "nan-policy-unknown",
        lambda ctx: MAML(MLP(), nan_policy="ignore"),  # type: ignore[arg-type]
        ValueError,
        r"nan_policy must be 'raise', 'skip' or 'off', got 'ignore'",
    ),
    Case(
        "learn-inner-lr-unknown",
        lambda ctx: MAML(MLP(), learn_inner_lr="per_tensor"),  # type: ignore[arg-type]
        ValueError,
        r"learn_inner_lr must be None, 'scalar', 'per_layer', 'per_layer_per_step' or "
        r"'per_parameter', got 'per_tensor'",
    ),
    Case(
        "task-type-unknown",
        lambda ctx: MAML(MLP(), task_type="ranking"),  # type: ignore[arg-type]
        ValueError,
        r"task_type must be 'auto', 'classification' or 'regression', got 'ranking'",
    ),
    Case(
        "eval-report-steps-out-of-range",
        lambda ctx: MAML(MLP(), eval_inner_steps=2, eval_report_steps=[5]),
        ValueError,
        r"eval_report_steps \[5\] must lie in 0\.\.eval_inner_steps \(2\)",
    ),
    Case(
        "truncate-negative",
        lambda ctx: MAML(MLP(), truncate=-1),
        ValueError,
        r"truncate must be None or an integer >= 0 \(the number of last inner steps the "
        r"meta-gradient flows through\), got -1",
    ),
    Case(
        "model-without-trainable-parameters",
        lambda ctx: MAML(MLP().requires_grad_(False)),
        ValueError,
        r"MLP has no trainable parameters: meta-learning needs at least one parameter with "
        r"requires_grad=True",
    ),
    Case(
        "anil-head-matches-nothing",
        lambda ctx: ANIL(MLP(), head="classifier"),
        ValueError,
        r"ANIL head='classifier' matches no submodule of MLP \(its submodules: features, head\)",
    ),
    Case(
        "anil-body-matches-nothing",
        lambda ctx: ANIL(MLP(), body="encoder"),
        ValueError,
        r"ANIL body='encoder' matches no submodule of MLP",
    ),
    Case(
        "anil-with-adapt",
        lambda ctx: ANIL(MLP(), adapt=["features"]),
        ValueError,
        r"ANIL adapts its head only; do not pass adapt=",
    ),
    Case(
        "anil-with-adapted",
        lambda ctx: ANIL(MLP(), adapted=["features"]),
        ValueError,
        r"ANIL adapts its head only; do not pass adapted=",
    ),
    Case(
        "reptile-with-learned-inner-lr",
        lambda ctx: Reptile(MLP(), learn_inner_lr="scalar"),
        ValueError,
        r"Reptile's meta-gradient does not reach inner learning rates; use MetaSGD or MAML with "
        r"learn_inner_lr",
    ),
    Case(
        "imaml-lambda-not-positive",
        lambda ctx: IMAML(MLP(), reg_lambda=0.0),
        ValueError,
        r"reg_lambda must be > 0, got 0\.0",
    ),
    Case(
        "imaml-no-cg-steps",
        lambda ctx: IMAML(MLP(), cg_steps=0),
        ValueError,
        r"cg_steps must be >= 1, got 0",
    ),
    # Non-finite values in the inner loop (nan_policy="raise", and "skip" with nothing left).
    Case(
        "nan-in-support-data",
        lambda ctx: meta_step(
            MAML(MLP(hidden=(4,)), inner_optim=SGD), with_nan_support(sinusoid_batch(), 1)
        ),
        NonFiniteError,
        r"task 1 of batch 0: non-finite inner loss nan at inner step 0 \(the fast weights are "
        r"finite; .* non-finite support data or loss\)",
    ),
    Case(
        "inner-loop-diverges",
        lambda ctx: meta_step(
            MAML(
                MLP(hidden=(4,)),
                inner_optim=functools.partial(torch.optim.SGD, lr=1e30),
                inner_steps=3,
            )
        ),
        NonFiniteError,
        r"task 0 of batch 0: non-finite inner loss .* at inner step [12]",
    ),
    Case(
        "every-task-skipped",
        lambda ctx: meta_step(
            MAML(MLP(hidden=(4,)), inner_optim=SGD, nan_policy="skip"),
            with_nan_support(sinusoid_batch(2), 0, 1),
        ),
        NonFiniteError,
        r"every task of batch 0 was skipped for non-finite values",
    ),
    Case(
        "evaluation-under-inference-mode",
        lambda ctx: torch.inference_mode()(MAML(MLP(hidden=(4,))).validation_step)(
            sinusoid_batch(), 0
        ),
        RuntimeError,
        r"MetaLearningModule adapts to each task in validation and test, which needs gradients: "
        r"create the Trainer with inference_mode=False",
    ),
    # Strategies that would give wrong meta-gradients.
    Case(
        "strategy-fsdp",
        lambda ctx: check_strategy(SimpleNamespace(strategy=FSDPStrategy())),
        ValueError,
        r"FSDPStrategy cannot train a MetaLearningModule: FSDP shards the parameters .* "
        r"strategy='ddp'",
    ),
    Case(
        "strategy-deepspeed",
        # (built without __init__, which needs the deepspeed package; the check reads the class)
        lambda ctx: check_strategy(SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy))),
        ValueError,
        r"DeepSpeedStrategy cannot train a MetaLearningModule: DeepSpeed \(ZeRO\) partitions",
    ),
    # Models.
    Case(
        "model-name-unknown",
        lambda ctx: build_model("vgg16"),
        ValueError,
        r"Unknown model name 'vgg16'; known names: 'conv4', 'mlp', 'resnet12'",
    ),
    Case(
        "model-activation-unknown",
        lambda ctx: MLP(activation="swish"),
        ValueError,
        r"Unknown activation 'swish'",
    ),
    Case(
        "conv4-image-too-small",
        lambda ctx: Conv4(image_size=8),
        ValueError,
        r"image_size=8 is too small for Conv4 with pool='max'",
    ),
    Case(
        "resnet12-wrong-channels",
        lambda ctx: ResNet12(channels=(8, 16, 32)),
        ValueError,
        r"4 entries",
    ),
    # Data folders and datasets.
    Case(
        "omniglot-root-missing",
        lambda ctx: Omniglot(ctx.tmp / "nowhere"),
        FileNotFoundError,
        r"Omniglot root folder .*nowhere does not exist(.|\n)*images_background\.zip"
        r"(.|\n)*download=True",
    ),
    Case(
        "omniglot-set-missing",
        lambda ctx: Omniglot(ctx.tmp, sets=["images_background_small1"]),
        FileNotFoundError,
        r"lacks some Omniglot sets(.|\n)*images_background_small1\.zip",
    ),
    Case(
        "omniglot-corrupt-image",
        lambda ctx: Omniglot(omniglot_zip_with_corrupt_png(ctx), "images_background"),
        ValueError,
        r"cannot decode image file .*0001_01\.png: .*The file is corrupt or not an image; "
        r"replace or delete it",
    ),
    Case(
        "image-folder-root-missing",
        lambda ctx: ImageFolder(ctx.tmp / "missing"),
        FileNotFoundError,
        r"image folder root .*missing does not exist; expected a folder laid out as "
        r".*missing/<class name>/<image files>",
    ),
    Case(
        "image-folder-without-classes",
        lambda ctx: ImageFolder(ctx.tmp),
        ValueError,
        r"contains no class folders; put the images of each class in their own folder",
    ),
    Case(
        "image-folder-empty-class",
        lambda ctx: ImageFolder(with_empty_class(ctx), image_size=8),
        ValueError,
        r"class folder .*class_empty contains no image files \(looked for .*\); add images or "
        r"remove the folder",
    ),
    Case(
        "image-folder-corrupt-image",
        lambda ctx: ImageFolder(with_corrupt_image(ctx), image_size=8),
        ValueError,
        r"cannot decode image file .*broken\.png",
    ),
    Case(
        "image-folder-mixed-sizes",
        lambda ctx: ImageFolder(with_mixed_sizes(ctx), image_size=None),
        ValueError,
        r"image .*big\.png has shape \(3, 30, 30\) but .* has \(3, 12, 12\); pass an image_size",
    ),
    Case(
        "mini-imagenet-split-file-missing",
        lambda ctx: MiniImageNet(mini_imagenet_without_test_csv(ctx), "test"),
        FileNotFoundError,
        r"split file .*test\.csv is missing",
    ),
    Case(
        "too-many-ways",
        lambda ctx: FewShotDataset(torch.zeros(4, 1), [0, 0, 1, 1], ["a", "b"]).sampler(
            ways=3, shots=1, queries=1
        ),
        ValueError,
        r"cannot draw 3-way tasks from a dataset with 2 classes; set ways to at most 2",
    ),
    Case(
        "too-few-images-per-class",
        lambda ctx: FewShotDataset(
            torch.zeros(7, 1), [0, 0, 0, 0, 0, 1, 1], ["cats", "dogs"]
        ).sampler(ways=2, shots=1, queries=2),
        ValueError,
        r"fewer than shots \+ queries(.|\n)*'dogs' has 2",
    ),
    Case(
        "labels-do-not-match-data",
        lambda ctx: FewShotDataset(torch.zeros(3, 1), [0, 1], ["a", "b"]),
        ValueError,
        r"data has 3 items but targets has 2 labels; pass one label per item",
    ),
    Case(
        "sinusoid-range-reversed",
        lambda ctx: SinusoidDataModule(amplitude_range=(5.0, 1.0)),
        ValueError,
        r"amplitude_range must be \(low, high\) with low <= high, got \(5\.0, 1\.0\)",
    ),
    Case(
        "meta-batch-size-zero",
        lambda ctx: SinusoidDataModule(meta_batch_size=0),
        ValueError,
        r"meta_batch_size must be a positive integer, got 0; use 1 or more",
    ),
    Case(
        "meta-batch-not-divisible-by-world-size",
        lambda ctx: on_ranks(3, meta_batch_size=4).train_dataloader(),
        ValueError,
        r"meta_batch_size=4 is global and must split evenly over world_size=3 processes; "
        r"choose a multiple of 3 \(e\.g\. 6\)",
    ),
    Case(
        "eval-episodes-not-divisible-by-world-size",
        lambda ctx: on_ranks(3, meta_batch_size=3, val_episodes=10).val_dataloader(),
        ValueError,
        r"num_episodes=10 must be divisible by world_size=3 .* choose a multiple of 3",
    ),
    Case(
        "persistent-workers",
        lambda ctx: TaskDataLoader(TrainTaskStream(SinusoidTasks(), 2, 2), persistent_workers=True),
        ValueError,
        r"persistent_workers=True is not supported: workers would keep the stream position",
    ),
    Case(
        "tasks-of-different-shapes",
        lambda ctx: TaskBatch.stack(
            [
                SinusoidTasks(shots=2).sample(torch.Generator()),
                SinusoidTasks(shots=3).sample(torch.Generator()),
            ]
        ),
        ValueError,
        r"cannot stack tasks whose support_x shapes differ",
    ),
    Case(
        "config-instantiates-a-bad-datamodule",
        lambda ctx: hydra_instantiate(
            {"_target_": "metalight.data.SinusoidDataModule", "shots": 0}
        ),
        InstantiationException,
        r"shots must be a positive integer, got 0",
    ),
    # A run's folders, through the Python API (train(cfg) checks them before creating any).
    Case(
        "run-output-dir-is-a-file",
        lambda ctx: validate_config(
            OmegaConf.create({"paths": {"output_dir": str(text_file(ctx.tmp / "f", "x"))}})
        ),
        ConfigError,
        r"paths\.output_dir=\S*f is a file, not a folder: set paths\.output_dir to a folder "
        r"you can write to",
    ),
    Case(
        "data-cache-dir-under-a-file",
        lambda ctx: validate_config(
            OmegaConf.create(
                {"data": {"cache_dir": f"{text_file(ctx.tmp / 'f', 'x')}/cache"}, "paths": {}}
            )
        ),
        ConfigError,
        r"data\.cache_dir=\S*f/cache lies under \S*f, which is a file: set data\.cache_dir to "
        r"a folder",
    ),
    # Checkpoints.
    Case(
        "checkpoint-of-a-model-with-other-shapes",
        lambda ctx: resume(ctx.checkpoint, MAML(MLP(hidden=(16,)), inner_steps=1)),
        RuntimeError,
        r"the checkpoint does not fit this MAML \(MLP\): size mismatch for model\.features\.0\."
        r"weight: \(8, 1\) in the checkpoint, \(16, 1\) here.*Build the module with the "
        r"configuration the checkpoint was trained with",
    ),
    Case(
        "checkpoint-of-another-architecture",
        lambda ctx: resume(ctx.checkpoint, MAML(MLP(hidden=(8, 8)), inner_steps=1)),
        RuntimeError,
        r"the checkpoint does not fit this MAML \(MLP\): missing keys "
        r"\['model\.features\.2\.bias', 'model\.features\.2\.weight'\]",
    ),
    Case(
        "checkpoint-without-learned-inner-lrs",
        lambda ctx: resume(
            ctx.checkpoint, MAML(MLP(hidden=(8,)), inner_steps=1, learn_inner_lr="per_layer")
        ),
        RuntimeError,
        r"missing keys \['inner_lrs\.0', 'inner_lrs\.1'",
    ),
    Case(
        "checkpoint-of-another-task-stream",
        lambda ctx: resume(ctx.checkpoint, MAML(MLP(hidden=(8,)), inner_steps=1), batches=2),
        ValueError,
        r"the checkpoint's training tasks were drawn with train_batches_per_epoch=5, this run "
        r"has train_batches_per_epoch=2: resuming would not continue the same stream of tasks\. "
        r"Resume with the checkpoint's values",
    ),
    Case(
        "checkpoint-of-another-seed",
        lambda ctx: trainer(max_steps=4).fit(
            MAML(MLP(hidden=(8,)), inner_steps=1),
            datamodule=SinusoidDataModule(meta_batch_size=2, train_batches_per_epoch=5, seed=3),
            ckpt_path=ctx.checkpoint,
        ),
        ValueError,
        r"drawn with seed=0, this run has seed=3",
    ),
    Case(
        "checkpoint-missing",
        lambda ctx: AtomicCheckpointIO().load_checkpoint(ctx.tmp / "nope.ckpt"),
        FileNotFoundError,
        r"checkpoint file .*nope\.ckpt does not exist",
    ),
    Case(
        "checkpoint-truncated",
        lambda ctx: resume(truncated(ctx), MAML(MLP(hidden=(8,))), plugins=[AtomicCheckpointIO()]),
        CorruptCheckpointError,
        r"checkpoint file .*cut\.ckpt \(\d+ bytes\) is truncated or is not a checkpoint: it is "
        r"not a complete torch\.save archive.* resume from an earlier checkpoint",
    ),
    Case(
        "checkpoint-not-a-checkpoint",
        lambda ctx: AtomicCheckpointIO().load_checkpoint(
            text_file(ctx.tmp / "notes.ckpt", "hello")
        ),
        CorruptCheckpointError,
        r"notes\.ckpt \(5 bytes\) is truncated or is not a checkpoint",
    ),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    module = MAML(MLP(hidden=(8,)), inner_steps=1)
    t = trainer(max_steps=3)
    t.fit(module, datamodule=SinusoidDataModule(meta_batch_size=2, train_batches_per_epoch=5))
    path = tmp_path_factory.mktemp("checkpoint") / "maml.ckpt"
    t.save_checkpoint(path)
    return path


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    for case in CASES:
        re.compile(case.match)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_explained(case: Case, tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(case.error, match=case.match):
        case.run(Ctx(tmp_path, checkpoint))


# --- bad configuration values of `metalight train` --------------------------------------------
# Each is refused at start-up: exit status 2, one line naming the key (or file) and the fix,
# no traceback, and every file already on disk (data, an earlier run) left as it was.
@dataclass
class CliCase:
    id: str
    args: list[str]  # after `metalight train`; "{data}" is a folder of class folders
    match: str
    tiny: bool = True  # with the small budgets of TINY (data options without them: False)
    # Starts processes if it is not refused: checked through validate_config first, since
    # Lightning would start them by re-running the command line, here pytest's.
    starts_processes: bool = False


TINY = [
    "trainer.max_steps=1",
    "data.meta_batch_size=2",
    "data.val_episodes=2",
    "data.test_episodes=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
FOLDERS = [
    "data=image_folder",
    "model=conv4",
    "model.in_channels=3",
    "data.train_root={data}",
    "data.ways=2",
    "data.shots=1",
    "data.queries=1",
    "data.image_size=16",
]
HELD_OUT = ["data.val_root={data}", "data.test_root={data}"]

CLI_CASES = [
    CliCase(
        "image-folder-without-test-root",
        [*FOLDERS, "data.val_root={data}"],
        r"data\.test_root is not set: data=image_folder needs held-out classes for the final "
        r"test; add data\.test_root=PATH.*or data\.test_root=null",
    ),
    CliCase(
        "image-folder-without-val-root",
        [*FOLDERS, "data.test_root={data}"],
        r"data\.val_root is not set: .*add data\.val_root=PATH.*or data\.val_root=null",
    ),
    CliCase(
        "devices-with-strategy-auto-not-dividing-the-meta-batch",
        ["trainer.devices=2", "data.meta_batch_size=3"],
        r"data\.meta_batch_size \(3\) must be divisible by trainer\.devices \(2\)",
        starts_processes=True,
    ),
    CliCase(
        "devices-over-nodes-not-dividing-the-test-episodes",
        [
            "trainer.devices=2",
            "trainer.num_nodes=2",
            "data.meta_batch_size=4",
            "data.val_episodes=4",
        ],
        r"data\.test_episodes \(2\) must be divisible by the number of processes "
        r"\(trainer\.devices x trainer\.num_nodes = 4\)",
        starts_processes=True,
    ),
    CliCase(
        "accumulate-grad-batches-zero",
        ["trainer.accumulate_grad_batches=0"],
        r"trainer\.accumulate_grad_batches must be an integer >= 1 .*got 0; e\.g\. "
        r"trainer\.accumulate_grad_batches=1",
    ),
    CliCase(
        "gradient-clip-negative",
        ["trainer.gradient_clip_val=-1"],
        r"trainer\.gradient_clip_val must be a number > 0 .*got -1; .*"
        r"trainer\.gradient_clip_val=null for no clipping",
    ),
    CliCase(
        "seed-negative",
        ["seed=-1"],
        r"seed must be an integer in 0\.\.4294967295, got -1; e\.g\. seed=0",
    ),
    CliCase(
        "adam-betas-one-entry",
        ["inner_optim=adam", "inner_optim.betas=[0.9]"],
        r"inner_optim\.betas must be a list of 2 numbers, got \[0\.9\]; e\.g\. "
        r"inner_optim\.betas=\[0\.9,0\.999\]",
    ),
    CliCase(
        "outer-optimizer-refuses-a-value",
        ["outer_optim.eps=-1"],
        r"outer_optim \(torch\.optim\.Adam\) refuses its values: Invalid epsilon value: -1",
    ),
    CliCase(
        "scheduler-without-partial",
        ["+scheduler._target_=torch.optim.lr_scheduler.StepLR", "+scheduler.step_size=2"],
        r"scheduler \(torch\.optim\.lr_scheduler\.StepLR\) must be a partial config: .*add "
        r"\+scheduler\._partial_=true",
    ),
    CliCase(
        "scheduler-refuses-a-value",
        [
            "+scheduler._target_=torch.optim.lr_scheduler.StepLR",
            "+scheduler._partial_=true",
            "+scheduler.step_sze=2",
        ],
        r"scheduler \(torch\.optim\.lr_scheduler\.StepLR\) refuses its values: .*unexpected "
        r"keyword argument 'step_sze'; fix the scheduler\.\* value it names",
    ),
    CliCase(
        "cache-dir-is-a-file",
        [*FOLDERS, *HELD_OUT, "data.cache_dir={file}"],
        r"data\.cache_dir=\S*notes\.txt is a file, not a folder: set data\.cache_dir to a "
        r"folder",
    ),
    CliCase(
        "output-dir-is-a-file",
        ["paths.output_dir={file}"],
        r"paths\.output_dir cannot hold run directories \(\S*notes\.txt\): File exists; set "
        r"paths\.output_dir to a folder you can write to",
    ),
    CliCase(
        "output-dir-under-a-file",
        ["paths.output_dir={file}/runs"],
        r"paths\.output_dir cannot hold run directories \(\S*notes\.txt/runs\): Not a directory",
    ),
    CliCase(
        "train-on-fixed-episodes",
        ["data=episodes", "data.root={data}"],
        r"data=episodes holds fixed test episodes only and cannot train; .*then test with "
        r"metalight eval ckpt_path=CKPT data=episodes data\.root=DIR",
        tiny=False,
    ),
    # The constructors' own checks, named by config key.
    CliCase(
        "truncate-negative",
        ["algorithm.truncate=-1"],
        r"algorithm\.truncate must be None or an integer >= 0 \(the number of last inner steps",
    ),
    CliCase(
        "inner-steps-not-an-integer",
        ["algorithm.inner_steps=abc"],
        r"algorithm\.inner_steps must be an integer >= 0, got 'abc'",
    ),
    CliCase(
        "imaml-reg-lambda-zero",
        ["algorithm=imaml", "algorithm.reg_lambda=0"],
        r"algorithm\.reg_lambda must be > 0, got 0",
    ),
    CliCase(
        "nan-policy-unknown",
        ["algorithm.nan_policy=ignore"],
        r"algorithm\.nan_policy must be 'raise', 'skip' or 'off', got 'ignore'",
    ),
    CliCase(
        "sinusoid-range-reversed",
        ["data.amplitude_range=[5.0,1.0]"],
        r"data\.amplitude_range must be \(low, high\) with low <= high",
    ),
]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (the trees here are a few small files)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_bad_config_value_is_refused_at_start_up(
    case: CliCase,
    compose_with: Callable[[list[str]], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from metalight.cli import main

    data = image_folder(tmp_path / "data", classes=2, per_class=2)
    notes = text_file(tmp_path / "notes.txt", "not a folder")
    earlier = tmp_path / "runs" / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    text_file(earlier / "config.yaml", "seed: 0\n")
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"\x00" * 64)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = [a.format(data=data, file=notes) for a in case.args]
    output = "paths.output_dir=runs"
    if any(a.startswith("paths.output_dir=") for a in args):
        output = ""
    tiny = TINY if case.tiny else []
    argv = ["train", *tiny, "logger=none", *([output] if output else []), *args]
    if case.starts_processes:
        from metalight.run import ConfigError, validate_config

        with pytest.raises(ConfigError, match=case.match):
            validate_config(compose_with(argv[1:]))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit status {code}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    assert lines[0].startswith("metalight train: error: "), lines[0]
    assert re.search(case.match, lines[0]), lines[0]
    after = snapshot(tmp_path)
    changed = [name for name, blob in before.items() if after.get(name) != blob]
    assert changed == []
    # At most the run directory Hydra reserves before the config is read: its own files only.
    new = sorted(set(after) - set(before))
    assert all(Path(n).parts[-1] == "train.log" or ".hydra" in Path(n).parts for n in new), new


# --- the command and the Python API accept the same values --------------------------------------
# (config key, value, a constructor call with that value). Every boundary value of a
# constructor's own check, on both sides; the command must accept exactly what the Python API
# accepts. Checks that relate several keys (model and data) or belong to the command alone
# (the learning rates must be > 0, ways >= 2) are not constructor checks and are not listed.
def _sinusoid(**kwargs: Any) -> Any:
    return SinusoidDataModule(**kwargs)


def _maml(**kwargs: Any) -> Any:
    return MAML(MLP(hidden=(4,)), **kwargs)


def _imaml(**kwargs: Any) -> Any:
    return IMAML(MLP(hidden=(4,)), **kwargs)


BOUNDARIES: list[tuple[list[str], str, Any, Callable[..., Any]]] = [
    *[
        ([], f"data.{name}", value, functools.partial(_sinusoid, **{name: value}))
        for name in (
            "meta_batch_size",
            "train_batches_per_epoch",
            "val_episodes",
            "test_episodes",
            "eval_meta_batch_size",
            "shots",
            "queries",
            "eval_shots",
            "eval_queries",
        )
        for value in (0, 1)
    ],
    *[([], "data.num_workers", v, functools.partial(_sinusoid, num_workers=v)) for v in (-1, 0)],
    *[
        # (no report steps: their range follows the evaluation steps, checked separately)
        (
            ["algorithm.eval_report_steps=[]"],
            f"algorithm.{name}",
            value,
            functools.partial(_maml, **{name: value}),
        )
        for name in ("inner_steps", "eval_inner_steps", "truncate")
        for value in (-1, 0, 1)
    ],
    *[
        (["algorithm=imaml"], "algorithm.cg_steps", v, functools.partial(_imaml, cg_steps=v))
        for v in (0, 1)
    ],
    *[
        (["algorithm=imaml"], "algorithm.reg_lambda", v, functools.partial(_imaml, reg_lambda=v))
        for v in (0.0, 1e-6)
    ],
]


@pytest.fixture(scope="module")
def compose_with() -> Callable[[list[str]], Any]:
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from metalight.run import config_dir, register_recipes, register_resolvers

    register_resolvers()
    register_recipes()

    def _compose(overrides: list[str]) -> Any:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            try:
                return compose("train", overrides=[*overrides, "paths.run_dir=unused"])
            except ConfigCompositionException:
                # A key the config leaves out (its default applies): add it.
                added = [*overrides[:-1], f"+{overrides[-1]}"]
                return compose("train", overrides=[*added, "paths.run_dir=unused"])

    return _compose


@pytest.mark.parametrize(
    ("groups", "key", "value", "build"),
    BOUNDARIES,
    ids=[f"{key}={value}" for _, key, value, _ in BOUNDARIES],
)
def test_command_and_python_api_agree_on_boundary_values(
    groups: list[str], key: str, value: Any, build: Callable[[], Any], compose_with: Any
) -> None:
    from metalight.run import ConfigError, validate_config

    try:
        build()
        python_error = None
    except (ValueError, TypeError) as err:
        python_error = str(err)
    try:
        validate_config(compose_with([*groups, f"{key}={value}"]))
        config_error = None
    except ConfigError as err:
        config_error = str(err)
    assert (python_error is None) == (config_error is None), (python_error, config_error)
    if config_error is not None:
        assert config_error.startswith(key), config_error


# --- data errors use the Python API's words; the command adds its config keys ------------------
def test_data_errors_name_arguments_and_the_command_maps_them_to_config_keys() -> None:
    from metalight.data._validation import DataArgumentError
    from metalight.run import format_error

    data = SinusoidDataModule(meta_batch_size=2, seed=3)
    saved = {"epoch": 0, "next_batch": 1, "stream": {"seed": 0, "meta_batch_size": 4}}
    with pytest.raises(DataArgumentError) as info:
        data.load_state_dict(saved)
    assert info.value.arguments == {"seed": 0, "meta_batch_size": 4}
    assert "data." not in str(info.value) and "command line" not in str(info.value)
    assert format_error(info.value).endswith(
        "Resume with the checkpoint's values (seed=0, meta_batch_size=4), or start a new run "
        "without the checkpoint (config: seed=0, data.meta_batch_size=4)"
    )
    no_val = EpisodicDataModuleWithoutVal()
    with pytest.raises(DataArgumentError) as info:
        no_val.val_dataloader()
    assert format_error(info.value) == (
        "EpisodicDataModule has no val split; pass val data, or skip it "
        "(Trainer(limit_val_batches=0)). (config: trainer.limit_val_batches=0)"
    )


def EpisodicDataModuleWithoutVal() -> Any:
    from metalight.data import EpisodicDataModule

    dataset = FewShotDataset(torch.zeros(8, 1), [0, 0, 0, 0, 1, 1, 1, 1], ["a", "b"])
    return EpisodicDataModule(dataset, ways=2, shots=1, queries=1, meta_batch_size=2)


_COMMAND_WORDS = re.compile(r"\bdata\.\w+=|command line|metalight (?:train|eval)|\bckpt_path=")


def test_data_layer_messages_do_not_quote_the_command_line() -> None:
    import ast

    import metalight.data

    offenders = []
    for path in sorted(Path(metalight.data.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and id(node) not in docstrings and _COMMAND_WORDS.search(text):
                offenders.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_image_folder_with_null_held_out_roots_trains_on_every_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # null is the explicit "no held-out classes": the run trains, skips validation and test,
    # and says so, where a forgotten root is refused (the cases above).
    from metalight.cli import main

    data = image_folder(tmp_path / "data", classes=2, per_class=2)
    monkeypatch.chdir(tmp_path)
    args = [a.format(data=data) for a in FOLDERS]
    argv = ["train", *TINY, "logger=none", "paths.output_dir=runs", *args]
    code = main([*argv, "data.val_root=null", "data.test_root=null"])
    out, err = capsys.readouterr()
    assert code == 0, f"exit status {code}\n{out}\n{err}"
    assert "validation and test skipped" in out + err
    (results,) = (tmp_path / "runs").rglob("results.json")
    assert json.loads(results.read_text())["skipped_splits"] == ["val", "test"]
