"""Omniglot from the real small background sets: counts, images, splits, rotations, errors."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from metalight.data import (
    ImageTransform,
    Omniglot,
    OmniglotDataModule,
    OmniglotTransform,
    download_file,
    md5sum,
)
from tests.data.conftest import SMALL_SETS

SMALL1 = {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40, "Latin": 26}
SMALL2 = {"Greek": 24, "Japanese_(katakana)": 47, "Latin": 26, "Sanskrit": 42, "Tagalog": 17}


def test_single_set_class_counts(omniglot_dir: Path) -> None:
    for set_name, expected in zip(SMALL_SETS, (SMALL1, SMALL2), strict=True):
        ds = Omniglot(omniglot_dir, set_name, image_size=28)
        assert Counter(ds.class_alphabets) == expected
        assert ds.num_classes == sum(expected.values())  # 136 and 156
    assert sum(SMALL1.values()) == 136 and sum(SMALL2.values()) == 156


def test_merged_sets_deduplicate_shared_alphabets(omniglot: Omniglot) -> None:
    # Greek (24) and Latin (26) are in both sets: 136 + 156 - 50 = 242 classes.
    assert omniglot.num_classes == 242
    assert Counter(omniglot.class_alphabets) == SMALL1 | SMALL2
    assert len(set(omniglot.class_names)) == 242
    assert "Greek/character01" in omniglot.class_names
    # 20 drawers per character, not 40 for the duplicated alphabets.
    assert omniglot.class_sizes.tolist() == [20] * 242
    assert len(omniglot) == 4840


def test_images_shape_range_and_inversion(omniglot: Omniglot) -> None:
    assert omniglot.data.shape == (4840, 1, 28, 28)
    assert omniglot.data.dtype == torch.uint8
    image, label = omniglot[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == 0
    x = omniglot.fetch(torch.arange(len(omniglot)))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # Strokes are 1 on a 0 background: most pixels are background.
    assert 0.03 < float(x.mean()) < 0.2
    assert float(x[:, :, 0, :].mean()) < 0.02  # the border row is background


def test_full_resolution_and_folder_layout_match_zip(
    omniglot_dir: Path, omniglot: Omniglot, tmp_path: Path
) -> None:
    # Extract one alphabet to the official folder layout and read it back from folders.
    target = tmp_path / "images_background_small1"
    with zipfile.ZipFile(omniglot_dir / "images_background_small1.zip") as archive:
        for name in archive.namelist():
            if "/Early_Aramaic/" in name and name.endswith(".png"):
                archive.extract(name, tmp_path)
    assert (target / "Early_Aramaic" / "character01").is_dir()
    from_folder = Omniglot(tmp_path, "images_background_small1", image_size=28)
    assert from_folder.num_classes == 22
    ids = [omniglot.class_names.index(n) for n in from_folder.class_names]
    expected = torch.cat([omniglot.data[omniglot.class_indices[c]] for c in ids])
    assert torch.equal(from_folder.data, expected)

    full = Omniglot(tmp_path, "images_background_small1", image_size=None)
    assert full.data.shape == (22 * 20, 1, 105, 105)
    assert set(full.data.unique().tolist()) == {0, 255}


def test_alphabet_split_is_disjoint(omniglot: Omniglot) -> None:
    splits = omniglot.split_by_alphabet(
        train=["Korean", "Japanese_(katakana)", "Sanskrit", "Balinese"],
        val=["Greek", "Tagalog"],
        test=["Latin", "Early_Aramaic"],
    )
    names = [set(s.class_names) for s in splits]
    assert [len(n) for n in names] == [40 + 47 + 42 + 24, 24 + 17, 26 + 22]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert {n.split("/")[0] for n in names[1]} == {"Greek", "Tagalog"}
    # Each split's images are exactly those of its classes in the full dataset.
    c = omniglot.class_names.index(splits.val.class_names[0])
    assert torch.equal(splits.val.data[:20], omniglot.data[omniglot.class_indices[c]])

    with pytest.raises(ValueError, match="alphabet 'Greek' is listed in both the train and val"):
        omniglot.split_by_alphabet(["Greek"], ["Greek"], ["Latin"])
    with pytest.raises(ValueError, match="unknown alphabet 'Klingon' in the test split"):
        omniglot.split_by_alphabet(["Greek"], ["Latin"], ["Klingon"])


def test_character_split_is_disjoint_and_seeded(omniglot: Omniglot) -> None:
    splits = omniglot.split_by_character(num_train=150, num_val=40, seed=0)
    names = [set(s.class_names) for s in splits]
    assert [len(n) for n in names] == [150, 40, 52]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert names[0] | names[1] | names[2] == set(omniglot.class_names)
    again = omniglot.split_by_character(num_train=150, num_val=40, seed=0)
    assert again.train.class_names == splits.train.class_names
    other = omniglot.split_by_character(num_train=150, num_val=40, seed=1)
    assert other.train.class_names != splits.train.class_names
    # Every character split off, none left for testing: allowed, the test split is empty.
    no_test = omniglot.split_by_character(num_train=200, num_val=42)
    assert [s.num_classes for s in no_test] == [200, 42, 0] and len(no_test.test) == 0
    with pytest.raises(ValueError, match="num_train \\+ num_val <= 242"):
        omniglot.split_by_character(num_train=200, num_val=43)
    with pytest.raises(ValueError, match="choose num_train >= 1 and num_val >= 0"):
        omniglot.split_by_character(num_train=0, num_val=10)
    with pytest.raises(ValueError, match="choose num_train >= 1 and num_val >= 0"):
        omniglot.split_by_character(num_train=10, num_val=-1)


def test_character_split_can_train_on_every_character(omniglot: Omniglot) -> None:
    train, val, test = omniglot.split_by_character(num_train=None, num_val=0)
    assert (train.num_classes, val.num_classes, test.num_classes) == (242, 0, 0)
    # Sorted class ids: the training set is the whole dataset, image for image.
    assert train.class_names == omniglot.class_names
    assert torch.equal(train.data, omniglot.data)
    # num_train=None keeps the validation characters out of training, as the default split.
    train, val, test = omniglot.split_by_character(num_train=None, num_val=40, seed=3)
    assert (train.num_classes, val.num_classes, test.num_classes) == (202, 40, 0)
    assert val.class_names == omniglot.split_by_character(202, 40, seed=3).val.class_names
    assert not set(train.class_names) & set(val.class_names)


def test_rotations_add_classes_from_cached_tensors(omniglot: Omniglot) -> None:
    rotated = omniglot.with_rotations()
    assert rotated.num_classes == 4 * omniglot.num_classes == 968
    assert len(rotated) == 4 * len(omniglot)
    base = omniglot.num_classes
    for c in (0, 100, 241):
        original = omniglot.data[omniglot.class_indices[c]]
        for turn in range(4):
            images = rotated.data[rotated.class_indices[turn * base + c]]
            assert torch.equal(images, torch.rot90(original, turn, dims=(-2, -1)))
    assert rotated.class_names[base + 5] == omniglot.class_names[5] + "@rot90"
    assert not torch.equal(rotated.data[rotated.class_indices[base]], omniglot.data[:20])


def test_missing_root_and_sets_are_explained(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        Omniglot(missing)
    message = str(err.value)
    assert f"Omniglot root folder {missing} does not exist" in message
    assert str(missing / "images_background.zip") in message
    assert str(missing / "images_evaluation.zip") in message
    assert "download=True" in message

    tmp_path.joinpath("omniglot").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        Omniglot(tmp_path / "omniglot", sets=["images_background_small1"])
    message = str(err.value)
    assert "lacks some Omniglot sets" in message
    assert "images_background_small1.zip" in message
    assert "copy images_background_small1.zip" in message


def test_corrupt_png_in_zip_is_named(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as archive:
        archive.writestr("images_background/Alpha/character01/0001_01.png", b"not a png")
    with pytest.raises(ValueError, match=r"cannot decode image file .*0001_01\.png"):
        Omniglot(tmp_path, "images_background")


def test_download_verifies_md5_and_writes_atomically(tmp_path: Path) -> None:
    source = tmp_path / "source.zip"
    source.write_bytes(b"omniglot bytes" * 1000)
    good = md5sum(source)
    dest = tmp_path / "out" / "images_background.zip"
    download_file(source.as_uri(), dest, md5=good)
    assert dest.read_bytes() == source.read_bytes()

    bad_dest = tmp_path / "out" / "images_evaluation.zip"
    with pytest.raises(OSError, match="checksum mismatch"):
        download_file(source.as_uri(), bad_dest, md5="0" * 32)
    assert not bad_dest.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images_background.zip"]


def test_public_transform_gives_a_training_image_bit_for_bit(
    omniglot_dir: Path, omniglot: Omniglot, tmp_path: Path
) -> None:
    assert omniglot.transform == OmniglotTransform(28)
    transform = OmniglotTransform(image_size=28)
    with zipfile.ZipFile(omniglot_dir / "images_background_small1.zip") as archive:
        names = sorted(
            n for n in archive.namelist() if "/Greek/character07/" in n and n.endswith(".png")
        )
        assert len(names) == 20
        # The 4th drawer's image: items of a class are in file-name order.
        data = archive.read(names[3])
    index = omniglot.class_indices[omniglot.class_names.index("Greek/character07")][3]
    trained_on = omniglot.fetch(index.reshape(1))[0]
    from_bytes = transform(data)
    assert from_bytes.dtype == torch.float32 and from_bytes.shape == (1, 28, 28)
    assert torch.equal(from_bytes, trained_on)
    path = tmp_path / "new_character.png"
    path.write_bytes(data)
    assert torch.equal(transform(path), trained_on)
    assert torch.equal(transform(str(path)), trained_on)
    with Image.open(path) as image:
        assert torch.equal(transform(image), trained_on)
    assert torch.equal(transform.stack([path, data]), trained_on.expand(2, 1, 28, 28))
    # Another drawer is another tensor: the comparison can fail.
    assert not torch.equal(transform(archive_read(omniglot_dir, names[4])), trained_on)


def archive_read(omniglot_dir: Path, name: str) -> bytes:
    with zipfile.ZipFile(omniglot_dir / "images_background_small1.zip") as archive:
        return archive.read(name)


def test_transform_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"image file {tmp_path / 'nope.png'} does not"):
        OmniglotTransform()(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot decode image file {bad}"):
        OmniglotTransform()(bad)
    with pytest.raises(ValueError, match="channels must be 1 \\(grayscale\\) or 3"):
        ImageTransform(28, channels=2)
    with pytest.raises(ValueError, match="unknown image transform settings \\['size'\\]"):
        ImageTransform.from_config({"size": 28})
    assert ImageTransform.from_config(OmniglotTransform(14).config()) == OmniglotTransform(14)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_zip_is_named_with_what_to_do(
    omniglot_dir: Path, tmp_path: Path, damage: str
) -> None:
    good = (omniglot_dir / "images_background_small1.zip").read_bytes()
    content = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"PK\x03\x04" * 50}
    path = tmp_path / "images_background.zip"
    path.write_bytes(content[damage])
    with pytest.raises(ValueError) as err:
        Omniglot(tmp_path, "images_background")
    message = str(err.value)
    assert "\n" not in message
    assert f"Omniglot zip file {path} is " in message
    assert "Delete it and download it again" in message and "download=True" in message
    if damage == "empty":
        assert "is empty (0 bytes)" in message


def test_zip_damaged_after_its_listing_is_named(omniglot_dir: Path, tmp_path: Path) -> None:
    # The central directory survives, a member's bytes do not: reading that member fails.
    good = bytearray((omniglot_dir / "images_background_small1.zip").read_bytes())
    with zipfile.ZipFile(omniglot_dir / "images_background_small1.zip") as archive:
        info = archive.infolist()[-1]
        while not info.filename.endswith(".png"):
            info = archive.infolist()[archive.infolist().index(info) - 1]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    good[start : start + info.compress_size] = bytes(info.compress_size)
    path = tmp_path / "images_background_small1.zip"
    path.write_bytes(bytes(good))
    with pytest.raises(ValueError, match=f"Omniglot zip file {path} is damaged"):
        Omniglot(tmp_path, "images_background_small1")


def test_data_module_trains_on_every_character_decoding_once(
    omniglot_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metalight.data.omniglot as omniglot_module

    decoded: list[int] = []
    real = omniglot_module.decode_images

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        decoded.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(omniglot_module, "decode_images", counting)
    settings = {"ways": 5, "shots": 1, "queries": 1, "meta_batch_size": 2}
    dm = OmniglotDataModule(
        omniglot_dir,
        sets=[SMALL_SETS[0]],
        num_train_characters=None,
        num_val_characters=0,
        **settings,
    )
    assert dm.split_names() == ("train",)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 5, 1, 28, 28)
    assert dm.datasets is not None and dm.datasets["train"].num_classes == 4 * 136
    assert len(decoded) == 1  # split_names() loaded the data; the loader reused them
    with pytest.raises(ValueError, match="OmniglotDataModule has no test split"):
        dm.test_dataloader()

    # Alphabets: nothing held out for validation, the unlisted alphabets all train.
    by_alphabet = OmniglotDataModule(
        omniglot_dir,
        sets=[SMALL_SETS[0]],
        split="alphabet",
        val_alphabets=[],
        test_alphabets=["Greek"],
        train_rotations=False,
        **settings,
    )
    assert by_alphabet.split_names() == ("train", "test")
    assert by_alphabet.datasets is not None
    assert by_alphabet.datasets["train"].num_classes == 136 - 24
    assert len(decoded) == 2
    with pytest.raises(ValueError, match="num_train_characters must be >= 1 or null"):
        OmniglotDataModule(omniglot_dir, num_train_characters=0)
    with pytest.raises(ValueError, match="split='alphabet' needs val_alphabets and test_"):
        OmniglotDataModule(omniglot_dir, split="alphabet", test_alphabets=[])
