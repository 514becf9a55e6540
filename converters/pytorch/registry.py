"""The table from Caffe ``type`` strings to PyTorch source emitters.

An emitter is a function ``emit(layer)`` that receives a
:class:`~caffelayers.converters.pytorch.source.LayerSource` and writes the layer's
``__init__`` and ``forward`` code through it. The key is Caffe's ``type`` string exactly, as
in :mod:`caffelayers.registry`; registering a key twice fails at import time. Users register
emitters for their own layer types with the same decorator, without touching the generator.
"""

from __future__ import annotations

from typing import Callable, Dict, TypeVar

from caffelayers.registry import register_in

F = TypeVar("F", bound=Callable)

SOURCE_EMITTERS: Dict[str, Callable] = {}


def register_source_emitter(type_name: str) -> Callable[[F], F]:
    """Function decorator: the PyTorch source emitter for Caffe layers of ``type_name``."""
    return register_in(SOURCE_EMITTERS, "PyTorch source emitter", type_name)
