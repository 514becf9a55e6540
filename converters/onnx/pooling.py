"""The Pooling emitter: Caffe's window placement made explicit, so that no runtime's
``ceil_mode`` or padded-divisor rule is relied on.

Caffe places window ``i`` at ``i * stride - pad`` and sizes the output with ``ceil`` (dropping
a last window that starts in the trailing padding). The emitted pool has ``ceil_mode`` 0 and
pads ``pad`` before and ``end = max(0, (n - 1) stride + k - in - pad)`` after, which makes
ONNX's ``floor`` count exactly Caffe's ``n`` windows at Caffe's places.

* MAX: ``MaxPool`` with those pads (``pad < k`` and ``end < k``, as every runtime requires),
  or, for Caffe's unpadded ceil windows that start past the input (``end >= k``), an explicit
  ``Pad`` with ``-FLT_MAX``, the value Caffe reports for an empty window.
* AVE: ``AveragePool`` with symmetric pads and ``count_include_pad`` when ``end == pad``;
  otherwise an explicit zero ``Pad`` and an unpadded ``AveragePool`` (tools reject uneven
  pads on AveragePool). Where Caffe's divisor (the window clipped to ``in + pad``) is not
  ``k_h k_w``, the result is multiplied by a constant ``k_h k_w / divisor`` per output pixel.
* STOCHASTIC at TEST: ``sum x^2 / (sum x + FLT_MIN)`` over the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from onnx import TensorProto

from ...layers.pooling import FLT_MAX, FLT_MIN
from ...registry import register_emitter


@dataclass
class _Windows:
    """Where Caffe places the windows, per spatial axis (height, width)."""

    size: Tuple[int, int]
    count: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    pad: Tuple[int, int]

    @property
    def after(self) -> List[int]:
        """Padding after each axis that holds every window (0 where the windows fit)."""
        return [max(0, (n - 1) * s + k - length - p) for length, n, k, s, p in
                zip(self.size, self.count, self.kernel, self.stride, self.pad)]

    def pool_attributes(self) -> dict:
        return {"kernel_shape": list(self.kernel), "strides": list(self.stride)}


def _divisors(length: int, windows: int, kernel: int, stride: int, pad: int) -> np.ndarray:
    """Caffe's AVE divisor along one axis: each window clipped to ``[-pad, length + pad)``
    (zero or negative for a window starting past the input, as in Caffe)."""
    start = np.arange(windows) * stride - pad
    return np.minimum(start + kernel, length + pad) - start


def _pad(ctx, x: str, before: Sequence[int], after: Sequence[int], value: float) -> str:
    pads = [0, 0] + list(before) + [0, 0] + list(after)
    return ctx.op("Pad", [x, ctx.ints(pads, "pads"), ctx.const(value, "pad_value")],
                  mode="constant")


@register_emitter("Pooling")
def emit_pooling(ctx, node) -> None:
    module = node.module
    (x,), tops = ctx.bottoms(node), ctx.tops(node)
    if module.pool == "STOCHASTIC" and module.phase == "TRAIN":
        raise ctx.unsupported("STOCHASTIC pooling draws random windows in the TRAIN phase; "
                              "convert the TEST phase")
    if module.global_pooling and not module.mask_top and module.pool != "STOCHASTIC":
        ctx.op("GlobalMaxPool" if module.pool == "MAX" else "GlobalAveragePool", [x], tops[0])
        return
    size = tuple(node.bottom_shapes[0][2:])
    windows = _Windows(size, tuple(node.top_shapes[0][2:]),
                       size if module.global_pooling else tuple(module.kernel_size),
                       tuple(module.stride), tuple(module.pad))
    if module.pool == "MAX":
        _emit_max(ctx, x, tops, windows)
    elif module.pool == "AVE":
        _emit_average(ctx, x, tops[0], windows)
    else:
        _emit_stochastic_test(ctx, x, tops[0], windows)


def _emit_max(ctx, x: str, tops: List[str], windows: _Windows) -> None:
    mask = len(tops) == 2
    outputs = [tops[0], ctx.fresh("indices")] if mask else tops[0]
    after = windows.after
    if all(a < k for a, k in zip(after, windows.kernel)):
        result = ctx.op("MaxPool", [x], outputs, pads=list(windows.pad) + after,
                        **windows.pool_attributes())
        if mask:
            # ONNX counts indices over the whole N x C x H x W input; Caffe within the plane.
            plane_size = ctx.const(windows.size[0] * windows.size[1], "plane", np.int64)
            ctx.op("Cast", [ctx.op("Mod", [result[1], plane_size])], tops[1],
                   to=TensorProto.FLOAT)
        return
    # Windows entirely past the input: Caffe's max over nothing is -FLT_MAX.
    padded = _pad(ctx, x, windows.pad, after, -FLT_MAX)
    result = ctx.op("MaxPool", [padded], outputs, **windows.pool_attributes())
    if mask:
        _emit_padded_mask(ctx, result[1], tops[1], windows.size, windows.pad, after)


def _emit_padded_mask(ctx, indices: str, top: str, size, pad, after) -> None:
    """Caffe's mask ``h * W + w`` from indices into the explicitly padded planes; -1 where
    the maximum lies in the padding (an empty window)."""
    height, width = size
    padded_height, padded_width = (length + p + a for length, p, a in zip(size, pad, after))

    def const(value, hint):
        return ctx.const(value, hint, np.int64)

    local = ctx.op("Mod", [indices, const(padded_height * padded_width, "padded_plane")])
    row = ctx.op("Sub", [ctx.op("Div", [local, const(padded_width, "padded_width")]),
                         const(pad[0], "pad_h")])
    col = ctx.op("Sub", [ctx.op("Mod", [local, const(padded_width, "padded_width")]),
                         const(pad[1], "pad_w")])
    zero = const(0, "zero")
    inside = ctx.op("And", [
        ctx.op("And", [ctx.op("GreaterOrEqual", [row, zero]),
                       ctx.op("Less", [row, const(height, "height")])]),
        ctx.op("And", [ctx.op("GreaterOrEqual", [col, zero]),
                       ctx.op("Less", [col, const(width, "width")])])])
    plane = ctx.op("Add", [ctx.op("Mul", [row, const(width, "width")]), col])
    chosen = ctx.op("Where", [inside, plane, const(-1, "outside")])
    ctx.op("Cast", [chosen], top, to=TensorProto.FLOAT)


def _window_averages(ctx, x: str, windows: _Windows, outputs=None) -> str:
    """The mean over each window of ``k_h x k_w`` elements, padding counted as zeros."""
    attributes = windows.pool_attributes()
    after = windows.after
    if after == list(windows.pad):
        if any(windows.pad):
            attributes.update(pads=list(windows.pad) * 2, count_include_pad=1)
        return ctx.op("AveragePool", [x], outputs, **attributes)
    padded = _pad(ctx, x, windows.pad, after, 0.0)
    return ctx.op("AveragePool", [padded], outputs, **attributes)


def _emit_average(ctx, x: str, top: str, windows: _Windows) -> None:
    rows, cols = (_divisors(*axis) for axis in zip(windows.size, windows.count, windows.kernel,
                                                   windows.stride, windows.pad))
    divisor = rows[:, None] * cols[None, :]
    area = windows.kernel[0] * windows.kernel[1]
    if np.all(divisor == area):
        _window_averages(ctx, x, windows, top)
        return
    with np.errstate(divide="ignore"):  # a zero divisor gives Caffe's 0 / 0 = NaN below
        correction = area / divisor.astype(np.float64)
    ctx.op("Mul", [_window_averages(ctx, x, windows), ctx.const(correction, "divisor")], top)


def _emit_stochastic_test(ctx, x: str, top: str, windows: _Windows) -> None:
    area = ctx.const(windows.kernel[0] * windows.kernel[1], "area")
    sums = ctx.op("Mul", [_window_averages(ctx, x, windows), area])
    squares = ctx.op("Mul", [_window_averages(ctx, ctx.op("Mul", [x, x]), windows), area])
    ctx.op("Div", [squares, ctx.op("Add", [sums, ctx.const(FLT_MIN, "flt_min")])], top)
