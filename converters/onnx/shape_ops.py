"""Emitters for the layers that move data without arithmetic: Concat, Slice, Split, Flatten,
Reshape, Crop, Tile, Silence. Reshape targets come from the layers' own shape rules (the
top shapes), with ``-1`` on the axis that follows a dynamic batch."""

from __future__ import annotations

from ...registry import register_emitter


@register_emitter("Concat")
def emit_concat(ctx, node) -> None:
    """``Concat`` on the canonical axis (one bottom: ``Identity``)."""
    bottoms, (top,) = ctx.bottoms(node), ctx.tops(node)
    if len(bottoms) == 1:
        ctx.op("Identity", bottoms, top)
        return
    ctx.op("Concat", bottoms, top, axis=node.module.axis % len(node.bottom_shapes[0]))


@register_emitter("Slice")
def emit_slice(ctx, node) -> None:
    """``Split`` into the tops' sizes along the axis (one top: ``Identity``); equal parts
    without slice points, which also splits a dynamic batch."""
    (x,), tops = ctx.bottoms(node), ctx.tops(node)
    if len(tops) == 1:
        ctx.op("Identity", [x], tops[0])
        return
    axis = node.module.axis % len(node.bottom_shapes[0])
    if not node.module.slice_points:
        # Opset 18 asks for the number of parts; before it, the outputs give it.
        ctx.op("Split", [x], tops, axis=axis,
               num_outputs=len(tops) if ctx.opset >= 18 else None)
        return
    sizes = [shape[axis] for shape in node.top_shapes]
    if sizes != [shape[axis] for shape in ctx.probe_shapes(node)[1]]:
        raise ctx.unsupported(f"slicing along axis {axis}, which follows the batch; convert "
                              "with a static batch (static_batch=True, --static-batch)")
    ctx.op("Split", [x, ctx.ints(sizes, "split")], tops, axis=axis)


@register_emitter("Split")
def emit_split(ctx, node) -> None:
    """One ``Identity`` per top: Caffe's copies."""
    (x,) = ctx.bottoms(node)
    for top in ctx.tops(node):
        ctx.op("Identity", [x], top)


def _emit_reshape_to_top(ctx, node) -> None:
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    ctx.reshape(x, node.top_shapes[0], ctx.probe_shapes(node)[1][0], top)


@register_emitter("Flatten")
def emit_flatten(ctx, node) -> None:
    """ONNX's ``Flatten`` for Caffe's default (axis 1 to the end, giving ``N x rest``);
    otherwise a ``Reshape`` to the top's shape."""
    module = node.module
    rank = len(node.bottom_shapes[0])
    if rank >= 2 and module.axis % rank == 1 and module.end_axis % rank == rank - 1:
        (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
        ctx.op("Flatten", [x], top, axis=1)
        return
    _emit_reshape_to_top(ctx, node)


@register_emitter("Reshape")
def emit_reshape(ctx, node) -> None:
    """``Reshape`` to the top's shape, as Caffe's rule computed it (``0`` and ``-1``
    resolved)."""
    _emit_reshape_to_top(ctx, node)


def _crop_offsets(axis: int, offset, rank: int):
    """Caffe's crop start on every axis: 0 before ``axis``, then one shared offset or one
    per cropped axis (none: 0)."""
    start = axis % rank
    if not offset:
        return [0] * rank
    if len(offset) == 1:
        return [0] * start + [offset[0]] * (rank - start)
    return [0] * start + list(offset)


@register_emitter("Crop")
def emit_crop(ctx, node) -> None:
    """``Slice`` of the first bottom to the reference's size; the reference only gives the
    size. Axes that keep their full size are not sliced, so a batch axis can stay dynamic."""
    x, (top,) = ctx.bottoms(node)[0], ctx.tops(node)
    shape, out = node.bottom_shapes[0], node.top_shapes[0]
    (probe_shape, _), (probe_out,) = ctx.probe_shapes(node)
    offsets = _crop_offsets(node.module.axis, node.module.offset, len(shape))
    starts, ends, axes = [], [], []
    for axis in range(len(shape)):
        if offsets[axis] == 0 and out[axis] == shape[axis] and \
                probe_out[axis] == probe_shape[axis]:
            continue
        if out[axis] != probe_out[axis]:
            raise ctx.unsupported(f"cropping axis {axis} to the reference's batch; convert "
                                  "with a static batch (static_batch=True, --static-batch)")
        starts.append(offsets[axis])
        ends.append(offsets[axis] + out[axis])
        axes.append(axis)
    if not axes:
        ctx.op("Identity", [x], top)
        return
    ctx.op("Slice", [x, ctx.ints(starts, "starts"), ctx.ints(ends, "ends"),
                     ctx.ints(axes, "axes")], top)


@register_emitter("Tile")
def emit_tile(ctx, node) -> None:
    """``Tile``: whole blocks repeated along the axis, as Caffe's."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    rank = len(node.bottom_shapes[0])
    repeats = [1] * rank
    repeats[node.module.axis % rank] = node.module.tiles
    ctx.op("Tile", [x, ctx.ints(repeats, "repeats")], top)


@register_emitter("Silence")
def emit_silence(ctx, node) -> None:
    """Nothing: Silence has no tops; it only keeps its bottoms from being net outputs."""
