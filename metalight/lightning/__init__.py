"""Lightning integration: the ``MetaLearningModule`` base class."""

from metalight.lightning.module import Adaptation, MetaLearningModule, NonFiniteError

__all__ = ["Adaptation", "MetaLearningModule", "NonFiniteError"]
