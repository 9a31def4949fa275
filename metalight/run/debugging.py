"""Debugging aids for ``debug=...`` configs (``configs/debug/``).

Example:
    >>> RepeatFirstMetaBatch().epoch
    0
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from metalight.run.errors import ConfigError

__all__ = ["RepeatFirstMetaBatch"]


class RepeatFirstMetaBatch(Callback):
    """Trains on the same meta-batch at every meta-iteration (``debug=overfit``).

    The episodic training stream draws new tasks in every epoch; this callback sends it back
    to the start of one epoch before each epoch begins, so with one meta-batch per epoch
    (``trainer.limit_train_batches=1``) every step sees exactly the same tasks.

    Args:
        epoch: the epoch whose first meta-batch is repeated.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[RepeatFirstMetaBatch()], logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False)
    """

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = int(epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        stream = getattr(datamodule, "train_stream", None)
        if stream is None:
            raise ConfigError(
                "debug=overfit needs a metalight episodic data module (one with "
                f"train_stream()); {type(datamodule).__name__} has none"
            )
        stream().set_epoch(self.epoch)
