"""The optional packages that reading real data needs (the ``caffelayers[data]`` extra).

``caffelayers`` itself never imports them: a data layer asks for its package when it first
reads, and a missing one is a :class:`MissingExtraError` saying what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import CaffeLayersError

#: import name -> the distribution that provides it (the members of the ``data`` extra).
PACKAGES = {"cv2": "opencv-python-headless", "lmdb": "lmdb", "h5py": "h5py"}

INSTALL_HINT = "pip install 'caffelayers[data]'"


class MissingExtraError(CaffeLayersError):
    """A data layer needs a package of the ``caffelayers[data]`` extra that is not installed."""


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (a key of :data:`PACKAGES`) or raise :class:`MissingExtraError`.

    Args:
        module: the import name, e.g. ``"cv2"``.
        what: who needs it, for the message (``"layer 'data' (ImageData)"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{what} needs the package {PACKAGES.get(module, module)!r} ({error}); it comes "
            f"with the data extra: {INSTALL_HINT}") from None
