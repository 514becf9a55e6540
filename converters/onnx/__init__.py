"""Caffe nets to ONNX, one emitter per Caffe layer type.

``convert_to_onnx(Net(prototxt, caffemodel))`` builds the model with ``onnx.helper`` (no
detour through ``torch.onnx``), reproducing Caffe's numbers where ONNX's operators mean
something else (pooling windows and divisors, LRN, BatchNorm's scale factor, ArgMax ties);
``save_onnx`` writes it, with external data past 2 GiB; ``export_onnx(net, path)`` does both
without a second in-memory copy of the weights. Register an emitter for your own layer
type with ``@caffelayers.register_emitter("Type")`` (see :class:`EmitContext`).
"""

from .core import (DEFAULT_OPSET, MIN_OPSET, UNSUPPORTED, EmitContext, check_convertible,
                   check_model, convert_to_onnx, export_onnx, fixed_size_reason,
                   missing_emitters, output_blobs, save_onnx)
from .sizes import ANY_SIZE  # inputs of any height and width: the table emitters extend
from . import data, elementwise, linear, neuron, normalization, pooling, reduction  # noqa: F401
from . import shape_ops, training  # noqa: F401  (importing the emitter modules registers them)
from .runtime import inference_problem, run_onnx, verify_case_onnx
from . import heads  # noqa: F401  MarginHead, SoftmaxDiffLoss
from . import ssd  # noqa: F401  Normalize, Permute, PriorBox, DetectionOutput (the SSD fork)
from . import forks  # noqa: F401  SegNet, PSPNet, ShuffleNet, MobileNet and SENet layers
from . import roi  # noqa: F401  ROIPooling, PSROIPooling, Proposal (Faster R-CNN, R-FCN)
from . import detection_losses  # noqa: F401  SmoothL1Loss (MultiBoxLoss is in UNSUPPORTED)

__all__ = [
    "ANY_SIZE", "DEFAULT_OPSET", "MIN_OPSET", "UNSUPPORTED", "EmitContext", "check_convertible",
    "check_model", "convert_to_onnx", "export_onnx", "fixed_size_reason", "inference_problem",
    "missing_emitters", "output_blobs", "run_onnx", "save_onnx", "verify_case_onnx",
]
