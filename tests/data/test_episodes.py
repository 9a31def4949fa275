"""Fixed episodes stored as folders, built from real held-out Omniglot alphabets."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from metalight.data import (
    EpisodesDataModule,
    FixedEpisodes,
    Omniglot,
    OmniglotTransform,
    TaskBatch,
    read_class_folders,
)

SET = "images_background_small1"
# (alphabet, characters, support images per class, query images per class) per episode.
EPISODES = [
    ("Greek", ("character01", "character02", "character03", "character04", "character05"), 1, 2),
    ("Greek", ("character10", "character11", "character12"), 2, 3),
    ("Early_Aramaic", ("character01", "character03", "character05", "character07"), 1, 1),
]


def character_images(omniglot_dir: Path, alphabet: str, character: str) -> list[bytes]:
    """The 20 drawings of one character, in file-name order (the dataset's order)."""
    with zipfile.ZipFile(omniglot_dir / f"{SET}.zip") as archive:
        names = sorted(
            n for n in archive.namelist() if f"/{alphabet}/{character}/" in n and n.endswith(".png")
        )
        return [archive.read(n) for n in names]


def make_episodes(
    omniglot_dir: Path,
    root: Path,
    episodes: Sequence[tuple[str, Sequence[str], int, int]] = EPISODES,
) -> Path:
    """Writes ``root/episode_<i>/{support,query}/<alphabet>_<character>/<k>.png``.

    Support images are the first drawings of each character, query images the next ones.
    """
    for index, (alphabet, characters, shots, queries) in enumerate(episodes):
        episode = root / f"episode_{index:02d}"
        for character in characters:
            images = character_images(omniglot_dir, alphabet, character)
            name = f"{alphabet}_{character}"
            for part, chosen in (
                ("support", images[:shots]),
                ("query", images[shots : shots + queries]),
            ):
                folder = episode / part / name
                folder.mkdir(parents=True, exist_ok=True)
                for k, data in enumerate(chosen):
                    (folder / f"{k:02d}.png").write_bytes(data)
    return root


def test_episodes_are_tasks_of_the_training_images(
    omniglot_dir: Path, omniglot: Omniglot, tmp_path: Path
) -> None:
    root = make_episodes(omniglot_dir, tmp_path / "episodes")
    episodes = FixedEpisodes(root, OmniglotTransform(28))
    assert len(episodes) == 3 and episodes.names == ["episode_00", "episode_01", "episode_02"]
    for task, (alphabet, characters, shots, queries), names in zip(
        episodes, EPISODES, episodes.class_names, strict=True
    ):
        ways = len(characters)
        assert names == sorted(f"{alphabet}_{c}" for c in characters)
        assert task.support_x.shape == (ways * shots, 1, 28, 28)
        assert task.query_x.shape == (ways * queries, 1, 28, 28)
        assert task.support_y.tolist() == [w for w in range(ways) for _ in range(shots)]
        assert task.query_y.tolist() == [w for w in range(ways) for _ in range(queries)]
        assert task.info.tolist() == list(range(ways))
        # Bit for bit the images the dataset trains on: the same drawers of each character.
        for way, name in enumerate(names):
            cls = omniglot.class_names.index(name.replace("_character", "/character"))
            drawings = omniglot.fetch(omniglot.class_indices[cls])
            assert torch.equal(task.support_x[way * shots : (way + 1) * shots], drawings[:shots])
            query = task.query_x[way * queries : (way + 1) * queries]
            assert torch.equal(query, drawings[shots : shots + queries])
    assert episodes.support_files[0][0] == (
        root / "episode_00" / "support" / "Greek_character01" / "00.png"
    )


def test_datamodule_serves_each_episode_in_folder_order(omniglot_dir: Path, tmp_path: Path) -> None:
    root = make_episodes(omniglot_dir, tmp_path / "episodes")
    dm = EpisodesDataModule(root, image_size=28, channels=1, invert=True)
    assert dm.transform == OmniglotTransform(28) and dm.split_names() == ("test",)
    batches = list(dm.test_dataloader())
    expected = FixedEpisodes(root, OmniglotTransform(28))
    assert len(batches) == 3
    for batch, task in zip(batches, expected, strict=True):
        assert isinstance(batch, TaskBatch) and len(batch) == 1
        assert torch.equal(batch.support_x[0], task.support_x)
        assert torch.equal(batch.query_y[0], task.query_y)
    with pytest.raises(ValueError, match="EpisodesDataModule holds fixed test episodes only"):
        dm.train_dataloader()


def write_png(path: Path, size: tuple[int, int] = (20, 20), value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def small_episode(root: Path, name: str = "ep") -> Path:
    for part in ("support", "query"):
        for cls in ("a", "b"):
            write_png(root / name / part / cls / "0.png")
    return root


def one_line_error(root: Path, transform: OmniglotTransform | None = None) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        FixedEpisodes(root, transform or OmniglotTransform(8))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_folders_each_get_one_line_naming_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"episodes folder {empty} holds no episodes" in one_line_error(empty)
    assert f"episodes folder {tmp_path / 'nope'} does not exist" in one_line_error(
        tmp_path / "nope"
    )

    root = small_episode(tmp_path / "query_class")
    write_png(root / "ep" / "query" / "c" / "0.png")
    message = one_line_error(root)
    assert f"class folder {root / 'ep' / 'query' / 'c'} has no match" in message
    assert "a query class must have a support folder of the same name" in message

    root = small_episode(tmp_path / "empty_class")
    (root / "ep" / "support" / "c").mkdir()
    assert f"class folder {root / 'ep' / 'support' / 'c'} is empty" in one_line_error(root)

    root = small_episode(tmp_path / "sizes")
    write_png(root / "ep" / "query" / "b" / "1.png", size=(30, 20))
    message = one_line_error(root, OmniglotTransform(image_size=None))
    assert f"image {root / 'ep' / 'query' / 'b' / '1.png'} has shape (1, 20, 30)" in message
    root = small_episode(tmp_path / "sizes_across")
    for cls in ("a", "b"):
        write_png(root / "ep" / "query" / cls / "0.png", size=(30, 20))
    message = one_line_error(root, OmniglotTransform(image_size=None))
    assert f"episode {root / 'ep'}: support image" in message and "(1, 20, 30)" in message
    # With an image_size every image is resized: the same folder then reads.
    assert len(FixedEpisodes(root, OmniglotTransform(8))) == 1

    root = small_episode(tmp_path / "not_image")
    notes = root / "ep" / "support" / "a" / "notes.txt"
    notes.write_text("drawn by hand")
    assert f"{notes} is not an image file" in one_line_error(root)
    notes.unlink()
    (root / "ep" / "support" / "a" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored
    corrupt = root / "ep" / "query" / "b" / "1.png"
    corrupt.write_bytes(b"not a png")
    assert f"cannot decode image file {corrupt}" in one_line_error(root)
    corrupt.unlink()
    assert len(FixedEpisodes(root, OmniglotTransform(8))) == 1

    root = small_episode(tmp_path / "no_query")
    for path in sorted((root / "ep" / "query").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "ep" / "query").rmdir()
    assert f"episode {root / 'ep'} has no query/ folder" in one_line_error(root)

    root = small_episode(tmp_path / "loose_file")
    write_png(root / "ep" / "support" / "0.png")
    message = one_line_error(root)
    assert f"{root / 'ep' / 'support' / '0.png'} is a file beside the class folders" in message


def test_read_class_folders_labels_by_sorted_name(tmp_path: Path) -> None:
    for cls, value in (("zeta", 255), ("alpha", 0)):
        for k in range(2):
            write_png(tmp_path / "support" / cls / f"{k}.png", value=value)
    folder = read_class_folders(tmp_path / "support", OmniglotTransform(8))
    assert folder.class_names == ["alpha", "zeta"]
    assert folder.y.tolist() == [0, 0, 1, 1]
    # Inverted: a black page is all strokes (1), a white one all background (0).
    assert folder.x[:2].eq(1).all() and folder.x[2:].eq(0).all()
