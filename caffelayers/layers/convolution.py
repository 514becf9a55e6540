"""Caffe's ``Convolution`` and ``Deconvolution`` (1-D to 3-D spatial, groups, dilation).

Both read the same ``convolution_param`` and keep their weights in Caffe's blob layout, which
is also PyTorch's: ``C_out x C_in/group x k...`` for a convolution and
``C_in x C_out/group x k...`` for a deconvolution, so PyTorch's kernels run on the blobs as
they are.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import fillers
from ..errors import ShapeError, UnsupportedParameterError
from ..limits import check_count
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, repeated

IntOrTuple = Union[int, Sequence[int]]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _spatial(value: IntOrTuple, axes: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * axes
    return tuple(int(v) for v in value)


def _spatial_field(p, field: str, prefix: str, axes: int, default: int, layer: str,
                   type_: str) -> List[int]:
    """One of Caffe's spatial fields: the repeated ``field`` (one value, or one per spatial
    axis), or the 2-D pair ``prefix_h``/``prefix_w``, never both.

    A missing half of a pair takes the proto default, as in Caffe (0, which is then rejected
    for a stride); a kernel needs both halves.
    """
    values = list(getattr(p, field))
    has_h, has_w = p.HasField(f"{prefix}_h"), p.HasField(f"{prefix}_w")
    if not (has_h or has_w):
        return repeated(values, axes, default, field, layer)
    problem = ""
    if axes != 2:
        problem = f"{prefix}_h and {prefix}_w can only be used for 2-D convolution"
    elif values:
        problem = f"give {field} or {prefix}_h/{prefix}_w, not both"
    elif prefix == "kernel" and not (has_h and has_w):
        problem = "non-square kernels need both kernel_h and kernel_w"
    if problem:
        raise UnsupportedParameterError(f"layer {layer!r} ({type_}): {problem}")
    return [getattr(p, f"{prefix}_h"), getattr(p, f"{prefix}_w")]


class _ConvolutionBase(CaffeLayer):
    """What Convolution and Deconvolution share (Caffe's ``BaseConvolutionLayer``).

    Subclasses give ``_output_size(size, axis)`` (one spatial axis) and ``_run(bottom)``.
    """

    __constants__ = ["in_channels", "num_output", "kernel_size", "stride", "pad", "dilation",
                     "group", "bias_term"]
    #: Deconvolution swaps the roles of input and output channels in the weight.
    transposed = False

    def __init__(self, in_channels: int, num_output: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, pad: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 group: int = 1, bias_term: bool = True):
        super().__init__()
        axes = 2 if isinstance(kernel_size, int) else len(kernel_size)
        self.in_channels = int(in_channels)
        self.num_output = int(num_output)
        self.kernel_size = _spatial(kernel_size, axes)
        self.stride = _spatial(stride, axes)
        self.pad = _spatial(pad, axes)
        self.dilation = _spatial(dilation, axes)
        self.group = int(group)
        self.bias_term = bool(bias_term)
        for name in ("stride", "pad", "dilation"):
            if len(getattr(self, name)) != axes:
                raise UnsupportedParameterError(
                    f"{type(self).__name__}: {name} {getattr(self, name)} needs one value "
                    f"per spatial axis of kernel_size {self.kernel_size}")
        if self.group < 1 or self.in_channels % self.group or self.num_output % self.group:
            raise UnsupportedParameterError(
                f"{type(self).__name__}: group {self.group} must divide both in_channels "
                f"{self.in_channels} and num_output {self.num_output}")
        if self.transposed:
            weight_shape = (self.in_channels, self.num_output // self.group)
        else:
            weight_shape = (self.num_output, self.in_channels // self.group)
        self.weight = nn.Parameter(torch.zeros(weight_shape + self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(self.num_output)) if self.bias_term else None

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.convolution_param
        type_ = cls.caffe_type
        num_axes = len(bottom_shapes[0])
        if not -num_axes <= p.axis < num_axes or p.axis % num_axes != 1:
            raise UnsupportedParameterError(
                f"layer {param.name!r} ({type_}): axis {p.axis} is not supported; channels "
                "must be axis 1 (N x C x spatial...)")
        axes = num_axes - 2
        if axes not in _CONV:
            raise ShapeError(param.name, type_, bottom_shapes,
                             "expected a bottom with 1 to 3 spatial axes (3-D to 5-D)")
        if not p.kernel_size and not (p.HasField("kernel_h") or p.HasField("kernel_w")):
            raise UnsupportedParameterError(
                f"layer {param.name!r} ({type_}): kernel_size (or kernel_h and kernel_w) is "
                "required")
        kernel = _spatial_field(p, "kernel_size", "kernel", axes, 0, param.name, type_)
        stride = _spatial_field(p, "stride", "stride", axes, 1, param.name, type_)
        pad = _spatial_field(p, "pad", "pad", axes, 0, param.name, type_)
        dilation = repeated(p.dilation, axes, 1, "dilation", param.name)
        for name, values in (("kernel size", kernel), ("stride", stride),
                             ("dilation", dilation)):
            if min(values) < 1:
                raise UnsupportedParameterError(
                    f"layer {param.name!r} ({type_}): every {name} must be at least 1, got "
                    f"{values}")
        if p.num_output < 1 or p.group < 1:
            raise UnsupportedParameterError(
                f"layer {param.name!r} ({type_}): num_output and group must be at least 1, "
                f"got {p.num_output} and {p.group}")
        if p.num_output % p.group:
            raise UnsupportedParameterError(
                f"layer {param.name!r} ({type_}): num_output {p.num_output} is not a "
                f"multiple of group {p.group}")
        channels = bottom_shapes[0][1]
        if channels % p.group:
            raise ShapeError(param.name, type_, bottom_shapes,
                             f"{channels} input channels are not a multiple of group {p.group}")
        # Caffe's INT_MAX on the weight blob, checked before it is made (a kernel_size of
        # 2e9 would otherwise overflow the size arithmetic of the allocation itself).
        weight = ((channels, p.num_output // p.group) if type_ == "Deconvolution" else
                  (p.num_output, channels // p.group)) + tuple(kernel)
        check_count(weight, f"layer {param.name!r} ({type_}): its weight blob")
        layer = cls(channels, p.num_output, tuple(kernel), tuple(stride), tuple(pad),
                    tuple(dilation), p.group, p.bias_term)
        fillers.fill_weight_and_bias(layer, p, ctx, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        axes = len(self.kernel_size)
        first = tuple(bottom_shapes[0]) if bottom_shapes else ()
        if not bottom_shapes or any(tuple(s) != first for s in bottom_shapes):
            raise self.shape_error(bottom_shapes, "one or more bottoms, all of the same shape")
        if len(first) != axes + 2 or first[1] != self.in_channels:
            raise self.shape_error(
                bottom_shapes, f"N x {self.in_channels} x {axes} spatial axes (the kernel is "
                f"{'x'.join(map(str, self.kernel_size))})")
        spatial = tuple(self._output_size(size, i) for i, size in enumerate(first[2:]))
        if min(spatial) < 1:
            raise self.shape_error(
                bottom_shapes, f"kernel {'x'.join(map(str, self.kernel_size))} (dilation "
                f"{self.dilation}) with pad {self.pad} and stride {self.stride} leaves no "
                "output")
        return [(first[0], self.num_output) + spatial] * len(bottom_shapes)

    def _kernel_extent(self, axis: int) -> int:
        return self.dilation[axis] * (self.kernel_size[axis] - 1) + 1

    def forward(self, *bottoms: torch.Tensor):
        self.output_shapes([tuple(bottom.shape) for bottom in bottoms])
        tops = tuple(self._run(bottom) for bottom in bottoms)
        return tops[0] if len(tops) == 1 else tops

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.num_output}",
                 f"kernel_size={self.kernel_size}"]
        axes = len(self.kernel_size)
        for name, default in (("stride", 1), ("pad", 0), ("dilation", 1)):
            value = getattr(self, name)
            if value != (default,) * axes:
                parts.append(f"{name}={value}")
        if self.group != 1:
            parts.append(f"group={self.group}")
        if not self.bias_term:
            parts.append("bias_term=False")
        return ", ".join(parts)


@register_layer("Convolution")
class Convolution(_ConvolutionBase):
    r"""Cross-correlation of the bottom with ``num_output`` filters, in ``group`` groups.

    :math:`y_{n,o} = b_o + \sum_{c \in g(o)} w_{o,c} \star x_{n,c}`, where ``g(o)`` is the
    group of input channels that output ``o`` sees.

    Args:
        in_channels: ``C_in``, channels of the bottom.
        num_output: ``C_out``, number of filters.
        kernel_size: one size per spatial axis (an int means 2-D with square kernels).
        stride, pad, dilation: one value per spatial axis, or one for all.
        group: split input and output channels into this many independent groups.
        bias_term: add a learned bias per output channel.

    Shape:
        - Input: :math:`(N, C_{in}, S_1, \ldots, S_d)`, ``d`` = 1 to 3; any number of
          bottoms of the same shape, each giving one top (the weights are shared).
        - Output: :math:`(N, C_{out}, O_1, \ldots, O_d)` with
          :math:`O_i = \lfloor (S_i + 2 p_i - (d_i (k_i - 1) + 1)) / s_i \rfloor + 1`.

    Attributes:
        weight: ``C_out x C_in/group x k_1 x ... x k_d``, Caffe's blob 0.
        bias: ``C_out``, Caffe's blob 1 (absent without ``bias_term``).

    Caffe: ``convolution_param { num_output kernel_size|kernel_h,kernel_w
    stride|stride_h,stride_w pad|pad_h,pad_w dilation group bias_term weight_filler
    bias_filler axis }``. ``kernel_h``/``kernel_w`` (and the stride and pad pairs) exist only
    for 2-D; ``axis`` must be 1. ``num_output`` and ``C_in`` must both divide by ``group``.
    """

    def _output_size(self, size: int, axis: int) -> int:
        span = size + 2 * self.pad[axis] - self._kernel_extent(axis)
        return span // self.stride[axis] + 1 if span >= 0 else 0

    def _run(self, bottom: torch.Tensor) -> torch.Tensor:
        conv = _CONV[len(self.kernel_size)]
        return conv(bottom, self.weight, self.bias, self.stride, self.pad, self.dilation,
                    self.group)


@register_layer("Deconvolution")
class Deconvolution(_ConvolutionBase):
    r"""Transposed convolution: the gradient of a ``Convolution`` with respect to its input.

    Each input pixel scatters ``w_{c,o} x_{n,c}`` onto a ``k`` window of the output, windows
    placed ``stride`` apart, and the outer ``pad`` of the result is cut off; groups split the
    channels as in :class:`Convolution`.

    Args:
        in_channels: ``C_in``, channels of the bottom.
        num_output: ``C_out``, channels of the top.
        kernel_size, stride, pad, dilation, group, bias_term: as in :class:`Convolution`.

    Shape:
        - Input: :math:`(N, C_{in}, S_1, \ldots, S_d)`, ``d`` = 1 to 3, one top per bottom.
        - Output: :math:`(N, C_{out}, O_1, \ldots, O_d)` with
          :math:`O_i = s_i (S_i - 1) + d_i (k_i - 1) + 1 - 2 p_i`.

    Attributes:
        weight: ``C_in x C_out/group x k_1 x ... x k_d`` (input channels first), blob 0.
        bias: ``C_out``, blob 1 (absent without ``bias_term``).

    Caffe: the same ``convolution_param`` as ``Convolution``. The weight's first axis is the
    *input* channels, which is also PyTorch's ``conv_transpose`` layout; grouped
    deconvolution splits both channel sets into ``group`` blocks.
    """

    transposed = True

    def _output_size(self, size: int, axis: int) -> int:
        return (self.stride[axis] * (size - 1) + self._kernel_extent(axis)
                - 2 * self.pad[axis])

    def _run(self, bottom: torch.Tensor) -> torch.Tensor:
        conv_transpose = _CONV_TRANSPOSE[len(self.kernel_size)]
        return conv_transpose(bottom, self.weight, self.bias, self.stride, self.pad, 0,
                              self.group, self.dilation)
