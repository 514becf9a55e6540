"""Caffe's ``Embed`` layer: a lookup table indexed by integer-valued bottoms."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .. import fillers
from ..errors import UnsupportedParameterError
from ..limits import check_count
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, as_labels, check_label_range


@register_layer("Embed")
class Embed(CaffeLayer):
    r"""Looks up one row of a ``input_dim x num_output`` table per bottom element.

    .. math::
        y_{i,:} = W_{x_i,:} + b

    which is an inner product with the one-hot encoding of :math:`x_i`.

    Args:
        input_dim: the number of rows :math:`K`; indices lie in ``[0, K)``.
        num_output: the row length :math:`N`.
        bias_term: add a learned bias of length :math:`N`.

    Shape:
        - Input: :math:`(*)`, float values holding integer indices.
        - Output: :math:`(*, N)`: the input's shape with ``num_output`` appended.

    Attributes:
        weight: the table, :math:`(K, N)` (Caffe's blob 0, stored transposed with respect to
            InnerProduct's ``N x K`` for locality of the lookup).
        bias: :math:`(N,)` (blob 1), or None.

    Caffe: ``embed_param { input_dim num_output bias_term weight_filler bias_filler }``;
    fillers default to constant 0. The index is the bottom value truncated to an integer.
    Caffe cannot backpropagate to the indices; the bottom gets no gradient here either.
    """

    __constants__ = ["input_dim", "num_output", "bias_term"]

    def __init__(self, input_dim: int, num_output: int, bias_term: bool = True):
        super().__init__()
        self.input_dim = int(input_dim)
        self.num_output = int(num_output)
        self.bias_term = bool(bias_term)
        self.weight = nn.Parameter(torch.zeros(self.input_dim, self.num_output))
        if bias_term:
            self.bias = nn.Parameter(torch.zeros(self.num_output))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "Embed":
        p = param.embed_param
        for field in ("input_dim", "num_output"):
            if getattr(p, field) <= 0:
                raise UnsupportedParameterError(
                    f"layer {param.name!r} (Embed): embed_param.{field} is "
                    f"{getattr(p, field)}, it must be positive")
        # Caffe's INT_MAX on the table, checked before it is made.
        check_count((p.input_dim, p.num_output), f"layer {param.name!r} (Embed): its weight blob")
        layer = cls(p.input_dim, p.num_output, p.bias_term)
        fillers.fill_weight_and_bias(layer, p, ctx, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return [tuple(bottom_shapes[0]) + (self.num_output,)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = as_labels(x)
        check_label_range(self, indices, self.input_dim, what="indices")
        y = self.weight[indices]
        if self.bias is not None:
            y = y + self.bias
        return y

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]

    def extra_repr(self) -> str:
        text = f"input_dim={self.input_dim}, num_output={self.num_output}"
        return text if self.bias_term else text + ", bias_term=False"
