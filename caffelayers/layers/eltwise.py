"""Caffe's ``Eltwise``: elementwise product, weighted sum or maximum of equal-shaped bottoms."""

from __future__ import annotations

from typing import List, Sequence

import torch

from ..errors import UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape
from .neuron import naming_layer

#: ``EltwiseParameter.EltwiseOp`` numbers in Caffe's schema.
ELTWISE_OPS = {0: "PROD", 1: "SUM", 2: "MAX"}


class _QuotientProdFunction(torch.autograd.Function):
    """Product of the bottoms whose gradient is ``top / bottom_i`` (``stable_prod_grad: false``).

    Caffe's unstable variant divides the product by each bottom, so a zero bottom gets a NaN
    or infinite gradient where the true one (the other bottoms' product) is finite.
    """

    @staticmethod
    def forward(ctx, *bottoms):
        top = bottoms[0] * bottoms[1]
        for bottom in bottoms[2:]:
            top = top * bottom
        ctx.save_for_backward(top, *bottoms)
        return top

    @staticmethod
    def backward(ctx, grad_top):
        top, *bottoms = ctx.saved_tensors
        return tuple(grad_top * (top / bottom) for bottom in bottoms)


@register_layer("Eltwise")
class Eltwise(CaffeLayer):
    """Combines two or more bottoms of one shape element by element.

    ``PROD: y = x_0 * x_1 * ...``, ``SUM: y = sum_i coeff_i * x_i``, ``MAX: y = max_i x_i``

    Args:
        operation: ``"PROD"``, ``"SUM"`` or ``"MAX"``.
        coeff: one coefficient per bottom for SUM (all 1 when empty).
        stable_prod_grad: PROD's gradient for bottom ``i`` is the product of the other
            bottoms (True) or ``y / x_i`` (False, NaN where ``x_i`` is 0).

    Shape:
        - Input: two or more bottoms of one shape.
        - Output: the same shape.

    Caffe: ``eltwise_param { operation coeff stable_prod_grad }``, operation SUM by default.
    Coefficients are refused for PROD and ignored for MAX (Caffe checks their count, though).
    MAX's gradient goes to the winning bottom only, with Caffe's tie rule: bottom 0 beats
    bottom 1 only when strictly greater (a tie goes to bottom 1), and each later bottom
    wins only when strictly greater than the running maximum (a tie stays with the
    earlier winner).
    """

    __constants__ = ["operation", "coeff", "stable_prod_grad"]

    def __init__(self, operation: str = "SUM", coeff: Sequence[float] = (),
                 stable_prod_grad: bool = True):
        super().__init__()
        operation = str(operation).upper()
        if operation not in ELTWISE_OPS.values():
            raise UnsupportedParameterError(
                f"Eltwise: operation {operation!r} is unknown; Caffe's are PROD, SUM, MAX")
        if operation == "PROD" and len(coeff):
            raise UnsupportedParameterError(
                "Eltwise: coefficients are only for SUM, not PROD; remove coeff")
        self.operation = operation
        self.coeff = tuple(float(c) for c in coeff)
        self.stable_prod_grad = bool(stable_prod_grad)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Eltwise":
        p = param.eltwise_param
        with naming_layer(param):
            return cls(ELTWISE_OPS[p.operation], list(p.coeff), p.stable_prod_grad)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) < 2:
            raise self.shape_error(bottom_shapes, "two or more bottoms")
        if self.coeff and len(self.coeff) != len(bottom_shapes):
            raise self.shape_error(bottom_shapes, f"one bottom per coeff ({len(self.coeff)} "
                                   "coefficients given)")
        first = tuple(bottom_shapes[0])
        if any(tuple(shape) != first for shape in bottom_shapes[1:]):
            raise self.shape_error(bottom_shapes, "bottoms of one shape")
        return [first]

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        if self.operation == "SUM":
            coeff = self.coeff or (1.0,) * len(bottoms)
            top = bottoms[0] * coeff[0]
            for c, bottom in zip(coeff[1:], bottoms[1:]):
                top = top + bottom * c
            return top
        if self.operation == "PROD":
            if not self.stable_prod_grad:
                return _QuotientProdFunction.apply(*bottoms)
            top = bottoms[0] * bottoms[1]
            for bottom in bottoms[2:]:
                top = top * bottom
            return top
        # MAX: each torch.where sends the gradient to the branch it picked, which makes
        # Caffe's mask of winners, ties included.
        top = torch.where(bottoms[0] > bottoms[1], bottoms[0], bottoms[1])
        for bottom in bottoms[2:]:
            top = torch.where(bottom > top, bottom, top)
        return top

    def extra_repr(self) -> str:
        parts = [f"operation={self.operation}"]
        if self.coeff:
            parts.append(f"coeff={list(self.coeff)}")
        if not self.stable_prod_grad:
            parts.append("stable_prod_grad=False")
        return ", ".join(parts)
