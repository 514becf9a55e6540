"""Caffe's layers that move data without arithmetic.

Concat, Slice, Split, Flatten, Reshape, Crop, Tile and Silence. Their gradients are
autograd's (copies, sums for repeated reads), which is what Caffe's backward computes.
Layers that pass a blob through unchanged return a view, a new tensor object, so that each
top's gradient can be read apart from its bottom's.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, count
from .neuron import naming_layer


def _legacy_axis(param, name: str, axis_field: str, legacy_field: str, layer_param) -> int:
    """``axis``, or the deprecated unsigned ``*_dim`` alias; Caffe refuses both at once."""
    if layer_param.HasField(axis_field) and layer_param.HasField(legacy_field):
        raise UnsupportedParameterError(
            f"layer {param.name!r}: {name}: give either {axis_field} or {legacy_field} "
            "(deprecated), not both")
    if layer_param.HasField(legacy_field):
        return getattr(layer_param, legacy_field)
    return getattr(layer_param, axis_field)


@register_layer("Concat")
class Concat(CaffeLayer):
    """Joins bottoms along one axis.

    ``y = cat(x_0, x_1, ..., dim=axis)``

    Args:
        axis: the axis to join along; negative counts from the end.

    Shape:
        - Input: bottoms with the same number of axes and the same sizes off ``axis``.
        - Output: the same, with ``size[axis] = sum of the bottoms' size[axis]``.

    Caffe: ``concat_param { axis }`` (default 1) or the deprecated ``concat_dim``
    (non-negative only); not both.
    """

    __constants__ = ["axis"]

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = int(axis)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Concat":
        return cls(_legacy_axis(param, "Concat", "axis", "concat_dim", param.concat_param))

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if not bottom_shapes:
            raise self.shape_error(bottom_shapes, "one or more bottoms")
        first = list(bottom_shapes[0])
        axis = self.canonical_axis(self.axis, len(first), bottom_shapes)
        for shape in bottom_shapes[1:]:
            if len(shape) != len(first):
                raise self.shape_error(bottom_shapes, "bottoms with the same number of axes")
            if any(a != b for i, (a, b) in enumerate(zip(first, shape)) if i != axis):
                raise self.shape_error(bottom_shapes, f"bottoms of equal sizes on every axis "
                                       f"but the concatenation axis {axis}")
            first[axis] += shape[axis]
        return [tuple(first)]

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        if len(bottoms) == 1:
            return bottoms[0].view_as(bottoms[0])
        return torch.cat(bottoms, dim=self.axis)

    def extra_repr(self) -> str:
        return "" if self.axis == 1 else f"axis={self.axis}"


@register_layer("Slice")
class Slice(CaffeLayer):
    """Cuts a bottom along one axis into consecutive pieces.

    Args:
        axis: the axis to cut; negative counts from the end.
        slice_points: increasing positions where one top ends and the next starts; empty
            for ``num_tops`` equal pieces.
        num_tops: the number of tops (``len(slice_points) + 1`` when points are given).

    Shape:
        - Input: any shape with ``size[axis] >= num_tops``.
        - Output: top ``i`` has ``size[axis] = p_i - p_{i-1}`` with ``p_0 = 0`` and
          ``p_last = size[axis]``, or ``size[axis] / num_tops`` without points.

    Caffe: ``slice_param { axis slice_point }`` (axis 1 by default) or the deprecated
    ``slice_dim``; the number of tops comes from the layer's ``top`` list.
    """

    __constants__ = ["axis", "slice_points", "num_tops"]

    def __init__(self, axis: int = 1, slice_points: Sequence[int] = (),
                 num_tops: Optional[int] = None):
        super().__init__()
        self.axis = int(axis)
        self.slice_points = tuple(int(p) for p in slice_points)
        implied = len(self.slice_points) + 1
        self.num_tops = implied if num_tops is None else int(num_tops)
        if self.num_tops < 1:
            raise UnsupportedParameterError(f"Slice: needs one or more tops, got "
                                            f"{self.num_tops}")
        if self.slice_points and self.num_tops != implied:
            raise UnsupportedParameterError(
                f"Slice: {len(self.slice_points)} slice points make {implied} tops, but the "
                f"layer has {self.num_tops}")

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Slice":
        p = param.slice_param
        axis = _legacy_axis(param, "Slice", "axis", "slice_dim", p)
        with naming_layer(param):
            return cls(axis, list(p.slice_point), len(param.top))

    def _sizes(self, bottom_shapes: Sequence[Shape]) -> Tuple[int, List[int]]:
        """The canonical axis and each top's size along it."""
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "exactly one bottom")
        shape = bottom_shapes[0]
        axis = self.canonical_axis(self.axis, len(shape), bottom_shapes)
        length = shape[axis]
        if not self.slice_points:
            if length % self.num_tops:
                raise self.shape_error(bottom_shapes, f"size {length} on axis {axis} divisible "
                                       f"by the {self.num_tops} tops")
            return axis, [length // self.num_tops] * self.num_tops
        if self.num_tops > length:
            raise self.shape_error(bottom_shapes, f"at least {self.num_tops} elements on axis "
                                   f"{axis}, one per top")
        ends = list(self.slice_points) + [length]
        starts = [0] + list(self.slice_points)
        if any(end <= start for start, end in zip(starts[:-1], ends[:-1])) or ends[-2] > length:
            raise self.shape_error(bottom_shapes, f"slice points {list(self.slice_points)} "
                                   f"increasing, above 0 and at most {length} (the size of "
                                   f"axis {axis})")
        return axis, [end - start for start, end in zip(starts, ends)]

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        axis, sizes = self._sizes(bottom_shapes)
        shape = tuple(bottom_shapes[0])
        return [shape[:axis] + (size,) + shape[axis + 1:] for size in sizes]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        axis, sizes = self._sizes([tuple(x.shape)])
        return tuple(torch.split(x, sizes, dim=axis))

    def extra_repr(self) -> str:
        parts = [f"axis={self.axis}" if self.axis != 1 else ""]
        if self.slice_points:
            parts.append(f"slice_points={list(self.slice_points)}")
        else:
            parts.append(f"num_tops={self.num_tops}")
        return ", ".join(p for p in parts if p)


@register_layer("Split")
class Split(CaffeLayer):
    """Copies one bottom to several tops; the bottom's gradient is the sum of theirs.

    Args:
        num_tops: how many tops.

    Shape:
        - Input: any shape.
        - Output: ``num_tops`` tops of the input's shape.

    Caffe: no parameters; the tops come from the layer's ``top`` list. Caffe also inserts
    these itself where a blob feeds several layers (autograd's sum does that here).
    """

    __constants__ = ["num_tops"]

    def __init__(self, num_tops: int = 2):
        super().__init__()
        self.num_tops = int(num_tops)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Split":
        return cls(len(param.top))

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "exactly one bottom")
        return [tuple(bottom_shapes[0])] * self.num_tops

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(x.view_as(x) for _ in range(self.num_tops))

    def extra_repr(self) -> str:
        return f"num_tops={self.num_tops}"


@register_layer("Flatten")
class Flatten(CaffeLayer):
    """Merges the axes ``axis`` to ``end_axis`` (both included) into one.

    Args:
        axis: the first axis merged; negative counts from the end.
        end_axis: the last axis merged; negative counts from the end.

    Shape:
        - Input: ``(d_0, ..., d_{n-1})``.
        - Output: ``(d_0, ..., d_{axis-1}, d_axis * ... * d_end_axis, d_{end_axis+1}, ...)``.

    Caffe: ``flatten_param { axis end_axis }`` (1 and -1 by default). As in Caffe,
    ``end_axis = axis - 1`` merges nothing and inserts an axis of size 1 at ``axis``.
    """

    __constants__ = ["axis", "end_axis"]

    def __init__(self, axis: int = 1, end_axis: int = -1):
        super().__init__()
        self.axis = int(axis)
        self.end_axis = int(end_axis)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Flatten":
        p = param.flatten_param
        return cls(p.axis, p.end_axis)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "exactly one bottom")
        shape = tuple(bottom_shapes[0])
        start = self.canonical_axis(self.axis, len(shape), bottom_shapes)
        end = self.canonical_axis(self.end_axis, len(shape), bottom_shapes)
        if end < start - 1:
            raise self.shape_error(bottom_shapes, f"end_axis {self.end_axis} (axis {end}) no "
                                   f"earlier than axis - 1 = {start - 1}")
        return [shape[:start] + (count(shape, start, end + 1),) + shape[end + 1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.output_shapes([tuple(x.shape)])[0])

    def extra_repr(self) -> str:
        parts = [f"axis={self.axis}" if self.axis != 1 else "",
                 f"end_axis={self.end_axis}" if self.end_axis != -1 else ""]
        return ", ".join(p for p in parts if p)


@register_layer("Reshape")
class Reshape(CaffeLayer):
    """Gives the bottom's data a new shape, replacing a range of its axes.

    Args:
        shape: the new sizes of the replaced axes: ``0`` copies the bottom's size at the
            same position, ``-1`` (at most once) is inferred from the element count.
        axis: the first replaced axis; ``-1`` means after the last axis, ``-2`` before it.
        num_axes: how many axes are replaced; ``-1`` means all from ``axis`` on.

    Shape:
        - Input: ``(d_0, ..., d_{n-1})``.
        - Output: ``d[:axis] + shape + d[axis + num_axes:]``, with the same element count.

    Caffe: ``reshape_param { shape { dim } axis num_axes }``. A ``0`` copies
    ``d[axis + i]`` for the ``i``-th new dim, whatever ``num_axes`` is; a negative ``axis``
    counts positions between axes (``-1`` is the end), unlike other layers.
    """

    __constants__ = ["shape", "axis", "num_axes"]

    def __init__(self, shape: Sequence[int], axis: int = 0, num_axes: int = -1):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.axis = int(axis)
        self.num_axes = int(num_axes)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Reshape":
        p = param.reshape_param
        return cls(list(p.shape.dim), p.axis, p.num_axes)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "exactly one bottom")
        bottom = tuple(bottom_shapes[0])
        if any(d < -1 for d in self.shape):
            raise self.shape_error(bottom_shapes, f"new shape {list(self.shape)} of sizes "
                                   ">= 0, 0 (copy) or -1 (infer)")
        if self.shape.count(-1) > 1:
            raise self.shape_error(bottom_shapes, f"new shape {list(self.shape)} with at "
                                   "most one -1")
        start = self.axis if self.axis >= 0 else len(bottom) + self.axis + 1
        if not 0 <= start <= len(bottom):
            raise self.shape_error(bottom_shapes, f"axis {self.axis} in [{-len(bottom) - 1}, "
                                   f"{len(bottom)}]")
        if self.num_axes < -1:
            raise self.shape_error(bottom_shapes, f"num_axes {self.num_axes} >= 0, or -1 for "
                                   "all")
        end = len(bottom) if self.num_axes == -1 else start + self.num_axes
        if end > len(bottom):
            raise self.shape_error(bottom_shapes, f"axis + num_axes = {end} at most "
                                   f"{len(bottom)}")
        new = list(self.shape)
        for i, d in enumerate(self.shape):
            if d == 0:
                if start + i >= len(bottom):
                    raise self.shape_error(bottom_shapes, f"a bottom axis {start + i} for the "
                                           f"0 at position {i} of {list(self.shape)} to copy")
                new[i] = bottom[start + i]
        total = count(bottom)
        if -1 in new:
            known = count(bottom[:start]) * count(bottom[end:]) * count(
                [d for d in new if d != -1])
            if known == 0 or total % known:
                raise self.shape_error(bottom_shapes, f"{total} elements divisible by the "
                                       f"product {known} of the sizes in {list(self.shape)}")
            new[new.index(-1)] = total // known
        top = bottom[:start] + tuple(new) + bottom[end:]
        if count(top) != total:
            raise self.shape_error(bottom_shapes, f"new shape {'x'.join(map(str, top))} with "
                                   f"the bottom's {total} elements")
        return [top]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.output_shapes([tuple(x.shape)])[0])

    def extra_repr(self) -> str:
        parts = [f"shape={list(self.shape)}",
                 f"axis={self.axis}" if self.axis else "",
                 f"num_axes={self.num_axes}" if self.num_axes != -1 else ""]
        return ", ".join(p for p in parts if p)


@register_layer("Crop")
class Crop(CaffeLayer):
    """Cuts the first bottom to the second bottom's size on the axes from ``axis`` on.

    ``y = x[..., o_axis : o_axis + r_axis, ..., o_last : o_last + r_last]``

    Args:
        axis: the first cropped axis; negative counts from the end.
        offset: where each crop starts: none (all 0), one shared by every cropped axis, or
            one per cropped axis.

    Shape:
        - Input: ``x`` and a reference ``r`` with at least as many axes.
        - Output: ``x``'s sizes before ``axis``, ``r``'s from ``axis`` on.

    Caffe: ``crop_param { axis offset }``, axis 2 by default (the spatial axes). The
    reference only gives a size: it gets no gradient.
    """

    __constants__ = ["axis", "offset"]

    def __init__(self, axis: int = 2, offset: Sequence[int] = ()):
        super().__init__()
        self.axis = int(axis)
        self.offset = tuple(int(o) for o in offset)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Crop":
        p = param.crop_param
        return cls(p.axis, list(p.offset))

    def _window(self, bottom_shapes: Sequence[Shape]) -> Tuple[List[int], Shape]:
        """Each axis's crop start and the top's shape."""
        if len(bottom_shapes) != 2:
            raise self.shape_error(bottom_shapes, "two bottoms: the data and the reference")
        shape, reference = bottom_shapes
        start = self.canonical_axis(self.axis, len(shape), bottom_shapes)
        cropped = len(shape) - start
        if len(self.offset) > 1 and len(self.offset) != cropped:
            raise self.shape_error(bottom_shapes, f"one offset per axis from axis {start} on "
                                   f"({cropped} axes, {len(self.offset)} offsets given)")
        if len(reference) < len(shape):
            raise self.shape_error(bottom_shapes, "a reference with at least as many axes as "
                                   "the data")
        if not self.offset:
            offsets = [0] * len(shape)
        elif len(self.offset) == 1:
            offsets = [0] * start + [self.offset[0]] * cropped
        else:
            offsets = [0] * start + list(self.offset)
        top = tuple(shape[:start]) + tuple(reference[start:len(shape)])
        for i in range(start, len(shape)):
            if offsets[i] + top[i] > shape[i]:
                raise self.shape_error(bottom_shapes, f"a crop of {top[i]} at offset "
                                       f"{offsets[i]} within the data's size {shape[i]} on "
                                       f"axis {i}")
        return offsets, top

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return [self._window(bottom_shapes)[1]]

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        offsets, top = self._window([tuple(x.shape), tuple(reference.shape)])
        return x[tuple(slice(o, o + size) for o, size in zip(offsets, top))]

    def extra_repr(self) -> str:
        parts = [f"axis={self.axis}" if self.axis != 2 else "",
                 f"offset={list(self.offset)}" if self.offset else ""]
        return ", ".join(p for p in parts if p)


@register_layer("Tile")
class Tile(CaffeLayer):
    """Repeats the bottom's block from ``axis`` on, ``tiles`` times along ``axis``.

    ``y = cat([x] * tiles, dim=axis)``

    Args:
        tiles: the number of copies, at least 1.
        axis: the axis to tile along; negative counts from the end.

    Shape:
        - Input: any shape.
        - Output: the input's shape with ``size[axis] * tiles``.

    Caffe: ``tile_param { axis tiles }``; ``tiles`` has no default and is required. The
    copies are whole blocks (``abcabc``), not repeated elements (``aabbcc``).
    """

    __constants__ = ["tiles", "axis"]

    def __init__(self, tiles: int, axis: int = 1):
        super().__init__()
        if int(tiles) < 1:
            raise UnsupportedParameterError(f"Tile: tiles {tiles} is not allowed; give 1 or "
                                            "more")
        self.tiles = int(tiles)
        self.axis = int(axis)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Tile":
        p = param.tile_param
        if not p.HasField("tiles"):
            raise UnsupportedParameterError(f"layer {param.name!r}: Tile: tile_param.tiles is "
                                            "required (the number of copies)")
        with naming_layer(param):
            return cls(p.tiles, p.axis)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "exactly one bottom")
        shape = list(bottom_shapes[0])
        axis = self.canonical_axis(self.axis, len(shape), bottom_shapes)
        shape[axis] *= self.tiles
        return [tuple(shape)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.canonical_axis(self.axis, x.dim(), [tuple(x.shape)])
        repeats = [1] * x.dim()
        repeats[axis] = self.tiles
        return x.repeat(repeats)

    def extra_repr(self) -> str:
        return f"tiles={self.tiles}" + ("" if self.axis == 1 else f", axis={self.axis}")


@register_layer("Silence")
class Silence(CaffeLayer):
    """Consumes its bottoms and produces no top (so that Caffe does not print them).

    Shape:
        - Input: any number of bottoms of any shape.
        - Output: none.

    Caffe: no parameters; its backward writes zero gradients, which is what the bottoms
    get from it here (no gradient flows from a layer without tops).
    """

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Silence":
        return cls()

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return []

    def forward(self, *bottoms: torch.Tensor) -> Tuple[()]:
        return ()
