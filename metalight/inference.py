"""Using a meta-trained model: ``metalight.load(run)`` and adapting it to new classes.

``load`` rebuilds what ``metalight train`` trained from its run directory: the module
(model, inner optimizer, unroll policies, evaluation settings, learned weights and inner
learning rates) from the saved ``config.yaml`` and checkpoint, and the image transform of
its training data, so that new images go through exactly what the training images went
through.

Example:
    >>> import metalight
    >>> trained = metalight.load("runs/2026-01-01_12-00-00")  # doctest: +SKIP
    >>> support = trained.read_folder("new_characters")  # doctest: +SKIP
    >>> adaptation = trained.adapt(support.x, support.y)  # doctest: +SKIP
    >>> query = trained.transform.stack(["unknown_1.png", "unknown_2.png"])  # doctest: +SKIP
    >>> labels = trained.predict_labels(adaptation, query)  # doctest: +SKIP
    >>> [support.class_names[i] for i in labels]  # doctest: +SKIP
    ['b', 'a']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from metalight.data.episodes import ClassFolder, read_class_folders
from metalight.data.transforms import ImageTransform
from metalight.lightning.module import Adaptation, MetaLearningModule

__all__ = [
    "TrainedModel",
    "adapt",
    "check_classes",
    "data_transform",
    "find_checkpoint",
    "load",
    "load_weights",
    "predict_logits",
]

_CHECKPOINT = "last.ckpt"


@dataclass
class TrainedModel:
    """A meta-trained module with what is needed to use it on new data.

    Attributes:
        module: The trained :class:`~metalight.lightning.MetaLearningModule`, in eval mode.
        transform: The image transform of its training data (``None`` for data that are not
            images, such as sinusoids, or a data module that does not say).
        config: The run's saved configuration (with any overrides given to :func:`load`).
        run_dir: The run directory.
        checkpoint: The checkpoint the weights came from.
    """

    module: MetaLearningModule
    transform: ImageTransform | None
    config: DictConfig
    run_dir: Path
    checkpoint: Path

    def read_folder(self, folder: str | os.PathLike[str], what: str = "folder") -> ClassFolder:
        """Reads ``folder/<class>/<image>`` with the training transform (labels by sorted
        class name); ``what`` names the folder in messages.

        Raises:
            ValueError: If the training data were not images, or the folder breaks the
                layout (the message names the path).
        """
        return read_class_folders(folder, self._image_transform(), what=what)

    def read_images(self, images: Sequence[str | os.PathLike[str]]) -> Tensor:
        """Reads image files with the training transform into ``[N, C, H, W]``."""
        return self._image_transform().stack(list(images))

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Adaptation:
        """Adapts to a support set; see :func:`adapt`."""
        return adapt(self.module, support_x, support_y, steps)

    def predict_labels(self, adaptation: Adaptation, x: Tensor) -> list[int]:
        """The predicted label of each row of ``x`` under ``adaptation``, as a list: the most
        probable of the support set's classes (an output beyond them names no class)."""
        return [int(label) for label in adaptation.predict_labels(x).tolist()]

    def _image_transform(self) -> ImageTransform:
        if self.transform is None:
            raise ValueError(
                f"the run in {self.run_dir} was not trained on images (its data is "
                f"{self.config.data.get('_target_')}); pass tensors to adapt() instead."
            )
        return self.transform


def adapt(
    module: MetaLearningModule, support_x: Tensor, support_y: Tensor, steps: int | None = None
) -> Adaptation:
    """Adapts ``module`` to one support set as its evaluation does (no graph is kept):
    ``module.adapt(support_x, support_y, steps)`` under ``torch.no_grad()``.

    Args:
        module: The meta-trained module.
        support_x: Support inputs ``[n, ...]`` on the module's device.
        support_y: Their labels ``[n]`` (or regression targets ``[n, 1]``).
        steps: Inner steps (default: the module's ``eval_inner_steps``).

    Returns:
        The :class:`~metalight.lightning.module.Adaptation`: ``predict(x)``,
        ``predict_labels(x)`` and ``predict_proba(x)`` with the adapted weights.

    Example:
        >>> import functools, torch
        >>> from metalight.lightning import MetaLearningModule
        >>> from metalight.models import MLP
        >>> module = MetaLearningModule(MLP(2, (8,), 3), inner_steps=1)
        >>> a = adapt(module, torch.randn(6, 2), torch.arange(3).repeat(2))
        >>> predict_logits(a, torch.randn(4, 2)).shape
        torch.Size([4, 3])
    """
    # Under no_grad the module adapts with gradients inside and hands back detached fast
    # weights: nothing kept leads to the meta-parameters.
    with torch.no_grad():
        return module.adapt(support_x, support_y, steps)


def check_classes(module: MetaLearningModule, support_x: Tensor, ways: int, what: str) -> None:
    """Refuses more classes than the model has outputs, before any adaptation is tried.

    Args:
        module: The meta-trained module.
        support_x: Support inputs (one forward pass over them gives the output width).
        ways: The number of classes of the support set.
        what: What holds the classes, for the message (a folder's path, ...).

    Raises:
        ValueError: If ``ways`` exceeds the model's outputs, or the model cannot take the
            inputs (images of another size than in training).
    """
    training = module.training
    module.eval()  # a look at the output width must not move BatchNorm's running statistics
    try:
        with torch.no_grad():
            outputs = module(support_x).shape[-1]
    except RuntimeError as err:
        # Mostly images of another size than training's, with a transform that keeps sizes
        # (image_size=null): the model's first fixed-size layer fails deep inside.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"the model cannot read the inputs of {what} (shape {list(support_x.shape[1:])}): "
            f"{first}; give inputs of the shape it was trained on (for images, set the data's "
            "image_size so that they are resized as in training)"
        ) from None
    finally:
        module.train(training)
    if ways > outputs:
        raise ValueError(
            f"{what} has {ways} classes but the model has {outputs} outputs (it was trained "
            f"{outputs}-way); give at most {outputs} classes."
        )


def predict_logits(adaptation: Adaptation, x: Tensor) -> Tensor:
    """The adapted model's outputs for ``x`` (no gradient kept).

    The inputs are run as one batch, as the test episodes are: with batch-statistics
    BatchNorm the outputs depend on the whole batch.
    """
    with torch.no_grad():
        return adaptation.predict(x)


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint meant by ``path``: a ``.ckpt`` file, or a run directory (its
    ``checkpoints/last.ckpt``), or its ``checkpoints/`` folder.

    Raises:
        FileNotFoundError: If there is no such file or no checkpoint in the directory.

    Example:
        >>> find_checkpoint("no/such/run")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no/such/run does not exist; give a run directory (runs/RUN) or a checkpoint (runs/RUN/checkpoints/last.ckpt).
    """  # noqa: E501
    given = Path(path).expanduser()
    hint = "give a run directory (runs/RUN) or a checkpoint (runs/RUN/checkpoints/last.ckpt)"
    if given.is_file():
        return given
    if not given.is_dir():
        raise FileNotFoundError(f"{path} does not exist; {hint}.")
    for candidate in (given / "checkpoints" / _CHECKPOINT, given / _CHECKPOINT):
        if candidate.is_file():
            return candidate
    looked = f"{given} holds no {_CHECKPOINT} (looked in {given / 'checkpoints'} and {given})"
    # Another checkpoint of the run (step*.ckpt, a best one) is the user's choice to make.
    others = sorted(
        p
        for folder in (given / "checkpoints", given)
        if folder.is_dir()
        for p in folder.glob("*.ckpt")
        if p.is_file()
    )
    if others:
        names = ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else "")
        raise FileNotFoundError(
            f"{looked}, but it holds {names}: give one of them, e.g. {others[-1]}."
        )
    if (given / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{looked}: the run saved no checkpoint (it stopped before its first save, or the "
            "checkpoint was deleted); give another run, or train this one again."
        )
    raise FileNotFoundError(f"{looked}; {hint}.")


def load(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
) -> TrainedModel:
    """Loads a meta-trained module and its data transform from a run or a checkpoint.

    The module is rebuilt from the run's ``config.yaml`` (model, algorithm, inner optimizer
    and its hyperparameters, unroll policy, evaluation steps) and given the checkpoint's
    weights, including learned inner learning rates. It is returned in eval mode.

    Args:
        path: A run directory of ``metalight train`` or a checkpoint inside one.
        map_location: Device to load onto.
        overrides: Hydra-syntax value overrides of the saved config, e.g.
            ``["algorithm.eval_inner_steps=20"]``.

    Returns:
        The :class:`TrainedModel`.

    Raises:
        FileNotFoundError: If there is no checkpoint at ``path``.
        metalight.run.ConfigError: If the config is missing or does not fit the checkpoint.

    Example:
        >>> import metalight
        >>> trained = metalight.load("runs/RUN")  # doctest: +SKIP
        >>> trained.transform  # doctest: +SKIP
        OmniglotTransform(image_size=28, channels=1, invert=True)
    """
    from metalight.run.build import build_module
    from metalight.run.errors import ConfigError
    from metalight.run.train import apply_overrides, load_run_config

    checkpoint = find_checkpoint(path)
    cfg, run_dir = load_run_config(checkpoint)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    module = build_module(cfg)
    if not isinstance(module, MetaLearningModule):
        raise ConfigError(
            f"the run in {run_dir} trained a {type(module).__name__}, which does not adapt to "
            "support sets: metalight.load reads runs of the meta-learning algorithms (MAML, "
            "ANIL, ...)"
        )
    load_weights(module, checkpoint, map_location)
    module.to(map_location)
    module.eval()
    return TrainedModel(module, data_transform(cfg), cfg, run_dir, checkpoint)


def data_transform(cfg: DictConfig) -> ImageTransform | None:
    """The image transform of a run config's data module (``None`` if it has none).

    Example:
        >>> from omegaconf import OmegaConf
        >>> data_transform(OmegaConf.create({"data": {
        ...     "_target_": "metalight.data.OmniglotDataModule", "root": "x", "image_size": 28}}))
        OmniglotTransform(image_size=28, channels=1, invert=True)
    """
    from metalight.run.build import build_datamodule

    # Building a data module reads no data: only its settings are needed here.
    transform = getattr(build_datamodule(cfg), "transform", None)
    return transform if isinstance(transform, ImageTransform) else None


def load_weights(
    module: MetaLearningModule,
    checkpoint: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
) -> None:
    """Loads a Lightning checkpoint's weights into ``module`` (checked to fit first).

    Raises:
        metalight.run.ConfigError: If the file is not a readable Lightning checkpoint or its
            weights do not fit the module.
    """
    from metalight.lightning.checkpoint_io import CorruptCheckpointError
    from metalight.run.errors import ConfigError
    from metalight.run.train import load_weights as load_run_weights

    # The command's own loader: zip CRCs verified (bit rot is named, not loaded), tensors
    # and plain values only. load_state_dict then copies onto the module's device.
    try:
        load_run_weights(module, checkpoint, label=str(checkpoint))
    except (CorruptCheckpointError, OSError) as err:
        raise ConfigError(f"{checkpoint} is not a readable checkpoint: {err}") from None
