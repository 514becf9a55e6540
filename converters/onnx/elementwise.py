"""Emitters for the layers that combine blobs element by element: Eltwise, Scale, Bias.

Caffe's Scale and Bias place their operand on bottom[0]'s axes ``axis .. axis + d - 1``;
ONNX broadcasting aligns trailing axes, so the operand gets trailing axes of size 1.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from ...registry import register_emitter


@register_emitter("Eltwise")
def emit_eltwise(ctx, node) -> None:
    """PROD: ``Mul``; SUM: ``Sum`` of the bottoms scaled by their ``coeff``; MAX: ``Max``."""
    module = node.module
    bottoms, (top,) = ctx.bottoms(node), ctx.tops(node)
    if module.operation == "PROD":
        product = bottoms[0]
        for index, bottom in enumerate(bottoms[1:], start=2):
            product = ctx.op("Mul", [product, bottom], top if index == len(bottoms) else None)
        return
    if module.operation == "MAX":
        ctx.op("Max", bottoms, top)
        return
    terms = [bottom if coeff == 1.0 else ctx.op("Mul", [bottom, ctx.const(coeff, "coeff")])
             for bottom, coeff in zip(bottoms, module.coeff or (1.0,) * len(bottoms))]
    ctx.op("Sum", terms, top)


def _view(axis: int, bottom_shape: Sequence[int], operand_shape: Sequence[int]) -> Tuple[int, ...]:
    """The operand with trailing axes of size 1, so that it broadcasts from ``axis`` on (a
    scalar operand applies everywhere, whatever ``axis`` says)."""
    operand = tuple(operand_shape)
    if not operand:
        return ()
    rank = len(bottom_shape)
    return operand + (1,) * (rank - axis % rank - len(operand))


def _operand_from_bottom(ctx, node, axis: int) -> str:
    """The second bottom, reshaped to broadcast against the first."""
    operand = ctx.bottoms(node)[1]
    view = _view(axis, node.bottom_shapes[0], node.bottom_shapes[1])
    if view == tuple(node.bottom_shapes[1]):
        return operand
    probe_bottoms, _ = ctx.probe_shapes(node)
    return ctx.reshape(operand, view, _view(axis, probe_bottoms[0], probe_bottoms[1]))


def _learned_operand(ctx, node, index: int, axis: int) -> str:
    blob = node.module.caffe_blobs()[index].detach().cpu().numpy()
    return ctx.param(node, index, blob.reshape(_view(axis, node.bottom_shapes[0], blob.shape)))


@register_emitter("Scale")
def emit_scale(ctx, node) -> None:
    """``x * scale (+ bias)``, the scale learned or the second bottom."""
    module = node.module
    x, (top,) = ctx.bottoms(node)[0], ctx.tops(node)
    if module.scale_from_bottom:
        scale = _operand_from_bottom(ctx, node, module.axis)
    else:
        scale = _learned_operand(ctx, node, 0, module.axis)
    if module.bias is None:
        ctx.op("Mul", [x, scale], top)
        return
    bias = _learned_operand(ctx, node, len(module.caffe_blobs()) - 1, module.axis)
    ctx.op("Add", [ctx.op("Mul", [x, scale]), bias], top)


@register_emitter("Bias")
def emit_bias(ctx, node) -> None:
    """``x + bias``, the bias learned or the second bottom."""
    module = node.module
    x, (top,) = ctx.bottoms(node)[0], ctx.tops(node)
    if module.bias_from_bottom:
        bias = _operand_from_bottom(ctx, node, module.axis)
    else:
        bias = _learned_operand(ctx, node, 0, module.axis)
    ctx.op("Add", [x, bias], top)
