"""Meta-learning algorithms, each a small subclass of ``MetaLearningModule``."""

from metalight.algorithms.anil import ANIL
from metalight.algorithms.imaml import IMAML, conjugate_gradient
from metalight.algorithms.maml import FOMAML, MAML
from metalight.algorithms.meta_sgd import MetaSGD
from metalight.algorithms.reptile import Reptile

__all__ = ["ANIL", "FOMAML", "IMAML", "MAML", "MetaSGD", "Reptile", "conjugate_gradient"]
