"""``torch.export``: the generated PyTorch module as an ``ExportedProgram``, saved with
``torch.export.save`` to a ``.pt2`` file that ``torch.export.load`` reads.

An exported program is a graph of ATen operators with the weights beside it: no Python
runs when it does, so, unlike TorchScript, it holds the layers that call a custom
``torch.autograd.Function`` (MarginInnerProduct, the loss layers). Exporting traces the
Function's forward, which is plain tensor code, into the graph; its backward (Caffe's own
gradient rule) is not kept: the program is for inference, one forward.

What the program fixes at conversion:

* MarginInnerProduct's iteration count: lambda is the value of the next iteration (the
  one ``Net`` would use on its next forward), a constant of the graph, and the program is
  stateless (every call gives the first forward's numbers, as Caffe's first iteration).
* Branches on tensor values (the label range checks of MarginInnerProduct and the losses)
  cannot be traced; such nets are exported with ``torch.export.draft_export``, which takes
  the branch that valid labels take and keeps the condition as a runtime assertion, so an
  out-of-range label raises when the program runs instead of giving numbers.
* InfogainLoss checks its labels without branching on them: while tracing, the check is a
  graph assertion (``torch._assert_async``) with the eager error's message, so it exports
  with plain ``torch.export.export``.
* The batch size is symbolic (``torch.export.Dim.AUTO``) where the net allows it; a layer
  that fixes it (a Reshape to fixed dims, an example batch of 1, a loss whose branches
  draft_export resolved on the example's size) keeps the example's, and the metadata's
  ``dynamic_batch`` says which. Height and width stay the example's.

The Caffe names of the inputs and outputs are saved next to the program as the extra file
``caffelayers.json`` (``{"inputs": [...], "outputs": [...], "method": "export"|"draft",
"dynamic_batch": bool}``); :func:`load_exported` returns them.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from caffelayers.errors import CaffeLayersError, UnsupportedParameterError
from caffelayers.layers.margin_inner_product import MarginInnerProduct

from .codegen import write_pytorch
from .torchscript import _example_inputs

METADATA_FILE = "caffelayers.json"

#: torch loggers that report every data-dependent branch draft_export resolves, and the
#: report it ends with; the branches are the label checks this module documents.
_QUIET_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export._draft_export",
                  "torch._export.serde.serialize")


def _freeze_iterations(model: nn.Module) -> None:
    """Make every MarginInnerProduct's iteration count a Python int, so that lambda (computed
    from it in Python) is a constant of the graph and the program carries no state."""
    for module in model.modules():
        if isinstance(module, MarginInnerProduct):
            iteration = int(module.iteration)
            delattr(module, "iteration")  # the buffer
            module.iteration = iteration


def _batch_dims(args: Tuple[torch.Tensor, ...]) -> Tuple:
    """``dynamic_shapes`` making the first axis of every input symbolic where export can."""
    return tuple({0: torch.export.Dim.AUTO} if arg.dim() else None for arg in args)


def _is_dynamic_batch(path: Path) -> bool:
    """Whether the saved program at ``path`` takes any batch size. Read back from the file:
    a draft program can keep a symbolic batch in memory and still specialize it when
    saved (a branch resolved on the example's size)."""
    program = _load(path, {})
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            value = node.meta.get("val")
            if value is not None and value.dim() and isinstance(value.shape[0], torch.SymInt):
                return True
    return False


def _export(model: nn.Module, args: Tuple[torch.Tensor, ...]):
    """``(program, method)``: ``torch.export.export``, or ``draft_export`` when the net
    branches on tensor values."""
    dynamic = _batch_dims(args)
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            # A failed export prints the partial graph to stderr; the fallback follows.
            with contextlib.redirect_stderr(io.StringIO()):
                return torch.export.export(model, args, dynamic_shapes=dynamic), "export"
        except torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode:
            with warnings.catch_warnings():
                # draft_export's trace log handler leaves its temporary file to the
                # garbage collector (torch's, not ours): collected here, quietly.
                warnings.simplefilter("ignore", ResourceWarning)
                program = torch.export.draft_export(model, args, dynamic_shapes=dynamic)
                gc.collect()
            return program, "draft"
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def convert_to_exported(net, path, example_inputs: Optional[Mapping[str, object]] = None,
                        class_name: str = "CaffeNet") -> str:
    """Write ``net`` as a ``torch.export`` program (``.pt2``) that ``torch.export.load``
    reads.

    Args:
        net: a built :class:`caffelayers.Net`.
        path: the ``.pt2`` file to write.
        example_inputs: inputs to trace by Caffe blob name (default: zeros of the net's
            input shapes; zeros are valid labels). A ``"draft"`` program asserts when it
            runs that its inputs take the branches these took (labels in range, and for
            losses with an ignore_label, whether any label is ignored).
        class_name: the generated class's name.

    Returns:
        How it was exported: ``"export"`` or ``"draft"`` (branches on label values kept
        as runtime assertions, see the module docstring).

    Raises:
        UnsupportedParameterError: torch.export cannot trace the net; the message names
            the layers run by caffelayers modules and the first line of torch's reason.
    """
    with tempfile.TemporaryDirectory(prefix="caffelayers-exported-") as tmp:
        generated, model = write_pytorch(net, tmp, class_name)
        _freeze_iterations(model)
        args = _example_inputs(net, example_inputs)
        try:
            with torch.no_grad():
                program, method = _export(model, args)
        # torch.export raises many error types for Python it cannot trace.
        except Exception as error:
            layers = ", ".join(f"{name!r} ({type_})" for name, type_ in
                               generated.imported_layers) or "none"
            reason = next((line for line in str(error).splitlines() if line.strip()),
                          type(error).__name__)
            raise UnsupportedParameterError(
                f"the net cannot be exported with torch.export: {reason.strip()} (layers run "
                f"by caffelayers modules: {layers}); convert it to PyTorch source "
                "instead") from error
        # Saved beside the generated source first: a failed save leaves no file behind.
        saved = Path(tmp) / "exported.pt2"
        torch.export.save(program, str(saved))
        metadata = {"inputs": list(model.input_names), "outputs": list(model.output_names),
                    "method": method, "dynamic_batch": _is_dynamic_batch(saved)}
        torch.export.save(program, str(saved), extra_files={METADATA_FILE: json.dumps(metadata)})
        shutil.move(str(saved), str(path))
    return method


def _load(path, extra_files: Dict[str, str]):
    """``torch.export.load``, without its notes on the symbols of resolved branches."""
    logger = logging.getLogger("torch._export.serde.serialize")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return torch.export.load(str(Path(path)), extra_files=extra_files)
    finally:
        logger.setLevel(level)


def load_exported(path) -> Tuple[nn.Module, List[str], List[str]]:
    """``(module, input names, output names)`` of a file written by
    :func:`convert_to_exported`: the module is ``torch.export.load(path).module()``; run it
    with :func:`~caffelayers.converters.pytorch.forward_by_name`."""
    extra: Dict[str, str] = {METADATA_FILE: ""}
    program = _load(path, extra)
    if not extra[METADATA_FILE]:
        raise CaffeLayersError(f"{path}: not written by caffelayers (no {METADATA_FILE})")
    metadata = json.loads(extra[METADATA_FILE])
    module = program.module()
    # An inference program: MarginInnerProduct's forward rescales its weight rows in place
    # (an out= operation), which autograd refuses on a parameter that requires grad.
    module.requires_grad_(False)
    return module, metadata["inputs"], metadata["outputs"]
