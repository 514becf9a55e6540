"""Emitters for the two-stage detector layers (Faster R-CNN, R-FCN), standard ONNX operators
only.

* ROIPooling: ONNX's ``MaxRoiPool``, whose rounding the standard leaves open; onnxruntime's
  kernel computes Caffe's (C ``round`` of the scaled corners, float bin sizes, floor/ceil
  bounds, clipping, 0 for an empty bin, ``-FLT_MAX`` for a bin of ``-inf``), which the tests
  pin on random ROIs, half-pixel corners and bins that float rounding stretches. It lets a
  NaN win a bin where Caffe's ``>`` skips it, so NaN becomes ``-inf`` first.
* PSROIPooling: an integral image in float64 (``CumSum`` twice, a zero row and column) and
  four ``Gather``s per bin, the bins computed with R-FCN's float operations in float32.
* Proposal: anchors as constants, the deltas decoded and clipped in float32 in
  py-faster-rcnn's order (``exp`` in float64, rounded, as the ``Net`` runtime does), small
  boxes masked to ``-inf``, ``TopK`` (score descending, ties by position) for the pre-NMS cut,
  ``NonMaxSuppression`` for the greedy suppression and ``Gather`` for the rows.
  ``NonMaxSuppression`` breaks equal scores arbitrarily, so it gets each candidate's rank
  (``k - r``) as its score and 0 for a masked one (dropped by its score threshold 0): its
  order is ``TopK``'s. Its IoU has no ``+ 1`` pixel, so it gets the
  boxes as ``(y1, x1, y2 + 1, x2 + 1)``: the same overlaps, rounded in another order (an
  IoU within an ulp of ``nms_thresh`` may be decided the other way).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ...layers.roi import PSROI_MIN_SIDE
from ...registry import register_emitter


def _rois(ctx, rois: str) -> str:
    """The ROIs as ``R x 5`` (Caffe also writes ``R x 5 x 1 x 1``)."""
    return ctx.op("Reshape", [rois, ctx.ints([-1, 5], "rois_shape")])


def _column(ctx, table: str, index: int, hint: str) -> str:
    """Column ``index`` of a 2-D tensor, kept as ``R x 1``."""
    return ctx.op("Gather", [table, ctx.ints([index], hint)], axis=1)


def _caffe_round(ctx, value: str) -> str:
    """C's ``round`` (halves away from zero): ``floor(|v|) + (|v| - floor(|v|) >= 0.5)``,
    the difference exact, with ``v``'s sign."""
    magnitude = ctx.op("Abs", [value])
    whole = ctx.op("Floor", [magnitude])
    half = ctx.op("GreaterOrEqual", [ctx.op("Sub", [magnitude, whole]),
                                     ctx.const(0.5, "half")])
    rounded = ctx.op("Add", [whole, ctx.op("Cast", [half], to=TensorProto.FLOAT)])
    negative = ctx.op("Less", [value, ctx.const(0.0, "zero")])
    return ctx.op("Where", [negative, ctx.op("Neg", [rounded]), rounded])


@register_emitter("ROIPooling")
def emit_roi_pooling(ctx, node) -> None:
    """``MaxRoiPool`` on the feature map with NaN replaced by ``-inf`` (see the module
    docstring)."""
    module = node.module
    (x, rois), (top,) = ctx.bottoms(node), ctx.tops(node)
    no_nan = ctx.op("Where", [ctx.op("IsNaN", [x]), ctx.const(float("-inf"), "minus_inf"), x])
    ctx.op("MaxRoiPool", [no_nan, _rois(ctx, rois)], top,
           pooled_shape=[module.pooled_h, module.pooled_w],
           spatial_scale=module.spatial_scale)


# -- PSROIPooling -------------------------------------------------------------------------
def _psroi_bounds(ctx, rois: str, column: int, groups: int, scale: float, limit: int):
    """R-FCN's bin bounds along one axis as ``R x G`` int64 ``(start, end)``."""
    start_corner = _caffe_round(ctx, _column(ctx, rois, column, f"column{column}"))
    end_corner = _caffe_round(ctx, _column(ctx, rois, column + 2, f"column{column + 2}"))
    scale_ = ctx.const(scale, "spatial_scale")
    roi_start = ctx.op("Mul", [start_corner, scale_])
    roi_end = ctx.op("Mul", [ctx.op("Add", [end_corner, ctx.const(1.0, "one")]), scale_])
    length = ctx.op("Max", [ctx.op("Sub", [roi_end, roi_start]),
                            ctx.const(PSROI_MIN_SIDE, "min_side")])
    bin_size = ctx.op("Div", [length, ctx.const(float(groups), "groups")])
    steps = np.arange(groups + 1, dtype=np.float32)[None, :]
    bounds = []
    for rounding, step in (("Floor", steps[:, :-1]), ("Ceil", steps[:, 1:])):
        offset = ctx.op("Add", [ctx.op("Mul", [ctx.const(step, "steps"), bin_size]),
                                roi_start])
        clipped = ctx.op("Clip", [ctx.op(rounding, [offset]), ctx.const(0.0, "zero"),
                                  ctx.const(float(limit), "limit")])
        bounds.append(ctx.op("Cast", [clipped], to=TensorProto.INT64))
    return bounds


@register_emitter("PSROIPooling")
def emit_psroi_pooling(ctx, node) -> None:
    """Bin sums from a float64 integral image (four corners), divided by the bin area in
    float32; 0 for an empty bin."""
    module = node.module
    (x, rois), (top,) = ctx.bottoms(node), ctx.tops(node)
    _, channels, height, width = node.bottom_shapes[0]
    groups, classes = module.group_size, module.output_dim
    rois = _rois(ctx, rois)
    wide = ctx.op("Cast", [x], to=TensorProto.DOUBLE)
    for axis in (2, 3):
        wide = ctx.op("CumSum", [wide, ctx.const(axis, f"axis{axis}", np.int64)])
    integral = ctx.op("Pad", [wide, ctx.ints([0, 0, 1, 1, 0, 0, 0, 0], "pads"),
                              ctx.const(0.0, "pad_value", np.float64)], mode="constant")
    flat = ctx.op("Reshape", [integral, ctx.ints([-1], "flat")])
    (h0, h1) = _psroi_bounds(ctx, rois, 2, groups, module.spatial_scale, height)
    (w0, w1) = _psroi_bounds(ctx, rois, 1, groups, module.spatial_scale, width)
    batch = ctx.op("Cast", [_column(ctx, rois, 0, "batch_column")], to=TensorProto.INT64)
    batch = ctx.op("Unsqueeze", [batch, ctx.ints([2, 3], "batch_axes")])  # R x 1 x 1 x 1
    channel = np.arange(channels, dtype=np.int64).reshape(1, classes, groups, groups)
    plane = ctx.op("Mul", [ctx.op("Add", [ctx.op("Mul", [batch, ctx.const(channels, "channels",
                                                                          np.int64)]),
                                          ctx.const(channel, "channel", np.int64)]),
                           ctx.const(height + 1, "rows", np.int64)])
    row_axes, col_axes = ctx.ints([1, 3], "row_axes"), ctx.ints([1, 2], "col_axes")
    rows = {name: ctx.op("Unsqueeze", [value, row_axes]) for name, value in
            (("top", h0), ("bottom", h1))}
    cols = {name: ctx.op("Unsqueeze", [value, col_axes]) for name, value in
            (("left", w0), ("right", w1))}
    stride = ctx.const(width + 1, "cols", np.int64)

    def corner(row: str, col: str) -> str:
        index = ctx.op("Add", [ctx.op("Mul", [ctx.op("Add", [plane, rows[row]]), stride]),
                               cols[col]])
        return ctx.op("Gather", [flat, index], axis=0)

    total = ctx.op("Add", [ctx.op("Sub", [ctx.op("Sub", [corner("bottom", "right"),
                                                         corner("top", "right")]),
                                          corner("bottom", "left")]),
                           corner("top", "left")])
    area = ctx.op("Mul", [ctx.op("Sub", [rows["bottom"], rows["top"]]),
                          ctx.op("Sub", [cols["right"], cols["left"]])])
    divisor = ctx.op("Cast", [ctx.op("Max", [area, ctx.const(1, "one_int", np.int64)])],
                     to=TensorProto.FLOAT)
    mean = ctx.op("Div", [ctx.op("Cast", [total], to=TensorProto.FLOAT), divisor])
    filled = ctx.op("Greater", [area, ctx.const(0, "zero_int", np.int64)])
    ctx.op("Where", [filled, mean, ctx.const(0.0, "empty")], top)


# -- Proposal -----------------------------------------------------------------------------
@register_emitter("Proposal")
def emit_proposal(ctx, node) -> None:
    """py-faster-rcnn's proposals per image (see the module docstring); the ROI rows come
    image by image, each in score order."""
    module = node.module
    (prob, deltas, info), tops = ctx.bottoms(node), ctx.tops(node)
    _, _, height, width = node.bottom_shapes[0]
    anchors = module.num_anchors
    cells = height * width * anchors

    # N x K foreground scores and deltas in (h, w, a) order.
    foreground = ctx.op("Slice", [prob, ctx.ints([anchors], "fg_start"),
                                  ctx.ints([2 * anchors], "fg_end"), ctx.ints([1], "fg_axis")])
    nhwc = [0, 2, 3, 1]
    scores = ctx.op("Reshape", [ctx.op("Transpose", [foreground], perm=nhwc),
                                ctx.ints([0, -1], "scores_shape")])
    per_anchor = ctx.op("Reshape", [ctx.op("Transpose", [deltas], perm=nhwc),
                                    ctx.ints([0, cells, 4], "deltas_shape")])
    dx, dy, dw, dh = (ctx.op("Gather", [per_anchor, ctx.const(k, f"delta{k}", np.int64)],
                             axis=2) for k in range(4))
    widths, heights, center_x, center_y = (
        ctx.const(values[None, :], name) for values, name in
        zip(module.anchor_geometry(height, width), ("widths", "heights", "center_x",
                                                    "center_y")))

    # bbox_transform_inv, then clip_boxes against each image's im_info row.
    x = ctx.op("Add", [ctx.op("Mul", [dx, widths]), center_x])
    y = ctx.op("Add", [ctx.op("Mul", [dy, heights]), center_y])
    half = ctx.const(0.5, "half")

    def exp(value: str) -> str:
        """``exp`` in float64, rounded to float32: the correctly rounded value, as Net's."""
        wide = ctx.op("Exp", [ctx.op("Cast", [value], to=TensorProto.DOUBLE)])
        return ctx.op("Cast", [wide], to=TensorProto.FLOAT)

    half_w = ctx.op("Mul", [half, ctx.op("Mul", [exp(dw), widths])])
    half_h = ctx.op("Mul", [half, ctx.op("Mul", [exp(dh), heights])])
    image = ctx.op("Reshape", [info, ctx.ints([0, -1], "info_shape")])
    image_h, image_w, image_scale = (_column(ctx, image, k, f"info{k}") for k in range(3))
    one, zero = ctx.const(1.0, "one"), ctx.const(0.0, "zero")
    right, bottom = ctx.op("Sub", [image_w, one]), ctx.op("Sub", [image_h, one])

    def clip(value: str, high: str) -> str:
        return ctx.op("Max", [ctx.op("Min", [value, high]), zero])

    x1, x2 = clip(ctx.op("Sub", [x, half_w]), right), clip(ctx.op("Add", [x, half_w]), right)
    y1, y2 = clip(ctx.op("Sub", [y, half_h]), bottom), clip(ctx.op("Add", [y, half_h]), bottom)

    # Boxes with a side below min_size * scale drop out of the ranking.
    smallest = ctx.op("Mul", [ctx.const(module.min_size, "min_size"), image_scale])
    sides = [ctx.op("Add", [ctx.op("Sub", [high, low]), one]) for low, high in
             ((x1, x2), (y1, y2))]
    kept = ctx.op("And", [ctx.op("GreaterOrEqual", [side, smallest]) for side in sides])
    minus_inf = ctx.const(float("-inf"), "minus_inf")
    ranked = ctx.op("Where", [kept, scores, minus_inf])

    candidates = cells if module.pre_nms_topn <= 0 else min(module.pre_nms_topn, cells)
    best, order = ctx.op("TopK", [ranked, ctx.ints([candidates], "pre_nms_topn")], 2, axis=1,
                         largest=1, sorted=1)
    x1, y1, x2, y2 = (ctx.op("GatherElements", [c, order], axis=1) for c in (x1, y1, x2, y2))

    rank = np.arange(candidates, 0, -1, dtype=np.float32)[None, :]
    valid = ctx.op("Greater", [best, minus_inf])
    nms_scores = ctx.op("Unsqueeze", [ctx.op("Where", [valid, ctx.const(rank, "rank"), zero]),
                                      ctx.ints([1], "class_axis")])
    box_axis = ctx.ints([2], "box_axis")
    corners = [ctx.op("Unsqueeze", [c, box_axis]) for c in
               (y1, x1, ctx.op("Add", [y2, one]), ctx.op("Add", [x2, one]))]
    limit = candidates if module.post_nms_topn <= 0 else module.post_nms_topn
    selected = ctx.op("NonMaxSuppression", [
        ctx.op("Concat", corners, axis=2), nms_scores, ctx.ints([limit], "post_nms_topn"),
        ctx.const([module.nms_thresh], "nms_thresh"), ctx.const([0.0], "score_threshold")])

    picked_image = ctx.op("Gather", [selected, ctx.const(0, "image_column", np.int64)], axis=1)
    picked = ctx.op("Add", [ctx.op("Mul", [picked_image, ctx.const(candidates, "candidates",
                                                                   np.int64)]),
                            ctx.op("Gather", [selected, ctx.const(2, "box_column", np.int64)],
                                   axis=1)])
    flat_shape = ctx.ints([-1], "flat")
    row_axis = ctx.ints([1], "row_axis")

    def rows_of(value: str) -> str:
        """``M x 1``: the picked entries of an ``N x k`` tensor."""
        taken = ctx.op("Gather", [ctx.op("Reshape", [value, flat_shape]), picked], axis=0)
        return ctx.op("Unsqueeze", [taken, row_axis])

    image_index = ctx.op("Unsqueeze", [ctx.op("Cast", [picked_image], to=TensorProto.FLOAT),
                                       row_axis])
    ctx.op("Concat", [image_index] + [rows_of(c) for c in (x1, y1, x2, y2)], tops[0], axis=1)
    if len(tops) == 2:
        ctx.op("Identity", [rows_of(best)], tops[1])
