"""The SSD fork's layers (weiliu89/caffe, branch ``ssd``): Normalize, Permute, PriorBox and
DetectionOutput, the inference half of the single-shot detector.

Each follows the fork's CPU code: Normalize's backward (which is not the derivative of its
forward when the per-channel scales differ), PriorBox's integer box sizes and prior order,
and DetectionOutput's box decoding, ``ApplyNMSFast`` (score threshold, stable sort, ``top_k``
before the suppression, the adaptive ``eta`` threshold, Caffe's ``JaccardOverlap``),
``keep_top_k`` across classes and the ``[1, 1, N, 7]`` rows with their "no detection" row.
The training side of the fork (AnnotatedData, MultiBoxLoss, SmoothL1Loss) is read by the
schema but has no module yet.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import fillers
from ..errors import UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, count

#: Caffe's ``-FLT_MAX``: DetectionOutput's confidence threshold when none is given.
FLT_MAX = 3.4028234663852886e38

CODE_TYPES = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}


def legacy_dims(shape: Sequence[int]) -> Tuple[int, int, int, int]:
    """Caffe's ``num()``, ``channels()``, ``height()``, ``width()`` of a blob of at most 4
    axes (a missing axis counts 1)."""
    padded = tuple(shape) + (1,) * (4 - len(shape))
    return padded[0], padded[1], padded[2], padded[3]


# -- Normalize ------------------------------------------------------------------------------
class _CaffeNormalize(torch.autograd.Function):
    """Normalize's forward, and the backward written as the fork's ``Backward_cpu``.

    ``x`` is viewed as ``(N, C, S)``; ``norm`` has shape ``(N, 1, 1)`` across the spatial
    positions and ``(N, 1, S)`` otherwise; ``scale`` is ``(1, C, 1)`` (or ``(1, 1, 1)``).
    """

    @staticmethod
    def forward(ctx, x, scale, across_spatial: bool, eps: float):
        squares = (x * x).sum(dim=(1, 2) if across_spatial else 1, keepdim=True)
        norm = torch.sqrt(squares + eps)
        # Caffe multiplies by the reciprocal across the spatial positions and divides
        # otherwise (caffe_cpu_scale versus caffe_div).
        unit = x * (1.0 / norm) if across_spatial else x / norm
        top = unit * scale
        ctx.save_for_backward(x, scale, norm, top)
        ctx.across_spatial = across_spatial
        return top

    @staticmethod
    def backward(ctx, top_diff):
        x, scale, norm, top = ctx.saved_tensors
        dims = (1, 2) if ctx.across_spatial else 1
        bottom_diff = scale_diff = None
        if ctx.needs_input_grad[0]:
            dot = (x * top_diff).sum(dim=dims, keepdim=True)
            # The fork scales the whole difference by the channel's own scale, where the
            # derivative would weight each channel's term in ``dot`` by its scale.
            bottom_diff = (top_diff - x * (dot / norm / norm)) / norm * scale
        if ctx.needs_input_grad[1]:
            per_channel = (top * top_diff).sum(dim=(0, 2), keepdim=True)
            scale_diff = (per_channel.sum(dim=1, keepdim=True) if scale.shape[1] == 1
                          else per_channel) / scale
        return bottom_diff, scale_diff, None, None


@register_layer("Normalize")
class Normalize(CaffeLayer):
    r"""L2 normalization with a learned scale (SSD's ``conv4_3_norm``, ParseNet).

    Across the spatial positions: :math:`y = s \, x / \sqrt{\sum_{c,h,w} x^2 + \epsilon}` per
    sample. Otherwise, at every position: :math:`y_c = s_c \, x_c / \sqrt{\sum_c x_c^2 +
    \epsilon}`. ``s`` is one scale (``channel_shared``) or one per channel.

    Args:
        channels: ``C``, the number of scales when they are not shared.
        across_spatial: normalize each sample as a whole (True) or each position.
        channel_shared: one scale for every channel.
        eps: added to the sum of squares before the square root.

    Shape:
        - Input: :math:`(N, C)`, :math:`(N, C, H)` or :math:`(N, C, H, W)`.
        - Output: the input's shape.

    Attributes:
        weight: the scale, Caffe's blob 0: shape ``()`` when shared, ``(C,)`` otherwise.

    Caffe: ``norm_param { across_spatial channel_shared scale_filler eps }`` (defaults
    True, True, constant 1, 1e-10). The backward is the fork's: the bottom's gradient is
    :math:`s_c (g - x (x \cdot g) / n^2) / n` and the scale's :math:`\sum y g / s`. With
    per-channel scales that differ, the bottom's is not the derivative of the forward (the
    derivative weights ``x . g`` by the scales), as in the fork; a zero scale gives a NaN
    scale gradient, as in the fork.
    """

    __constants__ = ["channels", "across_spatial", "channel_shared", "eps"]

    def __init__(self, channels: int, across_spatial: bool = True, channel_shared: bool = True,
                 eps: float = 1e-10):
        super().__init__()
        self.channels = int(channels)
        self.across_spatial = bool(across_spatial)
        self.channel_shared = bool(channel_shared)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(() if self.channel_shared else (self.channels,)))

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.norm_param
        if not bottom_shapes or len(bottom_shapes[0]) < 2:
            raise UnsupportedParameterError(
                f"layer {param.name!r} (Normalize): the bottom needs 2 or more axes, got "
                f"{'x'.join(map(str, bottom_shapes[0])) if bottom_shapes else 'none'}")
        layer = cls(bottom_shapes[0][1], p.across_spatial, p.channel_shared, p.eps)
        # Without a scale_filler the scale stays at the fork's default, constant 1.
        if ctx.fill and p.HasField("scale_filler"):
            fillers.fill(layer.weight, p.scale_filler, ctx.generator, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1 or not 2 <= len(bottom_shapes[0]) <= 4:
            raise self.shape_error(bottom_shapes, "one bottom of 2 to 4 axes (N x C x H x W)")
        if not self.channel_shared and bottom_shapes[0][1] != self.channels:
            raise self.shape_error(bottom_shapes, f"{self.channels} channels, one per scale")
        return [tuple(bottom_shapes[0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(x.shape)])
        num, channels = x.shape[:2]
        flat = x.reshape(num, channels, -1)
        scale = self.weight.to(x.dtype).reshape(1, -1, 1)
        return _CaffeNormalize.apply(flat, scale, self.across_spatial, self.eps).reshape(x.shape)

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [self.weight]

    def extra_repr(self) -> str:
        parts = [f"channels={self.channels}"]
        if not self.across_spatial:
            parts.append("across_spatial=False")
        if not self.channel_shared:
            parts.append("channel_shared=False")
        if self.eps != 1e-10:
            parts.append(f"eps={self.eps}")
        return ", ".join(parts)


# -- Permute --------------------------------------------------------------------------------
def complete_order(order: Sequence[int], rank: int, where: str) -> Tuple[int, ...]:
    """The fork's permutation: the given axes, then every missing axis in increasing order.

    Raises an :class:`UnsupportedParameterError` naming ``where`` for an axis outside
    ``[0, rank)`` or one given twice.
    """
    order = [int(o) for o in order]
    bad = [o for o in order if not 0 <= o < rank]
    if bad:
        raise UnsupportedParameterError(f"{where}: order {order} names axis {bad[0]}, which a "
                                        f"{rank}-axis bottom does not have (axes 0 to "
                                        f"{rank - 1})")
    if len(set(order)) != len(order):
        twice = sorted({o for o in order if order.count(o) > 1})
        raise UnsupportedParameterError(f"{where}: order {order} is not a permutation: axis "
                                        f"{twice[0]} appears twice")
    return tuple(order + [axis for axis in range(rank) if axis not in order])


@register_layer("Permute")
class Permute(CaffeLayer):
    r"""Reorders the axes of the bottom, the missing ones following in increasing order.

    :math:`y[i_0, ..., i_{k-1}] = x[j]` with :math:`j_{order[a]} = i_a`.

    Args:
        order: the bottom's axis that becomes each top axis; axes not given follow in
            increasing order (Caffe's completion), so ``(0, 2, 3, 1)`` and ``(0, 2, 3)`` are
            the same on a 4-axis bottom.

    Shape:
        - Input: any shape with at least ``max(order) + 1`` axes.
        - Output: :math:`(x.shape[order_0], ..., x.shape[order_{k-1}])`.

    Caffe: ``permute_param { order }``. The identity order shares the bottom (no copy);
    the backward scatters the top's gradient back through the same permutation.
    """

    __constants__ = ["order"]

    def __init__(self, order: Sequence[int] = ()):
        super().__init__()
        self.order = tuple(int(o) for o in order)
        # Negative and repeated axes are wrong at any rank (checked without building the
        # completion, which a huge axis would make huge); the range is checked against the
        # bottom.
        negative = [o for o in self.order if o < 0]
        if negative:
            raise UnsupportedParameterError(f"Permute: order {list(self.order)} names axis "
                                            f"{negative[0]}; axes count from 0")
        if len(set(self.order)) != len(self.order):
            twice = sorted({o for o in self.order if self.order.count(o) > 1})
            raise UnsupportedParameterError(f"Permute: order {list(self.order)} is not a "
                                            f"permutation: axis {twice[0]} appears twice")

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        order = list(param.permute_param.order)
        where = f"layer {param.name!r} (Permute)"
        if len(bottom_shapes) == 1:
            complete_order(order, len(bottom_shapes[0]), where)
        try:
            return cls(order)
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(str(error).replace("Permute", where, 1)) from None

    def full_order(self, rank: int) -> Tuple[int, ...]:
        """The permutation of a ``rank``-axis bottom."""
        return complete_order(self.order, rank, f"layer {self.layer_name!r} (Permute)")

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "one bottom")
        shape = tuple(bottom_shapes[0])
        if len(shape) <= max(self.order, default=-1):
            raise self.shape_error(bottom_shapes, f"at least {max(self.order) + 1} axes for "
                                   f"order {list(self.order)}")
        return [tuple(shape[axis] for axis in self.full_order(len(shape)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(x.shape)])
        order = self.full_order(x.dim())
        if order == tuple(range(x.dim())):
            return x
        return x.permute(order).contiguous()

    def extra_repr(self) -> str:
        return f"order={list(self.order)}"


# -- PriorBox -------------------------------------------------------------------------------
def _pair(value, what: str) -> Tuple[float, float]:
    values = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 2:
        raise UnsupportedParameterError(f"PriorBox: {what} needs one value or two (h, w), "
                                        f"got {value!r}")
    return float(values[0]), float(values[1])


def prior_aspect_ratios(aspect_ratios: Sequence[float], flip: bool) -> List[float]:
    """The fork's list: 1 first, then each new ratio (within 1e-6 of none before it) and,
    with ``flip``, its reciprocal right after it."""
    ratios = [1.0]
    for ratio in aspect_ratios:
        ratio = float(np.float32(ratio))
        if any(abs(ratio - known) < 1e-6 for known in ratios):
            continue
        ratios.append(ratio)
        if flip:
            ratios.append(float(np.float32(1.0 / ratio)))
    return ratios


def _height_width(p, single: str, height: str, width: str, where: str, unset):
    """PriorBox's ``single`` field or its ``height``/``width`` pair (never both), as
    ``(h, w)``, each positive; ``(unset, unset)`` when none is given."""
    if p.HasField(height) or p.HasField(width):
        if p.HasField(single):
            raise UnsupportedParameterError(f"{where}: give {single} or {height}/{width}, "
                                            "not both")
        pair = (getattr(p, height), getattr(p, width))
        if min(pair) <= 0:
            raise UnsupportedParameterError(f"{where}: {height} and {width} must both be "
                                            f"positive, got {pair}")
        return pair
    if p.HasField(single):
        if getattr(p, single) <= 0:
            raise UnsupportedParameterError(f"{where}: {single} must be positive")
        return (getattr(p, single),) * 2
    return (unset, unset)


@register_layer("PriorBox")
class PriorBox(CaffeLayer):
    r"""SSD's default boxes for one feature map, normalized to the image size.

    For each cell :math:`(h, w)` of the ``H x W`` feature map, centred at
    :math:`c = ((w + o) s_w, (h + o) s_h)`, and each ``min_size`` :math:`m` (with its
    ``max_size`` :math:`M`): a box of side :math:`m`, one of side :math:`\sqrt{m M}`, then for
    every aspect ratio :math:`r \ne 1` a box :math:`m \sqrt r \times m / \sqrt r`; each as
    ``(xmin, ymin, xmax, ymax) = (c - size / 2) / image, (c + size / 2) / image``.

    Args:
        min_sizes: box sizes in pixels (truncated to integers, as the fork does).
        max_sizes: none, or one per ``min_size`` and larger than it.
        aspect_ratios: ratios besides 1; repeats (within 1e-6) are ignored.
        flip: add ``1 / r`` after each ratio ``r``.
        clip: clamp the coordinates to ``[0, 1]``.
        variance: one value for all four coordinates or four values (default 0.1).
        img_size: ``(img_h, img_w)`` in pixels; 0 takes the image bottom's height and width.
        step: ``(step_h, step_w)`` in pixels; 0 takes ``image / feature map`` per axis.
        offset: the centre's position in its cell, in cells.

    Shape:
        - Input: the feature map :math:`(N, C, H, W)` and the image :math:`(N, C', H', W')`.
        - Output: :math:`(1, 2, H W P \cdot 4)` with
          :math:`P = |ratios| \cdot |min\_sizes| + |max\_sizes|`: the boxes, then the
          variances, for every cell in row-major order and every prior in the order above.

    Caffe: ``prior_box_param { min_size max_size aspect_ratio flip clip variance img_size
    img_h img_w step step_h step_w offset }`` (defaults: flip true, clip false, variance
    0.1, offset 0.5). The priors depend only on the shapes; the backward sends nothing.
    """

    __constants__ = ["min_sizes", "max_sizes", "aspect_ratios", "flip", "clip", "variance",
                     "img_size", "step", "offset"]

    def __init__(self, min_sizes: Sequence[float], max_sizes: Sequence[float] = (),
                 aspect_ratios: Sequence[float] = (), flip: bool = True, clip: bool = False,
                 variance: Sequence[float] = (0.1,), img_size=(0, 0), step=(0.0, 0.0),
                 offset: float = 0.5):
        super().__init__()
        self.min_sizes = tuple(float(s) for s in min_sizes)
        self.max_sizes = tuple(float(s) for s in max_sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.flip = bool(flip)
        self.clip = bool(clip)
        self.variance = tuple(float(v) for v in variance) or (0.1,)
        self.img_size = tuple(int(v) for v in _pair(img_size, "img_size"))
        self.step = _pair(step, "step")
        self.offset = float(offset)
        self._check()
        self.ratios = prior_aspect_ratios(self.aspect_ratios, self.flip)
        self.num_priors = len(self.ratios) * len(self.min_sizes) + len(self.max_sizes)

    def _check(self) -> None:
        problem = ""
        if not self.min_sizes:
            problem = "min_size is required (none given)"
        elif min(self.min_sizes) <= 0:
            problem = f"min_size must be positive, got {list(self.min_sizes)}"
        elif self.max_sizes and len(self.max_sizes) != len(self.min_sizes):
            problem = (f"{len(self.max_sizes)} max_size values for {len(self.min_sizes)} "
                       "min_size values; give one per min_size or none")
        elif any(high <= low for low, high in zip(self.min_sizes, self.max_sizes)):
            problem = (f"each max_size must be greater than its min_size, got min_size "
                       f"{list(self.min_sizes)}, max_size {list(self.max_sizes)}")
        elif len(self.variance) not in (1, 4):
            problem = f"variance takes 1 or 4 values, got {len(self.variance)}"
        elif min(self.variance) <= 0:
            problem = f"variance must be positive, got {list(self.variance)}"
        elif min(self.img_size) < 0 or (0 in self.img_size and max(self.img_size) > 0):
            problem = f"img_h and img_w must both be positive, got {self.img_size}"
        elif min(self.step) < 0 or (0 in self.step and max(self.step) > 0):
            problem = f"step_h and step_w must both be positive, got {self.step}"
        if problem:
            raise UnsupportedParameterError(f"PriorBox: {problem}")

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.prior_box_param
        where = f"layer {param.name!r} (PriorBox)"
        img_size = _height_width(p, "img_size", "img_h", "img_w", where, 0)
        step = _height_width(p, "step", "step_h", "step_w", where, 0.0)
        try:
            return cls(list(p.min_size), list(p.max_size), list(p.aspect_ratio), p.flip,
                       p.clip, list(p.variance), img_size, step, p.offset)
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(
                str(error).replace("PriorBox", where, 1)) from None

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 2 or any(len(s) > 4 for s in bottom_shapes):
            raise self.shape_error(bottom_shapes, "two bottoms of at most 4 axes: the feature "
                                   "map and the image")
        _, _, height, width = legacy_dims(bottom_shapes[0])
        size = height * width * self.num_priors * 4
        if size <= 0:
            raise self.shape_error(bottom_shapes, "a feature map with at least one cell")
        return [(1, 2, size)]

    def geometry(self, feature_shape: Sequence[int], image_shape: Sequence[int]):
        """``(layer_h, layer_w, img_h, img_w, step_h, step_w)`` as the fork derives them
        (the steps as float32 numbers)."""
        _, _, layer_h, layer_w = legacy_dims(feature_shape)
        if 0 in self.img_size:
            _, _, img_h, img_w = legacy_dims(image_shape)
        else:
            img_h, img_w = self.img_size
        if 0 in self.step:
            step_h = np.float32(img_h) / np.float32(layer_h)
            step_w = np.float32(img_w) / np.float32(layer_w)
        else:
            step_h, step_w = np.float32(self.step[0]), np.float32(self.step[1])
        return layer_h, layer_w, img_h, img_w, step_h, step_w

    def box_sizes(self) -> np.ndarray:
        """``(P, 2)`` widths and heights of one cell's priors, in the fork's order and
        float32 arithmetic (integer min/max sizes, ``sqrt(min * max)``)."""
        sizes = []
        for index, min_size in enumerate(self.min_sizes):
            side = int(min_size)
            sizes.append((side, side))
            if self.max_sizes:
                sizes.append((math.sqrt(side * int(self.max_sizes[index])),) * 2)
            for ratio in self.ratios:
                if abs(ratio - 1.0) < 1e-6:
                    continue
                root = np.sqrt(np.float32(ratio))
                sizes.append((np.float32(side) * root, np.float32(side) / root))
        return np.asarray(sizes, dtype=np.float32)

    def priors(self, feature_shape: Sequence[int], image_shape: Sequence[int]) -> np.ndarray:
        """The top's values, ``(1, 2, H W P 4)`` float32, for these bottom shapes."""
        layer_h, layer_w, img_h, img_w, step_h, step_w = self.geometry(feature_shape,
                                                                       image_shape)
        offset = np.float32(self.offset)
        center_x = (np.arange(layer_w, dtype=np.float32) + offset) * step_w
        center_y = (np.arange(layer_h, dtype=np.float32) + offset) * step_h
        half = self.box_sizes().astype(np.float64) / 2.0
        # (H, W, P) per coordinate, computed in double and stored in float like the fork.
        cx = center_x.astype(np.float64)[None, :, None]
        cy = center_y.astype(np.float64)[:, None, None]
        boxes = np.stack(np.broadcast_arrays(
            (cx - half[:, 0]) / img_w, (cy - half[:, 1]) / img_h,
            (cx + half[:, 0]) / img_w, (cy + half[:, 1]) / img_h), axis=-1)
        boxes = boxes.astype(np.float32).reshape(-1)
        if self.clip:
            boxes = np.clip(boxes, 0.0, 1.0)
        variances = np.resize(np.asarray(self.variance, dtype=np.float32), boxes.shape)
        return np.stack([boxes, variances])[None]

    def forward(self, feature: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(feature.shape), tuple(image.shape)])
        values = self.priors(tuple(feature.shape), tuple(image.shape))
        return torch.from_numpy(values).to(device=feature.device, dtype=feature.dtype)

    def extra_repr(self) -> str:
        parts = [f"min_sizes={list(self.min_sizes)}"]
        if self.max_sizes:
            parts.append(f"max_sizes={list(self.max_sizes)}")
        if self.aspect_ratios:
            parts.append(f"aspect_ratios={list(self.aspect_ratios)}")
        if not self.flip:
            parts.append("flip=False")
        if self.clip:
            parts.append("clip=True")
        if self.variance != (0.1,):
            parts.append(f"variance={list(self.variance)}")
        if self.img_size != (0, 0):
            parts.append(f"img_size={self.img_size}")
        if self.step != (0.0, 0.0):
            parts.append(f"step={self.step}")
        if self.offset != 0.5:
            parts.append(f"offset={self.offset}")
        return ", ".join(parts)


# -- DetectionOutput ------------------------------------------------------------------------
def decode_boxes(loc: torch.Tensor, prior_boxes: torch.Tensor, prior_variances: torch.Tensor,
                 code_type: str, variance_encoded_in_target: bool) -> torch.Tensor:
    """The fork's ``DecodeBBox`` in float32, for every prediction at once.

    ``loc`` is ``(..., P, 4)`` offsets, the priors ``(P, 4)``; returns ``(..., P, 4)`` boxes
    ``(xmin, ymin, xmax, ymax)``. CORNER adds the (variance-scaled) offsets to the corners;
    CENTER_SIZE moves the prior's centre by ``v loc * size`` and scales its size by
    ``exp(v loc)``; CORNER_SIZE adds ``v loc * size`` to the corners.
    """
    px0, py0, px1, py1 = prior_boxes.unbind(-1)
    lx0, ly0, lx1, ly1 = loc.unbind(-1)
    if not variance_encoded_in_target:
        v0, v1, v2, v3 = prior_variances.unbind(-1)
        lx0, ly0, lx1, ly1 = v0 * lx0, v1 * ly0, v2 * lx1, v3 * ly1
    if code_type == "CORNER":
        boxes = (px0 + lx0, py0 + ly0, px1 + lx1, py1 + ly1)
    elif code_type == "CORNER_SIZE":
        width, height = px1 - px0, py1 - py0
        boxes = (px0 + lx0 * width, py0 + ly0 * height, px1 + lx1 * width, py1 + ly1 * height)
    else:
        width, height = px1 - px0, py1 - py0
        center_x = lx0 * width + (px0 + px1) * 0.5
        center_y = ly0 * height + (py0 + py1) * 0.5
        half_w, half_h = torch.exp(lx1) * width * 0.5, torch.exp(ly1) * height * 0.5
        boxes = (center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h)
    return torch.stack(boxes, dim=-1)


def box_sizes(boxes: np.ndarray) -> np.ndarray:
    """The fork's ``BBoxSize`` (normalized): width times height, 0 for an inverted box."""
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    return np.where((width < 0) | (height < 0), np.float32(0), width * height)


def jaccard_overlaps(box: np.ndarray, size: np.float32, boxes: np.ndarray,
                     sizes: np.ndarray) -> np.ndarray:
    """The fork's ``JaccardOverlap`` of one box with each of ``boxes``, in float32: 0 unless
    the intersection has a positive width and height, else ``inter / (s1 + s2 - inter)``."""
    width = np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0])
    height = np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1])
    overlapping = (width > 0) & (height > 0)
    inter = np.where(overlapping, width * height, np.float32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        overlap = inter / (sizes + size - inter)
    return np.where(overlapping, overlap, np.float32(0)).astype(np.float32)


def nms_fast(boxes: np.ndarray, sizes: np.ndarray, scores: np.ndarray,
             score_threshold: float, nms_threshold: float, eta: float,
             top_k: int) -> List[int]:
    """The fork's ``ApplyNMSFast``: the indices kept, best first.

    Candidates score above ``score_threshold``, sorted by score with ties in index order
    (``stable_sort``), cut to ``top_k``; a candidate is kept when its overlap with every box
    kept before it is at most the current threshold, which each kept box multiplies by
    ``eta`` while it is above 0.5.
    """
    candidates = np.flatnonzero(scores > np.float32(score_threshold))
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    threshold = np.float32(nms_threshold)
    eta = np.float32(eta)
    # The largest overlap of each candidate with the boxes kept so far: a candidate is kept
    # when it is at most the threshold at its turn (the fork's loop over the kept boxes).
    worst = np.zeros(len(order), dtype=np.float32)
    ordered_boxes, ordered_sizes = boxes[order], sizes[order]
    kept: List[int] = []
    for position, index in enumerate(order):
        if not worst[position] <= threshold:
            continue
        kept.append(int(index))
        rest = slice(position + 1, None)
        np.maximum(worst[rest], jaccard_overlaps(ordered_boxes[position],
                                                 ordered_sizes[position],
                                                 ordered_boxes[rest], ordered_sizes[rest]),
                   out=worst[rest])
        if eta < 1 and threshold > 0.5:
            threshold = np.float32(threshold * eta)
    return kept


@register_layer("DetectionOutput")
class DetectionOutput(CaffeLayer):
    r"""SSD's detections: decode the box offsets against the priors, keep the best boxes of
    each class by non-maximum suppression, then the best ``keep_top_k`` of each image.

    Per image and non-background class ``c``: the priors whose confidence exceeds
    ``confidence_threshold``, best first (ties in prior order), at most ``top_k`` of them,
    each kept when its Jaccard overlap with every box kept before it is at most the NMS
    threshold (multiplied by ``eta`` after each kept box while above 0.5). When an image
    keeps more than ``keep_top_k`` boxes over all classes, the best ``keep_top_k`` remain.

    Args:
        num_classes: classes in the confidences, background included.
        share_location: one box per prior for every class (else one per class).
        background_label_id: the class that is never reported (-1: none).
        nms_threshold: the largest overlap a kept box may have with a better one.
        top_k: candidates per class before the suppression (-1: all).
        eta: adaptive NMS factor in ``(0, 1]``.
        code_type: ``"CORNER"``, ``"CENTER_SIZE"`` or ``"CORNER_SIZE"`` (see
            :func:`decode_boxes`).
        variance_encoded_in_target: the offsets are already scaled by the variances.
        keep_top_k: boxes per image after the suppression (-1: all).
        confidence_threshold: candidates must score above it (None: every score above
            ``-FLT_MAX``).
        clip: clamp the decoded boxes to ``[0, 1]`` before the suppression (OpenCV's
            ``clip`` field; the fork never clips).

    Shape:
        - Input: locations :math:`(N, P \cdot L \cdot 4)` (``L`` = 1, or ``num_classes``
          without ``share_location``), confidences :math:`(N, P \cdot C)`, priors
          :math:`(1, 2, P \cdot 4)` (PriorBox's layout; only the first ``2 P 4`` values are
          read).
        - Output: :math:`(1, 1, D, 7)`, one row ``(image, label, score, xmin, ymin, xmax,
          ymax)`` per detection, by image, then label, then score. When no image has a
          detection: :math:`(1, 1, N, 7)` rows ``(i, -1, -1, -1, -1, -1, -1)``. The shape
          rule says ``(1, 1, 1, 7)``, as Caffe's ``Reshape`` does before the forward.

    Caffe: ``detection_output_param { num_classes share_location background_label_id
    nms_param { nms_threshold top_k eta } code_type variance_encoded_in_target keep_top_k
    confidence_threshold }`` (defaults true, 0, 0.3, -1, 1, CORNER, false, -1, -FLT_MAX).
    ``save_output_param`` and ``visualize`` are read and ignored (nothing is written or
    shown). Caffe sorts for ``keep_top_k`` with ``std::sort``, which leaves equal scores at
    the cut in no defined order; here the lower label, then the better candidate, wins.
    There is no backward, as in Caffe.
    """

    has_backward = False  # Caffe's Backward_cpu is NOT_IMPLEMENTED

    __constants__ = ["num_classes", "share_location", "background_label_id", "nms_threshold",
                     "top_k", "eta", "code_type", "variance_encoded_in_target", "keep_top_k",
                     "confidence_threshold", "clip"]

    def __init__(self, num_classes: int, share_location: bool = True,
                 background_label_id: int = 0, nms_threshold: float = 0.3, top_k: int = -1,
                 eta: float = 1.0, code_type: str = "CORNER",
                 variance_encoded_in_target: bool = False, keep_top_k: int = -1,
                 confidence_threshold: Optional[float] = None, clip: bool = False):
        super().__init__()
        self.num_classes = int(num_classes)
        self.share_location = bool(share_location)
        self.background_label_id = int(background_label_id)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        self.eta = float(eta)
        self.code_type = str(code_type)
        self.variance_encoded_in_target = bool(variance_encoded_in_target)
        self.keep_top_k = int(keep_top_k)
        self.confidence_threshold = (None if confidence_threshold is None
                                     else float(confidence_threshold))
        self.clip = bool(clip)
        problem = ""
        if self.num_classes < 1:
            problem = f"num_classes must be at least 1, got {self.num_classes}"
        elif self.nms_threshold < 0:
            problem = f"nms_threshold must be non-negative, got {self.nms_threshold}"
        elif not 0 < self.eta <= 1:
            problem = f"eta must lie in (0, 1], got {self.eta}"
        elif self.share_location and self.background_label_id == -1:
            # The fork skips the location label equal to the background id, and the shared
            # locations are stored under label -1: it then aborts ("Could not find location
            # predictions for label -1"), as OpenCV does.
            problem = ("share_location with background_label_id -1 leaves no location "
                       "predictions in the fork (it aborts); give a background class or "
                       "share_location: false")
        elif self.code_type not in CODE_TYPES.values():
            problem = (f"code_type {self.code_type!r} is not one of "
                       f"{', '.join(CODE_TYPES.values())}")
        if problem:
            raise UnsupportedParameterError(f"DetectionOutput: {problem}")

    @property
    def num_loc_classes(self) -> int:
        return 1 if self.share_location else self.num_classes

    @property
    def foreground_classes(self) -> List[int]:
        """The classes that can be reported, in increasing order."""
        return [c for c in range(self.num_classes) if c != self.background_label_id]

    @property
    def score_threshold(self) -> float:
        return -FLT_MAX if self.confidence_threshold is None else self.confidence_threshold

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.detection_output_param
        where = f"layer {param.name!r} (DetectionOutput)"
        if not p.HasField("num_classes"):
            raise UnsupportedParameterError(f"{where}: num_classes is required")
        code = CODE_TYPES.get(p.code_type, str(p.code_type))
        nms = p.nms_param
        top_k = nms.top_k if nms.HasField("top_k") else -1
        threshold = p.confidence_threshold if p.HasField("confidence_threshold") else None
        # ``clip`` (field 1000) and ``normalized_bbox`` (10) are OpenCV's extensions of the
        # message, read where the schema has them: the fork never clips and has only
        # normalized boxes.
        clip = bool(getattr(p, "clip", False))
        if not getattr(p, "normalized_bbox", True):
            raise UnsupportedParameterError(
                f"{where}: normalized_bbox false (OpenCV's boxes in pixels) is not the SSD "
                "fork's layer; only normalized boxes are supported")
        try:
            return cls(p.num_classes, p.share_location, p.background_label_id,
                       nms.nms_threshold, top_k, nms.eta, code,
                       p.variance_encoded_in_target, p.keep_top_k, threshold, clip)
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(
                str(error).replace("DetectionOutput", where, 1)) from None

    def num_priors(self, bottom_shapes: Sequence[Shape]) -> int:
        """``P`` as the fork reads it (the prior bottom's height / 4), after checking that
        the three bottoms fit together (a ShapeError naming the layer otherwise)."""
        if len(bottom_shapes) != 3 or any(len(s) > 4 for s in bottom_shapes):
            raise self.shape_error(bottom_shapes, "three bottoms of at most 4 axes: locations, "
                                   "confidences and priors")
        loc, conf, prior = (legacy_dims(s) for s in bottom_shapes)
        priors = prior[2] // 4
        if prior[2] % 4 or prior[1] != 2 or priors == 0:
            raise self.shape_error(bottom_shapes, "priors shaped 1 x 2 x (P * 4), as "
                                   "PriorBox writes them")
        if loc[0] != conf[0]:
            raise self.shape_error(bottom_shapes, "as many location as confidence samples")
        if loc[1] != priors * self.num_loc_classes * 4 or count(bottom_shapes[0], 1) != loc[1]:
            raise self.shape_error(
                bottom_shapes, f"{priors * self.num_loc_classes * 4} location values per "
                f"sample ({priors} priors x {self.num_loc_classes} location classes x 4)")
        if conf[1] != priors * self.num_classes or count(bottom_shapes[1], 1) != conf[1]:
            raise self.shape_error(
                bottom_shapes, f"{priors * self.num_classes} confidences per sample "
                f"({priors} priors x num_classes {self.num_classes}); the confidences hold "
                f"{conf[1] / priors:g} per prior")
        return priors

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self.num_priors(bottom_shapes)
        return [(1, 1, 1, 7)]

    def decoded(self, loc: torch.Tensor, prior: torch.Tensor, priors: int) -> torch.Tensor:
        """``(N, L, P, 4)`` float32 boxes, clipped to ``[0, 1]`` with ``clip``."""
        num = loc.shape[0]
        offsets = loc.detach().float().reshape(num, priors, self.num_loc_classes, 4)
        prior = prior.detach().float().reshape(-1)[:2 * priors * 4].reshape(2, priors, 4)
        boxes = decode_boxes(offsets.transpose(1, 2), prior[0], prior[1], self.code_type,
                             self.variance_encoded_in_target)
        return boxes.clamp(0.0, 1.0) if self.clip else boxes

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor
                ) -> torch.Tensor:
        priors = self.num_priors([tuple(loc.shape), tuple(conf.shape), tuple(prior.shape)])
        num = loc.shape[0]
        boxes = self.decoded(loc, prior, priors).cpu().numpy()
        sizes = box_sizes(boxes)
        scores = conf.detach().float().reshape(num, priors, self.num_classes).cpu().numpy()
        rows: List[Tuple[int, int, float, np.ndarray]] = []
        kept_total = 0
        for image in range(num):
            kept = {}
            for label in self.foreground_classes:
                box_class = 0 if self.share_location else label
                kept[label] = nms_fast(boxes[image, box_class], sizes[image, box_class],
                                       scores[image, :, label], self.score_threshold,
                                       self.nms_threshold, self.eta, self.top_k)
            detections = sum(len(v) for v in kept.values())
            if -1 < self.keep_top_k < detections:
                pairs = [(scores[image, index, label], label, index)
                         for label, indices in kept.items() for index in indices]
                # Stable, best first: equal scores keep the label and NMS order.
                best = sorted(range(len(pairs)), key=lambda i: -pairs[i][0])[:self.keep_top_k]
                kept = {label: [] for label in kept}
                for i in best:
                    kept[pairs[i][1]].append(pairs[i][2])
                kept_total += self.keep_top_k
            else:
                kept_total += detections
            for label in sorted(kept):
                box_class = 0 if self.share_location else label
                for index in kept[label]:
                    rows.append((image, label, scores[image, index, label],
                                 boxes[image, box_class, index]))
        if kept_total == 0:
            top = torch.full((1, 1, num, 7), -1.0, dtype=loc.dtype, device=loc.device)
            top[0, 0, :, 0] = torch.arange(num, dtype=loc.dtype, device=loc.device)
            return top
        table = np.array([[image, label, score, *box] for image, label, score, box in rows],
                         dtype=np.float64)
        return torch.from_numpy(table).to(device=loc.device, dtype=loc.dtype)[None, None]

    def extra_repr(self) -> str:
        parts = [f"num_classes={self.num_classes}"]
        defaults = {"share_location": True, "background_label_id": 0, "nms_threshold": 0.3,
                    "top_k": -1, "eta": 1.0, "code_type": "CORNER",
                    "variance_encoded_in_target": False, "keep_top_k": -1,
                    "confidence_threshold": None, "clip": False}
        for name, default in defaults.items():
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}" if isinstance(value, str) else
                             f"{name}={value}")
        return ", ".join(parts)
