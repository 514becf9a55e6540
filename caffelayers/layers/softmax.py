"""Caffe's ``Softmax`` layer."""

from __future__ import annotations

from typing import List, Sequence

import torch

from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape


@register_layer("Softmax")
class Softmax(CaffeLayer):
    r"""Softmax along one axis, every other axis kept.

    .. math::
        y_c = \frac{\exp(x_c - m)}{\sum_{c'} \exp(x_{c'} - m)}

    along ``axis``, with :math:`m` the maximum over the axis (for stability; it cancels
    out).

    Args:
        axis: the axis the probabilities sum to 1 along (negative counts from the end).

    Shape:
        - Input: :math:`(*)`, at least ``axis + 1`` axes.
        - Output: :math:`(*)`, the input's shape.

    Caffe: ``softmax_param { axis }``, default axis **1** (the channels), not the last axis:
    an ``N x C x H x W`` blob gets a distribution over ``C`` at every pixel. ``engine`` is
    ignored.
    """

    __constants__ = ["axis"]

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = int(axis)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "Softmax":
        return cls(param.softmax_param.axis)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        shape = tuple(bottom_shapes[0])
        self.canonical_axis(self.axis, len(shape), bottom_shapes)
        return [shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.canonical_axis(self.axis, x.dim(), [tuple(x.shape)])
        return torch.softmax(x, dim=axis)

    def extra_repr(self) -> str:
        return "" if self.axis == 1 else f"axis={self.axis}"
