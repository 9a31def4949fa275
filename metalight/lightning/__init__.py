"""Lightning integration: the ``MetaLearningModule`` base class."""

from metalight.lightning.finite import NonFiniteError
from metalight.lightning.module import Adaptation, MetaLearningModule

__all__ = ["Adaptation", "MetaLearningModule", "NonFiniteError"]
