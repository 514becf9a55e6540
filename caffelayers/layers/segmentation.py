"""The segmentation forks' layers: SegNet's ``Upsample`` and ``BN``, PSPNet/DeepLab's
``Interp`` and ``BN``.

``BN`` is one Caffe type string with two unrelated implementations. SegNet's
(alexgkendall/caffe-segnet) has two blobs, scale and shift, and a ``bn_mode``: LEARN
normalizes with the batch's statistics always, INFERENCE is only ``scale * x + shift`` (its
``compute_bn_statistics.py`` folds the statistics into those two blobs). PSPNet's
(hszhao/PSPNet, from yjxiong's Caffe) has four blobs, slope, bias, running mean and running
variance, a ``momentum``, an ``eps`` and ``frozen``. :class:`BN` reads the ``bn_param`` and
builds one or the other (:func:`bn_variant`); both keep the blobs in Caffe's ``1 x C x 1 x 1``
shape.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import fillers
from ..errors import LabelError, UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape

Pair = Union[int, Sequence[int]]


def has_field(message, name: str) -> bool:
    """Whether ``message`` has field ``name`` set; False for a field its schema lacks, so that
    one fork's field names can be asked of a schema that carries another fork's."""
    return name in message.DESCRIPTOR.fields_by_name and message.HasField(name)


def _pair(value, what: str, where: str) -> Tuple[int, int]:
    values = (value, value) if isinstance(value, (int, bool)) else tuple(value)
    if len(values) != 2:
        raise UnsupportedParameterError(f"{where}: {what} needs one value or two (h, w), got "
                                        f"{value!r}")
    return values


def _legacy_shape(shape: Sequence[int]) -> Shape:
    """Caffe's num/channels/height/width view of a blob of at most 4 axes (1 where absent)."""
    return tuple(shape) + (1,) * (4 - len(shape))


# -- SegNet's Upsample --------------------------------------------------------------------
class _MaskScatter(torch.autograd.Function):
    """Each plane's values written to the positions its mask names, with SegNet's backward.

    Forward, as Caffe's CPU loop: the top starts at zero and ``top[mask[i]] = x[i]`` in
    order, so where two inputs name one position the later one stays. Backward, as Caffe:
    ``dx[i] = dtop[mask[i]]`` for every ``i``, the overwritten inputs included.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, plane: int) -> torch.Tensor:
        num, channels, inputs = index.shape
        # The last writer of each output position: the largest input index aimed at it.
        order = torch.arange(inputs, device=x.device).expand(num, channels, inputs)
        writer = torch.full((num, channels, plane), -1, dtype=torch.long, device=x.device)
        writer.scatter_reduce_(2, index, order, reduce="amax")
        flat = x.reshape(num, channels, inputs)
        top = flat.gather(2, writer.clamp(min=0)).masked_fill_(writer < 0, 0)
        ctx.save_for_backward(index)
        ctx.bottom_shape = x.shape
        return top

    @staticmethod
    def backward(ctx, grad_top: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad_top.gather(2, index).view(ctx.bottom_shape), None, None


@register_layer("Upsample")
class Upsample(CaffeLayer):
    r"""SegNet's unpooling: each value goes back to where its MAX pooling found it.

    :math:`y_{n,c}[m_{n,c,i}] = x_{n,c,i}` for every position ``i`` of the bottom's
    plane, where ``m`` is the mask (the pooling layer's second top, ``h * W_o + w`` in the
    output plane); every other position of ``y`` is 0.

    Args:
        scale: ``s`` or ``(s_h, s_w)``, each at least 2: the output is ``s`` times the input
            (minus the ``pad_out`` row or column). Ignored when ``size`` is given.
        pad_out: ``p`` or ``(p_h, p_w)``: take one row (column) off the scaled size, for a
            pooling input of odd size; only with a scale of 2 on that axis.
        size: ``(H_o, W_o)``, the output size, each at least 2 (Caffe's ``upsample_h`` and
            ``upsample_w``, which replace the deprecated scale and pad_out).

    Shape:
        - Input: the data :math:`(N, C, H, W)` and the mask :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H_o, W_o)` with :math:`H_o = s_h H - p_h` (or ``size``).

    Caffe: ``upsample_param { scale | scale_h scale_w  pad_out_h pad_out_w  upsample_h
    upsample_w }`` (alexgkendall/caffe-segnet). The mask is float and truncated to int; a mask
    entry outside the output plane is a fatal error in Caffe and a ``LabelError`` here (a
    mask made for another output size). Where two inputs name one output position (a mask
    from overlapping pooling windows), the later input in row-major order is kept, as in
    Caffe's CPU loop; its backward reads ``dy[mask[i]]`` for every input, the overwritten
    ones included. YOLO ports use the type ``Upsample`` for a one-bottom nearest-neighbour
    resize: that layer is not this one, and a one-bottom ``Upsample`` is refused.
    """

    __constants__ = ["scale", "pad_out", "size"]
    # Caffe takes exactly two bottoms; num_bottoms stays open so that the shape rule, which
    # says what the second bottom is (the pooling mask), reports a missing one.
    num_tops = (1, 1)

    def __init__(self, scale: Pair = 2, pad_out: Union[bool, Sequence[bool]] = False,
                 size: Optional[Sequence[int]] = None):
        super().__init__()
        self.size = None if size is None else tuple(int(v) for v in _pair(size, "size",
                                                                          "Upsample"))
        self.scale = tuple(int(v) for v in _pair(scale, "scale", "Upsample"))
        self.pad_out = tuple(bool(v) for v in _pair(pad_out, "pad_out", "Upsample"))
        problem = ""
        if self.size is not None:
            if min(self.size) <= 1:
                problem = f"upsample_h and upsample_w must be greater than 1, got {self.size}"
        elif min(self.scale) <= 1:
            problem = f"the scale must be greater than 1, got {self.scale}"
        elif any(p and s != 2 for p, s in zip(self.pad_out, self.scale)):
            problem = (f"pad_out needs a scale of 2 on its axis (scale {self.scale}, pad_out "
                       f"{self.pad_out}): the output size would be ill-defined")
        if problem:
            raise UnsupportedParameterError(f"Upsample: {problem}")

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.upsample_param
        where = f"layer {param.name!r} (Upsample)"
        given = {field.name for field, _ in p.ListFields()}
        if not ({"upsample_h", "upsample_w"} <= given
                or "scale" not in given and {"scale_h", "scale_w"} <= given
                or not (given & {"scale_h", "scale_w"})):
            raise UnsupportedParameterError(
                f"{where}: give upsample_h and upsample_w, or (deprecated) scale, or both "
                "scale_h and scale_w")
        try:
            if {"upsample_h", "upsample_w"} <= given:
                return cls(size=(p.upsample_h, p.upsample_w))
            scale = (p.scale_h, p.scale_w) if "scale_h" in given else p.scale
            return cls(scale, (p.pad_out_h, p.pad_out_w))
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(f"{where}: {error}") from None

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 2:
            raise self.shape_error(
                bottom_shapes, "two bottoms: the data and its argmax mask, the second top of "
                "the MAX Pooling layer it undoes (a one-bottom nearest-neighbour Upsample is "
                "another fork's layer)")
        data, mask = (tuple(s) for s in bottom_shapes)
        if len(data) != 4 or data != mask:
            raise self.shape_error(bottom_shapes, "a data bottom N x C x H x W and a mask of "
                                   "the same shape")
        return [data[:2] + self._output_size(data[2:])]

    def _output_size(self, size: Sequence[int]) -> Tuple[int, int]:
        if self.size is not None:
            return self.size
        return tuple(n * s - int(p) for n, s, p in zip(size, self.scale, self.pad_out))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        (shape,) = self.output_shapes([tuple(x.shape), tuple(mask.shape)])
        plane = shape[2] * shape[3]
        index = mask.detach().reshape(x.shape[0], x.shape[1], -1).long()
        if index.numel():
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= plane:
                raise LabelError(
                    f"layer {self.layer_name!r} (Upsample): mask index "
                    f"{low if low < 0 else high} lies outside the {shape[2]}x{shape[3]} output "
                    "plane; the scale or upsample size must match the pooling that made the "
                    "mask")
        return _MaskScatter.apply(x, index, plane).view(shape)

    def extra_repr(self) -> str:
        if self.size is not None:
            return f"size={self.size}"
        parts = [f"scale={self.scale}"]
        if any(self.pad_out):
            parts.append(f"pad_out={self.pad_out}")
        return ", ".join(parts)


# -- PSPNet/DeepLab's Interp --------------------------------------------------------------
@register_layer("Interp")
class Interp(CaffeLayer):
    r"""Bilinear resize with corner pixels aligned (DeepLab's ``Interp``, used by PSPNet).

    The bottom, optionally cropped by ``-pad_beg`` and ``-pad_end`` on each spatial axis, is
    sampled at :math:`h_{in} = h \, (H_{in} - 1) / (H_o - 1)` (0 when :math:`H_o = 1`) and
    likewise along the width, interpolating linearly between the two nearest rows and
    columns: PyTorch's ``align_corners=True``.

    Args:
        height, width: the output size (used when neither factor is given, or both are).
        zoom_factor: :math:`H_o = H_e + (H_e - 1)(z - 1)`, at least 1.
        shrink_factor: :math:`H_o = (H_e - 1) / s + 1` (integer division), at least 1;
            with ``zoom_factor`` too, the shrink comes first.
        pad_beg, pad_end: 0 or negative: rows and columns cut off at the start and the end
            of both spatial axes; :math:`H_e = H + pad\_beg + pad\_end`.

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H_o, W_o)` from the rule above, in Caffe's order of
          precedence: shrink alone, zoom alone, height and width, shrink then zoom.

    Caffe: ``interp_param { height width zoom_factor shrink_factor pad_beg pad_end }``
    (hszhao/PSPNet, DeepLab v2). Only non-positive padding is implemented (Caffe checks it).
    Caffe computes the sampling positions in float32 whatever the blob type, which this
    matches for float32 inputs. The backward is the adjoint of the interpolation, as
    autograd's.
    """

    __constants__ = ["height", "width", "zoom_factor", "shrink_factor", "pad_beg", "pad_end"]
    num_bottoms = (1, 1)
    num_tops = (1, 1)

    def __init__(self, height: Optional[int] = None, width: Optional[int] = None,
                 zoom_factor: Optional[int] = None, shrink_factor: Optional[int] = None,
                 pad_beg: int = 0, pad_end: int = 0):
        super().__init__()
        self.height = None if height is None else int(height)
        self.width = None if width is None else int(width)
        self.zoom_factor = None if zoom_factor is None else int(zoom_factor)
        self.shrink_factor = None if shrink_factor is None else int(shrink_factor)
        self.pad_beg = int(pad_beg)
        self.pad_end = int(pad_end)
        zoom, shrink = self.zoom_factor is not None, self.shrink_factor is not None
        sized = self.height is not None and self.width is not None
        problem = ""
        if self.pad_beg > 0 or self.pad_end > 0:
            problem = (f"pad_beg {self.pad_beg} and pad_end {self.pad_end} must be 0 or "
                       "negative (cropping); Caffe implements no positive padding")
        elif zoom and self.zoom_factor < 1 or shrink and self.shrink_factor < 1:
            problem = (f"zoom_factor {self.zoom_factor} and shrink_factor "
                       f"{self.shrink_factor} must be at least 1")
        elif not (zoom or shrink or sized):
            problem = "give zoom_factor, shrink_factor, or both height and width"
        if problem:
            raise UnsupportedParameterError(f"Interp: {problem}")

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.interp_param
        given = {name: getattr(p, name) if p.HasField(name) else None
                 for name in ("height", "width", "zoom_factor", "shrink_factor")}
        try:
            return cls(**given, pad_beg=p.pad_beg, pad_end=p.pad_end)
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(f"layer {param.name!r} (Interp): {error}") from None

    def _output_size(self, effective: int, fixed: Optional[int]) -> int:
        zoom, shrink = self.zoom_factor, self.shrink_factor
        if shrink is not None and zoom is None:
            return (effective - 1) // shrink + 1
        if zoom is not None and shrink is None:
            return effective + (effective - 1) * (zoom - 1)
        if self.height is not None and self.width is not None:
            return fixed
        shrunk = (effective - 1) // shrink + 1
        return shrunk + (shrunk - 1) * (zoom - 1)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1 or len(bottom_shapes[0]) != 4:
            raise self.shape_error(bottom_shapes, "one bottom N x C x H x W")
        shape = tuple(bottom_shapes[0])
        effective = [n + self.pad_beg + self.pad_end for n in shape[2:]]
        if min(effective) < 1:
            raise self.shape_error(bottom_shapes, f"pad_beg {self.pad_beg} and pad_end "
                                   f"{self.pad_end} crop away the whole input")
        size = (self._output_size(effective[0], self.height),
                self._output_size(effective[1], self.width))
        if min(size) < 1:
            raise self.shape_error(bottom_shapes, f"an output size of at least 1, got "
                                   f"{size[0]}x{size[1]}")
        return [shape[:2] + size]

    def crop(self, shape: Sequence[int]) -> Tuple[slice, slice]:
        """The rows and columns of the bottom that are interpolated."""
        return tuple(slice(-self.pad_beg, n + self.pad_end) for n in shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (shape,) = self.output_shapes([tuple(x.shape)])
        if self.pad_beg or self.pad_end:
            rows, cols = self.crop(x.shape)
            x = x[:, :, rows, cols]
        if tuple(x.shape[2:]) == shape[2:]:
            return x.clone()  # Caffe's special case: a copy
        return F.interpolate(x, size=shape[2:], mode="bilinear", align_corners=True)

    def extra_repr(self) -> str:
        names = ("height", "width", "zoom_factor", "shrink_factor")
        parts = [f"{name}={getattr(self, name)}" for name in names
                 if getattr(self, name) is not None]
        parts += [f"{name}={getattr(self, name)}" for name in ("pad_beg", "pad_end")
                  if getattr(self, name)]
        return ", ".join(parts)


# -- BN: SegNet's and PSPNet's ------------------------------------------------------------
#: bn_param fields that only SegNet's BN has, and those that only PSPNet's has.
SEGNET_FIELDS = ("bn_mode", "scale_filler", "shift_filler")
PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen")
BN_MODES = ("LEARN", "INFERENCE")


def bn_variant(bn_param, where: str = "BN") -> str:
    """``"SegNet"`` or ``"PSPNet"``: which fork's ``BN`` a ``bn_param`` belongs to.

    The rule: any of SegNet's fields (``bn_mode``, ``scale_filler``, ``shift_filler``) means
    SegNet; otherwise PSPNet (whose fields are ``slope_filler``, ``bias_filler``,
    ``momentum``, ``eps``, ``frozen``), also for an empty ``bn_param``: SegNet's published
    prototxts always set ``bn_mode`` or its fillers, and PSPNet's BN (from yjxiong's Caffe)
    is the one other nets use. Fields of both forks in one layer are an error. The blob count
    then confirms it: 2 blobs for SegNet, 4 for PSPNet, checked when weights are loaded.
    """
    segnet = [name for name in SEGNET_FIELDS if has_field(bn_param, name)]
    pspnet = [name for name in PSPNET_FIELDS if has_field(bn_param, name)]
    if segnet and pspnet:
        raise UnsupportedParameterError(
            f"{where}: bn_param mixes SegNet's fields ({', '.join(segnet)}) with PSPNet's "
            f"({', '.join(pspnet)}); a BN layer is one fork's or the other's")
    return "SegNet" if segnet else "PSPNet"


def _affine_blob(channels: int, value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((1, channels, 1, 1), float(value)))


@register_layer("BN")
class BN(CaffeLayer):
    """Batch normalization of SegNet or PSPNet (one type, two forks), told apart by ``bn_param``

    ``BN.from_caffe`` builds a :class:`SegNetBN` or a :class:`PSPNetBN`, the one
    :func:`bn_variant` names; construct the two classes directly from Python. Both normalize
    per channel (axis 1) over the batch and the spatial axes and keep their blobs as
    ``1 x C x 1 x 1``.
    """

    num_bottoms = (1, 1)
    num_tops = (1, 3)  # SegNet's LEARN mode adds the batch mean and variance

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        where = f"layer {param.name!r} (BN)"
        shape = bottom_shapes[0] if bottom_shapes else ()
        channels = shape[1] if len(shape) > 1 else 1  # output_shapes rejects the rest
        if bn_variant(param.bn_param, where) == "SegNet":
            return SegNetBN._from_caffe(param, channels, ctx)
        return PSPNetBN._from_caffe(param, channels, ctx)

    def _check_bottom(self, bottom_shapes: Sequence[Shape], max_tops: int = 1) -> Shape:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "one bottom")
        shape = tuple(bottom_shapes[0])
        if not 2 <= len(shape) <= 4 or shape[1] != self.channels:
            raise self.shape_error(bottom_shapes, f"N x {self.channels} (x H x W): 2 to 4 "
                                   "axes with the channels on axis 1")
        return shape


class SegNetBN(BN):
    r"""SegNet's batch normalization with a learned scale and shift.

    LEARN: :math:`y = \gamma_c (x - \mu_c) / \sqrt{\sigma^2_c + 10^{-9}} + \beta_c` with the
    batch's mean and biased variance over N, H and W, at training and test alike.
    INFERENCE: :math:`y = \gamma_c x + \beta_c` (the statistics are folded into the blobs).

    Args:
        channels: the size of axis 1.
        bn_mode: ``"LEARN"`` or ``"INFERENCE"``.
        batch_tops: LEARN only: also return the batch mean and variance as tops 2 and 3
            (0, 1 or 2 of them).

    Shape:
        - Input: :math:`(N, C, H, W)`, or fewer axes read as Caffe's legacy 4-D view.
        - Output: :math:`(N, C, H, W)`, always 4 axes; the extra tops are
          :math:`(1, C, 1, 1)`.

    Attributes:
        weight: the scale :math:`\gamma`, blob 0, ``1 x C x 1 x 1``.
        bias: the shift :math:`\beta`, blob 1, ``1 x C x 1 x 1``.

    Caffe: ``bn_param { bn_mode scale_filler shift_filler }`` (alexgkendall/caffe-segnet);
    without fillers both blobs start at 0. The variance is computed as
    :math:`E[x^2] - E[x]^2` with eps fixed at 1e-9, as in Caffe; the extra tops carry the
    variance before eps. LEARN's backward is the true gradient of this formula (Caffe's
    written-out rule), INFERENCE's is :math:`\gamma\,dy`, and the blobs' gradients are the
    sums of :math:`dy\,\hat x` (LEARN) or :math:`dy\,x` (INFERENCE) and :math:`dy`.
    """

    __constants__ = ["channels", "bn_mode", "batch_tops"]
    #: Caffe's variance epsilon (``var_eps_``), not configurable.
    EPS = 1e-9

    def __init__(self, channels: int, bn_mode: str = "LEARN", batch_tops: int = 0):
        super().__init__(channels)
        if bn_mode not in BN_MODES:
            raise UnsupportedParameterError(f"BN: bn_mode {bn_mode!r} is not one of "
                                            f"{', '.join(BN_MODES)}")
        if not 0 <= batch_tops <= (2 if bn_mode == "LEARN" else 0):
            raise UnsupportedParameterError(
                f"BN: {batch_tops + 1} tops; LEARN takes 1 to 3 (data, batch mean, batch "
                "variance), INFERENCE 1")
        self.bn_mode = bn_mode
        self.batch_tops = int(batch_tops)
        self.weight = _affine_blob(self.channels, 0.0)
        self.bias = _affine_blob(self.channels, 0.0)

    @classmethod
    def _from_caffe(cls, param, channels: int, ctx: BuildContext) -> "SegNetBN":
        p = param.bn_param
        mode = p.bn_mode if has_field(p, "bn_mode") else 0
        mode = BN_MODES[mode] if 0 <= mode < len(BN_MODES) else str(mode)
        try:
            layer = cls(channels, mode, max(len(param.top) - 1, 0))
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(f"layer {param.name!r} (BN): {error}") from None
        if ctx.fill:
            for blob, name in ((layer.weight, "scale_filler"), (layer.bias, "shift_filler")):
                fillers.fill(blob, getattr(p, name) if has_field(p, name) else None,
                             ctx.generator, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        shape = _legacy_shape(self._check_bottom(bottom_shapes))
        return [shape] + [(1, self.channels, 1, 1)] * self.batch_tops

    def forward(self, x: torch.Tensor):
        shape = self.output_shapes([tuple(x.shape)])[0]
        x = x.reshape(shape)
        if self.bn_mode == "INFERENCE":
            return x * self.weight + self.bias
        axes = (0, 2, 3)
        mean = x.mean(dim=axes, keepdim=True)
        variance = (x * x).mean(dim=axes, keepdim=True) - mean * mean
        top = (x - mean) / torch.sqrt(variance + self.EPS) * self.weight + self.bias
        if not self.batch_tops:
            return top
        return (top, mean.detach(), variance.detach())[:1 + self.batch_tops]

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [self.weight, self.bias]

    def extra_repr(self) -> str:
        parts = [str(self.channels), f"bn_mode={self.bn_mode}"]
        if self.batch_tops:
            parts.append(f"batch_tops={self.batch_tops}")
        return ", ".join(parts)


class _PSPNetNormalize(torch.autograd.Function):
    """``slope * (x - mean) * inv_std + bias`` with PSPNet's non-frozen backward.

    Caffe's rule, with ``g = dy * slope`` and ``x_hat`` the normalized input:
    ``dx = (g - mean(g) - x_hat * mean(g * x_hat)) * inv_std`` (means over N, H, W). With the
    batch's own statistics this is the true gradient; in the TEST phase, where the stored
    statistics normalize, Caffe applies it all the same, and so does this.
    """

    @staticmethod
    def forward(ctx, x, slope, bias, mean, inv_std):
        normalized = (x - mean) * inv_std
        ctx.save_for_backward(normalized, slope, inv_std)
        return normalized * slope + bias

    @staticmethod
    def backward(ctx, grad_top):
        normalized, slope, inv_std = ctx.saved_tensors
        axes = (0, 2, 3)
        scaled = grad_top * slope
        grad_x = (scaled - scaled.mean(dim=axes, keepdim=True)
                  - normalized * (scaled * normalized).mean(dim=axes, keepdim=True)) * inv_std
        grad_slope = (grad_top * normalized).sum(dim=axes, keepdim=True)
        grad_bias = grad_top.sum(dim=axes, keepdim=True)
        return grad_x, grad_slope, grad_bias, None, None


class PSPNetBN(BN):
    r"""PSPNet's batch normalization with a learned slope and bias and running statistics.

    :math:`y = s_c (x - \mu_c) / \sqrt{\sigma^2_c + \epsilon} + b_c` with the running
    statistics when ``frozen`` or in the TEST phase, else with the batch's (biased variance
    over N, H, W), which then update the running ones:
    :math:`\mu \leftarrow m \mu + (1 - m) \mu_{batch}` (the same for the variance).

    Args:
        channels: the size of axis 1.
        eps: added to the variance.
        momentum: how much of the running statistics each batch keeps.
        frozen: always normalize with the running statistics, and learn nothing (Caffe sets
            the slope's and bias's ``lr_mult`` and ``decay_mult`` to 0; they are buffers
            here, without gradient).
        phase: ``"TRAIN"`` or ``"TEST"``.

    Shape:
        - Input: :math:`(N, C, H, W)`, or fewer axes read as Caffe's legacy 4-D view.
        - Output: :math:`(N, C, H, W)`, always 4 axes.

    Attributes:
        weight: the slope, blob 0, ``1 x C x 1 x 1`` (a buffer when frozen).
        bias: blob 1, ``1 x C x 1 x 1`` (a buffer when frozen).
        running_mean: blob 2, ``1 x C x 1 x 1``, a buffer (Caffe pins its ``lr_mult`` to 0).
        running_var: blob 3, likewise; starts at 1 when frozen, else 0.

    Caffe: ``bn_param { slope_filler bias_filler momentum eps frozen }`` (hszhao/PSPNet;
    momentum 0.9 and eps 1e-5 by default). Frozen, the backward is
    :math:`dx = dy\, s / \sqrt{\sigma^2 + \epsilon}`. Otherwise it is the batch-statistics
    rule (see ``_PSPNetNormalize``), also in the TEST phase where it is not the derivative
    of the forward.
    """

    __constants__ = ["channels", "eps", "momentum", "frozen", "phase"]

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.9,
                 frozen: bool = False, phase: str = "TEST"):
        super().__init__(channels)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.frozen = bool(frozen)
        self.phase = phase
        shape = (1, self.channels, 1, 1)
        if self.frozen:
            # Caffe forces a frozen layer's lr_mult and decay_mult to 0: buffers, which the
            # solver leaves alone, as it does the statistics.
            self.register_buffer("weight", torch.zeros(shape))
            self.register_buffer("bias", torch.zeros(shape))
        else:
            self.weight = _affine_blob(self.channels, 0.0)
            self.bias = _affine_blob(self.channels, 0.0)
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_var", torch.full(shape, 1.0 if self.frozen else 0.0))

    @classmethod
    def _from_caffe(cls, param, channels: int, ctx: BuildContext) -> "PSPNetBN":
        p = param.bn_param
        # Fields absent from the schema (it carries both forks') keep PSPNet's defaults.
        eps, momentum, frozen = (getattr(p, name) if has_field(p, name) else default
                                 for name, default in (("eps", 1e-5), ("momentum", 0.9),
                                                       ("frozen", False)))
        layer = cls(channels, eps=eps, momentum=momentum, frozen=frozen, phase=ctx.phase)
        if ctx.fill:
            for blob, name in ((layer.weight, "slope_filler"), (layer.bias, "bias_filler")):
                fillers.fill(blob, getattr(p, name) if has_field(p, name) else None,
                             ctx.generator, param.name)
        return layer

    @property
    def use_global_stats(self) -> bool:
        return self.frozen or self.phase == "TEST"

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return [_legacy_shape(self._check_bottom(bottom_shapes))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(self.output_shapes([tuple(x.shape)])[0])
        mean, variance = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        if self.frozen:
            return (x - mean) * torch.rsqrt(variance + self.eps) * self.weight + self.bias
        if self.phase == "TRAIN":
            axes = (0, 2, 3)
            mean = x.detach().mean(dim=axes, keepdim=True)
            variance = (x.detach() - mean).square().mean(dim=axes, keepdim=True)
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * variance)
        return _PSPNetNormalize.apply(x, self.weight, self.bias, mean,
                                      torch.rsqrt(variance + self.eps))

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [self.weight, self.bias, self.running_mean, self.running_var]

    def extra_repr(self) -> str:
        parts = [str(self.channels)]
        if abs(self.eps - 1e-5) > 1e-11:
            parts.append(f"eps={self.eps:g}")
        if abs(self.momentum - 0.9) > 1e-7:
            parts.append(f"momentum={self.momentum:g}")
        if self.frozen:
            parts.append("frozen=True")
        parts.append(f"phase={self.phase}")
        return ", ".join(parts)
