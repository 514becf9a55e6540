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



def _version() -> str:
    """The installed distribution's version; in a checkout that is not installed, the one
    ``pyproject.toml`` declares (the single place it is written)."""
    from importlib import metadata

    try:
        return metadata.version("caffelayers")
    except metadata.PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) \
            if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


__version__ = _version()

__all__ = [
    "Net", "Solver", "CaffeFormatError", "CaffeLayersError", "LabelError", "ShapeError", "UnknownLayerError",
    "UnsupportedParameterError", "register_emitter", "register_layer", "__version__",
]
