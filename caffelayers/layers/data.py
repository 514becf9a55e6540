"""Input and the data layers: the places where blobs enter a net.

caffelayers never reads a data source while running a net: every data layer becomes an input
of the same top names, fed by the caller (``Net.forward(data=..., label=...)``). Their shape
rules state what Caffe's prototxt fixes (batch size, crop size, resize) and leave the rest
unknown (``None``), to be filled in with ``--input NAME=N,C,H,W``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import fillers
from ..errors import CaffeFormatError, CaffeLayersError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape


class InputLayer(CaffeLayer):
    """A layer whose tops are fed from outside the net.

    Args:
        top_shapes: one shape per top; ``None`` where the prototxt does not fix it.
        hint: what the caller must supply when a shape is unknown (for messages).

    Shape:
        - Output: ``top_shapes`` (the caller's arrays must match the known ones).
    """

    is_input = True
    num_bottoms = (0, 0)
    has_backward = False
    #: why the data source could not tell the shapes left open (see :func:`_probed`).
    source_error: Optional[CaffeLayersError] = None

    def __init__(self, top_shapes: Sequence[Optional[Shape]], hint: str = ""):
        super().__init__()
        self.top_shapes = [None if s is None else tuple(int(d) for d in s) for s in top_shapes]
        self.hint = hint

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Optional[Shape]]:
        return list(self.top_shapes)

    def forward(self, *bottoms):
        raise RuntimeError(f"input layer {self.layer_name!r} is fed by the caller, not run")

    def extra_repr(self) -> str:
        return ", ".join("?" if s is None else "x".join(map(str, s)) for s in self.top_shapes)


def _checked_dims(dims, param, what: str) -> Shape:
    shape = tuple(int(d) for d in dims)
    for d in shape:
        if d < 0 or d > 2**31 - 1:
            raise CaffeFormatError(f"layer {param.name!r}: {what} has dimension {d}, expected "
                                   "0 <= dim < 2^31")
    return shape


@register_layer("Input")
class Input(InputLayer):
    """Caffe's ``Input``: one shape per top, or one shape shared by every top.

    Caffe: ``input_param { shape { dim: ... } }``; the upgrader turns net-level
    ``input``/``input_dim``/``input_shape`` into these layers.
    """

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext):
        shapes = [_checked_dims(s.dim, param, "input_param.shape") for s in param.input_param.shape]
        tops = len(param.top)
        if len(shapes) == 1 and tops > 1:
            shapes = shapes * tops
        if len(shapes) != tops:
            raise CaffeFormatError(f"layer {param.name!r} (Input): {len(shapes)} shapes for "
                                   f"{tops} tops; give one shape, or one per top")
        return cls(shapes)


def _image_shape(param, batch: int, channels: Optional[int], height: int = 0,
                 width: int = 0) -> Optional[Shape]:
    """N x C x H x W of an image data top: crop_size wins over a resize, unknown otherwise."""
    crop = param.transform_param.crop_size
    if crop:
        height = width = crop
    if channels is None or not height or not width:
        return None
    return (batch, channels, height, width)


def _with_label(param, data_shape: Optional[Shape], batch: int) -> List[Optional[Shape]]:
    shapes = [data_shape]
    if len(param.top) > 1:
        shapes.append((batch,))
    return shapes


def _data_hint(param) -> str:
    return f"--input {param.top[0]}=N,C,H,W" if param.top else ""


def _probed(cls, param, ctx: BuildContext, shapes: List[Optional[Shape]]) -> "InputLayer":
    """The layer, with the top shapes that the prototxt leaves open read from the first item
    of the data source, as Caffe's ``DataLayerSetUp`` does. When the source cannot be read
    they stay unknown, and the layer keeps the reason (``source_error``) for the error that
    an unknown input shape becomes."""
    error = None
    if not all(shape is not None for shape in shapes):
        from ..data.sources import probe_source

        probed, error = probe_source(param, ctx.source_dir)
        shapes = probed or shapes
    layer = cls(shapes, _data_hint(param))
    layer.source_error = error
    return layer


@register_layer("Data")
class Data(InputLayer):
    """Caffe's ``Data`` (LMDB/LevelDB): batch size and crop size known, channels and image
    size only from the database, so the data top is unknown unless given."""

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx):
        batch = param.data_param.batch_size
        shapes = _with_label(param, _image_shape(param, batch, None), batch)
        return _probed(cls, param, ctx, shapes)


@register_layer("ImageData")
class ImageData(InputLayer):
    """Caffe's ``ImageData``: ``is_color`` gives the channels, ``new_height``/``new_width``
    or ``crop_size`` the image size; without them the images decide (unknown here)."""

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx):
        p = param.image_data_param
        channels = 3 if p.is_color else 1
        shape = _image_shape(param, p.batch_size, channels, p.new_height, p.new_width)
        return _probed(cls, param, ctx, _with_label(param, shape, p.batch_size))


@register_layer("WindowData")
class WindowData(InputLayer):
    """Caffe's ``WindowData``: colour windows warped to ``crop_size``."""

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx):
        p = param.window_data_param
        crop = param.transform_param.crop_size or p.crop_size
        shape = (p.batch_size, 3, crop, crop) if crop else None
        return cls(_with_label(param, shape, p.batch_size), _data_hint(param))


@register_layer("MemoryData")
class MemoryData(InputLayer):
    """Caffe's ``MemoryData``: every dimension is in ``memory_data_param``."""

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx):
        p = param.memory_data_param
        shape = _image_shape(param, p.batch_size, p.channels, p.height, p.width)
        return cls(_with_label(param, shape, p.batch_size), _data_hint(param))


@register_layer("HDF5Data")
class HDF5Data(InputLayer):
    """Caffe's ``HDF5Data``: the shapes live in the HDF5 files, only the batch size here."""

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx):
        return _probed(cls, param, ctx, [None] * len(param.top))


@register_layer("DummyData")
class DummyData(CaffeLayer):
    """Caffe's ``DummyData``: tops filled by ``data_filler`` (constant 0 by default).

    Shapes come from ``shape`` or the legacy ``num``/``channels``/``height``/``width``;
    one entry serves every top. Unlike the other data layers it produces its own tops, and
    refills them on every forward as Caffe does for non-constant fillers.
    """

    num_bottoms = (0, 0)
    has_backward = False

    def __init__(self, top_shapes: Sequence[Shape], fillers_=None):
        super().__init__()
        self.top_shapes = [tuple(s) for s in top_shapes]
        self.fillers = list(fillers_) if fillers_ is not None else [None] * len(self.top_shapes)
        self.generator: Optional[torch.Generator] = None
        # Follows the net's dtype and device through .to(), so the tops are created there.
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx):
        p = param.dummy_data_param
        legacy = [p.num, p.channels, p.height, p.width]
        if p.shape and any(legacy):
            raise CaffeFormatError(f"layer {param.name!r} (DummyData): give shape, or "
                                   "num/channels/height/width, not both")
        if p.shape:
            shapes = [_checked_dims(s.dim, param, "dummy_data_param.shape") for s in p.shape]
        else:
            # Caffe's CHECKs: each legacy field has one value, or one per top.
            if any(len(field) not in (1, len(param.top)) for field in legacy):
                raise CaffeFormatError(
                    f"layer {param.name!r} (DummyData): num, channels, height and width take "
                    f"one value each, or one per top ({len(param.top)} tops); got "
                    f"{', '.join(str(len(field)) for field in legacy)} values")
            size = max(len(field) for field in legacy)
            shapes = [_checked_dims([field[i if len(field) > 1 else 0] for field in legacy],
                                    param, "dummy_data_param") for i in range(size)]
        tops = len(param.top)
        if len(shapes) == 1:
            shapes = shapes * tops
        filler_list = list(p.data_filler) or [None]
        if len(filler_list) == 1:
            filler_list = filler_list * tops
        if len(shapes) != tops or len(filler_list) != tops:
            raise CaffeFormatError(f"layer {param.name!r} (DummyData): give one shape and "
                                   f"filler, or one per top ({tops} tops)")
        layer = cls(shapes, filler_list)
        layer.generator = ctx.generator
        return layer

    def output_shapes(self, bottom_shapes):
        return list(self.top_shapes)

    def forward(self):
        tops = []
        for shape, filler in zip(self.top_shapes, self.fillers):
            top = self.anchor.new_empty(shape)
            fillers.fill(top, filler, self.generator, self.layer_name)
            tops.append(top)
        return tuple(tops) if len(tops) > 1 else tops[0]
