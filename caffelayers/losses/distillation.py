r"""Distillation from a teacher's logits: Hinton's knowledge distillation and the two
"born-again networks" variants (Furlanello et al., 2018), CWTM and DKPP.

Every function takes the student's and the teacher's logits with the classes on axis 1
(``(N, C)`` or ``(N, C, d1, ...)``); the teacher is read under ``torch.no_grad`` and never
receives a gradient. Nothing is printed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import LabelError, ShapeError, UnsupportedParameterError
from ..layers.base import as_labels

__all__ = ["CWTMLoss", "DKPPLoss", "DistillationLoss", "cwtm_loss", "distillation_loss",
           "dkpp_loss", "permute_non_argmax"]

REDUCTIONS = ("mean", "sum", "none")


class _SoftTargetKL(torch.autograd.Function):
    """``T^2 KL(p_t || softmax(s / T))`` per position, class axis 1, from the teacher's
    log-probabilities; the gradient ``T (softmax(s / T) - p_t)``."""

    @staticmethod
    def forward(ctx, student, teacher_log_prob, temperature):
        log_prob = torch.log_softmax(student if temperature == 1 else student / temperature, 1)
        teacher_prob = teacher_log_prob.exp()
        # p_t (log p_t - log p_s): both logs finite for finite logits, so a p_t that
        # underflows to 0 contributes 0, never 0 * inf
        kl = torch.linalg.vecdot(teacher_prob, teacher_log_prob - log_prob, dim=1)
        ctx.save_for_backward(log_prob, teacher_prob)
        ctx.temperature = temperature
        return kl * temperature ** 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        log_prob, teacher_prob = ctx.saved_tensors
        weight = grad.unsqueeze(1) * ctx.temperature
        return log_prob.exp().sub_(teacher_prob).mul_(weight), None, None


def _check(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.dim() < 2 or tuple(student.shape) != tuple(teacher.shape):
        raise ShapeError(what, what, [tuple(student.shape), tuple(teacher.shape)],
                         "student and teacher logits of the same shape (N, C) or "
                         "(N, C, d1, ...)")


def _check_reduction(reduction: str, what: str) -> None:
    if reduction not in REDUCTIONS:
        raise UnsupportedParameterError(f"{what}: reduction must be one of "
                                        f"{', '.join(REDUCTIONS)}, got {reduction!r}")


def _check_number(value, what: str, name: str, low: float, high: float = math.inf,
                  low_open: bool = True) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and value <= high):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise UnsupportedParameterError(f"{what}: {name} must lie in {bound}, got {value!r}")
    return value


def _labels(labels: torch.Tensor, student: torch.Tensor, what: str) -> torch.Tensor:
    labels = as_labels(labels).to(student.device)
    expected = (student.shape[0],) + tuple(student.shape[2:])
    if labels.numel() != math.prod(expected):
        raise ShapeError(what, what, [tuple(student.shape), tuple(labels.shape)],
                         f"one label per position: shape {expected}")
    labels = labels.reshape(expected)
    classes = student.shape[1]
    bad = (labels < 0) | (labels >= classes)
    if labels.numel() and bool(bad.any()):
        raise LabelError(f"{what}: labels must lie in [0, {classes}), got "
                         f"{labels[bad].unique().tolist()[:10]}")
    return labels


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def _distil(student, teacher_log_prob, temperature, alpha, labels, reduction, what):
    """``alpha T^2 KL + (1 - alpha) CE`` with labels, ``T^2 KL`` without."""
    if labels is None:
        return _reduce(_SoftTargetKL.apply(student, teacher_log_prob, temperature), reduction)
    labels = _labels(labels, student, what)
    hard = F.cross_entropy(student, labels, reduction=reduction)
    if alpha == 0:
        return hard  # cross_entropy itself, bit for bit
    soft = _reduce(_SoftTargetKL.apply(student, teacher_log_prob, temperature), reduction)
    return alpha * soft + (1 - alpha) * hard


def _checked(student_logits, teacher_logits, temperature, alpha, reduction, what: str):
    """The checks every distillation loss makes; returns ``(temperature, alpha)``."""
    _check(student_logits, teacher_logits, what)
    _check_reduction(reduction, what)
    return (_check_number(temperature, what, "temperature", 0.0),
            _check_number(alpha, what, "alpha", 0.0, 1.0, low_open=False))


@torch.no_grad()
def _teacher_log_prob(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(t / T)`` over the classes; the teacher never receives a gradient."""
    teacher = teacher_logits.detach()
    return torch.log_softmax(teacher if temperature == 1 else teacher / temperature, 1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, alpha: float = 0.9,
                      labels: torch.Tensor | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    r"""Hinton's knowledge distillation, with the :math:`T^2` gradient scaling.

    .. math::
        \ell = \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\,
               \mathrm{softmax}(s / T)\big) + (1 - \alpha)\, \mathrm{CE}(s, y)

    per position; the soft term's gradient is :math:`\alpha T (\mathrm{softmax}(s/T) -
    \mathrm{softmax}(t/T))`, whose size does not shrink with :math:`T` (hence the
    :math:`T^2`). Without labels the loss is the soft term alone, :math:`T^2\,\mathrm{KL}`
    (``alpha`` unused). ``alpha = 0`` gives ``cross_entropy(s, y)`` bit for bit.

    Args:
        student_logits: :math:`s`, classes on axis 1.
        teacher_logits: :math:`t`, the same shape; never receives a gradient.
        temperature: :math:`T > 0`.
        alpha: the soft term's weight, in [0, 1].
        labels: :math:`y`, class indices (integers, or floats holding integers), or None.
        reduction: ``"mean"`` over the positions (``N d_1 \cdots``), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(N, C)` or :math:`(N, C, d_1, \ldots)`; labels :math:`(N, d_1,
          \ldots)`.
        - Output: :math:`()`, or :math:`(N, d_1, \ldots)` with ``reduction="none"``.
    """
    what = "distillation_loss"
    temperature, alpha = _checked(student_logits, teacher_logits, temperature, alpha,
                                  reduction, what)
    teacher_log_prob = _teacher_log_prob(teacher_logits, temperature)
    return _distil(student_logits, teacher_log_prob, temperature, alpha, labels, reduction,
                   what)


def cwtm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    r"""Confidence-weighted by teacher max (CWTM, born-again networks): each position's
    cross-entropy to its label weighted by the teacher's top probability.

    .. math::
        \ell = \sum_i \frac{w_i}{\sum_j w_j}\, \mathrm{CE}(s_i, y_i), \qquad
        w_i = \max_c \mathrm{softmax}(t_i)_c

    Args:
        student_logits: :math:`s`, classes on axis 1.
        teacher_logits: :math:`t`, the same shape; never receives a gradient.
        labels: :math:`y`, class indices.
        reduction: ``"mean"`` (the weights normalized over the batch, as above), ``"sum"``
            (:math:`\sum_i w_i\,\mathrm{CE}_i`) or ``"none"`` (:math:`w_i\,\mathrm{CE}_i`).

    Shape:
        - logits: :math:`(N, C)` or :math:`(N, C, d_1, \ldots)`; labels :math:`(N, d_1,
          \ldots)`.
        - Output: :math:`()`, or :math:`(N, d_1, \ldots)` with ``reduction="none"``.
    """
    what = "cwtm_loss"
    _check(student_logits, teacher_logits, what)
    _check_reduction(reduction, what)
    labels = _labels(labels, student_logits, what)
    with torch.no_grad():
        weights = torch.softmax(teacher_logits.detach(), 1).amax(1)
    weighted = F.cross_entropy(student_logits, labels, reduction="none") * weights
    if reduction == "none":
        return weighted
    total = weighted.sum()
    return total if reduction == "sum" else total / weights.sum()


def _random_orders(rows: int, size: int, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """``rows`` independent uniform permutations of ``range(size)``, as a ``rows x size``
    tensor: one ``randperm`` each when there are fewer rows than entries (linear time, 5
    to 8x faster than sorting long rows), random keys sorted row by row otherwise (one
    call for many short rows)."""
    source = generator.device if generator is not None else device
    if rows <= size:
        return torch.stack([torch.randperm(size, generator=generator, device=source)
                            for _ in range(rows)]).to(device)
    keys = torch.rand(rows, size, generator=generator, device=source)
    return keys.argsort(1).to(device)


def permute_non_argmax(values: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``values`` with the entries other than the argmax permuted at random along axis 1,
    independently at every position; the argmax entry stays in place (the first one on
    ties). ``generator`` (any device) seeds the permutations; None uses torch's global
    generator."""
    classes = values.shape[1]
    moved = values.movedim(1, -1)
    flat = moved.reshape(-1, classes)
    rows = flat.shape[0]
    if classes < 3 or rows == 0:
        return values.clone()
    top = flat.argmax(1, keepdim=True)
    # the C - 1 other columns of every row, in order: j, skipping the argmax
    others = torch.arange(classes - 1, device=values.device).expand(rows, -1)
    others = others + (others >= top).long()
    order = _random_orders(rows, classes - 1, generator, values.device)
    permuted = flat.clone()
    permuted.scatter_(1, others, flat.gather(1, others.gather(1, order)))
    return permuted.reshape(moved.shape).movedim(-1, 1)


def dkpp_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 1.0, alpha: float = 0.9,
              labels: torch.Tensor | None = None,
              generator: torch.Generator | None = None,
              reduction: str = "mean") -> torch.Tensor:
    r"""Dark knowledge with permuted predictions (DKPP, born-again networks): Hinton's
    distillation (:func:`distillation_loss`) from the teacher's distribution with its
    non-argmax entries permuted within each position.

    .. math::
        \ell = \alpha\, T^2\, \mathrm{KL}\big(\pi(\mathrm{softmax}(t / T)) \,\|\,
               \mathrm{softmax}(s / T)\big) + (1 - \alpha)\, \mathrm{CE}(s, y)

    with :math:`\pi` a random permutation of the classes other than the teacher's argmax
    (:func:`permute_non_argmax`, drawn from ``generator``), so that the student keeps the
    teacher's confidence in its top class but none of its "dark knowledge" about the
    others. Without labels: :math:`T^2\,\mathrm{KL}` alone.

    Args:
        student_logits, teacher_logits, temperature, alpha, labels, reduction: as
            :func:`distillation_loss`.
        generator: a seeded ``torch.Generator`` for the permutations (torch's global one
            when None).
    """
    what = "dkpp_loss"
    temperature, alpha = _checked(student_logits, teacher_logits, temperature, alpha,
                                  reduction, what)
    with torch.no_grad():
        teacher_log_prob = permute_non_argmax(_teacher_log_prob(teacher_logits, temperature),
                                              generator)
    return _distil(student_logits, teacher_log_prob, temperature, alpha, labels, reduction,
                   what)


class DistillationLoss(nn.Module):
    r"""Hinton's knowledge distillation with the :math:`T^2` scaling: see
    :func:`distillation_loss`.

    .. math::
        \ell = \alpha T^2\, \mathrm{KL}(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T))
               + (1 - \alpha)\, \mathrm{CE}(s, y)

    Args:
        temperature, alpha, reduction: as :func:`distillation_loss`.

    Shape:
        - student, teacher: :math:`(N, C)` or :math:`(N, C, d_1, \ldots)`; labels
          :math:`(N, d_1, \ldots)` or None.
        - Output: :math:`()`, or :math:`(N, d_1, \ldots)` with ``reduction="none"``.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = _check_number(temperature, "DistillationLoss", "temperature", 0.0)
        self.alpha = _check_number(alpha, "DistillationLoss", "alpha", 0.0, 1.0,
                                   low_open=False)
        _check_reduction(reduction, "DistillationLoss")
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits, labels=None):
        return distillation_loss(student_logits, teacher_logits, self.temperature,
                                 self.alpha, labels, self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature!r}, alpha={self.alpha!r}"
                + ("" if self.reduction == "mean" else f", reduction={self.reduction!r}"))


class CWTMLoss(nn.Module):
    r"""Confidence-weighted by teacher max: the label cross-entropy weighted by the
    teacher's top probability, normalized over the batch (see :func:`cwtm_loss`).

    .. math::
        \ell = \sum_i \frac{\max_c p^t_{ic}}{\sum_j \max_c p^t_{jc}}\, \mathrm{CE}(s_i, y_i)

    Args:
        reduction: as :func:`cwtm_loss`.

    Shape:
        - student, teacher: :math:`(N, C)` or :math:`(N, C, d_1, \ldots)`; labels
          :math:`(N, d_1, \ldots)`.
        - Output: :math:`()`, or :math:`(N, d_1, \ldots)` with ``reduction="none"``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction, "CWTMLoss")
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits, labels):
        return cwtm_loss(student_logits, teacher_logits, labels, self.reduction)

    def extra_repr(self) -> str:
        return "" if self.reduction == "mean" else f"reduction={self.reduction!r}"


class DKPPLoss(nn.Module):
    r"""Dark knowledge with permuted predictions: distillation from the teacher's
    distribution with its non-argmax entries permuted (see :func:`dkpp_loss`).

    .. math::
        \ell = \alpha T^2\, \mathrm{KL}(\pi(\mathrm{softmax}(t/T)) \,\|\,
               \mathrm{softmax}(s/T)) + (1 - \alpha)\, \mathrm{CE}(s, y)

    Args:
        temperature, alpha, reduction: as :func:`dkpp_loss`.
        seed: seeds the module's own generator (on the CPU), so that a run repeats; None
            draws from torch's global generator.

    Shape:
        - student, teacher: :math:`(N, C)` or :math:`(N, C, d_1, \ldots)`; labels
          :math:`(N, d_1, \ldots)` or None.
        - Output: :math:`()`, or :math:`(N, d_1, \ldots)` with ``reduction="none"``.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.9,
                 reduction: str = "mean", seed: int | None = None) -> None:
        super().__init__()
        self.temperature = _check_number(temperature, "DKPPLoss", "temperature", 0.0)
        self.alpha = _check_number(alpha, "DKPPLoss", "alpha", 0.0, 1.0, low_open=False)
        _check_reduction(reduction, "DKPPLoss")
        self.reduction = reduction
        self.seed = seed
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def forward(self, student_logits, teacher_logits, labels=None):
        return dkpp_loss(student_logits, teacher_logits, self.temperature, self.alpha, labels,
                         self.generator, self.reduction)

    def extra_repr(self) -> str:
        parts = [f"temperature={self.temperature!r}", f"alpha={self.alpha!r}"]
        if self.reduction != "mean":
            parts.append(f"reduction={self.reduction!r}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return ", ".join(parts)
