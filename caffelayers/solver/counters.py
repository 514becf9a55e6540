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
    """The per-net counters of a ``.caffelayers.json`` (``{net: {layer: {name: number}}}``),
    or None when there is none. Anything else in the file is refused, naming the file."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise CaffeFormatError(f"not a caffelayers counters file ({error})", path) from None
    nets = saved.get("nets") if isinstance(saved, dict) else None
    if not isinstance(nets, dict) or not all(
            isinstance(layers, dict) and all(isinstance(values, dict) for values in layers.values())
            for layers in nets.values()):
        raise CaffeFormatError("not a caffelayers counters file: expected {\"iter\": N, "
                               "\"nets\": {net: {layer: {counter: number}}}}", path)
    if saved.get("iter") != iteration:
        raise CaffeFormatError(f"written at iteration {saved.get('iter')!r:.40}, the solver "
                               f"state is at {iteration}", path)
    return nets


def load_layer_counters(net: Net, saved: Mapping, path: Path) -> None:
    """Set each counter buffer of ``net`` that ``saved`` holds, after checking that the value
    is one number that the buffer's dtype can hold."""
    with torch.no_grad():
        for layer, name, buffer in _counter_buffers(net):
            if layer not in saved or name not in saved[layer]:
                continue
            value = saved[layer][name]
            limits = torch.iinfo(buffer.dtype) if not buffer.dtype.is_floating_point else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    limits is not None and not (isinstance(value, int)
                                                and limits.min <= value <= limits.max)):
                raise CaffeFormatError(f"layer {layer!r} {name}: expected one "
                                       f"{'integer' if limits else 'number'} for a "
                                       f"{buffer.dtype} counter, got {value!r:.40}", path)
            buffer.fill_(value)


def write_counters(state_path, iteration: int, nets: Mapping[str, Net]) -> None:
    """Write the counters of ``nets`` (key -> net) beside the solver state ``state_path``."""
    saved = {key: layer_counters(net) for key, net in nets.items()}
    counters_path(state_path).write_text(
        json.dumps({"iter": iteration, "nets": saved}, indent=1) + "\n", encoding="utf-8")
