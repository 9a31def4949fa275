"""Using a meta-trained model: ``metalight.load``, ``metalight eval data=episodes`` and
``metalight predict``, on a tiny real Omniglot training run with no held-out split."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

import metalight
from metalight.cli import main
from metalight.data import EpisodesDataModule, FixedEpisodes, OmniglotTransform
from metalight.inference import adapt, find_checkpoint, predict_logits
from metalight.lightning.module import MetaLearningModule
from metalight.run import (
    build_datamodule,
    build_module,
    config_dir,
    register_recipes,
    register_resolvers,
    train,
)
from metalight.run.episodes_eval import score_episodes
from metalight.run.predict import predict_folders
from tests.data.test_episodes import character_images, make_episodes

REPO = Path(__file__).resolve().parents[1]


class KeepModule(Callback):
    """Keeps the trained module of the run, to compare with what is loaded later."""

    kept: ClassVar[list[MetaLearningModule]] = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, MetaLearningModule)
        KeepModule.kept.append(pl_module)


@pytest.fixture(scope="module")
def omniglot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="module")
def trained(
    omniglot_dir: Path, omniglot_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, MetaLearningModule, dict[str, Any], str]:
    """A tiny real run on every class of six alphabets (no validation, no test):
    (its run directory, the module as training left it, its results, its output)."""
    run_dir = tmp_path_factory.mktemp("inference") / "run"
    register_resolvers()
    register_recipes()
    overrides = [
        "+recipe=omniglot_maml_5w1s",
        f"data.root={omniglot_dir}",
        f"data.cache_dir={omniglot_cache}",
        "data.val_alphabets=[]",
        "data.test_alphabets=[]",
        "trainer.limit_val_batches=null",  # the data alone must switch validation off
        "model.hidden=8",
        "trainer.max_steps=2",
        "data.meta_batch_size=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=none",
        "num_threads=1",
        f"paths.run_dir={run_dir}",
        "+callbacks.keep._target_=tests.test_inference.KeepModule",
    ]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    KeepModule.kept.clear()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = train(cfg)
    (module,) = KeepModule.kept
    module.eval()
    return run_dir, module, results, printed.getvalue()


def test_training_on_every_class_skips_validation_and_test(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
) -> None:
    run_dir, _, results, output = trained
    assert results["steps"] == 2 and results["metrics"] == {}
    assert results["skipped_splits"] == ["val", "test"]
    assert "no held-out validation and test classes in the data: validation and test skipped" in (
        output
    )
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_load_restores_module_transform_and_settings(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
) -> None:
    run_dir, module, _, _ = trained
    for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "last.ckpt"):
        assert find_checkpoint(path) == run_dir / "checkpoints" / "last.ckpt"
    loaded = metalight.load(run_dir)
    assert loaded.transform == OmniglotTransform(28)
    assert loaded.run_dir == run_dir and not loaded.module.training
    restored = loaded.module
    assert type(restored) is type(module)
    assert restored.eval_inner_steps == module.eval_inner_steps == 3
    assert restored.inner_steps == 1 and restored.policy == module.policy
    assert type(restored.inner_optimizer) is torch.optim.SGD
    assert restored.inner_optimizer.param_groups[0]["lr"] == 0.4
    own = module.state_dict()
    assert restored.state_dict().keys() == own.keys()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, own[key]), key
    # Another module's weights differ: the comparison above can fail.
    fresh = build_module(loaded.config).state_dict()
    assert not all(torch.equal(fresh[key], value) for key, value in own.items())
    overridden = metalight.load(run_dir, overrides=["algorithm.eval_inner_steps=7"])
    assert overridden.module.eval_inner_steps == 7
    with pytest.raises(FileNotFoundError, match=f"{run_dir.parent / 'nope'} does not exist"):
        metalight.load(run_dir.parent / "nope")


FRESH_PROCESS = """
import sys, torch
torch.set_num_threads(1)
import metalight
trained = metalight.load(sys.argv[1])
support = trained.read_folder(sys.argv[2])
query = trained.read_images(sorted(__import__("pathlib").Path(sys.argv[3]).rglob("*.png")))
adaptation = trained.adapt(support.x, support.y)
torch.save({"logits": metalight.inference.predict_logits(adaptation, query),
            "labels": trained.predict_labels(adaptation, query),
            "classes": support.class_names}, sys.argv[4])
"""


def test_load_adapt_predict_in_a_fresh_process_equals_the_trained_module(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
) -> None:
    run_dir, module, _, _ = trained
    episodes = make_episodes(omniglot_dir, tmp_path / "episodes")
    support, query = episodes / "episode_00" / "support", episodes / "episode_00" / "query"
    out = tmp_path / "fresh.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(run_dir), str(support), str(query), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = torch.load(out, weights_only=True)

    # In memory: the module as training left it, the images through the dataset transform.
    transform = OmniglotTransform(28)
    names = sorted(p.name for p in support.iterdir())
    support_files = [f for n in names for f in sorted((support / n).iterdir())]
    x = transform.stack(support_files)
    y = torch.tensor([names.index(f.parent.name) for f in support_files])
    queries = sorted(query.rglob("*.png"))
    logits = predict_logits(adapt(module, x, y), transform.stack(queries))
    assert fresh["classes"] == names
    assert torch.equal(fresh["logits"], logits)
    assert fresh["labels"] == logits.argmax(-1).tolist()
    # Adaptation changed the predictions: the logits compared are the adapted ones.
    unadapted = predict_logits(adapt(module, x, y, steps=0), transform.stack(queries))
    assert not torch.equal(logits, unadapted)


def _eval_dirs(run_dir: Path) -> set[Path]:
    parent = run_dir / "eval"
    return set(parent.iterdir()) if parent.is_dir() else set()


def _new_eval_dir(run_dir: Path, before: set[Path]) -> Path:
    """The evaluation directory written since ``before`` (tests share the run)."""
    (new,) = _eval_dirs(run_dir) - before
    return new


def test_eval_scores_each_episode_as_adapting_by_hand(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _, _, _ = trained
    root = make_episodes(omniglot_dir, tmp_path / "episodes")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    before = _eval_dirs(run_dir)
    assert main(["eval", f"ckpt_path={ckpt}", "data=episodes", f"data.root={root}"]) == 0
    out = capsys.readouterr().out
    eval_dir = _new_eval_dir(run_dir, before)
    results = json.loads((eval_dir / "results.json").read_text())
    scores = results["episodes"]
    assert [s["episode"] for s in scores] == ["episode_00", "episode_01", "episode_02"]
    assert [(s["ways"], s["support_images"], s["query_images"]) for s in scores] == [
        (5, 5, 10),
        (3, 6, 9),
        (4, 4, 4),
    ]

    # By hand through the public API: read each episode's folders, adapt, count hits.
    loaded = metalight.load(ckpt)
    by_hand = []
    for name in ("episode_00", "episode_01", "episode_02"):
        support = loaded.read_folder(root / name / "support")
        query = loaded.read_folder(root / name / "query")
        adaptation = loaded.adapt(support.x, support.y)
        hits = torch.tensor(loaded.predict_labels(adaptation, query.x)) == query.y
        by_hand.append(hits.double().mean().item())
    assert [s["accuracy"] for s in scores] == by_hand
    assert not any(s["diverged"] for s in scores) and results["diverged_episodes"] == 0
    mean = sum(by_hand) / 3
    std = (sum((a - mean) ** 2 for a in by_hand) / 2) ** 0.5
    assert results["metrics"]["test/acc_post"] == pytest.approx(mean, abs=1e-12)
    assert results["metrics"]["test/acc_post_ci95"] == pytest.approx(1.96 * std / 3**0.5)
    assert results["metrics"]["test/episodes"] == 3
    assert f"after 3 steps {100 * mean:.2f}% ± " in out and "(95% CI over 3 tasks)" in out
    for name, accuracy in zip(("episode_00", "episode_01", "episode_02"), by_hand, strict=True):
        assert f"{name}  {100 * accuracy:>7.2f}%" in out

    # The module's own test loop over the same data module agrees on the mean.
    dm = EpisodesDataModule(root, transform=loaded.transform)
    tester = L.Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        (metrics,) = tester.test(loaded.module, datamodule=dm, verbose=False)
    assert metrics["test/acc_post"] == pytest.approx(mean, abs=1e-6)


def test_eval_counts_diverged_episodes(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _, _, _ = trained
    root = make_episodes(omniglot_dir, tmp_path / "episodes")
    monkeypatch.chdir(tmp_path)
    argv = [
        "eval",
        f"ckpt_path={run_dir}/checkpoints/last.ckpt",
        "data=episodes",
        f"data.root={root}",
        "algorithm.inner_optim.lr=1e30",  # an inner step this large overflows
    ]
    before = _eval_dirs(run_dir)
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((_new_eval_dir(run_dir, before) / "results.json").read_text())
    assert results["diverged_episodes"] == 3 and results["metrics"] == {}
    assert all(s["diverged"] and s["accuracy"] is None for s in results["episodes"])
    assert "non-finite" in results["episodes"][0]["error"]
    assert "diverged  3 of 3 episodes" in out


def test_predict_classifies_each_query_image_from_one_example_per_class(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _, _, _ = trained
    support, query = tmp_path / "support", tmp_path / "query"
    for character in ("character01", "character02", "character03", "character04", "character05"):
        images = character_images(omniglot_dir, "Latin", character)
        (support / character).mkdir(parents=True)
        (support / character / "example.png").write_bytes(images[0])
        (query / character).mkdir(parents=True)
        for k in (1, 2):
            (query / character / f"{k}.png").write_bytes(images[k])
    output = tmp_path / "out" / "predictions.csv"
    monkeypatch.chdir(tmp_path)
    argv = ["predict", f"ckpt_path={run_dir}", f"support={support}", f"query={query}"]
    assert main([*argv, f"output={output}"]) == 0
    printed = capsys.readouterr().out
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    files = sorted(query.rglob("*.png"))
    assert [Path(r["image"]) for r in rows] == files

    loaded = metalight.load(run_dir)
    folder = loaded.read_folder(support)
    labels = loaded.predict_labels(loaded.adapt(folder.x, folder.y), loaded.read_images(files))
    assert [r["predicted_class"] for r in rows] == [folder.class_names[i] for i in labels]
    for row in rows:
        assert f"{row['image']}  {row['predicted_class']}  (" in printed
    assert f"written to {output}" in printed


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["predict", "ckpt_path=CKPT", "support=SUPPORT"], "predict needs query=..."),
        (["predict", "ckpt_path=CKPT", "support=SUPPORT", "query=NOPE"], "query=NOPE does not"),
        (["eval", "ckpt_path=CKPT", "data=episodes"], "data.root is not set: data=episodes"),
        (
            ["eval", "ckpt_path=CKPT", "data=episodes", "data.root=NOPE"],
            "episodes folder NOPE does not exist",
        ),
    ],
)
def test_bad_input_gets_one_line(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    expected: str,
) -> None:
    run_dir, _, _, _ = trained
    support = tmp_path / "support" / "a"
    support.mkdir(parents=True)
    (support / "x.png").write_bytes(character_images(omniglot_dir, "Greek", "character01")[0])
    names = {"CKPT": str(run_dir), "SUPPORT": str(tmp_path / "support"), "NOPE": "nope"}
    for key, value in names.items():
        argv = [a.replace(key, value) for a in argv]
        expected = expected.replace(key, value)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_the_guide_python_example_runs_on_a_trained_run(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _, _, _ = trained
    guide = (REPO / "docs" / "using-a-trained-model.md").read_text()
    (source,) = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    new = tmp_path / "new_characters"
    for k, character in enumerate(("character01", "character02", "character03")):
        images = character_images(omniglot_dir, "Greek", character)
        (new / "support" / character).mkdir(parents=True)
        (new / "support" / character / "1.png").write_bytes(images[0])
        (new / "query").mkdir(exist_ok=True)
        (new / "query" / f"{k}.png").write_bytes(images[1])
    source = source.replace('"runs/RUN"', repr(str(run_dir)))
    source = source.replace('"new_characters/', f'"{new}/')
    namespace: dict[str, Any] = {}
    exec(compile(source, "using-a-trained-model.md", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "OmniglotTransform(image_size=28, channels=1, invert=True)"
    assert [line.split()[0] for line in lines[1:]] == ["0.png", "1.png", "2.png"]
    assert all(line.split()[1].startswith("character0") for line in lines[1:])
    assert namespace["query"].shape == (3, 1, 28, 28)


def test_the_guide_train_on_every_class_overrides_hold_nothing_out(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    omniglot_cache: Path,
) -> None:
    guide = (REPO / "docs" / "using-a-trained-model.md").read_text()
    assert "data.train_alphabets=null data.test_alphabets=[]" in guide
    register_resolvers()
    register_recipes()
    overrides = [
        "+recipe=omniglot_maml_5w1s",
        f"data.root={omniglot_dir}",
        "data.train_alphabets=null",
        "data.test_alphabets=[]",
        f"data.cache_dir={omniglot_cache}",  # decoded once already, by the trained run
    ]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    dm = build_datamodule(cfg)
    assert dm.split_names() == ("train",)
    assert dm.datasets["train"].num_classes == 4 * 242  # every character, with rotations


def test_more_classes_than_the_model_has_outputs_is_refused_in_one_line(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _, _, _ = trained
    six = [f"character{c:02d}" for c in range(1, 7)]
    root = make_episodes(omniglot_dir, tmp_path / "episodes", [("Greek", six, 1, 1)])
    monkeypatch.chdir(tmp_path)
    argv = ["eval", f"ckpt_path={run_dir}", "data=episodes", f"data.root={root}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"episode {root / 'episode_00'} has 6 classes but the model has 5 outputs" in err
    support, query = root / "episode_00" / "support", root / "episode_00" / "query"
    assert main(["predict", f"ckpt_path={run_dir}", f"support={support}", f"query={query}"]) == 2
    err = capsys.readouterr().err
    assert f"support folder {support} has 6 classes but the model has 5 outputs" in err
    assert len(err.strip().splitlines()) == 1

    assert main(["predict", "--help"]) == 0
    assert "support=DIR" in capsys.readouterr().out
    assert main(["eval", "--help"]) == 0
    assert "data=episodes data.root=DIR" in capsys.readouterr().out


def test_a_run_without_last_ckpt_says_what_it_holds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    # An interrupted run, or one whose checkpoint was deleted: no checkpoint at all.
    with pytest.raises(FileNotFoundError, match=r"holds no last\.ckpt .*: the run saved no ch"):
        find_checkpoint(run)
    # Its last.ckpt deleted, other checkpoints beside it: they are named, not guessed among.
    for name in ("step=4.ckpt", "step=2.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as info:
        find_checkpoint(run)
    message = str(info.value)
    assert "\n" not in message
    assert "but it holds step=2.ckpt, step=4.ckpt: give one of them, e.g. " in message
    assert message.endswith(f"{run / 'checkpoints' / 'step=4.ckpt'}.")
    # A folder that is no run at all gets the general hint.
    with pytest.raises(FileNotFoundError, match=r"give a run directory \(runs/RUN\)"):
        find_checkpoint(tmp_path)


def test_predict_with_fewer_classes_than_outputs_chooses_among_them(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
) -> None:
    # The run is 5-way; the support folder has 2 classes, named like numbers ("10" sorts
    # before "2": labels follow the sorted names, and the names come back as given).
    run_dir, _, _, _ = trained
    support, query = tmp_path / "support", tmp_path / "query"
    for name, character in (("2", "character01"), ("10", "character02")):
        images = character_images(omniglot_dir, "Latin", character)
        (support / name).mkdir(parents=True)
        (support / name / "example.png").write_bytes(images[0])
        query.mkdir(exist_ok=True)
        for k in (1, 2, 3):
            (query / f"{name}_{k}.png").write_bytes(images[k])
    loaded = metalight.load(run_dir)
    predictions = predict_folders(loaded, support, query)
    folder = loaded.read_folder(support)
    assert folder.class_names == ["10", "2"]
    files = sorted(query.glob("*.png"))
    logits = predict_logits(loaded.adapt(folder.x, folder.y), loaded.read_images(files))
    want = logits[:, :2].double().softmax(-1)
    assert [p.image for p in predictions] == files
    for p, row in zip(predictions, want, strict=True):
        assert p.class_name == folder.class_names[p.label]
        assert p.probability == pytest.approx(float(row.max()), abs=1e-12)
        assert p.label == int(row.argmax())
    # The Python API agrees: no label beyond the support set's two.
    labels = loaded.predict_labels(loaded.adapt(folder.x, folder.y), loaded.read_images(files))
    assert labels == [p.label for p in predictions]


def test_episode_scores_choose_among_the_episodes_classes(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
) -> None:
    # A 5-way model whose last output is pushed far up: scored over all five outputs, the
    # 3- and 4-way episodes would get every query wrong (label 4 names no class of theirs).
    run_dir, _, _, _ = trained
    loaded = metalight.load(run_dir)
    name, bias = [(n, p) for n, p in loaded.module.model.named_parameters() if n.endswith("bias")][
        -1
    ]
    assert bias.shape == (5,), name
    with torch.no_grad():
        bias[4] += 1000.0
    root = make_episodes(omniglot_dir, tmp_path / "episodes")
    episodes = FixedEpisodes(root, loaded.transform)
    scores = score_episodes(loaded.module, episodes)
    assert [s.ways for s in scores] == [5, 3, 4]
    by_hand = []
    for task in episodes:
        adaptation = loaded.adapt(task.support_x, task.support_y)
        logits = predict_logits(adaptation, task.query_x)
        if len(task.info) < 5:
            assert bool((logits.argmax(-1) == 4).all())  # what the scores must not count
        labels = torch.tensor(loaded.predict_labels(adaptation, task.query_x))
        by_hand.append((labels == task.query_y).double().mean().item())
    assert [s.accuracy for s in scores] == by_hand
    assert scores[1].accuracy > 0 and scores[2].accuracy > 0


def test_load_refuses_a_run_whose_module_does_not_adapt(tmp_path: Path) -> None:
    # A bilevel run (learned inner learning rate): its config builds no MetaLearningModule.
    # The refusal comes before the checkpoint is read, so an empty one shows it.
    from omegaconf import OmegaConf

    from metalight.run.errors import ConfigError

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    register_resolvers()
    register_recipes()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["+recipe=hyper_lr", f"paths.run_dir={run}"])
    OmegaConf.save(cfg, run / "config.yaml")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"which does not adapt to support sets: metalight\.lo"):
        metalight.load(run)


def test_load_with_a_model_that_does_not_fit_is_one_line(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
) -> None:
    from metalight.run.errors import ConfigError

    run_dir, _, _, _ = trained
    with pytest.raises(ConfigError) as info:
        metalight.load(run_dir, overrides=["model.hidden=16"])
    message = str(info.value)
    assert "\n" not in message
    assert "do not fit the model of its run's config.yaml" in message
    assert "size mismatch for model." in message and "Build the module with the" in message


def test_images_the_model_cannot_read_are_refused_in_one_line(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
) -> None:
    # A transform that keeps sizes (image_size=null) hands the 28x28-trained model Omniglot's
    # 105x105 drawings; its error deep inside becomes one line that says what to do.
    run_dir, _, _, _ = trained
    loaded = metalight.load(run_dir)
    loaded.transform = OmniglotTransform(image_size=None)
    support, query = tmp_path / "support", tmp_path / "query"
    images = character_images(omniglot_dir, "Latin", "character01")
    (support / "a").mkdir(parents=True)
    (support / "a" / "0.png").write_bytes(images[0])
    query.mkdir()
    (query / "1.png").write_bytes(images[1])
    with pytest.raises(ValueError) as info:
        predict_folders(loaded, support, query)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the model cannot read the inputs of support folder {support} ")
    assert "(shape [1, 105, 105])" in message and "set the data's image_size" in message


def test_query_images_of_another_size_than_the_support_are_refused(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str],
    omniglot_dir: Path,
    tmp_path: Path,
) -> None:
    from PIL import Image

    run_dir, _, _, _ = trained
    loaded = metalight.load(run_dir)
    loaded.transform = OmniglotTransform(image_size=None)
    support, query = tmp_path / "support", tmp_path / "query"
    images = character_images(omniglot_dir, "Latin", "character01")
    (support / "a").mkdir(parents=True)
    (query).mkdir()
    (query / "1.png").write_bytes(images[1])  # 105x105
    with Image.open(io.BytesIO(images[0])) as drawing:
        drawing.resize((28, 28)).save(support / "a" / "0.png")  # the size the model reads
    with pytest.raises(ValueError) as info:
        predict_folders(loaded, support, query)
    assert str(info.value) == (
        "the query images have shape [1, 105, 105] but the support images [1, 28, 28]; give "
        "images of one size (for a run that keeps image sizes, resize them as the training "
        "images were)."
    )


def test_load_verifies_the_checkpoint_it_reads(
    trained: tuple[Path, MetaLearningModule, dict[str, Any], str], tmp_path: Path
) -> None:
    # One flipped bit in a stored tensor: torch.load would return a changed weight; load()
    # reads through the command's loader, which checks every member's CRC.
    import shutil
    import zipfile

    from metalight.run.errors import ConfigError

    run_dir, _, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "checkpoints" / "last.ckpt"
    source = run_dir / "checkpoints" / "last.ckpt"
    blob = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    extra = int.from_bytes(blob[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + extra
    blob[start + 3] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ConfigError) as err:
        metalight.load(copy)
    message = str(err.value)
    assert "\n" not in message
    assert "fails its CRC" in message, message
