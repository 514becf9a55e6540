"""Softmax losses with an information-gain matrix: ``InfogainLoss``, ``SoftmaxWithLoss``.

BVLC Caffe's ``InfogainLoss`` (since PR 3855) takes logits, computes the softmax along
``axis`` and weights the log-probabilities of every class by the row of a cost matrix ``H``
picked by the label::

    L = -1/normalizer * sum_positions sum_l H[label, l] * log p_l

``SoftmaxWithLoss`` is the same loss with ``H`` the identity, which is computed here without
building a ``C x C`` identity. ``InfogainLossLegacy`` is the pre-2017 layer that takes
probabilities instead of logits.

Two modes:

* ``"caffe"`` reproduces Caffe's numbers: ``log(max(p, floor))`` in the forward
  (``1e-20`` for InfogainLoss, ``FLT_MIN`` for SoftmaxWithLoss, which is why a diverged
  SphereFace run prints ``87.3365 = -ln(FLT_MIN)``), and Caffe's backward
  ``p * rowsum(H)[label] - H[label, :]``, which ignores the floor.
* ``"exact"`` uses ``log_softmax`` (finite for any finite logits) and its true gradient,
  which is the same formula; ``H`` may require grad (learned cost matrices).

No ``N x C x C`` intermediate is built: the label rows of ``H`` are gathered, one row per
position, the size of the logits.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..errors import (CaffeFormatError, LabelError, ShapeError,
                      UnsupportedParameterError)
from ..proto.io import read_binaryproto
from ..layers.base import BuildContext, CaffeLayer, as_labels, count
from ..registry import register_layer
from .common import (FLT_MIN, LOSS_MODES, NORMALIZATIONS, normalization_from_caffe,
                     normalizer)

__all__ = [
    "softmax_infogain_loss", "softmax_loss", "infogain_loss_legacy",
    "SoftmaxWithInfogainLoss", "SoftmaxWithLoss", "InfogainLossLegacy",
]

#: Caffe's ``kLOG_THRESHOLD``: InfogainLoss takes ``log(max(p, 1e-20))``.
INFOGAIN_LOG_FLOOR = 1e-20

CostMatrix = Union[torch.Tensor, np.ndarray, str, os.PathLike]


# -- argument checks ---------------------------------------------------------------------

def _check_mode(mode: str) -> str:
    if mode not in LOSS_MODES:
        raise UnsupportedParameterError(f"loss mode must be one of {', '.join(LOSS_MODES)}, "
                                        f"got {mode!r}")
    return mode


def _check_normalization(normalization: str) -> str:
    if not isinstance(normalization, str) or normalization.upper() not in NORMALIZATIONS:
        raise UnsupportedParameterError(
            f"normalization must be one of {', '.join(n.lower() for n in NORMALIZATIONS)}, "
            f"got {normalization!r}")
    return normalization.lower()


def _as_tensor(H: CostMatrix) -> torch.Tensor:
    """``H`` given as a tensor, an array or a ``.binaryproto`` path, as a tensor."""
    if isinstance(H, torch.Tensor):
        return H
    if isinstance(H, (str, os.PathLike)):
        H = read_binaryproto(H)
    return torch.from_numpy(np.array(H))


def _cost_matrix(H: CostMatrix, classes: int, like: torch.Tensor, shapes, layer: str,
                 layer_type: str) -> torch.Tensor:
    """``H`` as a ``C x C`` tensor on the logits' device and dtype (Caffe checks the count only)."""
    H = _as_tensor(H)
    if H.numel() != classes * classes:
        raise ShapeError(layer, layer_type, list(shapes) + [tuple(H.shape)],
                         f"H must have C x C = {classes} x {classes} elements for C = "
                         f"{classes} classes, got {H.numel()}")
    return H.reshape(classes, classes).to(dtype=like.dtype, device=like.device)


def _is_tracing() -> bool:
    """Whether torch.export or torch.compile is tracing: no Python branch on tensor values
    then; the checks become graph assertions and the fast paths give way to the general
    ones (same values)."""
    return torch.compiler.is_compiling()


def _labels_and_mask(labels: torch.Tensor, classes: int, ignore_label: Optional[int],
                     layer: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Labels as indices with ignored positions moved to class 0, and the mask of kept ones.

    The mask is None when nothing is ignored, so that the common case skips the masking.
    A label outside ``[0, C)`` is an error (Caffe only checks it in debug builds): a
    :class:`LabelError` eagerly; when traced (torch.export), an assertion in the graph that
    raises a ``RuntimeError`` with the same message when the program runs, and the mask is
    kept whenever there is an ignore label (all ones when nothing is ignored).
    """
    keep = None
    if ignore_label is not None:
        keep = labels != ignore_label
        labels = labels.masked_fill(~keep, 0)
    outside = "" if ignore_label is None else f" that are not the ignore_label {ignore_label}"
    if _is_tracing():
        valid = ((labels >= 0) & (labels < classes)).all()
        torch._assert_async(valid, f"layer {layer!r}: label(s) outside [0, {classes})"
                                   f"{outside}")
        return labels, keep
    if keep is not None and bool(keep.all()):
        keep = None
    if labels.numel():
        lowest, highest = torch.aminmax(labels)
        if lowest.item() < 0 or highest.item() >= classes:
            bad = labels[(labels < 0) | (labels >= classes)]
            raise LabelError(f"layer {layer!r}: {bad.numel()} label(s) outside [0, {classes})"
                             f" (first: {int(bad[0])}){outside}")
    return labels, keep


# -- the shared autograd function --------------------------------------------------------

def _label_rows(H: torch.Tensor, labels: torch.Tensor,
                keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``H[label, :]`` for every position, laid out like the logits (``C`` on dim 1).

    One gather, no ``C x C`` block per position: rows are picked directly for ``(N,)``
    labels; for ``(outer, inner)`` labels ``H^T`` and the labels are broadcast (stride 0,
    nothing copied) so that ``gather`` writes ``(outer, C, inner)`` straight away. Ignored
    positions get zero rows.
    """
    if labels.dim() == 1:
        rows = H.index_select(0, labels)
    else:
        (outer, inner), classes = labels.shape, H.shape[0]
        rows = torch.gather(H.t().expand(outer, classes, classes), 2,
                            labels.unsqueeze(1).expand(outer, classes, inner))
    if keep is not None:
        rows.mul_(keep.unsqueeze(1))
    return rows


class _SoftmaxInfogain(torch.autograd.Function):
    """Softmax + infogain loss over dim 1 of logits ``(N, C)`` or ``(outer, C, inner)``
    (2-D when there is one position per sample: PyTorch's last-dimension softmax kernels
    are much faster), with the closed-form gradient.

    ``H`` None means the identity (SoftmaxWithLoss). ``log_floor`` None is the exact mode;
    a number is Caffe's mode, whose ``log(max(p, floor))`` equals
    ``max(log_softmax, log(floor))``. In both modes the logits' gradient is
    ``(p * rowsum(H)[label] - H[label, :]) * grad / normalizer`` with the unfloored ``p``:
    Caffe's formula, and the true derivative of the exact loss.

    On the CPU the first backward writes the logits' gradient over the forward's gathered
    label rows instead of a new ``N x C`` tensor, which would cost more than the arithmetic
    (the system hands it out as fresh pages to fault in); a later backward of the same
    forward (``retain_graph``, gradcheck) gathers the rows again.
    """

    @staticmethod
    def forward(ctx, logits, H, labels, keep, norm, log_floor):
        log_prob = torch.log_softmax(logits, dim=1)
        rows = None
        if H is None:
            picked = log_prob.gather(1, labels.unsqueeze(1))
            if log_floor is not None:
                picked.clamp_(min=log_floor)
            if keep is not None:
                picked.mul_(keep.unsqueeze(1))
            total = picked.sum()
        else:
            rows = _label_rows(H, labels, keep)
            # a traced graph cannot branch on values: it floors every entry
            floor_all = log_floor is not None and _is_tracing()
            floored = log_prob.clamp(min=log_floor) if floor_all else log_prob
            total = torch.dot(rows.view(-1), floored.view(-1))
            if (log_floor is not None and not floor_all and log_prob.numel()
                    and bool(log_prob.min() < log_floor)):
                # add back what the floor saves; saturated entries are rare, so index them
                low = log_prob < log_floor
                total = total + torch.dot(rows[low], log_floor - log_prob[low])
        ctx.log_floor, ctx.norm = log_floor, norm
        # an intermediate the first backward consumes: kept on ctx, not saved (saving would
        # forbid writing over it)
        ctx.rows = rows
        ctx.save_for_backward(log_prob, H, labels, keep)
        return (0.0 - total) / norm  # +0, not -0, when nothing counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        log_prob, H, labels, keep = ctx.saved_tensors
        rows, ctx.rows = ctx.rows, None
        if rows is None and H is not None:   # a second backward of one forward
            rows = _label_rows(H, labels, keep)
        scale = grad_loss / ctx.norm
        grad_logits = grad_H = None
        if ctx.needs_input_grad[0] and H is None:
            # p * scale at kept positions, minus scale at the label
            weight = scale.expand(labels.shape) if keep is None else keep * scale
            weight = weight.unsqueeze(1)
            grad_logits = log_prob.exp().mul_(weight)
            grad_logits.scatter_add_(1, labels.unsqueeze(1), -weight)
        elif ctx.needs_input_grad[0]:
            # PyTorch's fused log-softmax backward gives rows - p * rows.sum(1), where
            # rows.sum(1) = rowsum(H)[label] (0 at ignored positions): one pass. On the CPU
            # it is written over rows (its kernel sums a row before it writes the row; the
            # Caffe fixtures check it), elsewhere into a new tensor
            out = rows if rows.device.type == "cpu" else torch.empty_like(rows)
            grad_logits = torch._log_softmax_backward_data(rows, log_prob, 1, log_prob.dtype,
                                                           out=out)
            grad_logits.mul_(-scale)
        if H is not None and ctx.needs_input_grad[1]:
            # dL/dH[k, :] = -scale * (sum of log p over the kept positions labelled k)
            if ctx.log_floor is not None:
                log_prob = log_prob.clamp(min=ctx.log_floor)
            if log_prob.dim() == 3:
                log_prob = log_prob.transpose(1, 2).reshape(-1, H.shape[0])
            if keep is not None:
                log_prob = log_prob * keep.reshape(-1, 1)
            grad_H = torch.zeros_like(H).index_add_(0, labels.reshape(-1), log_prob)
            grad_H.mul_(-scale)
        return grad_logits, grad_H, None, None, None, None


# -- functional forms --------------------------------------------------------------------

def _softmax_loss(logits: torch.Tensor, labels: torch.Tensor, H: Optional[CostMatrix], *,
                  axis: int, normalization: str, ignore_label: Optional[int], mode: str,
                  floor: float, return_prob: bool, layer: str, layer_type: str):
    """What :func:`softmax_infogain_loss` and :func:`softmax_loss` share (``H`` None: identity)."""
    _check_mode(mode)
    normalization = _check_normalization(normalization)
    shapes = [tuple(logits.shape), tuple(labels.shape)]
    if not -logits.dim() <= axis < logits.dim():
        raise ShapeError(layer, layer_type, shapes, f"axis {axis} must lie in "
                         f"[{-logits.dim()}, {logits.dim()}) for a {logits.dim()}-D bottom")
    axis = axis % logits.dim()
    outer, classes = count(logits.shape, 0, axis), logits.shape[axis]
    inner = count(logits.shape, axis + 1)
    if labels.numel() != outer * inner:
        raise ShapeError(layer, layer_type, shapes,
                         f"one label per position: {outer * inner} labels (the logits' count "
                         f"without axis {axis}), got {labels.numel()}")
    if H is not None:
        H = _cost_matrix(H, classes, logits, shapes, layer, layer_type)
    positions = (outer,) if inner == 1 else (outer, inner)
    indices, keep = _labels_and_mask(as_labels(labels).reshape(positions), classes,
                                     ignore_label, layer)
    norm = normalizer(normalization, outer, inner, None if keep is None else keep.sum(),
                      ignore_label is not None)
    if isinstance(norm, torch.Tensor):
        norm = norm.to(logits.dtype)  # a float64 count would promote the 0-d loss
    # contiguous: the kernels below walk the logits and the gathered rows in one order
    flat = logits.reshape(positions[:1] + (classes,) + positions[1:]).contiguous()
    loss = _SoftmaxInfogain.apply(flat, H, indices, keep, norm,
                                  None if mode == "exact" else math.log(floor))
    if not return_prob:
        return loss
    # Caffe's backward ignores the probability top's diff; the exact mode differentiates it
    prob = torch.softmax(logits if mode == "exact" else logits.detach(), dim=axis)
    return loss, prob


def softmax_infogain_loss(logits: torch.Tensor, labels: torch.Tensor, H: CostMatrix,
                          axis: int = 1, normalization: str = "valid",
                          ignore_label: Optional[int] = None, mode: str = "exact",
                          return_prob: bool = False):
    r"""Infogain loss on logits, :math:`-\frac{1}{n}\sum_i \sum_l H_{y_i l} \log p_{il}`
    with :math:`p_i = \mathrm{softmax}(x_i)`.

    Args:
        logits: scores, classes along ``axis``; every other axis indexes positions.
        labels: one class index per position (integers, possibly stored as floats), any
            shape with ``outer * inner`` elements.
        H: the ``C x C`` cost matrix (any shape with ``C * C`` elements): a tensor (which
            may require grad), a numpy array or the path of a ``.binaryproto`` file.
        axis: the class axis (negative counts from the end).
        normalization: ``"full"`` (all positions), ``"valid"`` (positions not ignored),
            ``"batch_size"`` (the product of the axes before ``axis``) or ``"none"``; the
            divisor is floored at 1.
        ignore_label: positions with this label add nothing to the loss or the gradient.
        mode: ``"exact"`` (log-softmax, true gradient) or ``"caffe"`` (Caffe's
            ``log(max(p, 1e-20))`` and its gradient, which ignores the floor).
        return_prob: also return the softmax probabilities.

    Returns:
        The loss as a 0-d tensor, or ``(loss, prob)`` with ``prob`` shaped like ``logits``.

    Raises:
        ShapeError: wrong label count or ``H`` size; LabelError: a label outside
        ``[0, C)`` that is not ``ignore_label``.
    """
    return _softmax_loss(logits, labels, H, axis=axis, normalization=normalization,
                         ignore_label=ignore_label, mode=mode, floor=INFOGAIN_LOG_FLOOR,
                         return_prob=return_prob, layer="softmax_infogain_loss",
                         layer_type="InfogainLoss")


def softmax_loss(logits: torch.Tensor, labels: torch.Tensor, axis: int = 1,
                 normalization: str = "valid", ignore_label: Optional[int] = None,
                 mode: str = "exact", return_prob: bool = False):
    r"""Caffe's SoftmaxWithLoss: :math:`-\frac{1}{n}\sum_i \log\mathrm{softmax}(x_i)_{y_i}`.

    :func:`softmax_infogain_loss` with ``H`` the identity (never built). Arguments as there;
    ``mode="caffe"`` floors the probability at ``FLT_MIN``, so a position whose label has
    probability 0 costs ``-ln(FLT_MIN) = 87.3365``.
    """
    return _softmax_loss(logits, labels, None, axis=axis, normalization=normalization,
                         ignore_label=ignore_label, mode=mode, floor=FLT_MIN,
                         return_prob=return_prob, layer="softmax_loss",
                         layer_type="SoftmaxWithLoss")


class _LegacyInfogain(torch.autograd.Function):
    """Caffe's pre-2017 InfogainLoss on ``(N, C)`` probabilities, with Caffe's gradient
    ``-H[label, j] / max(p_j, floor)``, which (unlike the derivative of the floored log)
    does not vanish below the floor."""

    @staticmethod
    def forward(ctx, prob, H, labels):
        floored = prob.clamp(min=INFOGAIN_LOG_FLOOR)
        rows = H.index_select(0, labels)
        ctx.save_for_backward(floored, H, labels)
        return -torch.dot(rows.reshape(-1), floored.log().reshape(-1)) / prob.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        floored, H, labels = ctx.saved_tensors
        scale = grad_loss / floored.shape[0]
        grad_prob = grad_H = None
        if ctx.needs_input_grad[0]:
            grad_prob = H.index_select(0, labels).div_(floored).mul_(-scale)
        if ctx.needs_input_grad[1]:
            grad_H = torch.zeros_like(H).index_add_(0, labels, floored.log()).mul_(-scale)
        return grad_prob, grad_H, None


def _legacy_loss(prob, labels, H, mode, layer, layer_type):
    """:func:`infogain_loss_legacy`, with the layer named in errors."""
    _check_mode(mode)
    shapes = [tuple(prob.shape), tuple(labels.shape)]
    num = prob.shape[0] if prob.dim() else 1
    classes = prob.numel() // max(num, 1)
    if labels.numel() != num:
        raise ShapeError(layer, layer_type, shapes, f"one label per sample: {num} labels, "
                         f"got {labels.numel()}")
    H = _cost_matrix(H, classes, prob, shapes, layer, layer_type)
    indices, _ = _labels_and_mask(as_labels(labels).reshape(-1), classes, None, layer)
    prob = prob.reshape(num, classes)
    if mode == "caffe":
        return _LegacyInfogain.apply(prob, H, indices)
    log_prob = prob.clamp(min=INFOGAIN_LOG_FLOOR).log()
    return -(H.index_select(0, indices) * log_prob).sum() / num


def infogain_loss_legacy(prob: torch.Tensor, labels: torch.Tensor, H: CostMatrix,
                         mode: str = "exact") -> torch.Tensor:
    r"""Caffe's InfogainLoss before 2017, on probabilities:
    :math:`-\frac{1}{N}\sum_i \sum_j H_{y_i j}\log\max(p_{ij}, 10^{-20})`.

    Args:
        prob: probabilities ``N x ...``, flattened to ``N x C`` with ``C = count / N``.
        labels: ``N`` class indices.
        H: the ``C x C`` cost matrix (tensor, numpy array or ``.binaryproto`` path).
        mode: ``"caffe"`` gives Caffe's gradient ``-H[label, j] / max(p_j, 1e-20)``;
            ``"exact"`` the derivative of the floored loss (0 below the floor).
    """
    return _legacy_loss(prob, labels, H, mode, "infogain_loss_legacy", "InfogainLossLegacy")


# -- layer modules -----------------------------------------------------------------------

def _loss_settings(param) -> Tuple[Optional[object], Optional[int]]:
    """``loss_param`` (None when absent) and its ignore label (None when not set)."""
    loss_param = param.loss_param if param.HasField("loss_param") else None
    ignore = (loss_param.ignore_label
              if loss_param is not None and loss_param.HasField("ignore_label") else None)
    return loss_param, ignore


def _check_top_count(param, most: int) -> None:
    if len(param.top) > most:
        raise CaffeFormatError(f"layer {param.name!r} ({param.type}) has {len(param.top)} "
                               f"tops, at most {most} are allowed")


def _stored_infogain(param, bottom_shapes, ctx):
    """H from ``infogain_loss_param.source`` when no third bottom gives it, else None."""
    if len(bottom_shapes) >= 3:
        return None
    source = param.infogain_loss_param.source
    if not source:
        raise CaffeFormatError(f"layer {param.name!r} ({param.type}): the infogain matrix "
                               f"needs a third bottom or infogain_loss_param.source")
    return _resolve_source(source, ctx, param)


def _resolve_source(source: str, ctx: BuildContext, param) -> Path:
    """Caffe opens ``source`` from the working directory; failing that, the prototxt's."""
    path = Path(source)
    if path.is_file() or path.is_absolute() or ctx.source_dir is None:
        candidates = [path]
    else:
        candidates = [path, Path(ctx.source_dir) / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CaffeFormatError(f"layer {param.name!r} ({param.type}): infogain_loss_param.source "
                           f"not found (looked in: {', '.join(map(str, candidates))})",
                           path=source)


class _SoftmaxLossLayer(CaffeLayer):
    """What SoftmaxWithLoss and InfogainLoss share: settings, shape rule, forward."""

    is_loss = True
    __constants__ = ["axis", "normalization", "ignore_label", "mode", "return_prob"]
    _floor: float

    def __init__(self, axis: int = 1, normalization: str = "valid",
                 ignore_label: Optional[int] = None, mode: str = "exact",
                 return_prob: bool = False):
        super().__init__()
        self.axis = axis
        self.normalization = _check_normalization(normalization)
        self.ignore_label = ignore_label
        self.mode = _check_mode(mode)
        self.return_prob = return_prob

    def _check_shapes(self, bottom_shapes: Sequence[Tuple[int, ...]]) -> Tuple[int, ...]:
        logits, labels = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        axis = self.canonical_axis(self.axis, len(logits), bottom_shapes)
        positions = count(logits, 0, axis) * count(logits, axis + 1)
        if count(labels) != positions:
            raise self.shape_error(bottom_shapes, f"one label per position: {positions} "
                                   f"labels (the logits' count without axis {axis}), got "
                                   f"{count(labels)}")
        return logits

    def output_shapes(self, bottom_shapes):
        if len(bottom_shapes) != 2:
            raise self.shape_error(bottom_shapes, "2 bottoms (logits, labels)")
        logits = self._check_shapes(bottom_shapes)
        return [()] + ([logits] if self.return_prob else [])

    def _loss(self, logits, labels, H):
        return _softmax_loss(logits, labels, H, axis=self.axis,
                             normalization=self.normalization, ignore_label=self.ignore_label,
                             mode=self.mode, floor=self._floor, return_prob=self.return_prob,
                             layer=self.layer_name, layer_type=self.caffe_type)

    def extra_repr(self) -> str:
        parts = []
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        if self.normalization != "valid":
            parts.append(f"normalization={self.normalization!r}")
        if self.ignore_label is not None:
            parts.append(f"ignore_label={self.ignore_label}")
        if self.mode != "exact":
            parts.append(f"mode={self.mode!r}")
        if self.return_prob:
            parts.append("return_prob=True")
        return ", ".join(parts)


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLoss(_SoftmaxLossLayer):
    r"""Softmax cross-entropy: :math:`-\frac{1}{n}\sum_i \log\mathrm{softmax}(x_i)_{y_i}`.

    The infogain loss with an identity ``H`` (see :func:`softmax_loss`), never built.

    Args:
        axis: the class axis; every other axis indexes positions.
        normalization: ``"full"``, ``"valid"``, ``"batch_size"`` or ``"none"``.
        ignore_label: label of positions left out of the loss and the gradient.
        mode: ``"exact"`` or ``"caffe"`` (``log(max(p, FLT_MIN))``).
        return_prob: also return the softmax as a second top.

    Shape:
        - Input: logits ``(d_0, ..., C, ..., d_k)`` with ``C`` at ``axis``; labels with
          ``d_0 * ... * d_k`` elements (``C`` excluded).
        - Output: a 0-d loss, and the probabilities shaped like the logits.

    Caffe:
        ``softmax_param.axis`` -> ``axis``; ``loss_param.normalization`` (or the legacy
        ``normalize``: true is VALID, false BATCH_SIZE) and ``ignore_label``; a second top
        -> ``return_prob``. Net passes ``loss_mode`` (default ``"caffe"``). A loss of
        87.3365 is ``-ln(FLT_MIN)``: the label's probability underflowed to 0.
    """

    _floor = FLT_MIN

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "SoftmaxWithLoss":
        _check_top_count(param, 2)
        loss_param, ignore = _loss_settings(param)
        return cls(axis=param.softmax_param.axis,
                   normalization=normalization_from_caffe(loss_param).lower(),
                   ignore_label=ignore, mode=ctx.options.get("loss_mode", "caffe"),
                   return_prob=len(param.top) == 2)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        return self._loss(logits, labels, None)


@register_layer("InfogainLoss")
class SoftmaxWithInfogainLoss(_SoftmaxLossLayer):
    r"""Infogain loss on logits, :math:`-\frac{1}{n}\sum_i \sum_l H_{y_i l} \log p_{il}`
    with :math:`p_i = \mathrm{softmax}(x_i)`.

    Mistakes are weighted by a label-similarity matrix ``H`` (see
    :func:`softmax_infogain_loss`).

    Args:
        H: the ``C x C`` cost matrix (tensor, numpy array or ``.binaryproto`` path), or
            None when it comes as a third bottom. An ``nn.Parameter`` is learned (exact
            mode); anything else is stored as the buffer ``infogain``.
        axis: the class axis; every other axis indexes positions.
        normalization: ``"full"``, ``"valid"``, ``"batch_size"`` or ``"none"``.
        ignore_label: label of positions left out of the loss and the gradient.
        mode: ``"exact"`` or ``"caffe"`` (``log(max(p, 1e-20))``, Caffe's gradient).
        return_prob: also return the softmax as a second top.

    Shape:
        - Input: logits ``(d_0, ..., C, ..., d_k)`` with ``C`` at ``axis``; labels with
          ``d_0 * ... * d_k`` elements; optionally ``H`` with ``C * C`` elements.
        - Output: a 0-d loss, and the probabilities shaped like the logits.

    Attributes:
        infogain: the cost matrix given at construction (None with three bottoms).

    Caffe:
        Layer type ``InfogainLoss`` (BVLC since PR 3855, softmax inside).
        ``infogain_loss_param.axis`` -> ``axis``; ``infogain_loss_param.source`` -> ``H``
        (read from the working directory, else the prototxt's directory) unless ``H`` is
        the third bottom, which wins; ``loss_param.normalization`` and ``ignore_label``
        (the deprecated ``normalize`` is refused, as Caffe does). Caffe floors
        probabilities at 1e-20, so very confident wrong predictions saturate at
        ``46.05 * H[label, l]``, and its gradient ``p * rowsum(H)[label] - H[label, :]``
        ignores that floor. It never backpropagates to ``H``.
    """

    _floor = INFOGAIN_LOG_FLOOR

    def __init__(self, H: Optional[CostMatrix] = None, axis: int = 1,
                 normalization: str = "valid", ignore_label: Optional[int] = None,
                 mode: str = "exact", return_prob: bool = False):
        super().__init__(axis, normalization, ignore_label, mode, return_prob)
        if isinstance(H, torch.nn.Parameter):
            self.infogain = H
        else:
            self.register_buffer("infogain", None if H is None else _as_tensor(H))

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "SoftmaxWithInfogainLoss":
        _check_top_count(param, 2)
        loss_param, ignore = _loss_settings(param)
        if loss_param is not None and loss_param.HasField("normalize"):
            raise UnsupportedParameterError(
                f"layer {param.name!r} (InfogainLoss): loss_param.normalize is deprecated "
                f"and Caffe refuses it here; use loss_param.normalization")
        return cls(H=_stored_infogain(param, bottom_shapes, ctx), axis=param.infogain_loss_param.axis,
                   normalization=normalization_from_caffe(loss_param).lower(),
                   ignore_label=ignore, mode=ctx.options.get("loss_mode", "caffe"),
                   return_prob=len(param.top) == 2)

    def output_shapes(self, bottom_shapes):
        if len(bottom_shapes) not in (2, 3):
            raise self.shape_error(bottom_shapes, "2 or 3 bottoms (logits, labels, H)")
        if len(bottom_shapes) == 2 and self.infogain is None:
            raise self.shape_error(bottom_shapes, "a third bottom H (no matrix was given)")
        logits = self._check_shapes(bottom_shapes)
        classes = logits[self.axis % len(logits)]
        H_size = count(bottom_shapes[2]) if len(bottom_shapes) == 3 else self.infogain.numel()
        if H_size != classes * classes:
            raise self.shape_error(bottom_shapes, f"H must have C x C = {classes} x {classes} "
                                   f"elements, got {H_size}")
        return [()] + ([logits] if self.return_prob else [])

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                H: Optional[torch.Tensor] = None):
        if H is None:
            H = self.infogain
            if H is None:
                raise self.shape_error([tuple(logits.shape), tuple(labels.shape)],
                                       "a third bottom H (no matrix was given)")
        return self._loss(logits, labels, H)

    def extra_repr(self) -> str:
        matrix = "" if self.infogain is None else "H=" + "x".join(map(str, self.infogain.shape))
        return ", ".join(part for part in (matrix, super().extra_repr()) if part)


@register_layer("InfogainLossLegacy")
class InfogainLossLegacy(CaffeLayer):
    r"""Caffe's InfogainLoss before 2017, on probabilities (see :func:`infogain_loss_legacy`).

    :math:`-\frac{1}{N}\sum_i \sum_j H_{y_i j}\log\max(p_{ij}, 10^{-20})`

    Args:
        H: the ``C x C`` cost matrix (tensor, numpy array or ``.binaryproto`` path), or
            None when it comes as a third bottom.
        mode: ``"caffe"`` (gradient ``-H[label, j] / max(p_j, 1e-20)``) or ``"exact"``.

    Shape:
        - Input: probabilities ``(N, ...)`` with ``C = count / N`` per sample; ``N`` labels.
        - Output: a 0-d loss.

    Caffe:
        Register old nets' ``InfogainLoss`` layers (fed by a ``Softmax``) under this type to
        reproduce them. ``infogain_loss_param.source`` -> ``H``; the loss is always divided
        by ``N`` (no ``loss_param`` then). Caffe required ``H`` shaped ``1 x 1 x C x C``;
        any shape with ``C * C`` elements is accepted here.
    """

    is_loss = True
    __constants__ = ["mode"]

    def __init__(self, H: Optional[CostMatrix] = None, mode: str = "exact"):
        super().__init__()
        self.mode = _check_mode(mode)
        self.register_buffer("infogain", None if H is None else _as_tensor(H))

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx: BuildContext) -> "InfogainLossLegacy":
        _check_top_count(param, 1)
        return cls(H=_stored_infogain(param, bottom_shapes, ctx), mode=ctx.options.get("loss_mode", "caffe"))

    def output_shapes(self, bottom_shapes):
        if len(bottom_shapes) not in (2, 3) or (len(bottom_shapes) == 2 and self.infogain is None):
            raise self.shape_error(bottom_shapes, "bottoms (prob, labels, H), or (prob, "
                                   "labels) with a matrix given at construction")
        prob = tuple(bottom_shapes[0])
        num = prob[0] if prob else 1
        classes = count(prob) // max(num, 1)
        if count(bottom_shapes[1]) != num:
            raise self.shape_error(bottom_shapes, f"one label per sample: {num} labels")
        H_size = count(bottom_shapes[2]) if len(bottom_shapes) == 3 else self.infogain.numel()
        if H_size != classes * classes:
            raise self.shape_error(bottom_shapes, f"H must have C x C = {classes} x {classes} "
                                   f"elements, got {H_size}")
        return [()]

    def forward(self, prob: torch.Tensor, labels: torch.Tensor,
                H: Optional[torch.Tensor] = None):
        H = self.infogain if H is None else H
        if H is None:
            raise self.shape_error([tuple(prob.shape), tuple(labels.shape)],
                                   "a third bottom H (no matrix was given)")
        return _legacy_loss(prob, labels, H, self.mode, self.layer_name, self.caffe_type)

    def extra_repr(self) -> str:
        return "" if self.mode == "exact" else f"mode={self.mode!r}"
