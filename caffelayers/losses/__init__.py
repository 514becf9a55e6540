"""Loss functions and loss layers.

Importing this package registers every built-in loss layer type.
"""

from . import simple  # noqa: F401  SigmoidCrossEntropyLoss, EuclideanLoss, MultinomialLogisticLoss, HingeLoss, ContrastiveLoss
from .infogain import (InfogainLossLegacy, SoftmaxWithInfogainLoss, SoftmaxWithLoss,
                       infogain_loss_legacy, softmax_infogain_loss, softmax_loss)

__all__ = ["InfogainLossLegacy", "SoftmaxWithInfogainLoss", "SoftmaxWithLoss",
           "infogain_loss_legacy", "softmax_infogain_loss", "softmax_loss"]
