"""Runs without held-out data: training on every class skips validation and test."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_only

__all__ = ["skip_absent_splits"]


def skip_absent_splits(components: Any) -> list[str]:
    """Switches off validation when the data have no validation split, and says which of
    ``"val"`` and ``"test"`` the run must skip.

    The data are loaded here (once: the Trainer's ``setup`` reuses them) to learn which
    splits exist. A data module that cannot tell (no ``split_names``) is taken to have all.

    Args:
        components: The run's :class:`~metalight.run.build.Components`.

    Returns:
        The absent held-out splits, among ``["val", "test"]``; a note saying they are
        skipped has been printed (rank 0).

    Example:
        >>> from types import SimpleNamespace
        >>> skip_absent_splits(SimpleNamespace(datamodule=object(), trainer=None))
        []
    """
    split_names = getattr(components.datamodule, "split_names", None)
    if split_names is None:
        return []
    present = set(split_names())
    absent = [split for split in ("val", "test") if split not in present]
    if "val" in absent:
        components.trainer.limit_val_batches = 0
    if absent:
        words = {"val": "validation", "test": "test"}
        skipped = " and ".join(words[s] for s in absent)
        if getattr(rank_zero_only, "rank", 0) == 0:
            print(
                f"metalight: no held-out {skipped} classes in the data: {skipped} skipped",
                flush=True,
            )
    return absent
