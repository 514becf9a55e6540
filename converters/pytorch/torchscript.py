"""TorchScript export: the generated PyTorch module, scripted (or traced where scripting
cannot work), saved with ``torch.jit.save``.

Scripting compiles the generated ``forward`` itself, so the saved module keeps working for
any batch size and keeps ``train()``/``eval()`` behaviour. It fails when the net imports a
caffelayers module written for eager PyTorch (MarginInnerProduct, ArgMax, Accuracy, the loss
layers, STOCHASTIC pooling and BatchNorm of other ranks than 2 to 5); those nets are traced
instead, which records the operations run on one example input: the result is fixed to the
example's shapes and to eval() mode, and Python-side state (MarginInnerProduct's
iteration count and lambda) is frozen at its value during the trace.

The Caffe names of the inputs and outputs are saved next to the code as the extra file
``caffelayers.json`` (``{"inputs": [...], "outputs": [...], "method": "script"|"trace"}``);
:func:`load_torchscript` returns them.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from caffelayers.errors import CaffeLayersError

from .codegen import convert_to_pytorch, load_pytorch

METADATA_FILE = "caffelayers.json"
METHODS = ("auto", "script", "trace")


def _example_inputs(net, example_inputs: Optional[Mapping[str, object]]) -> Tuple:
    """Tensors for tracing, in input order: the given ones, else zeros of the net's input
    shapes (zeros are valid labels, too)."""
    tensors = []
    for name in net.graph.inputs:
        if example_inputs is not None and name in example_inputs:
            tensors.append(torch.as_tensor(example_inputs[name]).float())
            continue
        shape = net.graph.blob_shapes.get(name)
        if shape is None:
            raise CaffeLayersError(f"tracing needs an example for input {name!r}, whose shape "
                                   "the net does not fix")
        tensors.append(torch.zeros(shape))
    return tuple(tensors)


def convert_to_torchscript(net, path, method: str = "auto",
                           example_inputs: Optional[Mapping[str, object]] = None,
                           class_name: str = "CaffeNet") -> str:
    """Write ``net`` as a TorchScript file that ``torch.jit.load`` runs.

    Args:
        net: a built :class:`caffelayers.Net`.
        path: the ``.pt`` file to write.
        method: ``"script"``, ``"trace"``, or ``"auto"`` (script, and trace when scripting
            fails).
        example_inputs: inputs for tracing by Caffe blob name (default: zeros of the net's
            input shapes).
        class_name: the generated class's name (it shows in the saved code).

    Returns:
        The method used: ``"script"`` or ``"trace"``.
    """
    if method not in METHODS:
        raise CaffeLayersError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    with tempfile.TemporaryDirectory(prefix="caffelayers-torchscript-") as tmp:
        convert_to_pytorch(net, tmp, class_name)
        model = load_pytorch(tmp, class_name)
        scripted, used = None, method
        if method in ("auto", "script"):
            try:
                scripted, used = torch.jit.script(model), "script"
            except Exception as error:  # TorchScript raises many error types for Python it cannot compile
                if method == "script":
                    raise CaffeLayersError(f"the generated module cannot be scripted: "
                                           f"{str(error).splitlines()[0]}; use method "
                                           "'trace'") from error
        if scripted is None:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                scripted = torch.jit.trace(model, _example_inputs(net, example_inputs),
                                           strict=False, check_trace=False)
            used = "trace"
        metadata = {"inputs": list(model.input_names), "outputs": list(model.output_names),
                    "method": used}
        torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    return used


def load_torchscript(path) -> Tuple[torch.jit.ScriptModule, List[str], List[str]]:
    """``(module, input names, output names)`` of a file written by
    :func:`convert_to_torchscript`; run it with
    :func:`~caffelayers.converters.pytorch.forward_by_name`."""
    extra: Dict[str, str] = {METADATA_FILE: ""}
    module = torch.jit.load(str(Path(path)), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_FILE]:
        raise CaffeLayersError(f"{path}: not written by caffelayers (no {METADATA_FILE})")
    metadata = json.loads(extra[METADATA_FILE])
    return module, metadata["inputs"], metadata["outputs"]
