"""caffelayers: Caffe models in PyTorch and ONNX, exactly.

``caffelayers.Net`` runs a Caffe net in PyTorch, ``caffelayers.layers`` and
``caffelayers.losses`` hold the layer modules, ``caffelayers.proto`` reads and writes Caffe's
files, and ``caffelayers.converters`` emits ONNX and PyTorch source.
"""

from .errors import (CaffeFormatError, CaffeLayersError, LabelError, ShapeError,
                     UnknownLayerError, UnsupportedParameterError)
from .registry import register_emitter, register_layer
from . import layers  # noqa: F401  registers the built-in layer types
from . import losses  # noqa: F401  registers the built-in loss types
from .net import Net
from .solver import Solver

__version__ = "0.1.0"

__all__ = [
    "Net", "Solver", "CaffeFormatError", "CaffeLayersError", "LabelError", "ShapeError", "UnknownLayerError",
    "UnsupportedParameterError", "register_emitter", "register_layer", "__version__",
]
