"""TorchScript export: the generated PyTorch module, scripted (or traced where scripting
cannot work), saved with ``torch.jit.save``.

Scripting compiles the generated ``forward`` itself, so the saved module keeps working for
any batch size and keeps ``train()``/``eval()`` behaviour. Every layer written as
``torch.nn`` modules and tensor expressions scripts. A net that imports a caffelayers module
(ArgMax, Accuracy, Pooling with a mask top or STOCHASTIC, BatchNorm of fewer than 2 or more
than 5 axes) is traced instead: the operations run on one example input are recorded, so
the result is fixed to the example's shapes and to eval() mode. Modules whose forward calls
a custom ``torch.autograd.Function`` (MarginInnerProduct, the loss layers, MVN of other
than 4 axes) cannot be held by TorchScript at all; such nets raise an
``UnsupportedParameterError`` naming those layers (convert them to PyTorch source instead).

The Caffe names of the inputs and outputs are saved next to the code as the extra file
``caffelayers.json`` (``{"inputs": [...], "outputs": [...], "method": "script"|"trace"}``);
:func:`load_torchscript` returns them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from caffelayers.errors import CaffeLayersError, UnsupportedParameterError

from .codegen import write_pytorch

METADATA_FILE = "caffelayers.json"
METHODS = ("auto", "script", "trace")
_DEPRECATED = r".*torch\.jit.*deprecated"


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
    with tempfile.TemporaryDirectory(prefix="caffelayers-torchscript-") as tmp, \
            warnings.catch_warnings():
        # PyTorch 2.x deprecates TorchScript in favour of torch.export; exporting to it is
        # what was asked for, so its deprecation warnings are not repeated to the caller.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=_DEPRECATED)
        generated, model = write_pytorch(net, tmp, class_name)
        scripted, used = None, method
        if method in ("auto", "script"):
            try:
                scripted, used = torch.jit.script(model), "script"
            # The compiler raises many error types for Python it cannot compile.
            except Exception as error:
                if method == "script":
                    reason = next((line for line in str(error).splitlines() if line.strip()),
                                  type(error).__name__)
                    raise CaffeLayersError(f"the generated module cannot be scripted: "
                                           f"{reason}; use method 'trace'") from error
        metadata = {"inputs": list(model.input_names), "outputs": list(model.output_names)}
        try:
            if scripted is None:
                with torch.no_grad():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    scripted = torch.jit.trace(model, _example_inputs(net, example_inputs),
                                               strict=False, check_trace=False)
                used = "trace"
            metadata["method"] = used
            # Saved next to the generated source first: a failed save leaves no file behind.
            saved = Path(tmp) / "torchscript.pt"
            torch.jit.save(scripted, str(saved),
                           _extra_files={METADATA_FILE: json.dumps(metadata)})
            shutil.move(str(saved), str(path))
        except RuntimeError as error:
            # A custom autograd.Function (Caffe's own gradients) is Python that a trace
            # records as a call it cannot save.
            layers = ", ".join(f"{name!r} ({type_})" for name, type_ in
                               generated.imported_layers) or "none"
            reason = next((line for line in str(error).splitlines() if line.strip()), "")
            reason = reason.strip().split(". ")[0]
            raise UnsupportedParameterError(
                f"the net cannot be saved as TorchScript: {reason} (layers run by "
                f"caffelayers modules: {layers}); convert it to PyTorch source "
                "instead") from error
    return used


def load_torchscript(path) -> Tuple[torch.jit.ScriptModule, List[str], List[str]]:
    """``(module, input names, output names)`` of a file written by
    :func:`convert_to_torchscript`; run it with
    :func:`~caffelayers.converters.pytorch.forward_by_name`."""
    extra: Dict[str, str] = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=_DEPRECATED)
        module = torch.jit.load(str(Path(path)), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_FILE]:
        raise CaffeLayersError(f"{path}: not written by caffelayers (no {METADATA_FILE})")
    metadata = json.loads(extra[METADATA_FILE])
    return module, metadata["inputs"], metadata["outputs"]
