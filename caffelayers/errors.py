"""The errors caffelayers raises for bad input.

Every error a user can cause is a :class:`CaffeLayersError`; the CLI turns these into one
``error: ...`` line and exit status 2. Anything else escaping is a bug in caffelayers and is
left as a traceback so that it gets reported.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class CaffeLayersError(Exception):
    """Root of every error caused by the user's input."""


class CaffeFormatError(CaffeLayersError):
    """A file that is not what it claims to be: malformed text, a truncated protobuf.

    ``path``, ``line`` and ``column`` (1-based) locate the problem where known; the message
    already names them, the attributes are for programs.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 column: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.column = column
        self.detail = message
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = self.path or "<input>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.detail}"


class UnknownLayerError(CaffeLayersError):
    """The net uses layer types with no registered implementation; all are listed at once.

    ``layers`` is a list of ``(name, type)`` pairs in net order.
    """

    def __init__(self, layers: Sequence[tuple[str, str]], what: str = "module",
                 how: str = 'register one with @caffelayers.register_layer("TYPE")'):
        self.layers = list(layers)
        listing = ", ".join(f"{name!r} ({type_})" for name, type_ in self.layers)
        count = len(self.layers)
        noun = "layer has" if count == 1 else "layers have"
        super().__init__(f"{count} {noun} no {what}: {listing}; {how}")


class UnsupportedParameterError(CaffeLayersError):
    """A known layer type with a parameter value we cannot honour (named, with what is allowed)."""


class LabelError(CaffeLayersError, ValueError):
    """A label (or index) outside ``[0, C)`` that is not the ignore label."""


class ShapeError(CaffeLayersError):
    """Bottom shapes that a layer's shape rule rejects; names the layer and what it expected."""

    def __init__(self, layer: str, layer_type: str, bottom_shapes: Iterable, expected: str):
        self.layer = layer
        self.layer_type = layer_type
        self.bottom_shapes = [None if s is None else tuple(s) for s in bottom_shapes]
        shapes = ", ".join(shape_text(s) for s in self.bottom_shapes)
        super().__init__(f"layer {layer!r} ({layer_type}): bottom shapes [{shapes}] do not fit: "
                         f"{expected}")


def shape_text(shape) -> str:
    """A shape as messages write it: ``2x3x7x5``, ``scalar`` for no axes, ``?`` unknown."""
    return "?" if shape is None else "x".join(map(str, shape)) or "scalar"


def nearest_name(name: str, candidates: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix for a misspelt name, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
