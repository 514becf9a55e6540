"""One registry from Caffe ``type`` strings to the modules and ONNX emitters that implement them.

The key is Caffe's ``type`` string exactly (``"InnerProduct"``); legacy V1 enum names are
translated by the upgrader, never here. Registering a key twice is an error at import time, so
two modules can never silently shadow each other. Users register their own types from their
own code with the same decorators.
"""

from __future__ import annotations

from typing import Callable, Dict, TypeVar

T = TypeVar("T")

LAYERS: Dict[str, type] = {}
EMITTERS: Dict[str, Callable] = {}


def register_in(table: Dict[str, object], kind: str, type_name: str) -> Callable[[T], T]:
    """The decorator registering ``obj`` in ``table`` under ``type_name``, exactly once."""
    if not isinstance(type_name, str) or not type_name:
        raise TypeError(f"a {kind} is registered under a non-empty Caffe type string, "
                        f"got {type_name!r}")

    def decorate(obj: T) -> T:
        if type_name in table:
            raise ValueError(f"Caffe type {type_name!r} already has a {kind}: "
                             f"{table[type_name]!r}")
        table[type_name] = obj
        if kind == "layer":
            obj.caffe_type = type_name
        return obj

    return decorate


def register_layer(type_name: str) -> Callable[[T], T]:
    """Class decorator: the ``torch.nn.Module`` that runs Caffe layers of ``type_name``."""
    return register_in(LAYERS, "layer", type_name)


def register_emitter(type_name: str) -> Callable[[T], T]:
    """Function decorator: the ONNX emitter for Caffe layers of ``type_name``."""
    return register_in(EMITTERS, "emitter", type_name)


def layer_class(type_name: str):
    """The registered module class for ``type_name``, or None."""
    return LAYERS.get(type_name)
