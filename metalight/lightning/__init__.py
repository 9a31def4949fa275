"""Lightning integration: the ``MetaLearningModule`` base class."""

from metalight.lightning.adaptation import Adaptation
from metalight.lightning.finite import NonFiniteError
from metalight.lightning.module import InnerLR, MetaLearningModule

__all__ = ["Adaptation", "InnerLR", "MetaLearningModule", "NonFiniteError"]
