"""Loss functions and loss layers.

Importing this package registers every built-in loss layer type.
"""

from . import simple  # noqa: F401  SigmoidCrossEntropyLoss, EuclideanLoss, MultinomialLogisticLoss, HingeLoss, ContrastiveLoss
from . import infogain  # noqa: F401  SoftmaxWithLoss, InfogainLoss, InfogainLossLegacy
