"""Layer counters a caffemodel misses, kept beside a snapshot in ``PREFIX_iter_N.caffelayers.json``.

Caffe's ``SolverState`` has no field for a layer's own counters (MarginInnerProduct's
iteration, which drives its lambda schedule), so a snapshot writes them to a small JSON file
and a restore reads them back when the file is there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from ..errors import CaffeFormatError
from ..net import Net

__all__ = ["counters_path", "load_layer_counters", "read_counters", "write_counters"]


def counters_path(state_path) -> Path:
    """The counters file beside a ``.solverstate``."""
    return Path(str(state_path).removesuffix(".solverstate") + ".caffelayers.json")


def _counter_buffers(net: Net):
    """``(layer, buffer name, tensor)`` for the layers' state that a caffemodel misses:
    persistent scalar buffers that are not Caffe blobs (MarginInnerProduct's iteration).
    Constants such as InfogainLoss's H come from the prototxt again and are left out."""
    for node in net.graph.nodes:
        module = node.module
        blob_ids = {id(blob) for blob in module.caffe_blobs()}
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.dim() == 0 and id(buffer) not in blob_ids and \
                    name not in module._non_persistent_buffers_set:
                yield node.name, name, buffer


def layer_counters(net: Net) -> Dict[str, Dict[str, object]]:
    counters: Dict[str, Dict[str, object]] = {}
    for layer, name, buffer in _counter_buffers(net):
        counters.setdefault(layer, {})[name] = buffer.detach().cpu().tolist()
    return counters


def read_counters(path: Path, iteration: int) -> Optional[Dict[str, Mapping]]:
    """The per-net counters of a ``.caffelayers.json``, or None when there is none."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        nets = saved["nets"]
    except (ValueError, KeyError, TypeError):
        raise CaffeFormatError("not a caffelayers counters file", path) from None
    if saved.get("iter") != iteration:
        raise CaffeFormatError(f"written at iteration {saved.get('iter')}, the solver state "
                               f"is at {iteration}", path)
    return nets


def load_layer_counters(net: Net, saved: Mapping, path: Path) -> None:
    with torch.no_grad():
        for layer, name, buffer in _counter_buffers(net):
            if layer in saved and name in saved[layer]:
                value = torch.as_tensor(saved[layer][name], dtype=buffer.dtype)
                if value.shape != buffer.shape:
                    raise CaffeFormatError(f"layer {layer!r} {name} has shape "
                                           f"{tuple(value.shape)}, the net's has "
                                           f"{tuple(buffer.shape)}", path)
                buffer.copy_(value)



def write_counters(state_path, iteration: int, nets: Mapping[str, Net]) -> None:
    """Write the counters of ``nets`` (key -> net) beside the solver state ``state_path``."""
    saved = {key: layer_counters(net) for key, net in nets.items()}
    counters_path(state_path).write_text(
        json.dumps({"iter": iteration, "nets": saved}, indent=1) + "\n", encoding="utf-8")
