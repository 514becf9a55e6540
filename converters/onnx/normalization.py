"""Emitters for the normalizing layers: LRN, BatchNorm, MVN and Softmax."""

from __future__ import annotations

import math

from ...registry import register_emitter


@register_emitter("LRN")
def emit_lrn(ctx, node) -> None:
    """ACROSS_CHANNELS: ONNX's ``LRN``, whose ``alpha / size`` and ``bias`` are Caffe's
    ``alpha / n`` and ``k``. WITHIN_CHANNEL: Caffe's own construction,
    ``x * (1 + alpha * avg(x^2))^-beta`` with the average over ``n x n`` windows padded by
    ``(n - 1) / 2``, whose divisor is always ``n * n`` (``k`` unused)."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    if module.norm_region == "ACROSS_CHANNELS":
        ctx.op("LRN", [x], top, size=module.local_size, alpha=module.alpha, beta=module.beta,
               bias=module.k)
        return
    half = (module.local_size - 1) // 2
    mean = ctx.op("AveragePool", [ctx.op("Mul", [x, x])],
                  kernel_shape=[module.local_size] * 2, strides=[1, 1], pads=[half] * 4,
                  count_include_pad=1)
    base = ctx.op("Add", [ctx.op("Mul", [mean, ctx.const(module.alpha, "alpha")]),
                          ctx.const(1.0, "one")])
    factor = ctx.op("Pow", [base, ctx.const(-module.beta, "minus_beta")])
    ctx.op("Mul", [x, factor], top)


@register_emitter("BatchNorm")
def emit_batch_norm(ctx, node) -> None:
    """Stored statistics: ``BatchNormalization`` with unit scale and zero shift (NVCaffe's
    ``scale_bias``: its scale and shift blobs), the mean and variance folded at export
    (``blob / scale_factor``, 0 for a zero scale factor, as Caffe; NVCaffe's blobs as they
    are). Batch statistics (``use_global_stats: false``): the mean and biased variance over
    every axis but the channels, computed in the graph, then NVCaffe's scale and shift."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    if module.use_global_stats:
        channels = module.channels
        if module.scale_bias:
            scale, shift = ctx.param(node, 3), ctx.param(node, 4)
        else:
            scale = ctx.const([1.0] * channels, "unit_scale")
            shift = ctx.const([0.0] * channels, "zero_shift")
        mean = ctx.param(node, 0, module.running_mean.detach().cpu().numpy())
        variance = ctx.param(node, 1, module.running_var.detach().cpu().numpy())
        ctx.op("BatchNormalization", [x, scale, shift, mean, variance], top,
               epsilon=module.eps)
        return
    rank = len(node.bottom_shapes[0])
    axes = [0] + list(range(2, rank))
    centred = ctx.op("Sub", [x, ctx.reduce("ReduceMean", x, axes, keepdims=True)])
    variance = ctx.reduce("ReduceMean", ctx.op("Mul", [centred, centred]), axes, keepdims=True)
    deviation = ctx.op("Sqrt", [ctx.op("Add", [variance, ctx.const(module.eps, "eps")])])
    if not module.scale_bias:
        ctx.op("Div", [centred, deviation], top)
        return
    per_channel = (module.channels,) + (1,) * (rank - 2)
    scale = ctx.param(node, 3, module.weight.detach().cpu().numpy().reshape(per_channel))
    shift = ctx.param(node, 4, module.bias.detach().cpu().numpy().reshape(per_channel))
    normalized = ctx.op("Div", [centred, deviation])
    ctx.op("Add", [ctx.op("Mul", [normalized, scale]), shift], top)


@register_emitter("MVN")
def emit_mvn(ctx, node) -> None:
    """Per sample and channel (or per sample): ``(x - mean) / (std + eps)`` with the biased
    standard deviation, or ``x - mean``; the top has Caffe's 4-D legacy shape."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    (probe,) = ctx.probe_shapes(node)[1]

    def rows(shape):
        groups = shape[0] if module.across_channels else shape[0] * shape[1]
        return (groups, math.prod(shape) // groups if groups else 0)

    flat = ctx.reshape(x, rows(node.top_shapes[0]), rows(probe))
    centred = ctx.op("Sub", [flat, ctx.reduce("ReduceMean", flat, [1], keepdims=True)])
    if module.normalize_variance:
        variance = ctx.reduce("ReduceMean", ctx.op("Mul", [centred, centred]), [1],
                              keepdims=True)
        deviation = ctx.op("Add", [ctx.op("Sqrt", [variance]), ctx.const(module.eps, "eps")])
        centred = ctx.op("Div", [centred, deviation])
    ctx.reshape(centred, node.top_shapes[0], probe, top)


@register_emitter("Softmax")
def emit_softmax(ctx, node) -> None:
    """``Softmax`` on one axis (ONNX's meaning from opset 13 on), Caffe's default axis 1."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    ctx.op("Softmax", [x], top, axis=node.module.axis % len(node.bottom_shapes[0]))
