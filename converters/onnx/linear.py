"""Emitters for the layers with weight matrices: InnerProduct, Convolution, Deconvolution,
Embed. Weights keep Caffe's blob layout, which is also ONNX's (``Gemm`` transposes as the
layer's ``transpose`` says; ``Conv``/``ConvTranspose`` weights are ``C_out x C_in/g`` and
``C_in x C_out/g``)."""

from __future__ import annotations

import math

from onnx import TensorProto

from ...registry import register_emitter


@register_emitter("InnerProduct")
def emit_inner_product(ctx, node) -> None:
    """``Gemm`` on the bottom viewed as ``M x K`` (``K`` the axes from ``axis`` on).

    Axis 1 is ONNX's ``Flatten``; another axis reshapes to ``M x K`` and back to the top's
    leading axes.
    """
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    shape = node.bottom_shapes[0]
    axis = module.axis % len(shape)
    operands = [ctx.param(node, 0)] + ([ctx.param(node, 1)] if module.bias_term else [])
    trans_b = 0 if module.transpose else 1
    if axis == 1:
        flat = ctx.op("Flatten", [x], axis=1) if len(shape) > 2 else x
        ctx.op("Gemm", [flat] + operands, top, transB=trans_b)
        return
    (probe_bottom,), (probe_top,) = ctx.probe_shapes(node)
    rows = ctx.reshape(x, (math.prod(shape[:axis]), module.in_features),
                       (math.prod(probe_bottom[:axis]), module.in_features))
    product = ctx.op("Gemm", [rows] + operands, transB=trans_b)
    ctx.reshape(product, node.top_shapes[0], probe_top, top)


def _convolution_attributes(module) -> dict:
    return {"kernel_shape": list(module.kernel_size), "strides": list(module.stride),
            "pads": list(module.pad) * 2, "dilations": list(module.dilation),
            "group": module.group}


def _emit_convolution(ctx, node, op_type: str) -> None:
    module = node.module
    operands = [ctx.param(node, 0)] + ([ctx.param(node, 1)] if module.bias_term else [])
    # Caffe applies the same filters to every bottom, one top each.
    for x, top in zip(ctx.bottoms(node), ctx.tops(node)):
        ctx.op(op_type, [x] + operands, top, **_convolution_attributes(module))


@register_emitter("Convolution")
def emit_convolution(ctx, node) -> None:
    """``Conv`` with symmetric pads, strides, dilations and groups (1-D to 3-D)."""
    _emit_convolution(ctx, node, "Conv")


@register_emitter("Deconvolution")
def emit_deconvolution(ctx, node) -> None:
    """``ConvTranspose``: the output size ``s (in - 1) + d (k - 1) + 1 - 2 p`` is ONNX's with
    no ``output_padding``; the weight ``C_in x C_out/group x k...`` is ONNX's layout."""
    _emit_convolution(ctx, node, "ConvTranspose")


@register_emitter("Embed")
def emit_embed(ctx, node) -> None:
    """``Gather`` of the table's rows at the bottom's values truncated to integers (Caffe's
    ``static_cast<int>``, which ``Cast`` to int64 also does)."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    indices = ctx.op("Cast", [x], to=TensorProto.INT64)
    table = ctx.param(node, 0)
    if not node.module.bias_term:
        ctx.op("Gather", [table, indices], top, axis=0)
        return
    rows = ctx.op("Gather", [table, indices], axis=0)
    ctx.op("Add", [rows, ctx.param(node, 1)], top)
