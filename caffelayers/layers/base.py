"""The contract every Caffe layer module follows.

A layer is a ``torch.nn.Module`` registered under its Caffe type string. It has four parts,
mirroring Caffe's own split:

* ``from_caffe(param, bottom_shapes, ctx)`` (classmethod): reads the ``LayerParameter`` like
  Caffe's ``LayerSetUp`` and calls ``__init__`` with plain values, so that generated PyTorch
  source can build the same module by hand. It may use the bottom shapes to size parameters.
* ``output_shapes(bottom_shapes)``: the shape rule (Caffe's ``Reshape``). It raises a
  :class:`~caffelayers.errors.ShapeError` naming the layer when the bottoms do not fit.
* ``forward(*bottoms)``: the math; returns one tensor or a tuple with one tensor per top.
* ``caffe_blobs()``: parameters and buffers in Caffe's blob order, each stored in exactly
  Caffe's blob shape, so that loading, saving and per-blob gradients need no reshaping.

Labels arrive as floating-point tensors holding integers, as Caffe stores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import CaffeFormatError, LabelError, ShapeError

Shape = Tuple[int, ...]


@dataclass
class BuildContext:
    """What a layer may need besides its own parameters while it is being built.

    Attributes:
        phase: ``"TRAIN"`` or ``"TEST"``, the phase the net is built in.
        source_dir: directory that relative file names in the prototxt are resolved against.
        source_file: the prototxt, so that errors can name its file and the layer's line.
        fill: apply the prototxt's fillers to new parameters (False when weights follow).
        generator: random source for fillers, so that a seeded build is repeatable.
        options: net-wide switches such as ``margin_backward`` or ``loss_mode``.
    """

    phase: str = "TEST"
    source_dir: Optional[Path] = None
    source_file: Optional[Path] = None
    fill: bool = True
    generator: Optional[torch.Generator] = None
    options: Dict[str, Any] = field(default_factory=dict)


class CaffeLayer(nn.Module):
    """Base class of every Caffe layer module (see the module docstring for the contract)."""

    #: set by :func:`caffelayers.register_layer` to the Caffe type string.
    caffe_type: ClassVar[str] = ""
    #: a loss layer's first top gets ``loss_weight`` 1 unless the prototxt says otherwise.
    is_loss: ClassVar[bool] = False
    #: Caffe's ``CheckBlobCounts``: ``(least, most)`` bottoms and tops, ``None`` for no bound.
    #: The shape rule checks the finer constraints; these are checked before the layer is
    #: built, so that ``from_caffe`` can read the bottoms it needs.
    num_bottoms: ClassVar[Tuple[int, Optional[int]]] = (1, None)
    num_tops: ClassVar[Tuple[int, Optional[int]]] = (0, None)
    #: Caffe (or the fork) defines a backward pass for the type; False for data layers and
    #: for outputs that are not differentiated (Accuracy, ArgMax, detection outputs).
    has_backward: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.layer_name = type(self).__name__

    # -- building --------------------------------------------------------------------------
    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "CaffeLayer":
        raise NotImplementedError(f"{cls.__name__} does not read Caffe parameters")

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        raise NotImplementedError

    # -- Caffe blobs -----------------------------------------------------------------------
    def caffe_blobs(self) -> List[torch.Tensor]:
        """Parameters and buffers in Caffe's blob order and shape (empty for most layers)."""
        return []

    def load_caffe_blobs(self, arrays: Sequence[np.ndarray], source: str = "weights") -> None:
        """Copy Caffe blobs into :meth:`caffe_blobs`, checking their count and sizes.

        A blob whose element count matches is accepted in any shape (old caffemodels store
        4-D ``num/channels/height/width`` shapes for 1-D and 2-D blobs, as Caffe does).
        """
        targets = self.caffe_blobs()
        if len(arrays) != len(targets):
            raise CaffeFormatError(
                f"layer {self.layer_name!r} ({self.caffe_type}) has {len(arrays)} blobs, "
                f"the net expects {len(targets)}", path=source)
        for index, (array, target) in enumerate(zip(arrays, targets)):
            if array.size != target.numel():
                raise CaffeFormatError(
                    f"layer {self.layer_name!r} ({self.caffe_type}) blob {index} has shape "
                    f"{'x'.join(map(str, array.shape))}, the net expects "
                    f"{'x'.join(map(str, target.shape))}", path=source)
            with torch.no_grad():
                values = torch.from_numpy(np.ascontiguousarray(array).reshape(tuple(target.shape)))
                target.copy_(values.to(dtype=target.dtype))

    # -- helpers for subclasses ------------------------------------------------------------
    def shape_error(self, bottom_shapes: Sequence[Shape], expected: str) -> ShapeError:
        return ShapeError(self.layer_name, self.caffe_type or type(self).__name__,
                          bottom_shapes, expected)

    def canonical_axis(self, axis: int, num_axes: int, bottom_shapes: Sequence[Shape]) -> int:
        """Caffe's ``CanonicalAxisIndex``: a negative axis counts from the end."""
        if not -num_axes <= axis < num_axes:
            raise self.shape_error(bottom_shapes, f"axis {axis} must lie in "
                                   f"[{-num_axes}, {num_axes}) for a {num_axes}-D bottom")
        return axis + num_axes if axis < 0 else axis

    def extra_repr(self) -> str:
        return ""


def count(shape: Sequence[int], start: int = 0, end: Optional[int] = None) -> int:
    """Product of ``shape[start:end]`` (1 for an empty range), as Caffe's ``Blob::count``."""
    return math.prod(shape[start:end])


def as_labels(label: torch.Tensor) -> torch.Tensor:
    """Caffe's labels are floats holding integers; truncate them as ``static_cast<int>``."""
    return label.detach().long()


def check_label_range(layer: CaffeLayer, labels: torch.Tensor, classes: int,
                      ignore_label: Optional[int] = None, what: str = "labels") -> None:
    """Raise a :class:`LabelError` naming the layer when a label lies outside ``[0, classes)``
    (labels equal to ``ignore_label`` excepted); Caffe would read out of bounds instead."""
    bad = (labels < 0) | (labels >= classes)
    if ignore_label is not None:
        bad &= labels != ignore_label
    if labels.numel() and bool(bad.any()):
        values = labels[bad].unique().tolist()
        raise LabelError(f"layer {layer.layer_name!r} ({layer.caffe_type}): {what} must lie in "
                         f"[0, {classes}), got {values[:10]}{' ...' if len(values) > 10 else ''}")


def repeated(values, count_: int, default: int, what: str, layer: str) -> List[int]:
    """Caffe's repeated-or-single spatial fields (``kernel_size``, ``stride``, ``pad``)."""
    values = list(values)
    if not values:
        return [default] * count_
    if len(values) == 1:
        return values * count_
    if len(values) != count_:
        raise CaffeFormatError(f"layer {layer!r}: {what} has {len(values)} values, expected 1 "
                               f"or {count_}")
    return values
