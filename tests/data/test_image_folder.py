"""Folder-of-class-folders and mini-ImageNet layouts built in tmp_path, and their errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from metalight.data import ImageFolder, ImageFolderDataModule, ImageTransform, MiniImageNet

COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (120, 120, 0)]


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    for c in range(classes):
        for i in range(per_class):
            suffix = "png" if i % 2 else "jpg"
            write_image(root / f"class_{c}" / f"img_{i}.{suffix}", COLORS[c])
    return root


def test_folder_dataset_shapes_and_values(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    (root / "class_0" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    ds = ImageFolder(root, image_size=16, channels=3)
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    assert ds.data.shape == (18, 3, 16, 16) and ds.class_sizes.tolist() == [6, 6, 6]
    image, label = ds[0]
    assert label == 0 and image.shape == (3, 16, 16)
    # PNG is lossless: class_0's PNG images hold exactly their colour.
    png = ds.fetch(ds.class_indices[0][1:2])[0]
    assert torch.allclose(
        png, torch.tensor(COLORS[0]).float().div(255).view(3, 1, 1).expand(3, 16, 16)
    )

    gray = ImageFolder(root, image_size=(8, 12), channels=1)
    assert gray.data.shape == (18, 1, 8, 12)
    native = ImageFolder(root, image_size=None)
    assert native.data.shape == (18, 3, 20, 24)

    task = ds.sampler(ways=3, shots=2, queries=3).sample(torch.Generator().manual_seed(0))
    assert (
        task.support_x.shape == (6, 3, 16, 16)
        and task.query_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    )
    # Each way's images carry the colour of its class.
    for way, class_id in enumerate(task.info.tolist()):
        red = task.query_x[way * 3 : way * 3 + 3, 0].mean()
        assert abs(float(red) - COLORS[class_id][0] / 255) < 0.05


def test_folder_cache_is_reused(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", classes=2, per_class=4)
    cache = tmp_path / "cache"
    first = ImageFolder(root, image_size=8, cache_dir=cache)
    files = list(cache.glob("image_folder-*.pt"))
    assert len(files) == 1
    second = ImageFolder(root, image_size=8, cache_dir=cache)
    assert torch.equal(first.data, second.data) and first.class_names == second.class_names
    write_image(root / "class_1" / "img_9.png", COLORS[3])  # changed folder: a new cache entry
    assert len(ImageFolder(root, image_size=8, cache_dir=cache)) == 9
    assert len(list(cache.glob("image_folder-*.pt"))) == 2


def test_folder_errors_name_the_culprit(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"image folder root {missing} does not exist"):
        ImageFolder(missing)

    root = make_folder(tmp_path / "data", classes=2, per_class=3)
    (root / "class_empty").mkdir()
    with pytest.raises(
        ValueError, match=f"class folder {root / 'class_empty'} contains no image files"
    ):
        ImageFolder(root, image_size=8)
    (root / "class_empty").rmdir()

    corrupt = root / "class_1" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ValueError, match=f"cannot decode image file {corrupt}"):
        ImageFolder(root, image_size=8)
    corrupt.unlink()

    write_image(root / "class_1" / "big.png", COLORS[1], size=(30, 30))
    with pytest.raises(ValueError, match=r"image .*big\.png has shape \(3, 30, 30\)"):
        ImageFolder(root, image_size=None)

    ds = ImageFolder(root, image_size=8)  # class_0: 3 images, class_1: 4
    with pytest.raises(ValueError, match="'class_0' has 3") as err:
        ds.sampler(ways=2, shots=2, queries=2)
    assert "class_1" not in str(err.value)
    with pytest.raises(ValueError, match="cannot draw 3-way tasks from a dataset with 2 classes"):
        ds.sampler(ways=3, shots=1, queries=1)


def make_mini_imagenet(root: Path, classes: dict[str, list[str]], size: int = 90) -> Path:
    """Writes train/val/test CSVs (header filename,label) and JPEGs under images/."""
    wnids = {
        split: [f"n0{split[0]}{i:06d}" for i in range(len(colors))]
        for split, colors in classes.items()
    }
    for split, colors in classes.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for wnid, color in zip(wnids[split], colors, strict=True):
                for i in range(5):
                    name = f"{wnid}{i:08d}.jpg"
                    write_image(root / "images" / name, COLORS[int(color)], size=(size, size))
                    writer.writerow([name, wnid])
    return root


def test_mini_imagenet_layout(tmp_path: Path) -> None:
    root = make_mini_imagenet(
        tmp_path, {"train": ["0", "1", "2"], "val": ["3", "0"], "test": ["1", "2"]}
    )
    train = MiniImageNet(root, "train")
    assert train.num_classes == 3 and train.data.shape == (15, 3, 84, 84)
    assert train.class_names == sorted(train.class_names)
    val = MiniImageNet(root, "val")
    assert val.num_classes == 2 and not set(val.class_names) & set(train.class_names)
    task = train.sampler(ways=3, shots=1, queries=4).sample(torch.Generator().manual_seed(0))
    assert task.support_x.shape == (3, 3, 84, 84) and task.query_x.shape == (12, 3, 84, 84)


def test_mini_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=f"mini-ImageNet root folder {tmp_path / 'x'} does not exist"
    ):
        MiniImageNet(tmp_path / "x")
    root = make_mini_imagenet(tmp_path, {"train": ["0", "1"]})
    with pytest.raises(FileNotFoundError, match=f"split file {root / 'test.csv'} is missing"):
        MiniImageNet(root, "test")
    gone = root / "images" / "n0t00000100000002.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=f"image file {gone} is listed but does not exist"):
        MiniImageNet(root, "train")
    (root / "val.csv").write_text("image,class\na.jpg,n1\n")
    with pytest.raises(ValueError, match=r"val\.csv must start with the header 'filename,label'"):
        MiniImageNet(root, "val")


def test_folder_transform_gives_training_images_and_no_held_out_split(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", classes=3, per_class=4)
    # Not a flat colour: resizing and JPEG decoding both show in the pixels.
    picture = Image.linear_gradient("L").convert("RGB").resize((24, 20))
    picture.save(root / "class_1" / "img_9.jpg")
    for channels, invert in ((3, False), (1, True)):
        dm = ImageFolderDataModule(
            root, image_size=(12, 16), channels=channels, invert=invert, ways=3, queries=1
        )
        assert dm.transform == ImageTransform((12, 16), channels, invert)
        assert dm.split_names() == ("train",)  # no val_root, no test_root: training only
        assert dm.datasets is not None
        train = dm.datasets["train"]
        assert train.transform == dm.transform
        index = train.class_indices[1][-1:]  # img_9.jpg: the last file of class_1
        assert torch.equal(dm.transform(root / "class_1" / "img_9.jpg"), train.fetch(index)[0])
        assert not torch.equal(dm.transform(root / "class_1" / "img_0.jpg"), train.fetch(index)[0])
