"""The constructor argument ``adapted=`` (which parameters adapt) and its former name ``adapt=``."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from metalight.algorithms import ANIL, MAML
from metalight.models import MLP


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(hidden=(4,))


def test_adapted_selects_and_is_saved_under_its_name() -> None:
    module = MAML(mlp(), adapted=["head"])
    assert module.adaptable_parameters() == ["head.weight", "head.bias"]
    assert module.hparams["adapted"] == ["head"]
    assert "adapt" not in module.hparams


def test_adapt_is_accepted_as_the_former_name_and_saved_as_adapted() -> None:
    module = MAML(mlp(), adapt="head")
    assert module.adaptable_parameters() == ["head.weight", "head.bias"]
    assert module.hparams["adapted"] == "head"
    assert "adapt" not in module.hparams
    # The same value under both names is one choice (a subclass may pass one, its caller
    # the other).
    assert MAML(mlp(), adapted=["head"], adapt="head").adaptable_parameters() == [
        "head.weight",
        "head.bias",
    ]


def test_two_different_choices_are_refused_in_one_line() -> None:
    with pytest.raises(
        ValueError,
        match=r"^adapted=\['head'\] and adapt=\['features'\] both given: adapt= is the former "
        r"name of adapted=; pass adapted= only$",
    ):
        MAML(mlp(), adapted=["head"], adapt=["features"])


def test_a_pattern_that_matches_nothing_names_the_argument_used() -> None:
    with pytest.raises(ValueError, match=r"^adapted='decoder' matches no trainable parameter"):
        MAML(mlp(), adapted=["decoder"])
    with pytest.raises(ValueError, match=r"^adapt='decoder' matches no trainable parameter"):
        MAML(mlp(), adapt=["decoder"])


@pytest.mark.parametrize("algorithm", [MAML, ANIL])
def test_checkpoints_with_either_name_load(algorithm: type[MAML], tmp_path) -> None:  # type: ignore[no-untyped-def]
    trained = algorithm(mlp(), adapted=["head"]) if algorithm is MAML else algorithm(mlp())
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    for name in ("adapted", "adapt"):
        # A checkpoint saved before the rename holds "adapt" where a new one holds "adapted".
        hyperparameters = dict(trained.hparams)
        hyperparameters[name] = hyperparameters.pop("adapted")
        path = tmp_path / f"{name}.ckpt"
        torch.save(
            {
                "state_dict": trained.state_dict(),
                "hyper_parameters": hyperparameters,
                "pytorch-lightning_version": L.__version__,
            },
            path,
        )
        loaded = algorithm.load_from_checkpoint(path, model=mlp())
        assert loaded.adaptable_parameters() == ["head.weight", "head.bias"]
        assert loaded.hparams["adapted"] == ["head"]
        assert "adapt" not in loaded.hparams
        for (key, want), got in zip(
            trained.state_dict().items(), loaded.state_dict().values(), strict=True
        ):
            assert torch.equal(got, want), key
