"""Caffe layer modules, one module per layer type or small family.

Importing this package registers every built-in layer type. Adding a layer touches its own
module and one import line here.
"""

from .base import BuildContext, CaffeLayer
from . import data  # noqa: F401  Input and the data layers
from . import inner_product  # noqa: F401
from . import convolution  # noqa: F401  Convolution, Deconvolution
from . import pooling  # noqa: F401
from . import lrn  # noqa: F401
from . import neuron  # noqa: F401  ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Power, ...
from . import eltwise  # noqa: F401
from . import shape_ops  # noqa: F401  Concat, Slice, Split, Flatten, Reshape, Crop, Tile, ...
from . import reduction  # noqa: F401  Reduction, ArgMax
from . import normalization  # noqa: F401  BatchNorm, MVN
from . import scale_bias  # noqa: F401  Scale, Bias
from . import softmax  # noqa: F401
from . import embed  # noqa: F401
from . import accuracy  # noqa: F401
from . import segmentation, mobile  # noqa: F401  Upsample, Interp, BN; ShuffleChannel, ...
from . import ssd  # noqa: F401  Normalize, Permute, PriorBox, DetectionOutput (the SSD fork)
from . import roi  # noqa: F401  ROIPooling, PSROIPooling, Proposal (Faster R-CNN, R-FCN)
from .margin_inner_product import MarginInnerProduct  # noqa: F401
from .margin_head import MarginHead  # noqa: F401  A-Softmax, AM-Softmax/CosFace, ArcFace, combined

__all__ = ["BuildContext", "CaffeLayer", "MarginHead", "MarginInnerProduct"]
