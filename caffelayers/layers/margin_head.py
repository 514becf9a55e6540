"""Margin heads on the label column: A-Softmax, AM-Softmax (CosFace), ArcFace and the
combined margin of InsightFace, all on :mod:`.margin_inner_product`'s kernel.

A head multiplies the (optionally normalized and scaled) features by the unit-length class
weights and replaces one logit per row, the label's, by a margin function of its cosine.
The kernel does exactly that for any function ``f(cos)`` with its slope, so every kind runs
the three matrix products of a linear layer plus per-row work, with no temporary of the
logits' size besides the logits and their gradient, nor of the weight's size besides its
gradient (the logits are divided by the weight rows' lengths instead of a normalized copy).

The margin functions (:func:`label_margin`) are shared with
:func:`caffelayers.losses.sv_softmax.sv_softmax_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, ClassVar, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import CaffeFormatError, ShapeError, UnsupportedParameterError
from ..fillers import fill
from ..registry import register_layer
from .base import CaffeLayer, as_labels, check_label_range, count
from .margin_inner_product import (
    _MarginProduct,
    head_logits_shape,
    margin_terms,
    through_row_normalization,
)

__all__ = ["KINDS", "MarginHead", "label_margin", "margin_head"]

#: The head kinds, in the order of ``MarginHeadParameter.Kind``.
KINDS = ("sphere", "cos", "arc", "combined")
#: The margin each kind uses unless told otherwise (SphereFace's, CosFace's, ArcFace's and
#: InsightFace's combined defaults).
DEFAULT_MARGINS = {"sphere": 4, "cos": 0.35, "arc": 0.5, "combined": (1.0, 0.3, 0.2)}
#: The scale of the normalized logits unless told otherwise (InsightFace's default).
DEFAULT_SCALE = 64.0

Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Margin = Union[int, float, Sequence[float]]


# -- the label functions -----------------------------------------------------------------

def _sin_floor(dtype: torch.dtype) -> float:
    """The smallest ``sin theta`` divided by: below sqrt(eps), ``sin theta`` computed as
    ``sqrt(1 - cos^2)`` carries no digits, and at ``theta = 0`` or ``pi`` the slope of an
    additive angular margin is infinite."""
    return torch.finfo(dtype).eps ** 0.5


def _sin_of(cos: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(1 - cos * cos, min=0))


def _shifted(cos: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(theta + shift)`` and its slope in ``cos``, without ``acos``: exactly ``cos``
    and 1 when ``shift`` is 0."""
    sin = _sin_of(cos)
    value = cos * math.cos(shift) - sin * math.sin(shift)
    slope = math.cos(shift) + math.sin(shift) * cos / sin.clamp(min=_sin_floor(cos.dtype))
    return value, slope


def _multiplied(cos: torch.Tensor, m1: float, m2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(m1 theta + m2)`` and its slope ``m1 sin(m1 theta + m2) / sin theta``, with
    ``sin(m1 theta) / sin theta`` through ``sinc`` near ``theta = 0`` (limit ``m1``)."""
    theta = torch.acos(cos.clamp(-1, 1))
    angle = m1 * theta
    sin = torch.sin(theta).clamp(min=_sin_floor(cos.dtype))
    ratio = torch.where(theta < math.pi / 2,
                        m1 * torch.sinc(angle / math.pi) / torch.sinc(theta / math.pi),
                        torch.sin(angle) / sin)
    value = torch.cos(angle + m2)
    slope = m1 * (math.cos(m2) * ratio + math.sin(m2) * torch.cos(angle) / sin)
    return value, slope


def _with_radial(cos, value, slope) -> Terms:
    return value, slope, value - cos * slope


def label_margin(kind: str, m: Margin, easy_margin: bool = False
                 ) -> Callable[[torch.Tensor], Terms]:
    """The label column's margin function: ``cos -> (f(cos), f'(cos), f - cos f')``.

    ======== ============================================ =====================================
    kind     ``f(cos theta)``                             m
    ======== ============================================ =====================================
    sphere   ``(-1)^k cos(m theta) - 2k`` (A-Softmax)     integer 1 to 4
    cos      ``cos theta - m`` (AM-Softmax, CosFace)      float
    arc      ``cos(theta + m)`` (ArcFace); where          float
             ``theta + m > pi``: ``cos theta - m sin m``
             (or with ``easy_margin``, where
             ``cos theta <= 0``: ``cos theta``)
    combined ``cos(m1 theta + m2) - m3``                  ``(m1, m2, m3)``
    ======== ============================================ =====================================

    ArcFace's fallback keeps the logit increasing in ``cos theta`` past ``theta = pi - m``,
    where ``cos(theta + m)`` would turn back up. The combined margin has none (as
    InsightFace's). The slopes divide by ``max(sin theta, sqrt(eps))`` (see
    :func:`_sin_floor`); everything else is exact. With a zero margin (``m = 0``, ``(1, 0,
    0)``, or m = 1 for sphere) ``f`` returns ``cos`` itself, bit for bit (and a head with
    one leaves the label column alone: its logits are the plain ones, bit for bit).
    """
    kind, margin = _check_margin(kind, m)
    if kind == "sphere":
        return lambda cos: margin_terms(cos, margin)
    if kind == "cos":
        return lambda cos: (cos - margin, torch.ones_like(cos), torch.full_like(cos, -margin))
    if kind == "arc":
        threshold = 0.0 if easy_margin else math.cos(math.pi - margin)
        drop = 0.0 if easy_margin else margin * math.sin(margin)

        def arc(cos):
            value, slope = _shifted(cos, margin)
            keep = cos > threshold
            value = torch.where(keep, value, cos - drop)
            slope = torch.where(keep, slope, torch.ones_like(slope))
            return _with_radial(cos, value, slope)
        return arc
    m1, m2, m3 = margin

    def combined(cos):
        value, slope = _shifted(cos, m2) if m1 == 1 else _multiplied(cos, m1, m2)
        return _with_radial(cos, value - m3, slope)
    return combined


def _is_finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _check_margin(kind: str, m: Margin | None):
    """``(kind, margin)`` validated: the kind's default for None, an int for sphere, a
    triple for combined, a float otherwise."""
    if not isinstance(kind, str) or kind.lower() not in KINDS:
        raise UnsupportedParameterError(f"margin kind must be one of {', '.join(KINDS)}, "
                                        f"got {kind!r}")
    kind = kind.lower()
    m = DEFAULT_MARGINS[kind] if m is None else m
    if kind == "combined":
        values = tuple(m) if isinstance(m, (tuple, list)) else ()
        if len(values) != 3 or not all(_is_finite(v) for v in values):
            raise UnsupportedParameterError(
                f"the combined margin is three finite numbers (m1, m2, m3), got {m!r}")
        return kind, tuple(float(v) for v in values)
    if not _is_finite(m):
        raise UnsupportedParameterError(f"the {kind} margin is one finite number, got {m!r}")
    if kind == "sphere":
        if float(m) not in (1.0, 2.0, 3.0, 4.0):
            raise UnsupportedParameterError(
                f"the sphere margin (A-Softmax's m) is an integer from 1 to 4, got {m!r}")
        return kind, int(m)
    return kind, float(m)


# -- the kernel around it ----------------------------------------------------------------

class _ScaledUnitRows(torch.autograd.Function):
    """``s x / |x|`` row by row (zero rows stay zero), with the projected gradient
    ``s (g - (g . u) u) / |x|`` (zero for a zero row): one pass over ``x`` each way."""

    @staticmethod
    def forward(ctx, x, scale):
        # the norms in the precision the backward kernel takes (float32 for half rows)
        norm_type = torch.promote_types(x.dtype, torch.float32)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=norm_type)
        nonzero = norms > 0
        norms = norms.masked_fill_(~nonzero, 1.0)  # 0 / 1 keeps a zero row zero
        ctx.save_for_backward(x, norms, (nonzero * scale).to(x.dtype))
        return x * (scale / norms).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norms, gain = ctx.saved_tensors
        return through_row_normalization(grad, x, norms, gain), None


def margin_head(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None,
                kind: str = "arc", s: float | None = None, m: Margin | None = None,
                easy_margin: bool = False, lambda_: float = 0.0) -> torch.Tensor:
    r"""Logits of a margin head on a flat ``M x K`` input (the weight rows are normalized
    out of place; see :class:`MarginHead` for the formula).

    Args:
        x: ``M x K`` features.
        weight: ``N x K`` class weights, any row length.
        labels: ``M`` class indices (integers, or floats holding integers), or None for
            the logits without margin.
        kind, s, m, easy_margin, lambda_: as :class:`MarginHead`.

    Returns:
        ``M x N`` logits.
    """
    kind, margin = _check_margin(kind, m)
    scale = _check_scale(kind, s)
    if lambda_ and kind != "sphere":
        raise UnsupportedParameterError(f"lambda_ mixes the plain product into A-Softmax's "
                                        f"label logit; the {kind} head takes none")
    features = x if scale is None else _ScaledUnitRows.apply(x, scale)
    function: int | Callable = 1
    # a zero margin skips the label column: |z| f(cos) would round differently from z . w
    if labels is not None and not _is_zero(kind, margin):
        labels = as_labels(labels).reshape(-1).to(weight.device)
        function = margin if kind == "sphere" else label_margin(kind, margin, easy_margin)
    return _MarginProduct.apply(features, weight, labels, function, float(lambda_), True,
                                False)


def _is_zero(kind: str, margin) -> bool:
    """Whether the margin leaves the label logit as it is (``f(cos) = cos``)."""
    return margin in {"sphere": (1,), "cos": (0.0,), "arc": (0.0,),
                      "combined": ((1.0, 0.0, 0.0),)}[kind]


def _check_scale(kind: str, s: float | None) -> float | None:
    """The scale, or None for a sphere head on raw features (its logits scale with |x|)."""
    if s is None:
        return None if kind == "sphere" else DEFAULT_SCALE
    if not (_is_finite(s) and float(s) > 0):
        raise UnsupportedParameterError(f"the scale s must be a positive number, got {s!r}")
    return float(s)


@register_layer("MarginHead")
class MarginHead(CaffeLayer):
    r"""Margin softmax head: unit-length class weights, features normalized and scaled by
    s, and a margin on the label's logit (A-Softmax, AM-Softmax/CosFace, ArcFace, combined).

    .. math::
        y_{ij} = s \cos\theta_{ij} \ (j \ne l_i), \qquad y_{i l_i} = s\, f(\cos\theta_{i l_i}),
        \qquad \cos\theta_{ij} = \frac{x_i \cdot w_j}{|x_i|\,|w_j|}

    with :math:`f` the kind's margin function (:func:`label_margin`): ``sphere``
    :math:`\psi(\theta) = (-1)^k \cos(m\theta) - 2k`, ``cos`` :math:`\cos\theta - m`,
    ``arc`` :math:`\cos(\theta + m)` (with ArcFace's fallback past :math:`\pi - m`, or
    ``easy_margin``), ``combined`` :math:`\cos(m_1\theta + m_2) - m_3`. A ``sphere`` head
    without ``s`` keeps the feature norm, as SphereFace's ``MarginInnerProduct``:
    :math:`y_{ij} = |x_i| \cos\theta_{ij}`, :math:`y_{il_i} = (|x_i|\psi + \lambda
    |x_i|\cos\theta_{il_i}) / (1 + \lambda)`.

    Args:
        in_features: K, the size of each flattened input row.
        num_classes: N, the number of classes.
        kind: ``"sphere"``, ``"cos"``, ``"arc"`` or ``"combined"``.
        s: the scale of the normalized logits. None means 64 for ``cos``, ``arc`` and
            ``combined``, and raw features (the feature norm as the scale) for ``sphere``.
        m: the margin; None picks the kind's usual value (sphere 4, cos 0.35, arc 0.5,
            combined ``(1.0, 0.3, 0.2)``). ``combined`` takes the triple ``(m1, m2, m3)``.
        easy_margin: ``arc`` only: no margin where :math:`\cos\theta \le 0`, instead of the
            fallback :math:`\cos\theta - m \sin m` past :math:`\theta = \pi - m`.
        lambda\_: ``sphere`` only: the fixed weight of the plain logit mixed into the label
            logit (MarginInnerProduct's lambda; its schedule is that layer's job).
        axis: the first input axis flattened into K (negative counts from the end).

    Shape:
        - x: :math:`(d_0, \ldots, d_{axis-1}, \ldots)`: :math:`M = d_0 \cdots d_{axis-1}`
          rows of K elements.
        - label: M values (any shape), integers in ``[0, N)``; without it (or with
          ``margin=False``) the head gives the logits without margin, for testing.
        - logits: :math:`(d_0, \ldots, d_{axis-1}, N)`.

    Attributes:
        weight: the :math:`N \times K` class weights (Caffe's blob 0), left as they are:
            every forward divides the logits by their row lengths; the gradient is the
            true one, through the normalizations of the weights and of the features.

    Example::

        >>> head = MarginHead(512, 10572, "arc", s=64, m=0.5)
        >>> loss = F.cross_entropy(head(features, labels), labels)
        >>> scores = head(features, margin=False)              # test: s cos(theta_j)

    Caffe: type ``MarginHead`` (ours; no Caffe fork has it) with ``margin_head_param``:
    ``num_output``, ``kind`` (SPHERE, COS, ARC, COMBINED), ``scale`` (unset: the default
    above), ``margin`` (unset: the kind's default), ``m1``/``m2``/``m3`` (combined),
    ``easy_margin``, ``sphere_lambda``, ``weight_filler`` (its type defaults to xavier,
    not Caffe's constant 0, which has no direction to normalize), ``axis``. Bottoms: data
    and, for the margin, the label; one top.
    """

    __constants__: ClassVar[list[str]] = [
        "in_features", "num_classes", "kind", "s", "m", "easy_margin", "lambda_", "axis"]

    def __init__(self, in_features: int, num_classes: int, kind: str = "arc",
                 s: float | None = None, m: Margin | None = None,
                 easy_margin: bool = False, lambda_: float = 0.0, axis: int = 1) -> None:
        super().__init__()
        self.kind, self.m = _check_margin(kind, m)
        self.s = _check_scale(self.kind, s)
        if easy_margin and self.kind != "arc":
            raise UnsupportedParameterError(f"easy_margin is ArcFace's option; the {self.kind}"
                                            " head takes none")
        if lambda_ and self.kind != "sphere":
            raise UnsupportedParameterError(f"lambda_ is A-Softmax's option; the {self.kind} "
                                            "head takes none")
        if not (_is_finite(lambda_) and float(lambda_) > -1):
            raise UnsupportedParameterError(f"lambda_ must be a number above -1, got "
                                            f"{lambda_!r}")
        self.easy_margin = bool(easy_margin)
        self.lambda_ = float(lambda_)
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.axis = int(axis)
        if self.in_features < 1:  # a bottom without values per row: no head to build
            raise UnsupportedParameterError(f"the bottom has {self.in_features} values per "
                                            "row (K); a margin head needs at least one")
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        # Caffe's xavier filler, as MarginInnerProduct; from_caffe applies the prototxt's.
        bound = math.sqrt(3.0 / self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    # -- building --------------------------------------------------------------------------
    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx) -> MarginHead:
        p = param.margin_head_param
        if len(bottom_shapes) not in (1, 2) or len(param.top) != 1:
            raise CaffeFormatError(
                f"layer {param.name!r} (MarginHead) takes one or two bottoms (data, label) "
                f"and one top, got {len(bottom_shapes)} and {len(param.top)}")
        if p.num_output < 1:
            raise UnsupportedParameterError(
                f"layer {param.name!r}: num_output must be positive, got {p.num_output}")
        if p.kind not in range(len(KINDS)):
            raise UnsupportedParameterError(f"layer {param.name!r}: margin kind {p.kind} is "
                                            f"not one of {', '.join(KINDS)}")
        kind = KINDS[p.kind]
        if kind == "combined":
            margin = (p.m1, p.m2, p.m3)
        else:
            margin = p.margin if p.HasField("margin") else None
        shape = tuple(bottom_shapes[0])
        if not -len(shape) <= p.axis < len(shape):
            raise ShapeError(param.name, "MarginHead", bottom_shapes,
                             f"axis {p.axis} must lie in [{-len(shape)}, {len(shape)}) for a "
                             f"{len(shape)}-D bottom")
        layer = cls(count(shape, p.axis % len(shape)), p.num_output, kind,
                    s=p.scale if p.HasField("scale") else None, m=margin,
                    easy_margin=p.easy_margin, lambda_=p.sphere_lambda, axis=p.axis)
        layer.layer_name = param.name
        if ctx.fill:
            # xavier unless told: Caffe's default constant 0 leaves no direction to normalize
            fill(layer.weight, p.weight_filler, ctx.generator, param.name,
                 default_type="xavier")
        return layer

    def output_shapes(self, bottom_shapes):
        return [head_logits_shape(self, bottom_shapes, self.in_features, self.num_classes)]

    def caffe_blobs(self):
        return [self.weight]

    # -- the math --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None,
                margin: bool = True) -> torch.Tensor:
        """The logits; with ``margin=False`` or no label, those without margin
        (``s cos theta_j``, or ``|x| cos theta_j`` for a sphere head on raw features)."""
        shape = tuple(x.shape)
        bottom_shapes = [shape] if label is None else [shape, tuple(label.shape)]
        top_shape = self.output_shapes(bottom_shapes)[0]
        flat = x.reshape(count(top_shape[:-1]), self.in_features)
        labels = None
        if margin and label is not None:
            labels = as_labels(label).reshape(-1).to(self.weight.device)
            check_label_range(self, labels, self.num_classes)
        logits = margin_head(flat, self.weight, labels, self.kind, self.s, self.m,
                             self.easy_margin, self.lambda_)
        return logits.view(top_shape)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"num_classes={self.num_classes}",
                 f"kind={self.kind!r}", f"s={self.s!r}", f"m={self.m!r}"]
        if self.easy_margin:
            parts.append("easy_margin=True")
        if self.lambda_:
            parts.append(f"lambda_={self.lambda_!r}")
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        return ", ".join(parts)
