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

When the input's height and width are symbolic (``ctx.follows_size``), the pads cannot come
from one input size. Padding ``pad`` before and ``pad + stride - 1`` after makes ONNX's
``floor`` count Caffe's ``ceil`` windows at any size (``pad`` after for ``round_mode:
FLOOR``); MAX takes it as ``MaxPool`` pads where every pad stays below the kernel, otherwise
an explicit ``Pad`` (``-FLT_MAX`` or zeros). Caffe's dropped last window and AVE's clipped
divisor are then computed in the graph from the input's ``Shape``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from onnx import TensorProto

from ...layers.pooling import FLT_MAX, FLT_MIN
from ...registry import register_emitter
from .sizes import ANY_SIZE


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


def _follows_any_size(node, bottom_shapes, top_shapes) -> bool:
    """Every setting but a mask top (Caffe's index within the plane needs the plane's
    width) and global STOCHASTIC pooling (its kernel is the input's size)."""
    module = node.module
    return not module.mask_top and not (module.global_pooling and module.pool == "STOCHASTIC")


ANY_SIZE["Pooling"] = _follows_any_size


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
    if ctx.follows_size(node):
        _emit_any_size(ctx, x, tops[0], module)
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


# -- any input size ----------------------------------------------------------------------
def _emit_any_size(ctx, x: str, top: str, module) -> None:
    """Caffe's pooling for an input whose height and width are only known at run time."""
    kernel, stride, pad = module.kernel_size, module.stride, module.pad
    ceil = module.round_mode == "CEIL"
    # Floor of (in + pad + after - k) / s is Caffe's ceil (or floor) of (in + 2 pad - k) / s.
    after = [p + (s - 1 if ceil else 0) for p, s in zip(pad, stride)]
    attributes = {"kernel_shape": list(kernel), "strides": list(stride)}
    if module.pool == "MAX" and all(a < k for a, k in zip(after, kernel)):
        # Then p + s <= k (ceil): no window starts past the input, none is dropped.
        ctx.op("MaxPool", [x], top, pads=list(pad) + after, **attributes)
        return
    # With ceil and a stride above 1 a last window can reach past in + pad: AVE's divisor
    # then depends on the size; and Caffe drops a last window that starts in the padding.
    reaches_past = ceil and any(s > 1 for s in stride)
    drops = [ceil and p > 0 and p + s > k for k, s, p in zip(kernel, stride, pad)]
    if module.pool != "MAX" and not reaches_past:
        # Symmetric pads and windows inside [-pad, in + pad): the divisor is always k_h k_w.
        if any(pad):
            attributes.update(pads=list(pad) * 2, count_include_pad=1)
        _pool_ratio(ctx, module.pool, x, top, kernel, attributes)
        return
    average, drop = module.pool == "AVE", any(drops)
    pooled_top = None if average or drop else top
    padded = _pad(ctx, x, pad, after, -FLT_MAX if module.pool == "MAX" else 0.0)
    pooled = (ctx.op("MaxPool", [padded], pooled_top, **attributes) if module.pool == "MAX"
              else _pool_ratio(ctx, module.pool, padded, pooled_top, kernel, attributes))
    if not (average or drop):
        return
    size = ctx.op("Slice", [ctx.op("Shape", [x]), ctx.ints([2], "from"), ctx.ints([4], "to")])
    counts = _window_counts(ctx, size, kernel, stride, pad, drops)
    if drop:
        pooled = ctx.op("Slice", [pooled, ctx.ints([0, 0], "starts"), counts,
                                  ctx.ints([2, 3], "axes")], None if average else top)
    if average:
        area = ctx.const(float(kernel[0] * kernel[1]), "area")
        divisors = _divisors_of(ctx, size, counts, kernel, stride, pad)
        ctx.op("Mul", [pooled, ctx.op("Div", [area, divisors])], top)


def _pool_ratio(ctx, pool: str, x: str, top, kernel, attributes) -> str:
    """AVE: ``AveragePool``; STOCHASTIC at TEST: ``sum x^2 / (sum x + FLT_MIN)`` over the
    same windows."""
    if pool == "AVE":
        return ctx.op("AveragePool", [x], top, **attributes)
    area = ctx.const(float(kernel[0] * kernel[1]), "area")
    sums = ctx.op("Mul", [ctx.op("AveragePool", [x], **attributes), area])
    squares = ctx.op("Mul", [ctx.op("AveragePool", [ctx.op("Mul", [x, x])], **attributes), area])
    return ctx.op("Div", [squares, ctx.op("Add", [sums, ctx.const(FLT_MIN, "flt_min")])], top)


def _window_counts(ctx, size: str, kernel, stride, pad, drops) -> str:
    """Caffe's window count per axis (int64, height and width) from the input's size."""
    def ints(values, hint):
        return ctx.ints(list(values), hint)

    span = ctx.op("Add", [size, ints([2 * p - k for k, p in zip(kernel, pad)], "span")])
    counts = ctx.op("Add", [ctx.op("Div", [ctx.op("Add", [span, ints([s - 1 for s in stride],
                                                                       "round_up")]),
                                           ints(stride, "stride")]), ints([1, 1], "one")])
    if not any(drops):
        return counts
    last = ctx.op("Mul", [ctx.op("Sub", [counts, ints([1, 1], "one")]), ints(stride, "stride")])
    in_padding = ctx.op("Cast", [ctx.op("GreaterOrEqual", [last, ctx.op("Add", [
        size, ints(pad, "pad")])])], to=TensorProto.INT64)
    dropped = ctx.op("Mul", [in_padding, ints([int(d) for d in drops], "may_drop")])
    return ctx.op("Sub", [counts, dropped])


def _divisors_of(ctx, size: str, counts: str, kernel, stride, pad) -> str:
    """Caffe's AVE divisor of every output pixel, ``rows x cols`` (float): each window
    clipped to ``[-pad, in + pad)`` along each axis."""
    def scalar(value, hint):
        return ctx.const(value, hint, np.int64)

    axes = []
    for axis in range(2):
        index = scalar(axis, "axis")
        count = ctx.op("Gather", [counts, index], axis=0)
        length = ctx.op("Gather", [size, index], axis=0)
        start = ctx.op("Sub", [ctx.op("Mul", [ctx.op("Range", [scalar(0, "zero"), count,
                                                                 scalar(1, "one")]),
                                               scalar(stride[axis], "stride")]),
                               scalar(pad[axis], "pad")])
        end = ctx.op("Min", [ctx.op("Add", [start, scalar(kernel[axis], "kernel")]),
                             ctx.op("Add", [length, scalar(pad[axis], "pad")])])
        axes.append(ctx.op("Cast", [ctx.op("Sub", [end, start])], to=TensorProto.FLOAT))
    rows = ctx.op("Unsqueeze", [axes[0], ctx.ints([1], "column")])
    return ctx.op("Mul", [rows, axes[1]])
