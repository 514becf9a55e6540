"""The mobile-net forks' layers: ShuffleNet's ``ShuffleChannel``, the MobileNet forks'
depthwise convolutions (``DepthwiseConvolution``, ``ConvolutionDepthwise``) and ``ReLU6``,
and SENet's ``Axpy``.

The two depthwise types come from different forks and read ``convolution_param``
differently: yonghenglh6's ``DepthwiseConvolution`` is Caffe's convolution whose GPU kernel
assumes one filter per channel (so ``num_output`` and ``group`` must equal the channels),
farmingyard's ``ConvolutionDepthwise`` ignores ``num_output`` and ``group`` and always keeps
the channel count. Both are :class:`~caffelayers.layers.convolution.Convolution` with
``group = C_in = C_out``, weights ``C x 1 x k_h x k_w``.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..errors import ShapeError, UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, count
from .convolution import Convolution
from .neuron import NeuronLayer


@register_layer("ShuffleChannel")
class ShuffleChannel(CaffeLayer):
    r"""ShuffleNet's channel shuffle: ``group`` rows of channels read out column by column.

    With :math:`K = C / g`, output channel :math:`j g + i` is input channel :math:`i K + j`
    (:math:`i < g`, :math:`j < K`): the channels viewed as a ``g x K`` matrix, transposed.

    Args:
        group: ``g``, at least 1; must divide the channels.

    Shape:
        - Input: :math:`(N, C, *)`, two axes or more.
        - Output: the input's shape.

    Caffe: ``shuffle_channel_param { group }`` (farmingyard/ShuffleNet, default 1, the
    identity). The backward is the inverse permutation.
    """

    __constants__ = ["group"]

    def __init__(self, group: int = 1):
        super().__init__()
        self.group = int(group)
        if self.group < 1:
            raise UnsupportedParameterError(f"ShuffleChannel: group must be at least 1, got "
                                            f"{self.group}")

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        try:
            return cls(param.shuffle_channel_param.group)
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(f"layer {param.name!r}: {error}") from None

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1 or len(bottom_shapes[0]) < 2:
            raise self.shape_error(bottom_shapes, "one bottom of 2 or more axes (N x C x ...)")
        shape = tuple(bottom_shapes[0])
        if shape[1] % self.group:
            raise self.shape_error(bottom_shapes, f"channels divisible by group {self.group}")
        return [shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.output_shapes([tuple(x.shape)])[0]
        rows = x.reshape(shape[0], self.group, shape[1] // self.group, count(shape, 2))
        return rows.transpose(1, 2).reshape(shape)

    def extra_repr(self) -> str:
        return f"group={self.group}"


class _Depthwise(Convolution):
    """A Convolution with one filter per channel: ``group = C_in = C_out``."""

    def __init__(self, channels: int, kernel_size, stride=1, pad=0, dilation=1,
                 bias_term: bool = True):
        super().__init__(channels, channels, kernel_size, stride, pad, dilation, channels,
                         bias_term)

    @classmethod
    def _build(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        """Convolution's reading (and fillers) of ``param`` with ``num_output`` and ``group``
        set to the channels, as this class."""
        if len(bottom_shapes[0]) < 3:
            raise ShapeError(param.name, cls.caffe_type, bottom_shapes,
                             "N x C and at least one spatial axis")
        channels = bottom_shapes[0][1]
        copy = type(param)()
        copy.CopyFrom(param)
        copy.convolution_param.num_output = channels
        copy.convolution_param.group = channels
        # A Convolution that names this type in its errors.
        reader = type(cls.__name__, (Convolution,), {"caffe_type": cls.caffe_type})
        conv = reader.from_caffe(copy, bottom_shapes, ctx)
        layer = cls(channels, conv.kernel_size, conv.stride, conv.pad, conv.dilation,
                    conv.bias_term)
        layer.weight, layer.bias = conv.weight, conv.bias
        return layer

    def extra_repr(self) -> str:
        # The channels say it all: group and num_output equal them.
        return super().extra_repr().replace(f", group={self.group}", "")


@register_layer("DepthwiseConvolution")
class DepthwiseConvolution(_Depthwise):
    r"""Convolution with one filter per channel (yonghenglh6's MobileNet layer).

    :math:`y_{n,c} = b_c + w_c \star x_{n,c}`: :class:`Convolution` with
    ``group = num_output = C``.

    Args:
        channels: ``C``, the channels of the bottom and the top.
        kernel_size, stride, pad, dilation, bias_term: as in :class:`Convolution`.

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H_o, W_o)`, Convolution's size rule.

    Attributes:
        weight: ``C x 1 x k_h x k_w``, blob 0; bias: ``C``, blob 1.

    Caffe: ``convolution_param`` as for Convolution (yonghenglh6/DepthwiseConvolution). Its
    CPU path is Caffe's grouped convolution, its GPU kernel assumes one filter per channel;
    the two agree only when ``num_output`` and ``group`` equal the channels, so any other
    value is refused. A missing ``group`` means one filter per channel, the GPU's reading.
    """

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.convolution_param
        channels = bottom_shapes[0][1] if len(bottom_shapes[0]) > 1 else 0
        given_group = p.group if p.HasField("group") else channels
        if p.num_output != channels or given_group != channels:
            raise UnsupportedParameterError(
                f"layer {param.name!r} (DepthwiseConvolution): num_output {p.num_output} and "
                f"group {given_group} must both equal the bottom's {channels} channels (the "
                "fork's GPU kernel runs one filter per channel, its CPU path a grouped "
                "convolution; they differ otherwise)")
        return cls._build(param, bottom_shapes, ctx)


@register_layer("ConvolutionDepthwise")
class ConvolutionDepthwise(_Depthwise):
    r"""Convolution with one filter per channel (farmingyard's MobileNet/ShuffleNet layer).

    :math:`y_{n,c} = b_c + w_c \star x_{n,c}`, the top keeping the bottom's channels.

    Args:
        channels: ``C``, the channels of the bottom and the top.
        kernel_size, stride, pad, dilation, bias_term: as in :class:`Convolution` (2-D).

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H_o, W_o)`, Convolution's size rule.

    Attributes:
        weight: ``C x 1 x k_h x k_w``, blob 0; bias: ``C``, blob 1.

    Caffe: ``convolution_param`` (farmingyard/caffe-mobilenet, used by the ShuffleNet v2
    deploy net). ``num_output`` and ``group`` are not read: the filters and the top's
    channels are the bottom's channels whatever they say.
    """

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        if len(bottom_shapes[0]) != 4:
            raise ShapeError(param.name, "ConvolutionDepthwise", bottom_shapes,
                             "a bottom N x C x H x W (the layer is 2-D only)")
        return cls._build(param, bottom_shapes, ctx)


@register_layer("ReLU6")
class ReLU6(NeuronLayer):
    r"""Rectifier capped at 6: :math:`y = \min(\max(x, 0), 6) + a \min(x, 0)`.

    Args:
        negative_slope: ``a``, the slope for ``x <= 0`` (0: PyTorch's ``ReLU6``).

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: NVCaffe reads the slope from ``relu_param { negative_slope }``, MobileNet-YOLO's
    fork from ``relu6_param { negative_slope }``; both are read. The gradient is
    :math:`dy\,([x > 0] + a [x \le 0])\,[x < 6]`: at ``x = 0`` it is ``a``, at ``x = 6``
    it is 0.
    """

    __constants__ = ["negative_slope"]

    def __init__(self, negative_slope: float = 0.0):
        super().__init__()
        self.negative_slope = float(negative_slope)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "ReLU6":
        fields = param.DESCRIPTOR.fields_by_name
        if "relu6_param" in fields and param.HasField("relu6_param"):
            return cls(param.relu6_param.negative_slope)
        return cls(param.relu_param.negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # hardtanh's gradient is 0 at both ends, Caffe's [x > 0][x < 6]; clamp_max passes
        # the slope at x = 0, Caffe's a [x <= 0].
        top = F.hardtanh(x, 0.0, 6.0)
        if self.negative_slope:
            top = top + self.negative_slope * x.clamp_max(0.0)
        return top

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}" if self.negative_slope else ""


@register_layer("Axpy")
class Axpy(CaffeLayer):
    r"""SENet's fused channel scale and sum: :math:`y_{n,c} = a_{n,c}\,x_{n,c} + z_{n,c}`.

    Bottoms in Caffe's order: the per-channel scale ``a`` (the excitation), the features
    ``x``, and the shortcut ``z``.

    Shape:
        - Input: ``a`` :math:`(N, C)` or :math:`(N, C, 1, 1)`; ``x`` and ``z``
          :math:`(N, C, *)` of one shape.
        - Output: ``x``'s shape.

    Caffe: no parameters (hujie-frank/SENet). The gradients are ``dy * x`` summed over the
    spatial positions for ``a``, ``a * dy`` for ``x`` and ``dy`` for ``z``.
    """

    num_bottoms = (3, 3)
    num_tops = (1, 1)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Axpy":
        return cls()

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        expected = ("three bottoms: a scale N x C (x 1 x 1), then x and z of one shape "
                    "N x C x ...")
        if len(bottom_shapes) != 3:
            raise self.shape_error(bottom_shapes, expected)
        scale, x, z = (tuple(s) for s in bottom_shapes)
        fits = (len(x) >= 2 and x == z and len(scale) >= 2 and scale[:2] == x[:2]
                and count(scale, 2) == 1 and (len(scale) != 4 or scale[2:] == (1, 1)))
        if not fits:
            raise self.shape_error(bottom_shapes, expected)
        return [x]

    def forward(self, scale: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(scale.shape), tuple(x.shape), tuple(z.shape)])
        return scale.reshape(x.shape[:2] + (1,) * (x.dim() - 2)) * x + z
