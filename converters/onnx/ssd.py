"""Emitters for the SSD fork's layers, standard ONNX operators only (onnxruntime runs them;
no custom PriorBox or DetectionOutput op).

* Normalize: ``ReduceSum`` of squares, ``Sqrt``, the fork's reciprocal-or-divide, the scale.
* Permute: ``Transpose`` with the completed order.
* PriorBox: when the model's input heights and widths are fixed, the priors are a
  constant (they depend only on shapes); when they are symbolic (a fully convolutional
  net, see :data:`~caffelayers.converters.onnx.ANY_SIZE`) they are computed from ``Shape``
  of the bottoms with ``Range``, arithmetic and ``Expand``.
* DetectionOutput: Caffe's ``ApplyNMSFast`` expressed with ``TopK`` and
  ``NonMaxSuppression``, exactly:

  - ``TopK`` over the priors gives Caffe's candidate order (score descending, ties by prior
    index, ONNX's documented tie rule) and its ``top_k`` cut before the suppression;
  - ``NonMaxSuppression`` orders equal scores arbitrarily (onnxruntime's heap), so it gets
    each candidate's rank (``K - r``) as its score instead, and 0 for a candidate at or
    below ``confidence_threshold`` (its own ``score_threshold`` 0 then drops it);
  - its IoU matches Caffe's ``JaccardOverlap`` on normalized boxes (the same float
    products and sums, suppression when above the threshold) except for inverted boxes
    (``xmax < xmin``), whose corners it sorts where Caffe gives them size and overlap 0:
    such a box is handed to it as a zero-area box, which overlaps nothing in both;
  - ``keep_top_k`` is a ``TopK`` over each image's kept scores (ties: lower label, then
    better candidate, as the ``Net`` runtime decides them), and ``NonZero`` of the kept
    mask lists the rows in Caffe's order: image, label, score;
  - when nothing is kept in any image, the rows ``(i, -1, ..., -1)`` are appended instead.

  ``nms_param.eta < 1`` (adaptive NMS) changes the threshold after every kept box, which
  ``NonMaxSuppression`` cannot do: it raises :class:`UnsupportedParameterError`.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ...registry import register_emitter
from .sizes import ANY_SIZE

#: NonMaxSuppression keeps at most this many boxes per class: more than any candidate list.
MAX_BOXES = 2 ** 31 - 1


def _split(ctx, value: str, parts: int, axis: int):
    return ctx.op("Split", [value], parts, axis=axis,
                  num_outputs=parts if ctx.opset >= 18 else None)


def _dim(ctx, shape: str, axis: int, hint: str) -> str:
    """Axis ``axis`` of a ``Shape`` output as a 1-element int64 tensor."""
    return ctx.op("Slice", [shape, ctx.ints([axis], f"{hint}_start"),
                            ctx.ints([axis + 1], f"{hint}_end")])


def _scalar(ctx, value: str) -> str:
    return ctx.op("Squeeze", [value, ctx.ints([0], "axis0")])


# -- Normalize, Permute ---------------------------------------------------------------------
@register_emitter("Normalize")
def emit_normalize(ctx, node) -> None:
    """``x / sqrt(sum x^2 + eps) * scale``, the sum over C x H x W or over C."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    rank = len(node.bottom_shapes[0])
    axes = list(range(1, rank)) if module.across_spatial else [1]
    squares = ctx.reduce("ReduceSum", ctx.op("Mul", [x, x]), axes, keepdims=True)
    norm = ctx.op("Sqrt", [ctx.op("Add", [squares, ctx.const(module.eps, "eps")])])
    if module.across_spatial:  # the fork multiplies by the reciprocal here, divides below
        unit = ctx.op("Mul", [x, ctx.op("Reciprocal", [norm])])
    else:
        unit = ctx.op("Div", [x, norm])
    scale = module.weight.detach().cpu().numpy()
    if not module.channel_shared:
        scale = scale.reshape((-1,) + (1,) * (rank - 2))
    ctx.op("Mul", [unit, ctx.param(node, 0, scale)], top)


@register_emitter("Permute")
def emit_permute(ctx, node) -> None:
    """``Transpose`` with Caffe's completed order (the identity order: ``Identity``)."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    order = node.module.full_order(len(node.bottom_shapes[0]))
    if order == tuple(range(len(order))):
        ctx.op("Identity", [x], top)
    else:
        ctx.op("Transpose", [x], top, perm=list(order))


# -- PriorBox -------------------------------------------------------------------------------
@register_emitter("PriorBox")
def emit_prior_box(ctx, node) -> None:
    """The priors as a constant when the sizes are fixed, else computed from the shapes."""
    module = node.module
    bottoms, (top,) = ctx.bottoms(node), ctx.tops(node)
    if not ctx.dynamic_size:
        values = module.priors(*node.bottom_shapes)
        ctx.op("Constant", [], top, value=numpy_helper.from_array(values, f"{node.name}/priors"))
        return
    _emit_dynamic_priors(ctx, node, bottoms, top)


def _sizes(ctx, value: str, rank: int, hint: str):
    """Caffe's ``height()`` and ``width()`` of ``value`` as float 1-element tensors."""
    shape = ctx.op("Shape", [value])
    return [ctx.op("Cast", [_dim(ctx, shape, axis, f"{hint}{axis}")], to=TensorProto.FLOAT)
            if axis < rank else ctx.const([1.0], "one") for axis in (2, 3)]


def _emit_dynamic_priors(ctx, node, bottoms, top) -> None:
    """``(1, 2, H W P 4)`` from ``Shape`` of the bottoms: cell centres from ``Range``,
    corners ``(centre -+ size / 2) / image``, broadcast to ``H x W x P x 4``."""
    module = node.module
    feature, image = bottoms
    feature_rank, image_rank = (len(s) for s in node.bottom_shapes)
    layer_h, layer_w = _sizes(ctx, feature, feature_rank, "feature")
    if 0 in module.img_size:
        img_h, img_w = _sizes(ctx, image, image_rank, "image")
    else:
        img_h, img_w = (ctx.const([float(v)], hint) for v, hint in
                        zip(module.img_size, ("img_h", "img_w")))
    if 0 in module.step:
        step_h = ctx.op("Div", [img_h, layer_h])
        step_w = ctx.op("Div", [img_w, layer_w])
    else:
        step_h, step_w = (ctx.const([v], hint) for v, hint in
                          zip(module.step, ("step_h", "step_w")))
    offset = ctx.const(module.offset, "offset")

    def centres(count: str, step: str, shape, hint: str) -> str:
        cells = ctx.op("Range", [ctx.const(0.0, "zero"), _scalar(ctx, count),
                                 ctx.const(1.0, "unit")])
        centre = ctx.op("Mul", [ctx.op("Add", [cells, offset]), step])
        return ctx.op("Reshape", [centre, ctx.ints(shape, hint)])

    center_x = centres(layer_w, step_w, [1, -1, 1], "along_w")  # 1 x W x 1
    center_y = centres(layer_h, step_h, [-1, 1, 1], "along_h")  # H x 1 x 1
    half = module.box_sizes() / np.float32(2)
    half_w, half_h = ctx.const(half[:, 0], "half_w"), ctx.const(half[:, 1], "half_h")
    corners = [ctx.op("Div", [ctx.op(op, [center, size]), image_size]) for op in ("Sub", "Add")
               for center, size, image_size in ((center_x, half_w, img_w),
                                                (center_y, half_h, img_h))]
    grid = ctx.op("Concat", [ctx.op("Cast", [ctx.op("Concat", [layer_h, layer_w], axis=0)],
                                    to=TensorProto.INT64),
                             ctx.ints([module.num_priors, 1], "priors")], axis=0)
    expanded = [ctx.op("Expand", [ctx.op("Unsqueeze", [c, ctx.ints([3], "last")]), grid])
                for c in corners]
    boxes = ctx.op("Reshape", [ctx.op("Concat", expanded, axis=3), ctx.ints([1, 1, -1], "flat")])
    if module.clip:
        boxes = ctx.op("Clip", [boxes, ctx.const(0.0, "low"), ctx.const(1.0, "high")])
    variance = np.resize(np.asarray(module.variance, dtype=np.float32), 4)
    cells_and_priors = ctx.op("Slice", [grid, ctx.ints([0], "start"), ctx.ints([3], "end")])
    variances = ctx.op("Expand", [ctx.const(variance.reshape(1, 1, 1, 4), "variance"),
                                  ctx.op("Concat", [cells_and_priors, ctx.ints([4], "four")],
                                         axis=0)])
    ctx.op("Concat", [boxes, ctx.op("Reshape", [variances, ctx.ints([1, 1, -1], "flat")])],
           top, axis=1)


# -- DetectionOutput ------------------------------------------------------------------------
def _decode(ctx, module, loc_columns, prior_columns, variance_columns):
    """The fork's DecodeBBox on ``(..., 1)`` columns (the same float operations as
    :func:`caffelayers.layers.ssd.decode_boxes`)."""
    lx0, ly0, lx1, ly1 = loc_columns
    px0, py0, px1, py1 = prior_columns
    if not module.variance_encoded_in_target:
        lx0, ly0, lx1, ly1 = (ctx.op("Mul", [v, c]) for v, c in
                              zip(variance_columns, (lx0, ly0, lx1, ly1)))

    def mul(a, b):
        return ctx.op("Mul", [a, b])

    def add(a, b):
        return ctx.op("Add", [a, b])

    if module.code_type == "CORNER":
        return add(px0, lx0), add(py0, ly0), add(px1, lx1), add(py1, ly1)
    width, height = ctx.op("Sub", [px1, px0]), ctx.op("Sub", [py1, py0])
    if module.code_type == "CORNER_SIZE":
        return (add(px0, mul(lx0, width)), add(py0, mul(ly0, height)),
                add(px1, mul(lx1, width)), add(py1, mul(ly1, height)))
    half = ctx.const(0.5, "half")
    center_x = add(mul(lx0, width), mul(add(px0, px1), half))
    center_y = add(mul(ly0, height), mul(add(py0, py1), half))
    half_w = mul(mul(ctx.op("Exp", [lx1]), width), half)
    half_h = mul(mul(ctx.op("Exp", [ly1]), height), half)
    return (ctx.op("Sub", [center_x, half_w]), ctx.op("Sub", [center_y, half_h]),
            add(center_x, half_w), add(center_y, half_h))


@register_emitter("DetectionOutput")
def emit_detection_output(ctx, node) -> None:
    """Decode, per-class candidates (TopK), NonMaxSuppression on ranks, keep_top_k (TopK),
    rows in Caffe's order (NonZero), the "no detection" rows (see the module docstring)."""
    module = node.module
    if module.eta != 1.0:
        raise ctx.unsupported(
            f"nms_param.eta {module.eta:g} (adaptive NMS) lowers the threshold after every "
            "kept box, which ONNX's NonMaxSuppression cannot express; only eta 1 converts")
    (loc, conf, prior), (top,) = ctx.bottoms(node), ctx.tops(node)
    rows = _emit_rows(ctx, module, loc, conf, prior) if module.foreground_classes else None
    _emit_output(ctx, loc, rows, top)


def _emit_rows(ctx, module, loc: str, conf: str, prior: str) -> str:
    """The ``D x 7`` detections (possibly none)."""
    classes, loc_classes = module.num_classes, module.num_loc_classes
    foreground = module.foreground_classes
    # Priors: the first 2 P 4 values, boxes then variances, as P x 1 x 1 columns.
    table = ctx.op("Gather", [ctx.op("Reshape", [prior, ctx.ints([0, 2, -1, 4], "priors")]),
                              ctx.const(0, "first", np.int64)], axis=0)
    columns = ctx.op("Reshape", [table, ctx.ints([2, -1, 1, 4], "prior_columns")])
    boxes, variances = (ctx.op("Gather", [columns, ctx.const(i, f"part{i}", np.int64)], axis=0)
                        for i in (0, 1))
    prior_columns = _split(ctx, boxes, 4, axis=2)
    variance_columns = _split(ctx, variances, 4, axis=2)
    offsets = ctx.op("Reshape", [loc, ctx.ints([0, -1, loc_classes, 4], "offsets")])
    x0, y0, x1, y1 = _decode(ctx, module, _split(ctx, offsets, 4, axis=3), prior_columns,
                             variance_columns)
    if module.clip:
        low, high = ctx.const(0.0, "low"), ctx.const(1.0, "high")
        x0, y0, x1, y1 = (ctx.op("Clip", [c, low, high]) for c in (x0, y0, x1, y1))
    # NonMaxSuppression's copy: y first, inverted boxes collapsed to zero area.
    inverted = ctx.op("Or", [ctx.op("Less", [x1, x0]), ctx.op("Less", [y1, y0])])
    nms_x1 = ctx.op("Where", [inverted, x0, x1])
    nms_y1 = ctx.op("Where", [inverted, y0, y1])
    decoded = ctx.op("Concat", [x0, y0, x1, y1, y0, x0, nms_y1, nms_x1], axis=3)  # N P L 8
    by_class = ctx.op("Transpose", [decoded], perm=[0, 2, 1, 3])  # N x L x P x 8

    scores = ctx.op("Transpose", [ctx.op("Reshape", [conf, ctx.ints([0, -1, classes],
                                                                   "scores")])],
                    perm=[0, 2, 1])  # N x C x P
    wanted = ctx.ints(foreground, "foreground")
    if len(foreground) != classes:
        scores = ctx.op("Gather", [scores, wanted], axis=1)
    priors = _dim(ctx, ctx.op("Shape", [scores]), 2, "priors")
    count = priors if module.top_k < 0 else ctx.op("Min", [priors,
                                                           ctx.ints([module.top_k], "top_k")])
    best, order = ctx.op("TopK", [scores, count], 2, axis=2, largest=1, sorted=1)  # N C' K

    def wide(indices: str, axes) -> str:
        return ctx.op("Expand", [ctx.op("Unsqueeze", [indices, ctx.ints([-1], "last")]),
                                 ctx.ints(axes, "eight")])

    if module.share_location:
        shared = ctx.op("Squeeze", [by_class, ctx.ints([1], "axis1")])  # N x P x 8
        flat_order = ctx.op("Reshape", [order, ctx.ints([0, -1], "flat")])
        candidates = ctx.op("GatherElements", [shared, wide(flat_order, [1, 1, 8])], axis=1)
    else:
        per_class = ctx.op("Gather", [by_class, wanted], axis=1)  # N x C' x P x 8
        candidates = ctx.op("Reshape", [
            ctx.op("GatherElements", [per_class, wide(order, [1, 1, 1, 8])], axis=2),
            ctx.ints([0, -1, 8], "candidates")])  # N x C'K x 8

    # NonMaxSuppression on ranks (K - r), 0 for candidates at or below the threshold.
    passing = ctx.op("Greater", [best, ctx.const(module.score_threshold, "threshold")])
    ranks = ctx.op("Cast", [ctx.op("Range", [_scalar(ctx, count), ctx.const(0, "zero", np.int64),
                                             ctx.const(-1, "down", np.int64)])],
                   to=TensorProto.FLOAT)
    nms_scores = ctx.op("Unsqueeze", [
        ctx.op("Reshape", [ctx.op("Where", [passing, ranks, ctx.const(0.0, "dropped")]),
                           ctx.op("Concat", [ctx.ints([-1], "minus_one"), count], axis=0)]),
        ctx.ints([1], "axis1")])  # (N C') x 1 x K
    nms_boxes = ctx.op("Reshape", [
        ctx.op("Slice", [candidates, ctx.ints([4], "y0"), ctx.ints([8], "end"),
                         ctx.ints([2], "axis2")]),
        ctx.op("Concat", [ctx.ints([-1], "minus_one"), count, ctx.ints([4], "four")], axis=0)])
    selected = ctx.op("NonMaxSuppression", [
        nms_boxes, nms_scores, ctx.ints([MAX_BOXES], "max_boxes"),
        ctx.const([module.nms_threshold], "iou"), ctx.const([0.0], "rank_threshold")],
        center_point_box=0)
    group, candidate = (ctx.op("Gather", [selected, ctx.const(i, f"column{i}", np.int64)],
                               axis=1) for i in (0, 2))
    flat_best = ctx.op("Reshape", [best, ctx.ints([0, -1], "flat")])  # N x C'K
    kept = ctx.op("ScatterND", [
        ctx.op("ConstantOfShape", [ctx.op("Reshape", [ctx.op("Size", [best]),
                                                      ctx.ints([1], "one")])]),
        ctx.op("Unsqueeze", [ctx.op("Add", [ctx.op("Mul", [group, count]), candidate]),
                             ctx.ints([1], "axis1")]),
        ctx.op("ConstantOfShape", [ctx.op("Shape", [group])],
               value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))])
    kept = ctx.op("Reshape", [kept, ctx.op("Shape", [flat_best])])  # N x C'K of 0/1
    if module.keep_top_k > -1:
        minus_inf = ctx.const(-np.inf, "minus_inf")
        kept_scores = ctx.op("Where", [ctx.op("Cast", [kept], to=TensorProto.BOOL), flat_best,
                                       minus_inf])
        width = _dim(ctx, ctx.op("Shape", [flat_best]), 1, "width")
        limit = ctx.op("Min", [width, ctx.ints([module.keep_top_k], "keep_top_k")])
        values, positions = ctx.op("TopK", [kept_scores, limit], 2, axis=1, largest=1,
                                   sorted=1)
        kept = ctx.op("ScatterElements", [
            ctx.op("ConstantOfShape", [ctx.op("Shape", [flat_best])]), positions,
            ctx.op("Cast", [ctx.op("Greater", [values, minus_inf])], to=TensorProto.FLOAT)],
            axis=1)

    where = ctx.op("NonZero", [kept])  # 2 x D: image, class-major candidate
    image, column = (ctx.op("Gather", [where, ctx.const(i, f"row{i}", np.int64)], axis=0)
                     for i in (0, 1))
    width = _dim(ctx, ctx.op("Shape", [flat_best]), 1, "width")
    flat = ctx.op("Add", [ctx.op("Mul", [image, width]), column])
    score = ctx.op("Gather", [ctx.op("Reshape", [flat_best, ctx.ints([-1], "all")]), flat])
    box = ctx.op("Slice", [
        ctx.op("Gather", [ctx.op("Reshape", [candidates, ctx.ints([-1, 8], "rows")]), flat]),
        ctx.ints([0], "x0"), ctx.ints([4], "y0"), ctx.ints([1], "axis1")])
    label = ctx.op("Gather", [ctx.const(np.asarray(foreground, np.float32), "labels"),
                              ctx.op("Div", [column, count])])

    def as_column(value: str) -> str:
        return ctx.op("Unsqueeze", [value, ctx.ints([1], "axis1")])

    return ctx.op("Concat", [as_column(ctx.op("Cast", [image], to=TensorProto.FLOAT)),
                             as_column(label), as_column(score), box], axis=1)


def _emit_output(ctx, loc: str, rows, top: str) -> None:
    """``rows`` with the "no detection" rows ``(i, -1, ..., -1)`` appended when there are
    none (all rows when ``rows`` is None), as ``1 x 1 x D x 7``."""
    batch = _dim(ctx, ctx.op("Shape", [loc]), 0, "batch")
    images = ctx.op("Cast", [ctx.op("Range", [ctx.const(0, "zero", np.int64),
                                              _scalar(ctx, batch),
                                              ctx.const(1, "step", np.int64)])],
                    to=TensorProto.FLOAT)
    fillers = ctx.op("ConstantOfShape", [ctx.op("Concat", [batch, ctx.ints([6], "six")], axis=0)],
                     value=helper.make_tensor("minus_one", TensorProto.FLOAT, [1], [-1.0]))
    empty = ctx.op("Concat", [ctx.op("Unsqueeze", [images, ctx.ints([1], "axis1")]), fillers],
                   axis=1)
    if rows is None:
        table = empty
    else:
        none = ctx.op("Equal", [_dim(ctx, ctx.op("Shape", [rows]), 0, "found"),
                                ctx.ints([0], "zero_rows")])
        shown = ctx.op("Mul", [batch, ctx.op("Cast", [none], to=TensorProto.INT64)])
        table = ctx.op("Concat", [rows, ctx.op("Slice", [empty, ctx.ints([0], "start"),
                                                         shown])], axis=0)
    ctx.op("Reshape", [table, ctx.ints([1, 1, -1, 7], "detections")], top)


# Every emitter here reads sizes from the shapes at run time (or, PriorBox, only folds them
# when they are fixed): a net of these layers keeps symbolic heights and widths.
ANY_SIZE.update(dict.fromkeys(("Normalize", "Permute", "PriorBox", "DetectionOutput")))
