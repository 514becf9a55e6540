"""Caffe's broadcasting ``Scale`` and ``Bias`` layers.

Both apply an operand whose shape matches a run of bottom[0]'s axes starting at ``axis``
(a learned parameter, or a second bottom), broadcast over every other axis. A scalar operand
(no axes) applies everywhere, whatever ``axis`` says.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .. import fillers
from ..errors import ShapeError, UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape


def _operand_shape(param_axis: int, num_axes: int, bottom_shapes: Sequence[Shape], layer_name: str,
                   layer_type: str) -> Shape:
    """The learned operand's shape: bottom[0]'s axes ``[axis, axis + num_axes)``, -1 to the end."""
    shape = tuple(bottom_shapes[0])
    ndim = len(shape)
    if not -ndim <= param_axis < ndim:
        raise ShapeError(layer_name, layer_type, bottom_shapes,
                         f"axis {param_axis} must lie in [{-ndim}, {ndim})")
    axis = param_axis % ndim
    if num_axes < -1:
        raise ShapeError(layer_name, layer_type, bottom_shapes,
                         f"num_axes {num_axes}: must be -1 (to the last axis) or 0 and more")
    end = ndim if num_axes == -1 else axis + num_axes
    if end > ndim:
        raise ShapeError(layer_name, layer_type, bottom_shapes,
                         f"num_axes {num_axes} from axis {axis} runs past the bottom's {ndim} axes")
    return shape[axis:end]


class _Broadcasting(CaffeLayer):
    """What Scale and Bias share: where an operand sits along bottom[0]'s axes."""

    def _view_shape(self, bottom_shapes: Sequence[Shape], operand: Sequence[int],
                    what: str) -> Shape:
        """``operand`` reshaped so that it broadcasts against bottom[0] (Caffe's Reshape check)."""
        shape = tuple(bottom_shapes[0])
        operand = tuple(operand)
        if not operand:
            # Caffe sets axis to 0 for a scalar operand: it applies everywhere.
            return (1,) * len(shape)
        axis = self.canonical_axis(self.axis, len(shape), bottom_shapes)
        if shape[axis:axis + len(operand)] != operand:
            raise self.shape_error(bottom_shapes, f"the {what} of shape "
                                   f"{'x'.join(map(str, operand))} must match bottom[0]'s axes "
                                   f"{axis}..{axis + len(operand) - 1}")
        return (1,) * axis + operand + (1,) * (len(shape) - axis - len(operand))

    def _check_bottom_count(self, bottom_shapes: Sequence[Shape], from_bottom: bool,
                            what: str) -> None:
        expected = 2 if from_bottom else 1
        if len(bottom_shapes) != expected:
            source = "the second bottom" if from_bottom else "a learned parameter"
            raise self.shape_error(bottom_shapes, f"{expected} bottom(s): the {what} is {source}")


@register_layer("Scale")
class Scale(_Broadcasting):
    r"""Multiplies by a broadcast scale, then optionally adds a broadcast bias.

    .. math::
        y = x \odot s + b

    where ``s`` (and ``b``) cover bottom[0]'s axes ``axis .. axis + s.dim() - 1`` and
    broadcast over the others.

    Args:
        shape: the learned scale's shape, or ``None`` when the scale is the second bottom.
        axis: bottom[0]'s first axis the scale covers (negative counts from the end).
        bias_term: also add a learned bias.
        bias_shape: the bias's shape; defaults to ``shape`` (needed when ``shape`` is None).

    Shape:
        - Input: :math:`x` of any shape, and the scale when it is a bottom, e.g.
          :math:`(C,)` or :math:`(C, H)` against :math:`(N, C, H, W)` with ``axis=1``.
        - Output: the shape of :math:`x`.

    Attributes:
        weight: the learned scale (Caffe's blob 0), absent when the scale is a bottom.
        bias: the learned bias (the last blob), or None.

    Caffe: ``scale_param { axis num_axes filler bias_term bias_filler }``. ``num_axes``
    (default 1, -1 for every remaining axis) fixes the learned scale's shape; with two
    bottoms the second bottom's shape rules and the bias takes its shape. The scale's
    filler defaults to constant 1, the bias's to constant 0. A scalar (0-axis) scale ignores
    ``axis``.
    """

    __constants__ = ["axis", "bias_term"]

    def __init__(self, shape: Optional[Sequence[int]] = None, axis: int = 1,
                 bias_term: bool = False, bias_shape: Optional[Sequence[int]] = None):
        super().__init__()
        self.axis = int(axis)
        self.bias_term = bool(bias_term)
        self.scale_from_bottom = shape is None
        if shape is not None:
            self.weight = nn.Parameter(torch.ones(tuple(shape)))
        else:
            self.register_parameter("weight", None)
        if bias_term:
            bias_shape = shape if bias_shape is None else bias_shape
            if bias_shape is None:
                raise UnsupportedParameterError(
                    "Scale with the scale as a bottom and a bias needs bias_shape")
            self.bias = nn.Parameter(torch.zeros(tuple(bias_shape)))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "Scale":
        p = param.scale_param
        if len(bottom_shapes) > 1:
            shape, bias_shape = None, tuple(bottom_shapes[1])
        else:
            shape = _operand_shape(p.axis, p.num_axes, bottom_shapes, param.name, "Scale")
            bias_shape = shape
        layer = cls(shape, axis=p.axis, bias_term=p.bias_term, bias_shape=bias_shape)
        if ctx.fill:
            if layer.weight is not None and p.HasField("filler"):
                fillers.fill(layer.weight, p.filler, ctx.generator, param.name)
            if layer.bias is not None:
                bias_filler = p.bias_filler if p.HasField("bias_filler") else None
                fillers.fill(layer.bias, bias_filler, ctx.generator, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_bottom_count(bottom_shapes, self.scale_from_bottom, "scale")
        scale_shape = bottom_shapes[1] if self.scale_from_bottom else self.weight.shape
        self._view_shape(bottom_shapes, scale_shape, "scale")
        if self.bias is not None:
            self._view_shape(bottom_shapes, self.bias.shape, "bias")
        return [tuple(bottom_shapes[0])]

    def forward(self, x: torch.Tensor, *scale_bottom: torch.Tensor) -> torch.Tensor:
        bottom_shapes = [tuple(x.shape)] + [tuple(s.shape) for s in scale_bottom]
        self._check_bottom_count(bottom_shapes, self.scale_from_bottom, "scale")
        scale = scale_bottom[0] if self.scale_from_bottom else self.weight
        y = x * scale.reshape(self._view_shape(bottom_shapes, scale.shape, "scale"))
        if self.bias is not None:
            y = y + self.bias.reshape(self._view_shape(bottom_shapes, self.bias.shape, "bias"))
        return y

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]

    def extra_repr(self) -> str:
        parts = ["scale from bottom 1" if self.scale_from_bottom
                 else f"shape={tuple(self.weight.shape)}"]
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        if self.bias_term:
            parts.append("bias_term=True")
        return ", ".join(parts)


@register_layer("Bias")
class Bias(_Broadcasting):
    r"""Adds a broadcast bias.

    .. math::
        y = x + b

    where ``b`` covers bottom[0]'s axes ``axis .. axis + b.dim() - 1`` and broadcasts over
    the others.

    Args:
        shape: the learned bias's shape, or ``None`` when the bias is the second bottom.
        axis: bottom[0]'s first axis the bias covers (negative counts from the end).

    Shape:
        - Input: :math:`x` of any shape, and the bias when it is a bottom.
        - Output: the shape of :math:`x`.

    Attributes:
        bias: the learned bias (Caffe's blob 0), absent when the bias is a bottom.

    Caffe: ``bias_param { axis num_axes filler }``; ``num_axes`` (default 1, -1 for every
    remaining axis) fixes the learned bias's shape, the filler defaults to constant 0. A
    scalar (0-axis) bias ignores ``axis``.
    """

    __constants__ = ["axis"]

    def __init__(self, shape: Optional[Sequence[int]] = None, axis: int = 1):
        super().__init__()
        self.axis = int(axis)
        self.bias_from_bottom = shape is None
        if shape is not None:
            self.bias = nn.Parameter(torch.zeros(tuple(shape)))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "Bias":
        p = param.bias_param
        shape = None
        if len(bottom_shapes) == 1:
            shape = _operand_shape(p.axis, p.num_axes, bottom_shapes, param.name, "Bias")
        layer = cls(shape, axis=p.axis)
        if ctx.fill and layer.bias is not None and p.HasField("filler"):
            fillers.fill(layer.bias, p.filler, ctx.generator, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_bottom_count(bottom_shapes, self.bias_from_bottom, "bias")
        bias_shape = bottom_shapes[1] if self.bias_from_bottom else self.bias.shape
        self._view_shape(bottom_shapes, bias_shape, "bias")
        return [tuple(bottom_shapes[0])]

    def forward(self, x: torch.Tensor, *bias_bottom: torch.Tensor) -> torch.Tensor:
        bottom_shapes = [tuple(x.shape)] + [tuple(b.shape) for b in bias_bottom]
        self._check_bottom_count(bottom_shapes, self.bias_from_bottom, "bias")
        bias = bias_bottom[0] if self.bias_from_bottom else self.bias
        return x + bias.reshape(self._view_shape(bottom_shapes, bias.shape, "bias"))

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [] if self.bias is None else [self.bias]

    def extra_repr(self) -> str:
        parts = ["bias from bottom 1" if self.bias_from_bottom
                 else f"shape={tuple(self.bias.shape)}"]
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        return ", ".join(parts)
