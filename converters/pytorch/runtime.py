"""Run a net through a converter's output, the way ``Net.forward`` is run: for checking a
conversion against Caffe's references (``caffelayers verify --runtime ...``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

from caffelayers.errors import CaffeLayersError

from .codegen import forward_by_name, write_pytorch
from .torchscript import convert_to_torchscript, load_torchscript

RUNTIMES = ("pytorch-source", "torchscript")


class ConvertedNet:
    """A built ``Net`` converted to generated PyTorch source or to TorchScript, loaded and
    callable with inputs by Caffe blob name, returning outputs by Caffe blob name.

    The module is kept between calls, so state that a layer carries from one forward to the
    next (MarginInnerProduct's iteration count) advances as in ``Net``; a traced TorchScript
    module froze such state at conversion, though.

    Args:
        net: a built :class:`caffelayers.Net`.
        runtime: ``"pytorch-source"`` (``model.py`` + ``weights.pt``) or ``"torchscript"``.
        example_inputs: inputs for tracing, when TorchScript has to trace.

    Attributes:
        module: the loaded module (eval mode).
        input_names, output_names: Caffe blob names, in argument and output order.
        method: how the module was made: ``"source"``, ``"script"`` or ``"trace"``.
    """

    def __init__(self, net, runtime: str = "pytorch-source",
                 example_inputs: Optional[Mapping[str, object]] = None):
        if runtime not in RUNTIMES:
            raise CaffeLayersError(f"runtime must be one of {', '.join(RUNTIMES)}, got "
                                   f"{runtime!r}")
        self.runtime = runtime
        with tempfile.TemporaryDirectory(prefix="caffelayers-converted-") as tmp:
            if runtime == "pytorch-source":
                _, self.module = write_pytorch(net, tmp)
                self.method = "source"
                self.input_names: List[str] = list(self.module.input_names)
                self.output_names: List[str] = list(self.module.output_names)
            else:
                path = Path(tmp) / "model.pt"
                self.method = convert_to_torchscript(net, path, example_inputs=example_inputs)
                self.module, self.input_names, self.output_names = load_torchscript(path)

    def __call__(self, **inputs) -> Dict[str, torch.Tensor]:
        return forward_by_name(self.module, inputs, self.input_names, self.output_names)
