"""Loss functions and loss layers.

Importing this package registers every built-in loss layer type.
"""

from . import simple  # noqa: F401  SigmoidCrossEntropyLoss, EuclideanLoss, MultinomialLogisticLoss, HingeLoss, ContrastiveLoss
from . import detection  # noqa: F401  SmoothL1Loss, MultiBoxLoss (the detection forks)
from .distillation import (CWTMLoss, DistillationLoss, DKPPLoss, cwtm_loss, distillation_loss,
                           dkpp_loss, permute_non_argmax)
from .distribution import SoftmaxDiffLoss, softmax_diff_loss
from .infogain import (InfogainLossLegacy, SoftmaxWithInfogainLoss, SoftmaxWithLoss,
                       infogain_loss_legacy, softmax_infogain_loss, softmax_loss)
from .sv_softmax import SVSoftmaxLoss, sv_softmax_loss

__all__ = ["CWTMLoss", "DKPPLoss", "DistillationLoss", "InfogainLossLegacy", "SVSoftmaxLoss",
           "SoftmaxDiffLoss", "SoftmaxWithInfogainLoss", "SoftmaxWithLoss", "cwtm_loss",
           "distillation_loss", "dkpp_loss", "infogain_loss_legacy", "permute_non_argmax",
           "softmax_diff_loss", "softmax_infogain_loss", "softmax_loss", "sv_softmax_loss"]
