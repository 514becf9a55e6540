"""Caffe's ``InnerProduct``: a fully connected layer over the axes from ``axis`` on."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import fillers
from ..errors import ShapeError, UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, count


@register_layer("InnerProduct")
class InnerProduct(CaffeLayer):
    r"""Fully connected layer: :math:`y = x W^T + b` with ``x`` flattened from ``axis``.

    The bottom is viewed as ``M x K`` with ``M`` the product of the axes before ``axis`` and
    ``K`` the product of the axes from ``axis`` on; the top keeps the leading axes and ends in
    ``num_output``.

    Args:
        in_features: ``K``, the product of the bottom's axes from ``axis`` on.
        num_output: ``N``, the number of outputs.
        bias_term: add a learned bias of ``N`` values.
        axis: first axis to flatten into the features (negative counts from the end).
        transpose: store the weight as ``K x N`` (Caffe's ``transpose: true``) instead of
            ``N x K``; the math is the same.

    Shape:
        - Input: :math:`(d_0, \ldots, d_{axis-1}, d_{axis}, \ldots)` with
          :math:`\prod_{i \ge axis} d_i = K`.
        - Output: :math:`(d_0, \ldots, d_{axis-1}, N)`.

    Attributes:
        weight: ``N x K`` (``K x N`` when ``transpose``), Caffe's blob 0.
        bias: ``N``, Caffe's blob 1 (absent without ``bias_term``).

    Caffe: ``inner_product_param { num_output bias_term axis transpose weight_filler
    bias_filler }``. The weight is kept in the blob's own layout, so a transposed weight is
    loaded and saved without reshaping; a bottom whose ``K`` differs from the weight's is an
    error, as in Caffe's ``Reshape``.
    """

    __constants__ = ["in_features", "num_output", "bias_term", "axis", "transpose"]

    def __init__(self, in_features: int, num_output: int, bias_term: bool = True,
                 axis: int = 1, transpose: bool = False):
        super().__init__()
        self.in_features = int(in_features)
        self.num_output = int(num_output)
        self.bias_term = bool(bias_term)
        self.axis = int(axis)
        self.transpose = bool(transpose)
        weight_shape = ((self.in_features, self.num_output) if self.transpose
                        else (self.num_output, self.in_features))
        self.weight = nn.Parameter(torch.zeros(weight_shape))
        self.bias = nn.Parameter(torch.zeros(self.num_output)) if self.bias_term else None

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.inner_product_param
        if p.num_output < 1:
            raise UnsupportedParameterError(
                f"layer {param.name!r} (InnerProduct): num_output must be at least 1, got "
                f"{p.num_output}")
        num_axes = len(bottom_shapes[0])
        if not -num_axes <= p.axis < num_axes:
            raise ShapeError(param.name, "InnerProduct", bottom_shapes,
                             f"axis {p.axis} must lie in [{-num_axes}, {num_axes})")
        axis = p.axis % num_axes
        layer = cls(count(bottom_shapes[0], axis), p.num_output, p.bias_term, p.axis,
                    p.transpose)
        fillers.fill_weight_and_bias(layer, p, ctx, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "InnerProduct takes exactly one bottom")
        shape = tuple(bottom_shapes[0])
        axis = self.canonical_axis(self.axis, len(shape), bottom_shapes)
        features = count(shape, axis)
        if features != self.in_features:
            raise self.shape_error(
                bottom_shapes, f"the axes from {axis} on hold {features} values, the weight "
                f"expects {self.in_features}")
        return [shape[:axis] + (self.num_output,)]

    def forward(self, bottom: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(bottom.shape)])  # a ShapeError rather than torch's message
        flat = bottom.flatten(self.axis % bottom.dim())
        weight = self.weight.t() if self.transpose else self.weight
        return F.linear(flat, weight, self.bias)

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"num_output={self.num_output}"]
        if not self.bias_term:
            parts.append("bias_term=False")
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        if self.transpose:
            parts.append("transpose=True")
        return ", ".join(parts)
