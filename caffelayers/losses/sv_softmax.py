r"""Support-vector guided softmax (SV-Softmax, SV-X-Softmax) on cosine logits.

Wang et al., "Support Vector Guided Softmax Loss for Face Recognition" (2018): a
non-label class whose cosine beats the label's margin function is a support vector
(a mis-classified feature), and its logit is raised, which concentrates the loss on the
hard negatives; the margin variants (SV-AM, SV-Arc) add a margin to the label as
AM-Softmax and ArcFace do. ``t = 1`` gives the plain (margin) softmax exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import LabelError, ShapeError, UnsupportedParameterError
from ..layers.base import as_labels
from ..layers.margin_head import label_margin

__all__ = ["MARGINS", "SVSoftmaxLoss", "sv_softmax_loss"]

#: The label margins: none (SV-Softmax), AM (SV-AM-Softmax), Arc (SV-Arc-Softmax) and
#: A-Softmax's (SV-Sphere), each the ``MarginHead`` kind of the same margin function.
MARGINS = {"none": None, "am": "cos", "arc": "arc", "sphere": "sphere"}
REDUCTIONS = ("none", "mean", "sum")


class _SVSoftmax(torch.autograd.Function):
    """Cross-entropy of the support-vector logits, class axis 1 of ``(N, C, *)`` cosines.

    Saves the log-probabilities, the support-vector indicator and the label margin's slope;
    the gradient is ``(softmax - onehot) * s * (1 + (t - 1) I)`` off the label and
    ``(softmax_y - 1) * s * f'(cos_y)`` on it (the mask is constant).
    """

    @staticmethod
    def forward(ctx, cos, labels, s, t, margin, reduction):
        column = labels.unsqueeze(1)
        label_cos = cos.gather(1, column)
        if margin is None:
            label_value, slope = label_cos, None
        else:
            label_value, slope, _ = margin(label_cos)
        logits = cos * s
        support = None
        if t != 1:
            # I_k = [f(m, theta_y) - cos_k < 0] off the label, as 0/1 in the logits' dtype
            # (a float mask: torch.where and bool-float arithmetic cost several times more)
            support = (cos - label_value).clamp_(min=0).sign_()
            support.scatter_(1, column, 0.0)
            # s cos + s (t - 1)(cos + 1) I = s cos + w cos + w, with w = s (t - 1) I
            boost = support * (s * (t - 1))
            logits.addcmul_(boost, cos).add_(boost)
        if margin is not None:
            logits.scatter_(1, column, label_value * s)
        log_prob = torch.log_softmax(logits, dim=1)
        ctx.save_for_backward(log_prob, labels, support, slope)
        ctx.s, ctx.t, ctx.reduction = s, t, reduction
        # nll_loss, as cross_entropy reduces: t = 1 and no margin give cross_entropy's bits
        return F.nll_loss(log_prob, labels, reduction=reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        log_prob, labels, support, slope = ctx.saved_tensors
        s, t = ctx.s, ctx.t
        if ctx.reduction == "none":
            weight = grad_loss.unsqueeze(1) * s
        elif ctx.reduction == "mean":
            weight = grad_loss * (s / labels.numel())
        else:
            weight = grad_loss * s
        column = labels.unsqueeze(1)
        grad = log_prob.exp()
        grad.scatter_(1, column, grad.gather(1, column) - 1)
        grad.mul_(weight)
        if support is not None:
            grad.addcmul_(grad, support, value=t - 1)  # the support vectors' slope s t
        if slope is not None:
            grad.scatter_(1, column, grad.gather(1, column) * slope)
        return grad, None, None, None, None, None


def _label_function(s: float, t: float, margin: str, m: float, reduction: str,
                    easy_margin: bool) -> Callable | None:
    """Check the settings; the label margin function (None for ``"none"``)."""
    if margin not in MARGINS:
        raise UnsupportedParameterError(f"sv_softmax_loss: margin must be one of "
                                        f"{', '.join(MARGINS)}, got {margin!r}")
    if reduction not in REDUCTIONS:
        raise UnsupportedParameterError(f"sv_softmax_loss: reduction must be one of "
                                        f"{', '.join(REDUCTIONS)}, got {reduction!r}")
    for name, value in (("s", s), ("t", t)):
        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise UnsupportedParameterError(f"sv_softmax_loss: {name} must be a finite "
                                            f"number, got {value!r}")
    if margin == "none":
        if m or easy_margin:
            raise UnsupportedParameterError("sv_softmax_loss: margin 'none' takes m = 0 and "
                                            "no easy_margin; pick 'am', 'arc' or 'sphere'")
        return None
    if easy_margin and margin != "arc":
        raise UnsupportedParameterError("sv_softmax_loss: easy_margin is for margin 'arc'")
    return label_margin(MARGINS[margin], m, easy_margin)


def sv_softmax_loss(cos: torch.Tensor, labels: torch.Tensor, s: float = 1.0, t: float = 1.0,
                    margin: str = "none", m: float = 0.0, reduction: str = "mean",
                    easy_margin: bool = False) -> torch.Tensor:
    r"""Support-vector guided softmax loss on cosine logits.

    .. math::
        \ell_i = -\log \frac{e^{s f(m, \theta_y)}}{e^{s f(m, \theta_y)} +
            \sum_{k \ne y} h_k\, e^{s \cos\theta_k}}, \qquad
        h_k = e^{s (t - 1)(\cos\theta_k + 1) I_k}, \quad
        I_k = [f(m, \theta_y) - \cos\theta_k < 0]

    that is, the cross-entropy of the logits :math:`s f(m, \theta_y)` (label) and
    :math:`s \cos\theta_k + s (t - 1)(\cos\theta_k + 1) I_k` (others). :math:`f` is
    :math:`\cos\theta` (``"none"``), :math:`\cos\theta - m` (``"am"``),
    :math:`\cos(\theta + m)` (``"arc"``, with ArcFace's fallback past
    :math:`\theta = \pi - m`) or A-Softmax's :math:`\psi_m(\theta)` (``"sphere"``, m an
    integer 1 to 4): :func:`caffelayers.layers.margin_head.label_margin`. The indicator
    :math:`I_k` (never set for the label) is constant for the gradient. ``t = 1`` (and no
    margin, or a zero one) gives ``cross_entropy(s * cos, labels)`` bit for bit.

    Args:
        cos: cosine logits, classes on axis 1.
        labels: class indices (integers, or floats holding integers).
        s: the scale.
        t: the support vectors' weight (:math:`t \ge 1` in the paper; 1 turns it off).
        margin: ``"none"``, ``"am"``, ``"arc"`` or ``"sphere"``.
        m: the label margin (0 with ``"none"``).
        reduction: ``"mean"`` (over the positions), ``"sum"`` or ``"none"``.
        easy_margin: ``"arc"`` only: ArcFace's ``easy_margin`` instead of the fallback.

    Shape:
        - cos: :math:`(N, C)` or :math:`(N, C, d_1, \ldots)`.
        - labels: :math:`(N)` or :math:`(N, d_1, \ldots)`, values in ``[0, C)``.
        - Output: :math:`()`, or the labels' shape with ``reduction="none"``.
    """
    function = _label_function(s, t, margin, m, reduction, easy_margin)
    if cos.dim() < 2:
        raise ShapeError("sv_softmax_loss", "SVSoftmaxLoss", [tuple(cos.shape)],
                         "cosines of shape (N, C) or (N, C, d1, ...)")
    labels = as_labels(labels).to(cos.device)
    expected = (cos.shape[0],) + tuple(cos.shape[2:])
    if tuple(labels.shape) != expected:
        if labels.numel() != math.prod(expected):
            raise ShapeError("sv_softmax_loss", "SVSoftmaxLoss",
                             [tuple(cos.shape), tuple(labels.shape)],
                             f"one label per position: shape {expected}")
        labels = labels.reshape(expected)
    classes = cos.shape[1]
    if labels.numel() and bool(((labels < 0) | (labels >= classes)).any()):
        bad = labels[(labels < 0) | (labels >= classes)].unique().tolist()
        raise LabelError(f"sv_softmax_loss: labels must lie in [0, {classes}), got {bad[:10]}")
    return _SVSoftmax.apply(cos, labels, float(s), float(t), function, reduction)


class SVSoftmaxLoss(nn.Module):
    r"""Support-vector guided softmax loss (SV-Softmax, SV-AM-, SV-Arc-, SV-Sphere-Softmax)
    on cosine logits: see :func:`sv_softmax_loss` for the formula.

    Args:
        s, t, margin, m, reduction, easy_margin: as :func:`sv_softmax_loss`.

    Shape:
        - cos: :math:`(N, C)` or :math:`(N, C, d_1, \ldots)`; labels :math:`(N, d_1, \ldots)`.
        - Output: :math:`()`, or the labels' shape with ``reduction="none"``.

    Example::

        >>> head = MarginHead(512, 10572, "cos", s=1.0, m=0.0)    # plain cosines
        >>> loss = SVSoftmaxLoss(s=32, t=1.2, margin="am", m=0.35)(head(x, margin=False), y)
    """

    __constants__ = ["s", "t", "margin", "m", "reduction", "easy_margin"]

    def __init__(self, s: float = 1.0, t: float = 1.0, margin: str = "none", m: float = 0.0,
                 reduction: str = "mean", easy_margin: bool = False) -> None:
        super().__init__()
        self.s, self.t, self.margin, self.m = float(s), float(t), margin, m
        self.reduction, self.easy_margin = reduction, bool(easy_margin)
        _label_function(self.s, self.t, margin, m, reduction, self.easy_margin)

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sv_softmax_loss(cos, labels, self.s, self.t, self.margin, self.m,
                               self.reduction, self.easy_margin)

    def extra_repr(self) -> str:
        defaults = {"s": 1.0, "t": 1.0, "margin": "none", "m": 0.0, "reduction": "mean",
                    "easy_margin": False}
        return ", ".join(f"{name}={getattr(self, name)!r}" for name, default in
                         defaults.items() if getattr(self, name) != default)
