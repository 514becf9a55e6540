"""Caffe's weight fillers (``FillerParameter``), applied to a tensor in place.

Fan sizes follow Caffe's ``filler.hpp``: ``fan_in = count / shape[0]`` and
``fan_out = count / shape[1]`` (``count`` for a 1-D blob), which for a convolution weight
``C_out x C_in x kh x kw`` is ``C_in*kh*kw`` and ``C_out*kh*kw``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import UnsupportedParameterError

FILLER_TYPES = ("constant", "gaussian", "uniform", "xavier", "msra", "positive_unitball",
                "bilinear")


def _fan(tensor: torch.Tensor, variance_norm: int) -> float:
    numel = tensor.numel()
    fan_in = numel / tensor.shape[0] if tensor.dim() else numel
    fan_out = numel / tensor.shape[1] if tensor.dim() > 1 else numel
    # VarianceNorm: FAN_IN = 0, FAN_OUT = 1, AVERAGE = 2.
    if variance_norm == 1:
        return fan_out
    if variance_norm == 2:
        return (fan_in + fan_out) / 2.0
    return fan_in


@torch.no_grad()
def fill(tensor: torch.Tensor, filler=None, generator: Optional[torch.Generator] = None,
         layer: str = "", default_type: str = "constant") -> torch.Tensor:
    """Fill ``tensor`` in place as Caffe's filler described by ``filler`` would.

    ``filler`` is a ``FillerParameter`` or None; when its ``type`` is not set,
    ``default_type`` applies (Caffe's own default is ``constant`` with value 0).
    """
    kind = filler.type if filler is not None and filler.HasField("type") else default_type
    value = filler.value if filler is not None else 0.0
    if tensor.device.type == "meta":
        return tensor
    if kind == "constant":
        return tensor.fill_(value)
    if kind == "gaussian":
        mean, std = (filler.mean, filler.std) if filler is not None else (0.0, 1.0)
        tensor.normal_(mean, std, generator=generator)
        sparse = filler.sparse if filler is not None and filler.HasField("sparse") else -1
        if sparse >= 0:
            if tensor.dim() < 2:
                raise UnsupportedParameterError(
                    f"layer {layer!r}: a sparse gaussian filler needs a blob of 2 or more "
                    "axes")
            keep = torch.rand(tensor.shape, generator=generator, device=tensor.device)
            tensor.mul_((keep < sparse / tensor.shape[0]).to(tensor.dtype))
        return tensor
    if kind == "uniform":
        low, high = (filler.min, filler.max) if filler is not None else (0.0, 1.0)
        return tensor.uniform_(low, high, generator=generator)
    variance_norm = filler.variance_norm if filler is not None else 0  # FAN_IN
    if kind == "xavier":
        scale = math.sqrt(3.0 / _fan(tensor, variance_norm))
        return tensor.uniform_(-scale, scale, generator=generator)
    if kind == "msra":
        std = math.sqrt(2.0 / _fan(tensor, variance_norm))
        return tensor.normal_(0.0, std, generator=generator)
    if kind == "positive_unitball":
        tensor.uniform_(0.0, 1.0, generator=generator)
        rows = tensor.reshape(tensor.shape[0], -1)
        rows.div_(rows.sum(dim=1, keepdim=True))
        return tensor
    if kind == "bilinear":
        if tensor.dim() != 4 or tensor.shape[2] != tensor.shape[3]:
            raise UnsupportedParameterError(
                f"layer {layer!r}: the bilinear filler needs a 4-D blob with square kernels, "
                f"got {tuple(tensor.shape)}")
        size = tensor.shape[3]
        factor = math.ceil(size / 2.0)
        centre = (2 * factor - 1 - factor % 2) / (2.0 * factor)
        axis = torch.arange(size, dtype=torch.float64)
        profile = 1 - (axis / factor - centre).abs()
        kernel = profile[:, None] * profile[None, :]
        return tensor.copy_(kernel.expand_as(tensor))
    raise UnsupportedParameterError(
        f"layer {layer!r}: unknown filler type {kind!r}; Caffe's fillers are "
        f"{', '.join(FILLER_TYPES)}")


def fill_weight_and_bias(layer, param_block, ctx, layer_name: str) -> None:
    """Apply ``weight_filler`` and ``bias_filler`` of a Convolution-, InnerProduct- or
    Embed-style parameter message to ``layer.weight`` and ``layer.bias`` (if any), unless
    the build context says the weights will be loaded instead."""
    if not ctx.fill:
        return
    fill(layer.weight, param_block.weight_filler, ctx.generator, layer_name)
    if layer.bias is not None:
        fill(layer.bias, param_block.bias_filler, ctx.generator, layer_name)
