"""ONNX emitter for the detection forks' SmoothL1Loss, as standard ops.

The forward of every variant (:class:`caffelayers.losses.detection.SmoothL1Loss`):
``sum(w_out * f(w_in * (a - b))) / D`` with ``f`` the smooth L1 of ``sigma``, ``D`` the
batch (Fast/Faster R-CNN, SSD) or R-FCN's normalization, and R-FCN's per-instance top.
SSD's MultiBoxLoss has no emitter: its greedy matching and mining are data-dependent loops
(see ``UNSUPPORTED``).
"""

from __future__ import annotations

import math

from ...layers.ssd import legacy_dims
from ...registry import register_emitter
from .training import _count, _probe_bottom, _scalar, _sum_all


@register_emitter("SmoothL1Loss")
def emit_smooth_l1_loss(ctx, node) -> None:
    """``where(|d| < 1/s2, 0.5 s2 d^2, |d| - 0.5/s2)`` summed and divided; the weights and
    the targets reshaped to the predictions' shape (elements pair up in memory order)."""
    module = node.module
    bottoms, tops = ctx.bottoms(node), ctx.tops(node)
    a = bottoms[0]
    shape = ctx.op("Shape", [a])

    def like_a(value: str) -> str:
        return ctx.op("Reshape", [value, shape])

    diff = ctx.op("Sub", [a, like_a(bottoms[1])])
    if len(bottoms) >= 3:
        diff = ctx.op("Mul", [like_a(bottoms[2]), diff])
    sigma2 = module.sigma2
    magnitude = ctx.op("Abs", [diff])
    inner = ctx.op("Less", [magnitude, _scalar(ctx, 1.0 / sigma2, "smooth_l1_knee")])
    square = ctx.op("Mul", [ctx.op("Mul", [diff, diff]), _scalar(ctx, 0.5 * sigma2, "half_s2")])
    linear = ctx.op("Sub", [magnitude, _scalar(ctx, 0.5 / sigma2, "half_over_s2")])
    errors = ctx.op("Where", [inner, square, linear])
    if len(bottoms) == 4:
        errors = ctx.op("Mul", [like_a(bottoms[3]), errors])
    build, probe = tuple(node.bottom_shapes[0]), _probe_bottom(ctx, node)
    num, channels, height, width = legacy_dims(build)
    dynamic = build[0] != probe[0]
    mode = module.normalization
    if mode is None or mode == "BATCH_SIZE":
        divisor = _count(ctx, a, num, dynamic, rows_only=True, floor=mode is not None)
    elif mode in ("FULL", "VALID"):
        # N H W: the element count over the (fixed) channels, floored at 1.
        size = _count(ctx, a, math.prod(build), dynamic, floor=False)
        divisor = ctx.op("Max", [ctx.op("Div", [size, _scalar(ctx, channels, "channels")]),
                                 _scalar(ctx, 1.0, "one")])
    else:
        value = module.pre_fixed_normalizer if mode == "PRE_FIXED" else 1.0
        divisor = _scalar(ctx, max(1.0, value), "normalizer")
    ctx.op("Div", [_sum_all(ctx, errors), divisor], tops[0])
    if module.instance_loss:
        per_position = ctx.reshape(errors, (num, channels, height * width),
                                   (probe[0], channels, height * width))
        summed = ctx.reduce("ReduceSum", per_position, [1], keepdims=True)
        ctx.reshape(summed, (num, 1, height, width), (probe[0], 1, height, width), tops[1])
