"""Emitters for Caffe's elementwise neuron layers (one bottom, one top of its shape)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...registry import register_emitter


def _unary(op_type: str):
    def emit(ctx, node) -> None:
        (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
        ctx.op(op_type, [x], top)
    emit.__doc__ = f"``{op_type}``."
    return emit


register_emitter("Sigmoid")(_unary("Sigmoid"))
register_emitter("TanH")(_unary("Tanh"))
register_emitter("AbsVal")(_unary("Abs"))


@register_emitter("BNLL")
def emit_bnll(ctx, node) -> None:
    """Softplus in Caffe's overflow-free form ``max(x, 0) + log(1 + exp(-|x|))`` (ONNX's
    ``Softplus`` may be evaluated as ``log(1 + exp(x))``, infinite past x = 88)."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    decay = ctx.op("Exp", [ctx.op("Neg", [ctx.op("Abs", [x])])])
    tail = ctx.op("Log", [ctx.op("Add", [decay, ctx.const(1.0, "one")])])
    ctx.op("Add", [ctx.op("Relu", [x]), tail], top)


@register_emitter("ReLU")
def emit_relu(ctx, node) -> None:
    """``Relu``, or ``LeakyRelu`` with Caffe's ``negative_slope``."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    slope = node.module.negative_slope
    if slope:
        ctx.op("LeakyRelu", [x], top, alpha=slope)
    else:
        ctx.op("Relu", [x], top)


@register_emitter("PReLU")
def emit_prelu(ctx, node) -> None:
    """``PRelu`` with the slopes shaped ``C x 1 x ...`` to broadcast on axis 1 (ONNX aligns
    trailing axes), or a single slope when channel-shared."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    slopes = node.module.weight.detach().cpu().numpy()
    rank = len(node.bottom_shapes[0])
    shape = (1,) if node.module.channel_shared else (slopes.size,) + (1,) * (rank - 2)
    ctx.op("PRelu", [x, ctx.param(node, 0, slopes.reshape(shape))], top)


@register_emitter("ELU")
def emit_elu(ctx, node) -> None:
    """``Elu`` (Caffe's and ONNX's formulas agree, ``x = 0`` included)."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    ctx.op("Elu", [x], top, alpha=node.module.alpha)


def _chain(ctx, x: str, top: str, steps) -> None:
    """Apply ``steps`` in order, the last one writing ``top`` (``Identity`` when none).

    Each step is ``(op_type, constant, hint)``: a binary op with a float constant, or a
    unary op when ``constant`` is None. Steps that Caffe skips (scale 1, shift 0) are left
    out by the callers.
    """
    if not steps:
        ctx.op("Identity", [x], top)
        return
    for index, (op_type, constant, hint) in enumerate(steps):
        inputs = [x] if constant is None else [x, ctx.const(constant, hint)]
        x = ctx.op(op_type, inputs, top if index == len(steps) - 1 else None)


def _affine_steps(scale: float, shift: float):
    """``x * scale + shift`` without the steps Caffe skips."""
    return ([("Mul", scale, "scale")] if scale != 1.0 else []) + \
        ([("Add", shift, "shift")] if shift != 0.0 else [])


@register_emitter("Power")
def emit_power(ctx, node) -> None:
    """``(shift + scale x) ^ power``; when ``power * scale`` is 0 Caffe writes the constant
    ``shift ^ power`` (1 for power 0) whatever the input, which ``ConstantOfShape`` does."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    if module.power * module.scale == 0:
        value = 1.0 if module.power == 0 else float(np.float32(module.shift) **
                                                    np.float32(module.power))
        fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [value])
        ctx.op("ConstantOfShape", [ctx.op("Shape", [x])], top, value=fill)
        return
    power = [("Pow", module.power, "power")] if module.power != 1.0 else []
    _chain(ctx, x, top, _affine_steps(module.scale, module.shift) + power)


@register_emitter("Exp")
def emit_exp(ctx, node) -> None:
    """``outer * exp(inner * x)`` with ``inner = ln(base) scale`` and ``outer = base^shift``,
    Caffe's own factorization."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    outer = [("Mul", module.outer_scale, "outer_scale")] if module.outer_scale != 1.0 else []
    _chain(ctx, x, top, _affine_steps(module.inner_scale, 0.0) + [("Exp", None, "")] + outer)


@register_emitter("Log")
def emit_log(ctx, node) -> None:
    """``log(shift + scale x) / ln(base)``."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    base = [("Mul", module.base_scale, "base_scale")] if module.base_scale != 1.0 else []
    _chain(ctx, x, top, _affine_steps(module.scale, module.shift) + [("Log", None, "")] + base)


@register_emitter("Threshold")
def emit_threshold(ctx, node) -> None:
    """1 where ``x > threshold``, else 0 (as floats)."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    above = ctx.op("Greater", [x, ctx.const(node.module.threshold, "threshold")])
    ctx.op("Cast", [above], top, to=TensorProto.FLOAT)


@register_emitter("Dropout")
def emit_dropout(ctx, node) -> None:
    """Caffe's TEST phase: the identity, or a scale by ``1 - ratio`` without ``scale_train``;
    a TRAIN net's random masks cannot be exported."""
    if node.module.training:
        raise ctx.unsupported("Dropout drops at random in the TRAIN phase; convert the TEST "
                              "phase, where it is the identity")
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    if node.module.scale_train:
        ctx.op("Identity", [x], top)
    else:
        ctx.op("Mul", [x, ctx.const(node.module.test_scale, "test_scale")], top)


@register_emitter("Clip")
def emit_clip(ctx, node) -> None:
    """``Clip`` to ``[min, max]``; for Caffe's unchecked ``min > max`` (every output ``min``)
    ``Max(Min(x, max), min)``, the order of Caffe's own expression."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    low, high = ctx.const(module.min, "min"), ctx.const(module.max, "max")
    if module.min <= module.max:
        ctx.op("Clip", [x, low, high], top)
    else:
        ctx.op("Max", [ctx.op("Min", [x, high]), low], top)


@register_emitter("Swish")
def emit_swish(ctx, node) -> None:
    """``x * Sigmoid(beta * x)``."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    beta = node.module.beta
    scaled = x if beta == 1.0 else ctx.op("Mul", [x, ctx.const(beta, "beta")])
    ctx.op("Mul", [x, ctx.op("Sigmoid", [scaled])], top)
