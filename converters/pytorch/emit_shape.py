"""Source emitters for layers that combine or move data: Eltwise, Concat, Slice, Split,
Flatten, Reshape, Crop, Tile, Reduction, Silence. Each is one expression on tensors."""

from __future__ import annotations

from .registry import register_source_emitter
from .source import LayerSource, canonical_axis, number


@register_source_emitter("Eltwise")
def eltwise(layer: LayerSource) -> None:
    """SUM with each ``coeff`` written as a factor, PROD as a product, MAX as
    ``torch.maximum`` (equal values: the same number whichever bottom wins). Caffe's
    gradient rules (MAX's tie winner, ``stable_prod_grad: false``) are not reproduced:
    the forward values are the same."""
    m = layer.module
    bottoms = layer.bottoms
    if m.operation == "PROD":
        layer.assign(" * ".join(bottoms))
    elif m.operation == "MAX":
        expression = bottoms[0]
        for bottom in bottoms[1:]:
            expression = f"torch.maximum({expression}, {bottom})"
        layer.assign(expression)
    else:
        coeffs = m.coeff or (1.0,) * len(bottoms)
        expression = ""
        for coeff, bottom in zip(coeffs, bottoms):
            sign = "-" if coeff < 0 else "+"
            term = bottom if abs(coeff) == 1 else f"{number(abs(coeff))} * {bottom}"
            if not expression:
                expression = term if sign == "+" else f"-{term}"
            else:
                expression += f" {sign} {term}"
        layer.assign(expression, comment="Caffe's Eltwise coefficients" if m.coeff else "")


def _alias(layer: LayerSource) -> None:
    """The top is the bottom itself (nothing to write when Caffe reuses the name)."""
    if layer.tops[0] != layer.bottoms[0]:
        layer.assign(layer.bottoms[0])


@register_source_emitter("Concat")
def concat(layer: LayerSource) -> None:
    if len(layer.bottoms) == 1:
        _alias(layer)
        return
    layer.assign(f"torch.cat([{', '.join(layer.bottoms)}], dim={layer.module.axis})")


@register_source_emitter("Slice")
def slice_(layer: LayerSource) -> None:
    """``torch.split`` with the tops' sizes along Caffe's axis."""
    axis = canonical_axis(layer.module.axis, len(layer.bottom_shape()))
    sizes = [shape[axis] for shape in layer.node.top_shapes]
    if len(sizes) == 1:
        _alias(layer)
        return
    layer.assign(f"torch.split({layer.bottoms[0]}, {sizes}, dim={axis})")


@register_source_emitter("Split")
def split(layer: LayerSource) -> None:
    """Every top is the bottom itself (autograd adds the gradients of its readers)."""
    x = layer.bottoms[0]
    targets = [top for top in layer.tops if top != x]
    if targets:
        layer.line(" = ".join(targets + [x]))


@register_source_emitter("Flatten")
def flatten(layer: LayerSource) -> None:
    """``torch.flatten(x, axis, end_axis)``; Caffe's ``end_axis = axis - 1`` inserts an
    axis of size 1."""
    m = layer.module
    x = layer.bottoms[0]
    rank = len(layer.bottom_shape())
    start, end = canonical_axis(m.axis, rank), canonical_axis(m.end_axis, rank)
    if end == start - 1:
        layer.assign(f"{x}.unsqueeze({start})")
    elif end == rank - 1:
        layer.assign(f"torch.flatten({x}, {start})")
    else:
        layer.assign(f"torch.flatten({x}, {start}, {end})")


@register_source_emitter("Reshape")
def reshape(layer: LayerSource) -> None:
    """``x.reshape(...)``: axes outside Caffe's replaced range and Caffe's ``0`` (copy) dims
    read the input's size, so the batch size may change; ``-1`` stays ``-1``."""
    m = layer.module
    x = layer.bottoms[0]
    rank = len(layer.bottom_shape())
    start = m.axis if m.axis >= 0 else rank + m.axis + 1
    end = rank if m.num_axes == -1 else start + m.num_axes
    dims = [f"{x}.shape[{i}]" for i in range(start)]
    dims += [f"{x}.shape[{start + i}]" if d == 0 else str(d) for i, d in enumerate(m.shape)]
    dims += [f"{x}.shape[{i}]" for i in range(end, rank)]
    layer.assign(f"{x}.reshape({', '.join(dims) or '()'})")


@register_source_emitter("Crop")
def crop(layer: LayerSource) -> None:
    """Slicing: from Caffe's ``axis`` on, each axis starts at its offset and takes the
    reference's size."""
    m = layer.module
    x, reference = layer.bottoms
    rank = len(layer.bottom_shape())
    start = canonical_axis(m.axis, rank)
    offsets = list(m.offset) or [0]
    if len(offsets) == 1:
        offsets = offsets * (rank - start)
    index = [":"] * start
    for axis, offset in zip(range(start, rank), offsets):
        stop = f"{reference}.shape[{axis}]"
        index.append(f"{offset}:{offset} + {stop}" if offset else f":{stop}")
    layer.assign(f"{x}[{', '.join(index)}]")


@register_source_emitter("Tile")
def tile(layer: LayerSource) -> None:
    """``x.repeat``: whole blocks, ``abcabc``, as Caffe's Tile."""
    m = layer.module
    rank = len(layer.bottom_shape())
    repeats = [1] * rank
    repeats[canonical_axis(m.axis, rank)] = m.tiles
    layer.assign(f"{layer.bottoms[0]}.repeat({', '.join(map(str, repeats))})")


@register_source_emitter("Reduction")
def reduction(layer: LayerSource) -> None:
    """Caffe reduces every axis from ``axis`` on: flatten them, then sum (of ``|x|`` for
    ASUM, ``x^2`` for SUMSQ) or mean, times ``coeff``."""
    m = layer.module
    x = layer.bottoms[0]
    axis = canonical_axis(m.axis, len(layer.bottom_shape()))
    rows = f"torch.flatten({x}, {axis})"
    if m.operation == "ASUM":
        rows += ".abs()"
    elif m.operation == "SUMSQ":
        rows += ".square()"
    reduce = "mean" if m.operation == "MEAN" else "sum"
    expression = f"{rows}.{reduce}(dim={axis})"
    if m.coeff != 1:
        expression += f" * {number(m.coeff)}"
    layer.assign(expression)


@register_source_emitter("Silence")
def silence(layer: LayerSource) -> None:
    """No output; bottoms nothing else reads are deleted (so no value is left unused)."""
    unused = sorted({b for b in layer.bottoms if not layer.read_later(b)})
    if unused:
        layer.line(f"del {', '.join(unused)}")
