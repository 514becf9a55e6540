"""Emitters for the margin heads and the softmax distribution-difference loss: MarginHead
(logits, with the label column's margin when the label is a bottom) and SoftmaxDiffLoss
(the loss, 0-d or per position), as subgraphs of standard ops.

Labels and targets are graph inputs of their Caffe blobs, float as Caffe stores them; labels
are truncated to integers inside the graph. The exported MarginHead weight has unit rows
(the forward only ever uses the normalized weight).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx import TensorProto

from ...losses.distribution import _layout
from ...registry import register_emitter
from .training import margin_psi


def _scalar(ctx, value: float, hint: str) -> str:
    """A 0-d float32 constant."""
    return ctx.const(np.float32(value), hint)


def _shifted(ctx, cos: str, shift: float) -> str:
    """``cos(theta + shift) = cos cos(shift) - sin(theta) sin(shift)``, no ``acos``."""
    square = ctx.op("Sub", [_scalar(ctx, 1.0, "one"), ctx.op("Mul", [cos, cos])])
    sin = ctx.op("Sqrt", [ctx.op("Max", [square, _scalar(ctx, 0.0, "zero")])])
    return ctx.op("Sub", [ctx.op("Mul", [cos, _scalar(ctx, math.cos(shift), "cos_m")]),
                          ctx.op("Mul", [sin, _scalar(ctx, math.sin(shift), "sin_m")])])


def _label_function(ctx, module, cos: str) -> str:
    """The head's ``f(cos)`` (see ``caffelayers.layers.margin_head.label_margin``)."""
    kind, m = module.kind, module.m
    if kind == "sphere":
        return margin_psi(ctx, cos, m)
    if kind == "cos":
        return ctx.op("Sub", [cos, _scalar(ctx, m, "margin")])
    if kind == "arc":
        threshold = 0.0 if module.easy_margin else math.cos(math.pi - m)
        drop = 0.0 if module.easy_margin else m * math.sin(m)
        keep = ctx.op("Greater", [cos, _scalar(ctx, threshold, "threshold")])
        fallback = ctx.op("Sub", [cos, _scalar(ctx, drop, "drop")])
        return ctx.op("Where", [keep, _shifted(ctx, cos, m), fallback])
    m1, m2, m3 = m
    if m1 == 1:
        value = _shifted(ctx, cos, m2)
    else:
        clipped = ctx.op("Clip", [cos, _scalar(ctx, -1.0, "low"), _scalar(ctx, 1.0, "high")])
        angle = ctx.op("Add", [ctx.op("Mul", [ctx.op("Acos", [clipped]),
                                              _scalar(ctx, m1, "m1")]),
                               _scalar(ctx, m2, "m2")])
        value = ctx.op("Cos", [angle])
    return ctx.op("Sub", [value, _scalar(ctx, m3, "m3")])


@register_emitter("MarginHead")
def emit_margin_head(ctx, node) -> None:
    """``Gemm`` of the (normalized, scaled) features with the unit-row weight; with a label
    bottom, the label column replaced by ``(|z| f(cos) + lambda z . w_y) / (1 + lambda)``,
    ``z`` the features fed to the product (``GatherElements``, per-row arithmetic,
    ``ScatterElements``). Zero feature rows give zero logits, as the module."""
    module = node.module
    bottoms, (top,) = ctx.bottoms(node), ctx.tops(node)
    shape = tuple(node.bottom_shapes[0])
    axis = module.axis % len(shape)
    tiny = _scalar(ctx, np.finfo(np.float32).tiny, "tiny")

    weight = module.weight.detach().double()
    unit = weight / torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    features = ctx.op("Flatten", [bottoms[0]], axis=axis) if (len(shape), axis) != (2, 1) \
        else bottoms[0]
    if module.s is not None:
        norm = ctx.reduce("ReduceL2", features, [1], keepdims=True)
        features = ctx.op("Mul", [ctx.op("Div", [features, ctx.op("Max", [norm, tiny])]),
                                  _scalar(ctx, module.s, "scale")])
    logits = ctx.op("Gemm", [features, ctx.param(node, 0, unit.float().cpu().numpy())],
                    transB=1)
    trivial = module.kind == "sphere" and module.m == 1
    if len(bottoms) == 2 and not trivial:
        labels = ctx.op("Reshape", [ctx.op("Cast", [bottoms[1]], to=TensorProto.INT64),
                                    ctx.ints([-1, 1], "column")])
        product = ctx.op("GatherElements", [logits, labels], axis=1)            # z . w_y
        norm = ctx.reduce("ReduceL2", features, [1], keepdims=True)
        cos = ctx.op("Div", [product, ctx.op("Max", [norm, tiny])])
        label_logit = ctx.op("Mul", [norm, _label_function(ctx, module, cos)])
        if module.lambda_:
            mixed = ctx.op("Add", [label_logit, ctx.op("Mul", [product, _scalar(
                ctx, module.lambda_, "lambda")])])
            label_logit = ctx.op("Mul", [mixed, _scalar(ctx, 1 / (1 + module.lambda_),
                                                        "mix")])
        logits = ctx.op("ScatterElements", [logits, labels, label_logit], axis=1)
    top_shape = tuple(node.top_shapes[0])
    if len(top_shape) == 2:
        ctx.op("Identity", [logits], top)
    else:
        ctx.reshape(logits, top_shape, ctx.probe_shapes(node)[1][0], top)


def _sum_over_classes(ctx, value: str) -> str:
    return ctx.reduce("ReduceSum", value, [1], keepdims=False)


def _binary_target(ctx, target: str, temperature: float) -> str:
    """``c^(1/T) / (c^(1/T) + (1 - c)^(1/T))`` with ``c`` clipped to [0, 1]."""
    clipped = ctx.op("Clip", [target, _scalar(ctx, 0.0, "zero"), _scalar(ctx, 1.0, "one")])
    power = _scalar(ctx, 1 / temperature, "inverse_t")
    positive = ctx.op("Pow", [clipped, power])
    negative = ctx.op("Pow", [ctx.op("Sub", [_scalar(ctx, 1.0, "one"), clipped]), power])
    return ctx.op("Div", [positive, ctx.op("Add", [positive, negative])])


def _losses(ctx, module, x: str, target: str) -> str:
    """Per-position losses ``(outer, inner)`` of ``x`` ``(outer, C, inner)`` against the
    target ``(outer, C, inner or 1)`` (see ``softmax_diff_loss``)."""
    temperature = module.temperature
    logits = x if temperature == 1 else ctx.op("Div", [x, _scalar(ctx, temperature, "t")])
    if module.style == "multilabel":
        if module.mode == "MI":
            if temperature != 1:
                target = _binary_target(ctx, target, temperature)
            # max(z, 0) - z c + log(1 + exp(-|z|))
            softplus = ctx.op("Softplus", [ctx.op("Neg", [ctx.op("Abs", [logits])])])
            elements = ctx.op("Add", [ctx.op("Sub", [ctx.op("Relu", [logits]),
                                                     ctx.op("Mul", [logits, target])]),
                                      softplus])
            return _sum_over_classes(ctx, elements)
        difference = ctx.op("Sub", [ctx.op("Sigmoid", [logits]), target])
        if module.mode == "L1":
            return ctx.op("Mul", [_sum_over_classes(ctx, ctx.op("Abs", [difference])),
                                  _scalar(ctx, 2.0, "two")])
        return _sum_over_classes(ctx, ctx.op("Mul", [difference, difference]))
    if module.mode == "MI":
        if temperature != 1:
            sharpened = ctx.op("Pow", [target, _scalar(ctx, 1 / temperature, "inverse_t")])
            target = ctx.op("Div", [sharpened, ctx.reduce("ReduceSum", sharpened, [1],
                                                          keepdims=True)])
        shifted = ctx.op("Sub", [logits, ctx.reduce("ReduceMax", logits, [1], keepdims=True)])
        log_total = ctx.op("Log", [_sum_over_classes(ctx, ctx.op("Exp", [shifted]))])
        return ctx.op("Sub", [log_total,
                              _sum_over_classes(ctx, ctx.op("Mul", [target, shifted]))])
    difference = ctx.op("Sub", [ctx.op("Softmax", [logits], axis=1), target])
    if module.mode == "L1":
        return _sum_over_classes(ctx, ctx.op("Abs", [difference]))
    return ctx.op("Mul", [_sum_over_classes(ctx, ctx.op("Mul", [difference, difference])),
                          _scalar(ctx, 0.5, "half")])


@register_emitter("SoftmaxDiffLoss")
def emit_softmax_diff_loss(ctx, node) -> None:
    """The loss as the layer computes it (the target is not checked here): per-position
    losses of the logits viewed as ``(outer, C, inner)``, then the sum, the mean over
    positions or samples (divisors read from the shapes, so a dynamic batch works), or the
    per-position values reshaped to the top."""
    module = node.module
    (x, target), (top,) = ctx.bottoms(node), ctx.tops(node)
    (probe_x, probe_target), (probe_top,) = ctx.probe_shapes(node)
    shapes = [tuple(node.bottom_shapes[0]), tuple(probe_x)]
    (outer, classes, inner), per_sample = _layout(shapes[0], tuple(node.bottom_shapes[1]),
                                                  module.axis, node.name)
    (probe_outer, _, probe_inner), _ = _layout(shapes[1], tuple(probe_target), module.axis,
                                               node.name)
    values = ctx.reshape(x, (outer, classes, inner), (probe_outer, classes, probe_inner))
    target = ctx.reshape(target, (outer, classes, 1 if per_sample else inner),
                         (probe_outer, classes, 1 if per_sample else probe_inner))
    losses = _losses(ctx, module, values, target)
    if module.reduction == "none":
        ctx.reshape(losses, tuple(node.top_shapes[0]), tuple(probe_top), top)
        return
    total = ctx.op("ReduceSum", [losses], keepdims=0)
    if module.reduction == "sum":
        ctx.op("Identity", [total], top)
        return
    if module.reduction == "mean":
        size = ctx.op("Size", [losses])
    else:
        size = ctx.op("Gather", [ctx.op("Shape", [x]), ctx.const(np.int64(0), "axis0",
                                                                 np.int64)], axis=0)
    divisor = ctx.op("Max", [ctx.op("Cast", [size], to=TensorProto.FLOAT),
                             _scalar(ctx, 1.0, "one")])
    ctx.op("Div", [total, divisor], top)
