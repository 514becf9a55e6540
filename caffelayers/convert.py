"""``caffelayers convert``: one entry point over the ONNX, PyTorch-source and TorchScript back ends.

Every back end reads the same :class:`~caffelayers.graph.NetGraph`; this module only checks
the whole net before anything is built (every layer a back end cannot convert is reported at
once), writes the output, and runs it again for a parity report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping

import numpy as np
import torch

from .errors import UnknownLayerError

TARGETS = ("onnx", "pytorch", "torchscript")
RUNTIMES = ("torch", "onnxruntime", "pytorch-source", "torchscript")


def check_convertible(graph, target: str) -> None:
    """Raise one :class:`UnknownLayerError` naming every layer ``target`` cannot convert."""
    if target == "onnx":
        from .converters.onnx import check_convertible as check_onnx

        check_onnx(graph)
        return
    from .converters.pytorch import missing_emitters

    missing = missing_emitters(graph)
    if missing:
        raise UnknownLayerError(missing, what="a PyTorch source emitter",
                                how="register one with @caffelayers.converters.pytorch."
                                    'register_source_emitter("TYPE")')


def write(net, target: str, output: str | Path, opset: int = 17,
          static_batch: bool = False) -> List[Path]:
    """Convert a built ``Net`` and write it; returns the files written."""
    output = Path(output)
    (output if target == "pytorch" else output.parent).mkdir(parents=True, exist_ok=True)
    if target == "onnx":
        from .converters.onnx import export_onnx

        return list(export_onnx(net, output, opset=opset, static_batch=static_batch))
    if target == "pytorch":
        from .converters.pytorch import convert_to_pytorch

        convert_to_pytorch(net, output)
        return [output / "model.py", output / "weights.pt"]
    from .converters.pytorch import convert_to_torchscript

    convert_to_torchscript(net, output)
    return [output]


def runner(target: str, output: str | Path) -> Callable[[Mapping[str, np.ndarray]], Dict]:
    """A function running the written model on inputs by blob name, outputs by blob name."""
    if target == "onnx":
        from .converters.onnx import run_onnx

        return lambda inputs: run_onnx(str(output), inputs)
    from .converters.pytorch import forward_by_name, load_pytorch, load_torchscript

    if target == "pytorch":
        module, names = load_pytorch(output), ()
    else:
        module, *names = load_torchscript(output)

    def run(inputs):
        with torch.no_grad():
            return forward_by_name(module, inputs, *names)

    return run
