"""Caffe's neuron layers: one bottom, one top of the same shape, applied elementwise.

ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Power, Exp, Log, Threshold and Dropout, and
BVLC's later Clip and Swish.
Autograd's gradient is Caffe's for most of them, including the value chosen at the kinks
(``x = 0``). Two use a ``torch.autograd.Function``: Power, whose Caffe backward divides by
the base (NaN where it is 0), and BNLL, whose overflow-safe forward would give autograd a
wrong value at 0, so Caffe's gradient (a sigmoid with a capped exponent) is written out.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import fillers
from ..errors import ShapeError, UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape


@contextmanager
def naming_layer(param) -> Iterator[None]:
    """Restate an ``UnsupportedParameterError`` raised while building with the layer's name.

    ``__init__`` validates plain values and names only the type ("Exp: base ..."); building
    from a prototxt knows the layer's name, which the user needs to find it.
    """
    try:
        yield
    except UnsupportedParameterError as error:
        raise UnsupportedParameterError(f"layer {param.name!r}: {error}") from None


class NeuronLayer(CaffeLayer):
    """A layer whose top has its bottom's shape (Caffe's ``NeuronLayer``)."""

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1:
            raise self.shape_error(bottom_shapes, "exactly one bottom")
        return [tuple(bottom_shapes[0])]


def _check_base(base: float, layer_type: str) -> float:
    """The natural log of an Exp/Log ``base``; ``-1`` stands for e, as in Caffe."""
    if base == -1:
        return 1.0
    if not base > 0 or math.isinf(base):
        raise UnsupportedParameterError(
            f"{layer_type}: base {base} is not allowed; give a finite base > 0, or -1 for e")
    return math.log(base)


@register_layer("ReLU")
class ReLU(NeuronLayer):
    """Rectifier with an optional slope for negative inputs.

    ``y = max(x, 0) + negative_slope * min(x, 0)``

    Args:
        negative_slope: the slope for ``x <= 0`` (0 gives the plain ReLU).

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``relu_param { negative_slope }``; ``engine`` is ignored. The gradient at
    ``x = 0`` is ``negative_slope`` (Caffe tests ``x > 0``).
    """

    __constants__ = ["negative_slope"]

    def __init__(self, negative_slope: float = 0.0):
        super().__init__()
        self.negative_slope = float(negative_slope)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "ReLU":
        return cls(param.relu_param.negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.negative_slope == 0.0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}" if self.negative_slope else ""


@register_layer("PReLU")
class PReLU(NeuronLayer):
    """ReLU with learned negative slopes, one per channel (axis 1) or one for all.

    ``y = max(x, 0) + a_c * min(x, 0)``, ``c`` the index on axis 1.

    Args:
        channels: the size of the bottom's axis 1.
        channel_shared: learn one slope for every channel.

    Shape:
        - Input: ``(N, C, *)``, at least 2 axes.
        - Output: the input's shape.

    Attributes:
        weight: the slopes, Caffe's blob 0: shape ``(C,)``, or ``()`` when channel-shared
            (Caffe stores a 0-axis blob). Initialized to 0.25.

    Caffe: ``prelu_param { filler channel_shared }``; without a filler the slopes start at
    the constant 0.25. The gradient at ``x = 0`` uses the slope (Caffe tests ``x > 0``), and
    the slope's gradient is ``sum(top_diff * x)`` over ``x <= 0``.
    """

    __constants__ = ["channels", "channel_shared"]

    def __init__(self, channels: int, channel_shared: bool = False):
        super().__init__()
        self.channels = int(channels)
        self.channel_shared = bool(channel_shared)
        shape = () if self.channel_shared else (self.channels,)
        self.weight = nn.Parameter(torch.full(shape, 0.25))

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "PReLU":
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise ShapeError(param.name, "PReLU", bottom_shapes,
                             "a bottom of at least 2 axes (N, C, ...)")
        p = param.prelu_param
        layer = cls(shape[1], p.channel_shared)
        if ctx.fill and p.HasField("filler"):
            fillers.fill(layer.weight, p.filler, ctx.generator, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        shape = super().output_shapes(bottom_shapes)[0]
        if len(shape) < 2:
            raise self.shape_error(bottom_shapes, "a bottom of at least 2 axes (N, C, ...)")
        if not self.channel_shared and shape[1] != self.channels:
            raise self.shape_error(bottom_shapes, f"{self.channels} channels on axis 1, "
                                   "one per learned slope")
        return [shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.weight.reshape((-1,) + (1,) * (x.dim() - 2))
        return torch.where(x > 0, x, slope * x)

    def caffe_blobs(self) -> List[torch.Tensor]:
        return [self.weight]

    def extra_repr(self) -> str:
        return "channel_shared=True" if self.channel_shared else f"channels={self.channels}"


@register_layer("ELU")
class ELU(NeuronLayer):
    """Exponential linear unit.

    ``y = max(x, 0) + alpha * (exp(min(x, 0)) - 1)``

    Args:
        alpha: the value ``y`` approaches as ``x -> -inf`` is ``-alpha``.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``elu_param { alpha }``. The gradient for ``x <= 0`` (``x = 0`` included) is
    ``alpha * exp(x)``, which is autograd's too.
    """

    __constants__ = ["alpha"]

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = float(alpha)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "ELU":
        return cls(param.elu_param.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x, self.alpha)

    def extra_repr(self) -> str:
        return "" if self.alpha == 1.0 else f"alpha={self.alpha}"


@register_layer("Sigmoid")
class Sigmoid(NeuronLayer):
    """Logistic function ``y = 1 / (1 + exp(-x))``; gradient ``y * (1 - y)`` as Caffe's.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: no parameters (``sigmoid_param`` only picks an engine).
    """

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Sigmoid":
        return cls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


@register_layer("TanH")
class TanH(NeuronLayer):
    """Hyperbolic tangent ``y = tanh(x)``; gradient ``1 - y^2`` as Caffe's.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: no parameters (``tanh_param`` only picks an engine).
    """

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "TanH":
        return cls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


@register_layer("AbsVal")
class AbsVal(NeuronLayer):
    """Absolute value ``y = |x|``; gradient ``sign(x)``, 0 at ``x = 0`` as Caffe's.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: no parameters; Caffe refuses to run it in place (``top == bottom``).
    """

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "AbsVal":
        return cls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


#: Caffe's BNLL backward caps the exponent here so that ``exp`` cannot overflow.
BNLL_EXPONENT_CAP = 50.0


class _BNLLFunction(torch.autograd.Function):
    """Softplus in Caffe's two-branch form, with Caffe's capped-exponent gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        # x + log(1 + exp(-x)) for x > 0, log(1 + exp(x)) otherwise: both branches in one.
        return torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))

    @staticmethod
    def backward(ctx, grad_top):
        (x,) = ctx.saved_tensors
        expval = torch.exp(torch.clamp(x, max=BNLL_EXPONENT_CAP))
        return grad_top * expval / (expval + 1)


@register_layer("BNLL")
class BNLL(NeuronLayer):
    """Binomial normal log likelihood, i.e. softplus ``y = log(1 + exp(x))``.

    Computed as ``x + log(1 + exp(-x))`` for ``x > 0`` and ``log(1 + exp(x))`` otherwise,
    so that no ``exp`` overflows.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: no parameters. The backward is ``top_diff * e / (e + 1)`` with
    ``e = exp(min(x, 50))`` (the sigmoid, saturated above 50).
    """

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "BNLL":
        return cls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BNLLFunction.apply(x)


class _PowerFunction(torch.autograd.Function):
    """``(shift + scale * x) ** power`` with Caffe's backward, which divides ``y`` by the base.

    Caffe's gradient is ``power * scale * y / (shift + scale * x)`` except for ``power`` 1
    and 2 (written without division) and for a constant output (zero). Where the base is 0
    and ``power`` is not 1 or 2 this is ``0 / 0``: NaN, as in Caffe.
    """

    @staticmethod
    def forward(ctx, x, power, scale, shift):
        diff_scale = power * scale
        ctx.constants = (power, scale, shift, diff_scale)
        if diff_scale == 0:
            # The input is ignored: Caffe writes the constant, 1 when power is 0.
            if power == 0:
                return torch.ones_like(x)
            return torch.full_like(x, shift).pow_(power)
        base = x * scale + shift
        top = base if power == 1 else torch.pow(base, power)
        ctx.save_for_backward(base, top)
        return top

    @staticmethod
    def backward(ctx, grad_top):
        power, scale, shift, diff_scale = ctx.constants
        if diff_scale == 0:
            return torch.zeros_like(grad_top), None, None, None
        base, top = ctx.saved_tensors
        if power == 1:
            local = torch.full_like(grad_top, diff_scale)
        elif power == 2:
            local = base * diff_scale
        else:
            local = top / base * diff_scale
        return grad_top * local, None, None, None


@register_layer("Power")
class Power(NeuronLayer):
    """Power of an affine function of the input.

    ``y = (shift + scale * x) ^ power``

    Args:
        power: the exponent.
        scale: multiplies the input.
        shift: added after scaling.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``power_param { power scale shift }``. When ``power * scale == 0`` the output is
    the constant ``shift ^ power`` (1 when ``power == 0``) with zero gradient. Otherwise the
    gradient is computed as ``power * scale * y / (shift + scale * x)`` (except for power 1
    and 2), so a zero base gives NaN where the true derivative is finite; this is kept.
    """

    __constants__ = ["power", "scale", "shift"]

    def __init__(self, power: float = 1.0, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.power = float(power)
        self.scale = float(scale)
        self.shift = float(shift)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Power":
        p = param.power_param
        return cls(p.power, p.scale, p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PowerFunction.apply(x, self.power, self.scale, self.shift)

    def extra_repr(self) -> str:
        parts = [f"power={self.power}" if self.power != 1 else "",
                 f"scale={self.scale}" if self.scale != 1 else "",
                 f"shift={self.shift}" if self.shift != 0 else ""]
        return ", ".join(p for p in parts if p)


@register_layer("Exp")
class Exp(NeuronLayer):
    """Exponential of an affine function of the input.

    ``y = base ^ (shift + scale * x)``, computed as ``base^shift * exp(ln(base) * scale * x)``.

    Args:
        base: a positive base, or -1 for e.
        scale: multiplies the input.
        shift: added after scaling.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``exp_param { base scale shift }``; the default ``base: -1`` means e. Its
    gradient ``y * ln(base) * scale`` is the true one.
    """

    __constants__ = ["base", "scale", "shift"]

    def __init__(self, base: float = -1.0, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.base = float(base)
        self.scale = float(scale)
        self.shift = float(shift)
        self.inner_scale = _check_base(self.base, "Exp") * self.scale
        try:
            self.outer_scale = math.exp(self.shift) if self.base == -1 else \
                math.pow(self.base, self.shift)
        except OverflowError:  # Caffe's float pow/exp saturates there: every output is inf
            self.outer_scale = math.inf

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Exp":
        p = param.exp_param
        with naming_layer(param):
            return cls(p.base, p.scale, p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.exp(x * self.inner_scale)
        return top if self.outer_scale == 1.0 else top * self.outer_scale

    def extra_repr(self) -> str:
        parts = [f"base={self.base}" if self.base != -1 else "",
                 f"scale={self.scale}" if self.scale != 1 else "",
                 f"shift={self.shift}" if self.shift != 0 else ""]
        return ", ".join(p for p in parts if p)


@register_layer("Log")
class Log(NeuronLayer):
    """Logarithm of an affine function of the input.

    ``y = log_base(shift + scale * x)``

    Args:
        base: a positive base, or -1 for e.
        scale: multiplies the input.
        shift: added after scaling.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``log_param { base scale shift }``; the default ``base: -1`` means e. Its
    gradient ``scale / (ln(base) * (shift + scale * x))`` is the true one.
    """

    __constants__ = ["base", "scale", "shift"]

    def __init__(self, base: float = -1.0, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.base = float(base)
        self.scale = float(scale)
        self.shift = float(shift)
        log_base = _check_base(self.base, "Log")
        if log_base == 0:
            raise UnsupportedParameterError("Log: base 1 has no logarithm; give a base > 0 "
                                            "other than 1, or -1 for e")
        self.base_scale = 1.0 / log_base

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Log":
        p = param.log_param
        with naming_layer(param):
            return cls(p.base, p.scale, p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.log(x * self.scale + self.shift)
        return top if self.base_scale == 1.0 else top * self.base_scale

    def extra_repr(self) -> str:
        parts = [f"base={self.base}" if self.base != -1 else "",
                 f"scale={self.scale}" if self.scale != 1 else "",
                 f"shift={self.shift}" if self.shift != 0 else ""]
        return ", ".join(p for p in parts if p)


@register_layer("Threshold")
class Threshold(NeuronLayer):
    """Step function ``y = 1 if x > threshold else 0``.

    Args:
        threshold: the step's position (strictly greater values give 1).

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``threshold_param { threshold }``. Caffe has no backward for it (a net that
    needs a gradient through it aborts with "Not Implemented"); here the top is not
    differentiable, so no gradient flows back through it, which is also the step's
    derivative everywhere but at the step.
    """

    __constants__ = ["threshold"]

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        self.threshold = float(threshold)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Threshold":
        return cls(param.threshold_param.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.detach() > self.threshold).to(x.dtype)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}" if self.threshold else ""


@register_layer("Dropout")
class Dropout(NeuronLayer):
    """Zeroes each element with probability ``dropout_ratio`` while training.

    With ``scale_train`` (Caffe's only behaviour): training
    ``y = x * mask / (1 - dropout_ratio)``, ``mask ~ Bernoulli(1 - dropout_ratio)``;
    evaluation ``y = x``. Without it (Faster R-CNN's fork): training ``y = x * mask``,
    evaluation ``y = x * (1 - dropout_ratio)``.

    Args:
        dropout_ratio: the probability of dropping an element, in ``[0, 1)``.
        generator: the random source of the masks (the global one when None).
        scale_train: scale kept units at training time (True) or all units at test time.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``dropout_param { dropout_ratio scale_train }``; ``scale_train`` is
    caffe-fast-rcnn's field (py-faster-rcnn's ZF and VGG16 test nets set it false). Caffe
    drops only in the TRAIN phase, which :meth:`from_caffe` turns into the module's training
    mode (``module.train()`` and ``module.eval()`` switch it later). The masks cannot match
    Caffe's own random numbers.
    """

    __constants__ = ["dropout_ratio", "scale_train"]

    def __init__(self, dropout_ratio: float = 0.5, generator: Optional[torch.Generator] = None,
                 scale_train: bool = True):
        super().__init__()
        if not 0.0 <= dropout_ratio < 1.0:
            raise UnsupportedParameterError(
                f"Dropout: dropout_ratio {dropout_ratio} is not allowed; it must lie in [0, 1)")
        self.dropout_ratio = float(dropout_ratio)
        self.generator = generator
        self.scale_train = bool(scale_train)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Dropout":
        p = param.dropout_param
        with naming_layer(param):
            layer = cls(p.dropout_ratio, ctx.generator, p.scale_train)
        layer.train(ctx.phase == "TRAIN")
        return layer

    @property
    def test_scale(self) -> float:
        """The factor of the evaluation phase: 1, or ``1 - ratio`` without ``scale_train``."""
        return 1.0 if self.scale_train else 1.0 - self.dropout_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            # A new tensor object, so that the top's gradient can be read apart from the bottom's.
            return x.view_as(x) if self.scale_train else x * self.test_scale
        if self.generator is None:
            uniform = torch.rand(x.shape, dtype=x.dtype, device=x.device)
        else:
            uniform = torch.rand(x.shape, dtype=x.dtype, device=self.generator.device,
                                 generator=self.generator).to(x.device)
        keep = (uniform < 1.0 - self.dropout_ratio).to(x.dtype)
        return x * (keep / (1.0 - self.dropout_ratio)) if self.scale_train else x * keep

    def extra_repr(self) -> str:
        return f"dropout_ratio={self.dropout_ratio}" + \
            ("" if self.scale_train else ", scale_train=False")


@register_layer("Clip")
class Clip(NeuronLayer):
    r"""Clamps to an interval: :math:`y = \max(\mathrm{min}, \min(x, \mathrm{max}))`.

    Args:
        min: the lower bound.
        max: the upper bound.

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``clip_param { min max }``, both required (BVLC Caffe after 1.0). The gradient
    passes where :math:`\mathrm{min} \le x \le \mathrm{max}`, both ends included, as
    Caffe's. Caffe does not check ``min <= max``; with ``min > max`` every output is
    ``min`` (the order of Caffe's max and min, kept here) with zero gradient. A NaN input
    stays NaN here (Caffe's CPU loop turns it into ``min``).
    """

    __constants__ = ["min", "max"]

    def __init__(self, min: float, max: float):  # Caffe's field names
        super().__init__()
        self.min = float(min)
        self.max = float(max)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Clip":
        p = param.clip_param
        missing = [name for name in ("min", "max") if not p.HasField(name)]
        if missing:
            raise UnsupportedParameterError(
                f"layer {param.name!r} (Clip): clip_param needs {' and '.join(missing)} (both "
                "are required)")
        return cls(p.min, p.max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(max=self.max).clamp(min=self.min)

    def extra_repr(self) -> str:
        return f"min={self.min}, max={self.max}"


@register_layer("Swish")
class Swish(NeuronLayer):
    r"""Swish: :math:`y = x\,\sigma(\beta x)`.

    Args:
        beta: scales the sigmoid's input (1 gives SiLU).

    Shape:
        - Input: any shape.
        - Output: the input's shape.

    Caffe: ``swish_param { beta }`` (BVLC Caffe after 1.0, default 1). Caffe's backward,
    :math:`dy\,(\beta y + \sigma(\beta x)(1 - \beta y))`, is the true derivative.
    """

    __constants__ = ["beta"]

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = float(beta)

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "Swish":
        return cls(param.swish_param.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x * self.beta if self.beta != 1.0 else x)

    def extra_repr(self) -> str:
        return "" if self.beta == 1.0 else f"beta={self.beta}"
