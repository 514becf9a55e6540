"""Emitters for Reduction (sums over the trailing axes) and ArgMax (top-k positions)."""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from ...registry import register_emitter

INT64_MIN = np.iinfo(np.int64).min


@register_emitter("Reduction")
def emit_reduction(ctx, node) -> None:
    """The bottom as rows of the axes from ``axis`` on, summed (after ``Abs`` or squaring),
    times ``coeff`` (divided by the row length for MEAN, as Caffe folds it)."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    shape = node.bottom_shapes[0]
    axis = module.axis % len(shape)
    rows = ctx.op("Flatten", [x], axis=axis)
    if module.operation == "ASUM":
        rows = ctx.op("Abs", [rows])
    elif module.operation == "SUMSQ":
        rows = ctx.op("Mul", [rows, rows])
    reducer, scale = "ReduceSum", module.coeff
    if module.operation == "MEAN":
        length = math.prod(shape[axis:])
        if length == math.prod(ctx.probe_shapes(node)[0][0][axis:]):
            scale = module.coeff / length
        else:  # the rows hold the batch, so their length is only known when run
            reducer = "ReduceMean"
    total = ctx.reduce(reducer, rows, [1], keepdims=False)
    if scale != 1.0:
        total = ctx.op("Mul", [total, ctx.const(scale, "coeff")])
    ctx.reshape(total, node.top_shapes[0], ctx.probe_shapes(node)[1][0], top)


def _caffe_top_k(ctx, values: str, axis: int, length: int, k: int):
    """The ``k`` largest along ``axis`` and their positions (int64), largest first, ties to
    the higher position as Caffe's sort of ``(value, index)`` pairs gives them.

    ONNX's TopK puts the lower index first on ties, so it runs on the reversed axis and the
    positions are mirrored back.
    """
    reversed_ = ctx.op("Slice", [values, ctx.ints([-1], "rev_starts"),
                                 ctx.ints([INT64_MIN], "rev_ends"), ctx.ints([axis], "rev_axes"),
                                 ctx.ints([-1], "rev_steps")])
    top_values, indices = ctx.op("TopK", [reversed_, ctx.ints([k], "k")], 2, axis=axis,
                                 largest=1, sorted=1)
    positions = ctx.op("Sub", [ctx.const(length - 1, "last", np.int64), indices])
    return top_values, positions


@register_emitter("ArgMax")
def emit_argmax(ctx, node) -> None:
    """Without ``axis``: each sample's flattened rest searched, positions (and values with
    ``out_max_val``) stacked on axis 1 and padded to the top's shape. With ``axis``: the
    positions, or the values when ``out_max_val``, along that axis."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    shape = node.bottom_shapes[0]
    if module.axis is not None:
        axis = module.axis % len(shape)
        if shape[axis] != ctx.probe_shapes(node)[0][0][axis]:
            raise ctx.unsupported(f"searching along axis {axis}, which follows the batch; "
                                  "convert with a static batch (static_batch=True, "
                                  "--static-batch)")
        values, positions = _caffe_top_k(ctx, x, axis, shape[axis], module.top_k)
        if module.out_max_val:
            ctx.op("Identity", [values], top)
        else:
            ctx.op("Cast", [positions], top, to=TensorProto.FLOAT)
        return
    flat = ctx.op("Flatten", [x], axis=1)
    values, positions = _caffe_top_k(ctx, flat, 1, math.prod(shape[1:]), module.top_k)
    axis_one = ctx.ints([1], "axis_one")
    parts = [ctx.op("Unsqueeze", [ctx.op("Cast", [positions], to=TensorProto.FLOAT), axis_one])]
    if module.out_max_val:
        parts.append(ctx.op("Unsqueeze", [values, axis_one]))
    stacked = ctx.op("Concat", parts, axis=1) if len(parts) > 1 else parts[0]
    ctx.reshape(stacked, node.top_shapes[0], ctx.probe_shapes(node)[1][0], top)
