"""Source emitters for Caffe's elementwise (neuron) layers.

Layers PyTorch has a module for become that module; the others are one expression that
spells out Caffe's formula (Power, Exp, Log, Threshold, AbsVal).
"""

from __future__ import annotations

import math

import numpy as np

from .registry import register_source_emitter
from .source import LayerSource, call, number


def _module(layer: LayerSource, constructor: str, state=None) -> None:
    handle = layer.submodule(constructor, state)
    layer.assign(f"{handle}({layer.bottoms[0]})")


@register_source_emitter("ReLU")
def relu(layer: LayerSource) -> None:
    """``nn.ReLU``, or ``nn.LeakyReLU`` with Caffe's ``negative_slope``."""
    slope = layer.module.negative_slope
    _module(layer, call("nn.LeakyReLU", slope) if slope else "nn.ReLU()")


@register_source_emitter("PReLU")
def prelu(layer: LayerSource) -> None:
    """``nn.PReLU``: one slope per channel on axis 1, as Caffe; ``channel_shared`` is one
    slope (Caffe's 0-axis blob becomes PyTorch's shape ``(1,)``)."""
    m = layer.module
    constructor = "nn.PReLU()" if m.channel_shared else call("nn.PReLU", m.channels)
    _module(layer, constructor, {"weight": m.weight.reshape(-1)})


@register_source_emitter("ELU")
def elu(layer: LayerSource) -> None:
    alpha = layer.module.alpha
    _module(layer, "nn.ELU()" if alpha == 1.0 else call("nn.ELU", alpha))


@register_source_emitter("Sigmoid")
def sigmoid(layer: LayerSource) -> None:
    _module(layer, "nn.Sigmoid()")


@register_source_emitter("TanH")
def tanh(layer: LayerSource) -> None:
    _module(layer, "nn.Tanh()")


@register_source_emitter("BNLL")
def bnll(layer: LayerSource) -> None:
    """``nn.Softplus``: ``log(1 + exp(x))``; above 20 it returns ``x``, which differs from
    Caffe's value by less than ``exp(-20)``."""
    _module(layer, "nn.Softplus()")


@register_source_emitter("Dropout")
def dropout(layer: LayerSource) -> None:
    """``nn.Dropout``: the identity in ``eval()`` (Caffe's TEST phase); in ``train()`` it
    scales kept units by ``1 / (1 - p)`` as Caffe does. Without ``scale_train`` (Faster
    R-CNN's fork), the TEST phase's scale by ``1 - p`` written out."""
    if layer.module.scale_train:
        _module(layer, call("nn.Dropout", layer.module.dropout_ratio))
    else:
        layer.assign(f"{layer.bottoms[0]} * {number(layer.module.test_scale)}",
                     comment=f"{layer.name}: Dropout without scale_train, TEST phase")


@register_source_emitter("AbsVal")
def absval(layer: LayerSource) -> None:
    layer.assign(f"torch.abs({layer.bottoms[0]})")


def _affine(x: str, scale: float, shift: float) -> str:
    """``x * scale + shift`` without the terms that do nothing."""
    text = x if scale == 1 else f"{x} * {number(scale)}"
    if shift == 0:
        return text
    return f"{text} - {number(-shift)}" if shift < 0 else f"{text} + {number(shift)}"


@register_source_emitter("Power")
def power(layer: LayerSource) -> None:
    """``(shift + scale * x) ** power``; when ``power * scale == 0`` Caffe writes the
    constant ``shift ** power`` (1 for power 0)."""
    m = layer.module
    x = layer.bottoms[0]
    if m.power * m.scale == 0:
        value = 1.0 if m.power == 0 else float(np.power(np.float32(m.shift),
                                                        np.float32(m.power)))
        layer.assign(f"torch.full_like({x}, {number(value)})",
                     comment="Caffe's Power ignores the input when power * scale is 0")
        return
    base = _affine(x, m.scale, m.shift)
    layer.assign(base if m.power == 1 else f"torch.pow({base}, {number(m.power)})")


@register_source_emitter("Exp")
def exp(layer: LayerSource) -> None:
    """``base ** (shift + scale * x)``, with base e for Caffe's ``base: -1``."""
    m = layer.module
    exponent = _affine(layer.bottoms[0], m.scale, m.shift)
    if m.base == -1:
        layer.assign(f"torch.exp({exponent})")
    else:
        layer.assign(f"torch.pow({number(m.base)}, {exponent})")


@register_source_emitter("Log")
def log(layer: LayerSource) -> None:
    """``log_base(shift + scale * x)``, with base e for Caffe's ``base: -1``."""
    m = layer.module
    logarithm = f"torch.log({_affine(layer.bottoms[0], m.scale, m.shift)})"
    if m.base == -1:
        layer.assign(logarithm)
    else:
        layer.assign(f"{logarithm} / {number(math.log(m.base))}",
                     comment=f"log base {number(m.base)}")


@register_source_emitter("Threshold")
def threshold(layer: LayerSource) -> None:
    """1 where ``x > threshold`` (strictly), else 0, in the input's dtype."""
    x = layer.bottoms[0]
    layer.assign(f"({x} > {number(layer.module.threshold)}).to({x}.dtype)")


@register_source_emitter("Clip")
def clip(layer: LayerSource) -> None:
    """``torch.clamp(x, min, max)`` (the gradient passes at both bounds, as Caffe's); Caffe's
    unchecked ``min > max`` keeps the order of its expression, giving ``min``."""
    m = layer.module
    x = layer.bottoms[0]
    if m.min <= m.max:
        layer.assign(f"torch.clamp({x}, {number(m.min)}, {number(m.max)})")
    else:
        layer.assign(f"{x}.clamp(max={number(m.max)}).clamp(min={number(m.min)})")


@register_source_emitter("Swish")
def swish(layer: LayerSource) -> None:
    """``nn.SiLU`` for ``beta`` 1, else ``x * torch.sigmoid(beta * x)``."""
    beta = layer.module.beta
    x = layer.bottoms[0]
    if beta == 1.0:
        _module(layer, "nn.SiLU()")
    else:
        layer.assign(f"{x} * torch.sigmoid({number(beta)} * {x})")
