"""``metalight predict ckpt_path=CKPT support=DIR query=DIR``: classify new images.

The trained model adapts on the support folder (``DIR/<class>/<image>``, one folder per
class, as few as one image each) and predicts the class of every query image (any image
file under the query folder, or one image file). Images go through the training data's
transform. The predictions are printed and written as CSV.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from metalight.data._images import IMAGE_EXTENSIONS
from metalight.inference import TrainedModel, check_classes, load, predict_logits
from metalight.lightning.checkpoint_io import atomic_write
from metalight.lightning.module import NonFiniteError
from metalight.run.errors import ConfigError
from metalight.run.resources import make_run_dir

__all__ = ["Prediction", "list_query_images", "predict_command", "predict_folders"]

PREDICTIONS_FILE = "predictions.csv"

_USAGE = "metalight predict ckpt_path=CKPT support=DIR query=DIR [output=FILE] [KEY=VALUE ...]"
HELP = f"""\
usage: {_USAGE}

Adapt a trained model to new classes and classify new images. support=DIR holds one folder
per class (DIR/<class>/<image>, one image or more each); query=DIR holds the images to
classify (any image file under it; or give one image file). Images go through what the
training images went through (the run's config.yaml says how). The model adapts with
algorithm.eval_inner_steps inner steps (override it with algorithm.eval_inner_steps=N) and
sees all query images as one batch, as in testing. The predictions are printed and written
to <run dir>/predict/<time>/predictions.csv (or output=FILE).
"""


@dataclass
class Prediction:
    """The predicted class of one query image.

    Attributes:
        image: The image file.
        label: The predicted class's label (its position among the sorted support classes).
        class_name: The predicted class's folder name.
        probability: The softmax probability of that class.
    """

    image: Path
    label: int
    class_name: str
    probability: float


def list_query_images(query: str | os.PathLike[str]) -> list[Path]:
    """The image files to classify: ``query`` itself if a file, else every image file under
    it (sorted by path; hidden files skipped).

    Raises:
        FileNotFoundError: If ``query`` does not exist.
        ValueError: If a file under it is not an image, or there is no image; the message
            names the path.
    """
    root = Path(query).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"query={query} does not exist; give a folder of images.")
    images = []
    for path in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or path.is_dir():
            continue
        if not path.name.lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(
                f"{path} is not an image file (image files end in {', '.join(IMAGE_EXTENSIONS)});"
                " remove it from the query folder."
            )
        images.append(path)
    if not images:
        raise ValueError(f"query folder {root} holds no image files; add the images to classify.")
    return images


def predict_folders(
    trained: TrainedModel, support: str | os.PathLike[str], query: str | os.PathLike[str]
) -> list[Prediction]:
    """Adapts on ``support/<class>/<image>`` and predicts the class of each query image.

    Raises:
        ValueError: On a folder that breaks the layout, more support classes than the model
            has outputs, or a diverged adaptation.

    Example:
        >>> import metalight
        >>> trained = metalight.load("runs/RUN")  # doctest: +SKIP
        >>> [p.class_name for p in predict_folders(trained, "support", "query")]  # doctest: +SKIP
        ['b', 'a', 'c']
    """
    folder = trained.read_folder(support, what="support folder")
    files = list_query_images(query)
    x = trained.read_images(files)
    if x.shape[1:] != folder.x.shape[1:]:
        raise ValueError(
            f"the query images have shape {list(x.shape[1:])} but the support images "
            f"{list(folder.x.shape[1:])}; give images of one size (for a run that keeps image "
            "sizes, resize them as the training images were)."
        )
    device = trained.module.device
    ways = len(folder.class_names)
    check_classes(trained.module, folder.x.to(device), ways, f"support folder {folder.root}")
    try:
        adaptation = trained.adapt(folder.x.to(device), folder.y.to(device))
        logits = predict_logits(adaptation, x.to(device))
    except NonFiniteError as err:
        raise ValueError(f"adapting on {folder.root} diverged: {err}") from err
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            f"adapting on {folder.root} diverged: the outputs are not finite; lower the inner "
            "steps (algorithm.eval_inner_steps=...)."
        )
    # Outputs beyond the support classes belong to no class here.
    probabilities = torch.softmax(logits[:, :ways].double(), dim=-1)
    best, labels = probabilities.max(dim=-1)
    return [
        Prediction(path, int(label), folder.class_names[int(label)], float(p))
        for path, label, p in zip(files, labels.tolist(), best.tolist(), strict=True)
    ]


def _csv_text(predictions: Sequence[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "predicted_class", "probability"])
    for p in predictions:
        writer.writerow([str(p.image), p.class_name, f"{p.probability:.6f}"])
    return buffer.getvalue()


def predict_command(args: Sequence[str]) -> int:
    """``metalight predict ckpt_path=CKPT support=DIR query=DIR [output=FILE] [KEY=VALUE]``.

    Other ``KEY=VALUE`` arguments override the run's saved config (e.g.
    ``algorithm.eval_inner_steps=20``).
    """
    if any(a in ("-h", "--help") for a in args):
        print(HELP, end="")
        return 0
    values = {
        k: a.split("=", 1)[1]
        for a in args
        for k in ("ckpt_path", "support", "query", "output")
        if a.startswith(f"{k}=")
    }
    missing = [k for k in ("ckpt_path", "support", "query") if not values.get(k)]
    if missing:
        raise ConfigError(f"predict needs {', '.join(f'{k}=...' for k in missing)}: {_USAGE}")
    overrides = [
        a for a in args if a.split("=", 1)[0] not in ("ckpt_path", "support", "query", "output")
    ]
    from metalight.run.train import configure_torch

    trained = load(values["ckpt_path"], overrides=overrides)
    configure_torch(trained.config)
    accelerator = str(OmegaConf.select(trained.config, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        trained.module.to("cuda")
    predictions = predict_folders(trained, values["support"], values["query"])
    output = values.get("output")
    path = Path(output) if output else make_run_dir(trained.run_dir / "predict") / PREDICTIONS_FILE
    atomic_write(path, _csv_text(predictions))
    classes = len({p.class_name for p in predictions})
    width = max(len(str(p.image)) for p in predictions)
    print(
        f"metalight predict: {len(predictions)} query images, adapted on {values['support']} "
        f"with {trained.module.eval_inner_steps} inner steps ({classes} "
        f"class{'' if classes == 1 else 'es'} predicted)",
        flush=True,
    )
    for p in predictions:
        print(f"  {p.image!s:<{width}}  {p.class_name}  ({100 * p.probability:.1f}%)")
    print(f"  written to {path}", flush=True)
    return 0
