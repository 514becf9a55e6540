"""What Caffe's loss layers share: ``loss_param`` normalization and ``ignore_label``."""

from __future__ import annotations

from typing import Optional

import torch

NORMALIZATIONS = ("FULL", "VALID", "BATCH_SIZE", "NONE")
#: the softmax losses' modes: the exact loss, or Caffe's floored one
LOSS_MODES = ("exact", "caffe")
#: C's ``FLT_MIN``: SoftmaxWithLoss takes ``log(max(p, FLT_MIN))``, in float and double alike.
FLT_MIN = float(torch.finfo(torch.float32).tiny)


def normalization_from_caffe(loss_param, default: str = "VALID") -> str:
    """``loss_param``'s normalization mode as a name, with Caffe's legacy ``normalize`` field.

    Caffe: when ``normalization`` is not set but the old ``normalize`` bool is, ``true``
    means VALID and ``false`` means BATCH_SIZE; when neither is set, the layer's own default
    applies (VALID for most, BATCH_SIZE for Caffe 1.0's SigmoidCrossEntropyLoss).
    """
    if loss_param is None:
        return default
    if not loss_param.HasField("normalization"):
        if loss_param.HasField("normalize"):
            return "VALID" if loss_param.normalize else "BATCH_SIZE"
        return default
    return NORMALIZATIONS[loss_param.normalization]


def normalizer(mode: str, outer: int, inner: int, valid: Optional[torch.Tensor] = None,
               has_ignore_label: bool = False) -> torch.Tensor | float:
    """The divisor of a Caffe loss: ``max(1, n)``, as Caffe's ``get_normalizer``.

    ``outer`` is the batch size, ``inner`` the number of positions per sample; ``valid`` is
    the count of labels that are not ``ignore_label`` (only used by VALID when an ignore
    label is set, otherwise VALID equals FULL).
    """
    mode = mode.upper()
    if mode == "FULL":
        value = float(outer * inner)
    elif mode == "VALID":
        if has_ignore_label and valid is not None:
            return torch.clamp(valid.to(torch.float64), min=1.0)
        value = float(outer * inner)
    elif mode == "BATCH_SIZE":
        value = float(outer)
    elif mode == "NONE":
        value = 1.0
    else:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")
    return max(1.0, value)
