r"""Differences between a softmax and a target distribution: ``softmax_diff_loss`` and the
``SoftmaxDiffLoss`` layer (knowledge distillation from soft targets).

The softmax is taken along the class axis, stably (the maximum subtracted), and compared
with a target distribution by the L1 distance, half the squared L2 distance, or the
cross-entropy ("MI"), per position; the multilabel style treats every class as its own
binary distribution (a sigmoid). The backward is written out: the L1 and L2 gradients go
through the softmax Jacobian exactly, the cross-entropy's is ``(softmax_T - target) / T``.
The target never receives a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..errors import LabelError, ShapeError, UnsupportedParameterError
from ..layers.base import BuildContext, CaffeLayer, Shape, count
from ..registry import register_layer
from .common import normalization_from_caffe

__all__ = ["MODES", "STYLES", "SoftmaxDiffLoss", "softmax_diff_loss"]

MODES = ("L1", "L2", "MI")
STYLES = ("multiclass", "multilabel")
REDUCTIONS = ("sum", "mean", "batchmean", "none")
#: How far a multiclass target's sum may stray from 1 (and a multilabel target from
#: ``[0, 1]``) before it is rejected.
TARGET_TOLERANCE = 1e-3
#: Caffe's ``loss_param.normalization`` as a reduction; unset means the plain sum.
_NORMALIZATION_REDUCTIONS = {"FULL": "mean", "VALID": "mean", "BATCH_SIZE": "batchmean",
                             "NONE": "sum"}


class _SoftmaxDiff(torch.autograd.Function):
    """Per-position losses of ``x`` viewed as ``(outer, C, inner)`` (or ``(outer, C)``)
    against a target of the same shape or ``(outer, C, 1)`` (already sharpened for the
    temperature); classes on axis 1."""

    @staticmethod
    def forward(ctx, x, target, mode, temperature, multilabel):
        logits = x if temperature == 1 else x / temperature
        if multilabel:
            probabilities = torch.sigmoid(logits)
            if mode == "MI":
                # PyTorch's fused form of max(z, 0) - z c + log(1 + exp(-|z|)): finite for
                # any finite z, and twice as fast as those five steps
                losses = F.binary_cross_entropy_with_logits(
                    logits, target.expand_as(logits), reduction="none").sum(1)
            else:
                difference = probabilities - target
                losses = (2 * difference.abs_().sum(1) if mode == "L1"
                          else torch.linalg.vecdot(difference, difference, dim=1))
        elif mode == "MI":
            shifted = logits - logits.amax(1, keepdim=True)
            probabilities = shifted.exp()
            total = probabilities.sum(1, keepdim=True)
            probabilities.div_(total)
            losses = total.squeeze(1).log() - torch.linalg.vecdot(target, shifted, dim=1)
        else:
            probabilities = torch.softmax(logits, 1)  # subtracts the maximum, fused
            difference = probabilities - target
            # abs_().sum(1), not vector_norm(ord=1), which is 10x slower on a middle axis
            losses = (difference.abs_().sum(1) if mode == "L1"
                      else 0.5 * torch.linalg.vecdot(difference, difference, dim=1))
        ctx.save_for_backward(probabilities, target)
        ctx.mode, ctx.temperature, ctx.multilabel = mode, temperature, multilabel
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        probabilities, target = ctx.saved_tensors
        weight = grad_losses.unsqueeze(1)
        if ctx.mode == "MI":
            # softmax or sigmoid alike: (p_T - target) / T
            return (probabilities - target).mul_(weight / ctx.temperature), None, None, None, None
        grad = probabilities - target
        if ctx.mode == "L1":
            grad.sign_()
        if ctx.multilabel:
            # d/dx of 2|p - c| or (p - c)^2 with p = sigmoid(x): 2 g p (1 - p)
            grad.mul_(probabilities * (1 - probabilities)).mul_(2 * weight)
        else:
            # the softmax Jacobian, p * (g - sum_c p g), by PyTorch's fused softmax backward
            grad = torch._softmax_backward_data(grad.mul_(weight), probabilities, 1,
                                                probabilities.dtype)
        return grad, None, None, None, None


def _name(value: str, allowed: Sequence[str], what: str) -> str:
    matches = [a for a in allowed if isinstance(value, str) and value.lower() == a.lower()]
    if not matches:
        raise UnsupportedParameterError(f"softmax_diff_loss: {what} must be one of "
                                        f"{', '.join(allowed)}, got {value!r}")
    return matches[0]


def _prepare_target(target: torch.Tensor, temperature: float, multilabel: bool) -> torch.Tensor:
    """Check the target (classes on axis 1) and sharpen or soften it for ``T``."""
    target = target.detach()
    if not target.numel():
        return target
    if multilabel:
        low, high = torch.aminmax(target)
        if not (low >= -TARGET_TOLERANCE and high <= 1 + TARGET_TOLERANCE):
            raise LabelError(f"softmax_diff_loss: multilabel targets are probabilities in "
                             f"[0, 1], got values in [{float(low):g}, {float(high):g}]")
        if temperature == 1:
            return target
        # each class's binary distribution (c, 1 - c), sharpened: c^(1/T) / (c^(1/T) +
        # (1 - c)^(1/T)) = sigmoid((log c - log(1 - c)) / T), exact at 0 and 1 (+-inf logits)
        target = target.clamp(0, 1)
        return torch.sigmoid((target.log() - (1 - target).log_()).div_(temperature))
    sums = target.sum(1)
    off = (sums - 1).abs()
    if not bool((off <= TARGET_TOLERANCE).all()):
        worst = int(torch.nan_to_num(off, nan=math.inf).flatten().argmax())
        raise LabelError(f"softmax_diff_loss: every target distribution must sum to 1 over "
                         f"the classes (within {TARGET_TOLERANCE:g}); one sums to "
                         f"{float(sums.flatten()[worst]):.6g}")
    if temperature == 1:
        return target
    if bool((target < 0).any()):
        raise LabelError("softmax_diff_loss: a target with negative probabilities cannot be "
                         "raised to the power 1/T")
    # q^(1/T) as exp(log(q) / T): twice as fast as pow, and 0 stays 0
    sharpened = target.log().div_(temperature).exp_()
    return sharpened / sharpened.sum(1, keepdim=True)


def _layout(x_shape: Shape, target_shape: Shape, axis: int, layer: str = "softmax_diff_loss"):
    """``(outer, C, inner)``, and whether the target has one distribution per sample
    (``outer x C`` elements) rather than one per position."""
    if len(x_shape) == 0:
        raise ShapeError(layer, "SoftmaxDiffLoss", [x_shape, target_shape],
                         "logits with a class axis")
    if not -len(x_shape) <= axis < len(x_shape):
        raise ShapeError(layer, "SoftmaxDiffLoss", [x_shape, target_shape],
                         f"axis {axis} must lie in [{-len(x_shape)}, {len(x_shape)}) for "
                         f"{len(x_shape)}-D logits")
    axis %= len(x_shape)
    outer, classes, inner = count(x_shape, 0, axis), x_shape[axis], count(x_shape, axis + 1)
    elements = count(target_shape)
    if elements == outer * classes * inner:
        return (outer, classes, inner), False
    if elements == outer * classes:
        return (outer, classes, inner), True
    raise ShapeError(layer, "SoftmaxDiffLoss", [x_shape, target_shape],
                     f"a target with one distribution per position ({outer * classes * inner} "
                     f"elements) or per sample ({outer} x {classes} = {outer * classes})")


def softmax_diff_loss(x: torch.Tensor, target: torch.Tensor, mode: str = "L1",
                      temperature: float = 1.0, style: str = "multiclass", axis: int = 1,
                      reduction: str = "sum") -> torch.Tensor:
    r"""Difference between the softmax of ``x`` and a target distribution, per position.

    Multiclass, with :math:`p = \mathrm{softmax}(x)` along ``axis`` and target :math:`q`
    (each summing to 1 over the classes):

    .. math::
        L1 = \sum_c |p_c - q_c|, \qquad L2 = \tfrac12 \sum_c (p_c - q_c)^2, \qquad
        MI = -\sum_c q'_c \log \mathrm{softmax}(x / T)_c
           = \log\sum_c e^{\tilde x_c} - \sum_c q'_c \tilde x_c

    with :math:`\tilde x = x/T - \max_c x_c/T` and :math:`q' = q^{1/T} / \sum_c q_c^{1/T}`
    (sharpened for :math:`T < 1`, softened for :math:`T > 1`; :math:`q` itself at
    :math:`T = 1`). The gradients: :math:`p \odot (g - \sum_c p_c g_c)` with
    :math:`g = \mathrm{sign}(p - q)` (L1) or :math:`p - q` (L2), the softmax Jacobian
    exactly; :math:`(\mathrm{softmax}(x/T) - q') / T` (MI).

    Multilabel: every class is its own binary distribution :math:`(\sigma, 1 - \sigma)`
    against :math:`(c, 1 - c)`, with :math:`\sigma = \sigma(x/T)`: MI is the binary
    cross-entropy :math:`\sum_c \max(z_c, 0) - z_c c'_c + \log(1 + e^{-|z_c|})` of
    :math:`z = x/T`, with :math:`c' = c^{1/T} / (c^{1/T} + (1 - c)^{1/T})` and gradient
    :math:`(\sigma(z) - c') / T`; L1 is :math:`\sum_c 2|\sigma_c - c_c|` and L2
    :math:`\sum_c (\sigma_c - c_c)^2` (both binary halves counted).

    Args:
        x: logits, classes along ``axis``.
        target: the target distributions: one per position (``x``'s shape, or any shape
            with as many elements) or one per sample (``outer x C`` elements, broadcast over
            the positions). Never receives a gradient.
        mode: ``"L1"``, ``"L2"`` or ``"MI"``.
        temperature: T > 0; L1 and L2 take only 1.
        style: ``"multiclass"`` (targets sum to 1 per position, within 1e-3) or
            ``"multilabel"`` (targets in [0, 1]).
        axis: the class axis (negative counts from the end).
        reduction: ``"sum"`` (everything, no normalization; the default), ``"mean"`` (over
            the positions, ``outer x inner``), ``"batchmean"`` (over ``x.shape[0]``) or
            ``"none"``.

    Shape:
        - x: :math:`(d_0, \ldots, d_{axis-1}, C, d_{axis+1}, \ldots)`.
        - target: as x, or :math:`(d_0, \ldots, d_{axis-1}, C)`.
        - Output: :math:`()`, or x's shape without ``axis`` for ``reduction="none"``.

    Raises:
        LabelError: a multiclass target that does not sum to 1, or a multilabel one
            outside [0, 1].
        UnsupportedParameterError: a bad mode, style, reduction or temperature.
    """
    mode = _name(mode, MODES, "mode")
    style = _name(style, STYLES, "style")
    reduction = _name(reduction, REDUCTIONS, "reduction")
    temperature = _check_temperature(mode, temperature)
    (outer, classes, inner), per_sample = _layout(tuple(x.shape), tuple(target.shape), axis)
    # one position per sample: 2-D, where PyTorch's softmax kernels are several times faster
    # than on a middle axis
    layout = (outer, classes) if inner == 1 else (outer, classes, inner)
    values = x.reshape(layout)
    target = target.to(device=x.device, dtype=x.dtype)
    target = target.reshape(layout if inner == 1 or not per_sample else (outer, classes, 1))
    target = _prepare_target(target, temperature, style == "multilabel")
    losses = _SoftmaxDiff.apply(values, target, mode, temperature, style == "multilabel")
    if reduction == "none":
        axis %= x.dim()
        return losses.reshape(tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:]))
    total = losses.sum()
    if reduction == "mean":
        return total / max(1, outer * inner)
    if reduction == "batchmean":
        return total / max(1, x.shape[0])
    return total


def _check_temperature(mode: str, temperature: float) -> float:
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        temperature = math.nan
    if not (math.isfinite(temperature) and temperature > 0):
        raise UnsupportedParameterError(f"softmax_diff_loss: temperature must be a positive "
                                        f"number, got {temperature!r}")
    if mode != "MI" and temperature != 1:
        raise UnsupportedParameterError(f"softmax_diff_loss: mode {mode} takes temperature "
                                        f"1 only, got {temperature:g} (use MI to distil at "
                                        "a temperature)")
    return temperature


@register_layer("SoftmaxDiffLoss")
class SoftmaxDiffLoss(CaffeLayer):
    r"""Difference between the softmax of the logits and a target distribution (L1, L2 or
    cross-entropy), for distillation from soft targets: see :func:`softmax_diff_loss`.

    .. math::
        \ell = \sum_{\text{positions}} D\big(\mathrm{softmax}(x / T), q\big), \quad
        D \in \{\textstyle\sum|p - q|,\ \tfrac12\sum(p - q)^2,\ -\sum q' \log p\}

    Args:
        mode, temperature, style, axis, reduction: as :func:`softmax_diff_loss`.

    Shape:
        - Logits: :math:`(d_0, \ldots, C, \ldots)` with the classes on ``axis``.
        - Target: the logits' element count (one distribution per position) or
          :math:`d_0 \cdots d_{axis-1} \times C` (one per sample).
        - Output: :math:`()` (x's shape without ``axis`` for ``reduction="none"``).

    Caffe: type ``SoftmaxDiffLoss`` (ours) with ``softmax_diff_loss_param { mode (L1, L2,
    MI) temperature style (MULTICLASS, MULTILABEL) axis }``; ``loss_param``'s
    ``normalization`` picks the reduction: unset or NONE the sum, FULL or VALID the mean
    over positions, BATCH_SIZE over samples. ``ignore_label`` is not supported (a soft
    target has no label to ignore). The target bottom gets no gradient.
    """

    is_loss = True
    __constants__ = ["mode", "temperature", "style", "axis", "reduction"]

    def __init__(self, mode: str = "L1", temperature: float = 1.0, style: str = "multiclass",
                 axis: int = 1, reduction: str = "sum") -> None:
        super().__init__()
        self.mode = _name(mode, MODES, "mode")
        self.style = _name(style, STYLES, "style")
        self.reduction = _name(reduction, REDUCTIONS, "reduction")
        self.temperature = _check_temperature(self.mode, temperature)
        self.axis = int(axis)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape],
                   ctx: BuildContext) -> SoftmaxDiffLoss:
        p = param.softmax_diff_loss_param
        if param.loss_param.HasField("ignore_label"):
            raise UnsupportedParameterError(
                f"layer {param.name!r} (SoftmaxDiffLoss): ignore_label has no meaning for "
                "soft targets")
        reduction = "sum"
        if param.loss_param.HasField("normalization") or param.loss_param.HasField("normalize"):
            reduction = _NORMALIZATION_REDUCTIONS[normalization_from_caffe(param.loss_param)]
        if p.mode not in range(len(MODES)) or p.style not in range(len(STYLES)):
            raise UnsupportedParameterError(f"layer {param.name!r}: mode {p.mode} or style "
                                            f"{p.style} is out of range")
        layer = cls(MODES[p.mode], p.temperature, STYLES[p.style], p.axis, reduction)
        layer.layer_name = param.name
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        if len(bottom_shapes) != 2:
            raise self.shape_error(bottom_shapes, "two bottoms: logits and target")
        shape = tuple(bottom_shapes[0])
        _layout(shape, tuple(bottom_shapes[1]), self.axis, self.layer_name)
        if self.reduction == "none":
            axis = self.axis % len(shape)
            return [shape[:axis] + shape[axis + 1:]]
        return [()]

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(x.shape), tuple(target.shape)])
        return softmax_diff_loss(x, target, self.mode, self.temperature, self.style,
                                 self.axis, self.reduction)

    def extra_repr(self) -> str:
        parts = [f"mode={self.mode!r}"]
        defaults = {"temperature": 1.0, "style": "multiclass", "axis": 1, "reduction": "sum"}
        parts += [f"{name}={getattr(self, name)!r}" for name, default in defaults.items()
                  if getattr(self, name) != default]
        return ", ".join(parts)
