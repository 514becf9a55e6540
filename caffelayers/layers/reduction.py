"""Caffe's ``Reduction`` (sums over the trailing axes) and ``ArgMax`` (top-k positions)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..errors import UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, count
from .neuron import naming_layer

#: ``ReductionParameter.ReductionOp`` numbers in Caffe's schema.
REDUCTION_OPS = {1: "SUM", 2: "ASUM", 3: "SUMSQ", 4: "MEAN"}


@register_layer("Reduction")
class Reduction(CaffeLayer):
    """Reduces all axes from ``axis`` on to one number per leading position, times ``coeff``.

    ``SUM: y = coeff * sum x``, ``ASUM: coeff * sum |x|``, ``SUMSQ: coeff * sum x^2``,
    ``MEAN: coeff * sum x / n``, each sum over the ``n`` elements from ``axis`` on.

    Args:
        operation: ``"SUM"``, ``"ASUM"``, ``"SUMSQ"`` or ``"MEAN"``.
        axis: the first reduced axis; every later axis is reduced too. Negative counts from
            the end.
        coeff: scales the result.

    Shape:
        - Input: ``(d_0, ..., d_{n-1})``.
        - Output: ``(d_0, ..., d_{axis-1})``; a 0-axis scalar for ``axis = 0``.

    Caffe: ``reduction_param { operation axis coeff }`` (SUM, axis 0 and coeff 1 by
    default). Caffe can only reduce the whole tail of the shape, never a middle axis.
    ASUM's gradient at 0 is 0 (``sign(0)``), as autograd's.
    """

    __constants__ = ["operation", "axis", "coeff"]

    def __init__(self, operation: str = "SUM", axis: int = 0, coeff: float = 1.0):
        super().__init__()
        operation = str(operation).upper()
        if operation not in REDUCTION_OPS.values():
            raise UnsupportedParameterError(
                f"Reduction: operation {operation!r} is unknown; Caffe's are SUM, ASUM, SUMSQ, "
                "MEAN")
        self.operation = operation
        self.axis = int(axis)
        self.coeff = float(coeff)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Reduction":
        p = param.reduction_param
        return cls(REDUCTION_OPS[p.operation], p.axis, p.coeff)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "exactly one bottom")
        shape = tuple(bottom_shapes[0])
        axis = self.canonical_axis(self.axis, len(shape), bottom_shapes)
        return [shape[:axis]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_shape = self.output_shapes([tuple(x.shape)])[0]
        rows = x.reshape(count(top_shape), -1)
        if self.operation == "ASUM":
            rows = rows.abs()
        elif self.operation == "SUMSQ":
            rows = rows * rows
        top = rows.sum(dim=1)
        # Caffe folds MEAN's 1/n into the coefficient.
        scale = self.coeff / rows.shape[1] if self.operation == "MEAN" else self.coeff
        if scale != 1.0:
            top = top * scale
        return top.reshape(top_shape)

    def extra_repr(self) -> str:
        parts = [f"operation={self.operation}",
                 f"axis={self.axis}" if self.axis else "",
                 f"coeff={self.coeff}" if self.coeff != 1 else ""]
        return ", ".join(p for p in parts if p)


def _top_k_descending(values: torch.Tensor, k: int):
    """The ``k`` largest entries along the last axis and their positions, largest first.

    Equal values are ordered by position, highest first: Caffe sorts ``(value, index)``
    pairs with ``std::greater``, which compares the index on a tie in value.
    """
    length = values.shape[-1]
    # A stable descending sort of the reversed row keeps later positions first on ties.
    sorted_values, reversed_positions = torch.sort(values.flip(-1), dim=-1, descending=True,
                                                   stable=True)
    positions = (length - 1) - reversed_positions[..., :k]
    return sorted_values[..., :k], positions


@register_layer("ArgMax")
class ArgMax(CaffeLayer):
    """Positions (and optionally values) of the ``top_k`` largest entries.

    Without ``axis``, each sample (index on axis 0) is searched over all its other axes
    flattened; with ``axis``, every line along that axis is searched.

    Args:
        top_k: how many maxima, largest first.
        out_max_val: also (without ``axis``) or instead (with ``axis``) output the values.
        axis: the axis to search along, or None for each sample's flattened rest.

    Shape:
        - Input: ``(N, ...)``.
        - Output without ``axis``: ``(N, 1, top_k)``, or ``(N, 2, top_k)`` with positions in
          ``[:, 0]`` and values in ``[:, 1]`` when ``out_max_val``; padded with trailing axes
          of size 1 to the input's number of axes (``(N, 1, top_k, 1)`` for a 4-D input).
        - Output with ``axis``: the input's shape with ``size[axis] = top_k``, holding the
          positions, or the values when ``out_max_val``.

    Caffe: ``argmax_param { top_k out_max_val axis }``. Positions are stored as floats. Ties
    go to the highest position (Caffe's sort compares ``(value, index)`` pairs). Caffe has
    no backward for ArgMax; here its top is not differentiable.
    """

    has_backward = False  # Caffe's Backward_cpu is NOT_IMPLEMENTED

    __constants__ = ["top_k", "out_max_val", "axis"]

    def __init__(self, top_k: int = 1, out_max_val: bool = False, axis: Optional[int] = None):
        super().__init__()
        if int(top_k) < 1:
            raise UnsupportedParameterError(f"ArgMax: top_k {top_k} is not allowed; give 1 or "
                                            "more")
        self.top_k = int(top_k)
        self.out_max_val = bool(out_max_val)
        self.axis = None if axis is None else int(axis)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "ArgMax":
        p = param.argmax_param
        with naming_layer(param):
            return cls(p.top_k, p.out_max_val, p.axis if p.HasField("axis") else None)

    def _search_axis(self, bottom_shapes: Sequence[Shape]) -> Optional[int]:
        """The canonical search axis (None: per sample), after checking the bottom."""
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "exactly one bottom")
        shape = tuple(bottom_shapes[0])
        if self.axis is None:
            if not shape:
                raise self.shape_error(bottom_shapes, "a bottom with a sample axis")
            if self.top_k > count(shape, 1):
                raise self.shape_error(bottom_shapes, f"at least top_k = {self.top_k} "
                                       "elements per sample")
            return None
        axis = self.canonical_axis(self.axis, len(shape), bottom_shapes)
        if self.top_k > shape[axis]:
            raise self.shape_error(bottom_shapes, f"at least top_k = {self.top_k} elements on "
                                   f"axis {axis}")
        return axis

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        axis = self._search_axis(bottom_shapes)
        shape = list(bottom_shapes[0])
        if axis is not None:
            shape[axis] = self.top_k
            return [tuple(shape)]
        top = [1] * max(len(shape), 3)
        top[0], top[1], top[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        return [tuple(top)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self._search_axis([tuple(x.shape)])
        top_shape = self.output_shapes([tuple(x.shape)])[0]
        x = x.detach()
        if axis is None:
            values, positions = _top_k_descending(x.reshape(x.shape[0], -1), self.top_k)
            parts = [positions.to(x.dtype)] + ([values] if self.out_max_val else [])
            return torch.stack(parts, dim=1).reshape(top_shape)
        values, positions = _top_k_descending(x.movedim(axis, -1), self.top_k)
        top = values if self.out_max_val else positions.to(x.dtype)
        return top.movedim(-1, axis).contiguous()

    def extra_repr(self) -> str:
        parts = [f"top_k={self.top_k}" if self.top_k != 1 else "",
                 "out_max_val=True" if self.out_max_val else "",
                 f"axis={self.axis}" if self.axis is not None else ""]
        return ", ".join(p for p in parts if p)
