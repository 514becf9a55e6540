"""Caffe's simple loss layers: SigmoidCrossEntropyLoss, EuclideanLoss, MultinomialLogisticLoss,
HingeLoss and ContrastiveLoss.

Each returns the loss as a 0-d tensor; ``loss_weight`` and ``propagate_down`` are applied by
the net. Labels and targets never receive a gradient (Caffe refuses to backpropagate to
them). Several of these layers size themselves with Caffe's legacy ``num``/``channels``/
``height``/``width`` accessors, which reject blobs of more than 4 axes; so do we.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedParameterError
from ..layers.base import BuildContext, CaffeLayer, Shape, as_labels, check_label_range, count
from ..registry import register_layer
from .common import NORMALIZATIONS, normalization_from_caffe, normalizer

#: Caffe's ``kLOG_THRESHOLD``: probabilities are floored here before the log.
LOG_THRESHOLD = 1e-20
#: ContrastiveLoss's backward divides by ``distance + 1e-4`` (not by the distance).
CONTRASTIVE_DISTANCE_EPS = 1e-4


def _legacy_shape(shape: Sequence[int]) -> Shape:
    """num, channels, height, width of a blob of at most 4 axes (1 where an axis is absent)."""
    return tuple(shape) + (1,) * (4 - len(shape))


class _Loss(CaffeLayer):
    """Shared checks of Caffe's ``LossLayer``: the bottoms' batch sizes agree, one scalar top."""

    is_loss = True
    #: bottoms read through the legacy 4-axis accessors (checked to have at most 4 axes).
    legacy_bottoms: Sequence[int] = ()

    def _check_bottoms(self, bottom_shapes: Sequence[Shape], number: int = 2) -> None:
        if len(bottom_shapes) != number:
            raise self.shape_error(bottom_shapes, f"{number} bottoms")
        if any(len(s) == 0 for s in bottom_shapes[:2]):
            raise self.shape_error(bottom_shapes, "bottoms of 1 axis or more (axis 0 is the "
                                   "batch)")
        if bottom_shapes[0][0] != bottom_shapes[1][0]:
            raise self.shape_error(bottom_shapes, "the same first dimension (batch size) for "
                                   "the data and the label")
        for index in self.legacy_bottoms:
            if len(bottom_shapes[index]) > 4:
                raise self.shape_error(bottom_shapes, f"bottom {index} of at most 4 axes "
                                       "(Caffe reads it through num/channels/height/width)")



@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(_Loss):
    r"""Cross-entropy between targets and the sigmoid of the logits, computed stably.

    .. math::
        \ell = \frac{1}{D} \sum_i \big[\max(x_i, 0) - x_i t_i + \log(1 + e^{-|x_i|})\big]

    summed over the positions whose target is not ``ignore_label``; the gradient is
    :math:`(\sigma(x_i) - t_i) / D`.

    Args:
        normalization: the divisor :math:`D`: ``"FULL"`` (every position), ``"VALID"``
            (positions not ignored), ``"BATCH_SIZE"`` (:math:`N`) or ``"NONE"`` (1);
            never below 1.
        ignore_label: positions whose target truncates to this integer add nothing, or None.

    Shape:
        - Logits: :math:`(N, *)`.
        - Targets: the same number of elements, first dimension :math:`N`, values in [0, 1].
        - Output: :math:`()`.

    Caffe: ``loss_param { normalization normalize ignore_label }``. In Caffe 1.0 this layer's
    default is **BATCH_SIZE**, not VALID as for SoftmaxWithLoss (``normalize: true`` still
    means VALID). The ignore test truncates the target (``static_cast<int>``), so with
    ``ignore_label: 0`` a target of 0.7 is ignored too.
    """

    __constants__ = ["normalization", "ignore_label"]

    def __init__(self, normalization: str = "BATCH_SIZE", ignore_label: Optional[int] = None):
        super().__init__()
        normalization = normalization.upper()
        if normalization not in NORMALIZATIONS:
            raise UnsupportedParameterError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, got "
                f"{normalization!r}")
        self.normalization = normalization
        self.ignore_label = None if ignore_label is None else int(ignore_label)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape],
                   ctx: BuildContext) -> "SigmoidCrossEntropyLoss":
        p = param.loss_param
        if p.HasField("normalization") or p.HasField("normalize"):
            mode = normalization_from_caffe(p)
        else:
            mode = "BATCH_SIZE"  # Caffe 1.0's historical default for this layer
        ignore = p.ignore_label if p.HasField("ignore_label") else None
        return cls(mode, ignore)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_bottoms(bottom_shapes)
        if count(bottom_shapes[0]) != count(bottom_shapes[1]):
            raise self.shape_error(bottom_shapes, "logits and targets with the same count")
        return [()]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(logits.shape), tuple(target.shape)])
        target = target.detach().reshape(logits.shape).to(logits.dtype)
        # The stable form Caffe uses; PyTorch's backward of it is sigmoid(x) - t, as Caffe's.
        losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        valid = None
        if self.ignore_label is not None:
            kept = as_labels(target) != self.ignore_label
            losses = losses * kept.to(losses.dtype)
            valid = kept.sum()
        outer = logits.shape[0]
        divisor = normalizer(self.normalization, outer, logits.numel() // outer if outer else 0,
                             valid, self.ignore_label is not None)
        return losses.sum() / torch.as_tensor(divisor, dtype=logits.dtype, device=logits.device)

    def extra_repr(self) -> str:
        parts = [] if self.normalization == "BATCH_SIZE" else [
            f"normalization={self.normalization!r}"]
        if self.ignore_label is not None:
            parts.append(f"ignore_label={self.ignore_label}")
        return ", ".join(parts)


@register_layer("EuclideanLoss")
class EuclideanLoss(_Loss):
    r"""Half the squared distance, averaged over the batch.

    .. math::
        \ell = \frac{1}{2N} \sum_i (a_i - b_i)^2

    Both bottoms get a gradient (:math:`\pm (a - b) / N`).

    Shape:
        - Inputs: :math:`(N, *)` each, with the same number of elements per sample (the
          shapes may differ; elements pair up in memory order).
        - Output: :math:`()`.

    Caffe: no parameters; :math:`N` is ``num()`` (axis 0), so blobs have at most 4 axes.
    """

    legacy_bottoms = (0, 1)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape],
                   ctx: BuildContext) -> "EuclideanLoss":
        return cls()

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_bottoms(bottom_shapes)
        if count(bottom_shapes[0], 1) != count(bottom_shapes[1], 1):
            raise self.shape_error(bottom_shapes, "the same number of elements per sample")
        return [()]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(a.shape), tuple(b.shape)])
        difference = a - b.reshape(a.shape)
        return difference.square().sum() / a.shape[0] / 2


class _MultinomialLogistic(torch.autograd.Function):
    """``-mean log max(p[label], 1e-20)`` with Caffe's backward ``-1 / (N max(p, 1e-20))``.

    The exact gradient is 0 where the floor is active; Caffe keeps ``-1 / (N * 1e-20)``.
    """

    @staticmethod
    def forward(ctx, probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        picked = probabilities.gather(1, labels.unsqueeze(1)).clamp(min=LOG_THRESHOLD)
        ctx.save_for_backward(picked, labels)
        ctx.input_shape = probabilities.shape
        return -picked.log().sum() / probabilities.shape[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        picked, labels = ctx.saved_tensors
        num = ctx.input_shape[0]
        grad_input = picked.new_zeros(ctx.input_shape)
        grad_input.scatter_(1, labels.unsqueeze(1), -grad / num / picked)
        return grad_input, None


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLoss(_Loss):
    r"""Negative log of the probability given to the label, averaged over the batch.

    .. math::
        \ell = -\frac{1}{N} \sum_n \log \max(p_{n, \ell_n}, 10^{-20})

    Shape:
        - Probabilities: :math:`(N, C)` or :math:`(N, C, H, W)`; each sample's elements are
          the classes (:math:`C H W` of them).
        - Labels: :math:`(N,)` or :math:`(N, 1, 1, 1)`: one label per sample.
        - Output: :math:`()`.

    Caffe: no parameters. The probability is floored at ``kLOG_THRESHOLD`` (1e-20), and the
    backward keeps ``-1 / (N max(p, 1e-20))`` even where the floor is active (reproduced
    here). The input should already be probabilities (e.g. a Softmax's output).
    """

    legacy_bottoms = (0, 1)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape],
                   ctx: BuildContext) -> "MultinomialLogisticLoss":
        return cls()

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_bottoms(bottom_shapes)
        if _legacy_shape(bottom_shapes[1])[1:] != (1, 1, 1):
            raise self.shape_error(bottom_shapes, "one label per sample: labels of shape N "
                                   "or N x 1 x 1 x 1")
        return [()]

    def forward(self, probabilities: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(probabilities.shape), tuple(label.shape)])
        rows = probabilities.reshape(probabilities.shape[0], -1)
        labels = as_labels(label).reshape(-1)
        check_label_range(self, labels, rows.shape[1])
        return _MultinomialLogistic.apply(rows, labels)


@register_layer("HingeLoss")
class HingeLoss(_Loss):
    r"""One-vs-all hinge loss, L1 or L2, averaged over the batch.

    .. math::
        \ell = \frac{1}{N} \sum_{n, k} \max(0, 1 - \delta_{k \ell_n} x_{nk})^p,
        \qquad \delta = +1 \text{ for the label}, -1 \text{ otherwise}

    with :math:`p = 1` (L1) or :math:`p = 2` (L2).

    Args:
        norm: ``"L1"`` or ``"L2"``.

    Shape:
        - Scores: :math:`(N, C)` or :math:`(N, C, H, W)` (each sample's elements are the
          classes).
        - Labels: :math:`N` elements, one per sample.
        - Output: :math:`()`.

    Caffe: ``hinge_loss_param { norm }`` (L1 by default). Note the squared L2 form is not
    halved. The gradient at the hinge is 0.
    """

    __constants__ = ["norm"]
    legacy_bottoms = (0,)

    def __init__(self, norm: str = "L1"):
        super().__init__()
        norm = norm.upper()
        if norm not in ("L1", "L2"):
            raise UnsupportedParameterError(f"norm must be 'L1' or 'L2', got {norm!r}")
        self.norm = norm

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "HingeLoss":
        # HingeLossParameter.Norm: L1 = 1, L2 = 2.
        return cls("L2" if param.hinge_loss_param.norm == 2 else "L1")

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_bottoms(bottom_shapes)
        if count(bottom_shapes[1]) != bottom_shapes[0][0]:
            raise self.shape_error(bottom_shapes, "one label per sample")
        return [()]

    def forward(self, scores: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(scores.shape), tuple(label.shape)])
        rows = scores.reshape(scores.shape[0], -1)
        labels = as_labels(label).reshape(-1)
        check_label_range(self, labels, rows.shape[1])
        # Caffe negates the labelled class's score: max(0, 1 - x) there, max(0, 1 + x) elsewhere.
        signs = 1 - 2 * F.one_hot(labels, rows.shape[1]).to(rows.dtype)
        margins = torch.relu(1 + signs * rows)
        total = margins.sum() if self.norm == "L1" else margins.square().sum()
        return total / rows.shape[0]

    def extra_repr(self) -> str:
        return "" if self.norm == "L1" else "norm='L2'"


class _Contrastive(torch.autograd.Function):
    """The contrastive loss with Caffe's backward.

    For a dissimilar pair in the non-legacy form, Caffe's gradient is
    ``-(margin - d) / (d + 1e-4) * (a - b) / N`` where the exact one divides by ``d``.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, similar: torch.Tensor, margin: float,
                legacy: bool) -> torch.Tensor:
        difference = a - b
        distance_sq = difference.square().sum(dim=1)
        if legacy:
            shortfall = margin - distance_sq
            dissimilar_loss = shortfall.clamp(min=0)
            dissimilar_coeff = -torch.ones_like(distance_sq)
        else:
            distance = distance_sq.sqrt()
            shortfall = margin - distance
            dissimilar_loss = shortfall.clamp(min=0).square()
            dissimilar_coeff = -shortfall / (distance + CONTRASTIVE_DISTANCE_EPS)
        dissimilar_coeff = torch.where(shortfall > 0, dissimilar_coeff,
                                       torch.zeros_like(dissimilar_coeff))
        coeff = torch.where(similar, torch.ones_like(distance_sq), dissimilar_coeff)
        ctx.save_for_backward(difference, coeff)
        losses = torch.where(similar, distance_sq, dissimilar_loss)
        return losses.sum() / a.shape[0] / 2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        difference, coeff = ctx.saved_tensors
        grad_a = difference * (coeff * grad / difference.shape[0]).unsqueeze(1)
        return grad_a, -grad_a, None, None, None


@register_layer("ContrastiveLoss")
class ContrastiveLoss(_Loss):
    r"""Contrastive loss of feature pairs (Hadsell et al. 2006).

    .. math::
        \ell = \frac{1}{2N} \sum_n \begin{cases}
            d_n^2 & y_n \ne 0 \text{ (similar)} \\
            \max(m - d_n, 0)^2 & y_n = 0 \text{ (dissimilar)}
        \end{cases}

    with :math:`d_n = \lVert a_n - b_n \rVert_2`; ``legacy_version`` uses
    :math:`\max(m - d_n^2, 0)` for dissimilar pairs.

    Args:
        margin: :math:`m`.
        legacy_version: Caffe's first formulation, :math:`\max(m - d^2, 0)`.

    Shape:
        - Inputs ``a``, ``b``: :math:`(N, C)` or :math:`(N, C, 1, 1)`.
        - Similarity ``y``: :math:`N` elements, nonzero (after truncation) for similar pairs.
        - Output: :math:`()`.

    Caffe: ``contrastive_loss_param { margin legacy_version }`` (1.0 and false). Its backward
    for a dissimilar pair in the default form divides by ``d + 1e-4`` instead of ``d``
    (reproduced here; it also keeps the gradient finite at ``d = 0``). ``a`` and ``b`` both
    get gradients, ``y`` none.
    """

    __constants__ = ["margin", "legacy_version"]
    legacy_bottoms = (0, 1, 2)

    def __init__(self, margin: float = 1.0, legacy_version: bool = False):
        super().__init__()
        self.margin = float(margin)
        self.legacy_version = bool(legacy_version)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape],
                   ctx: BuildContext) -> "ContrastiveLoss":
        p = param.contrastive_loss_param
        return cls(p.margin, p.legacy_version)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_bottoms(bottom_shapes, number=3)
        a, b, similar = (_legacy_shape(s) for s in bottom_shapes)
        if a[2:] != (1, 1) or b[2:] != (1, 1) or a[1] != b[1]:
            raise self.shape_error(bottom_shapes, "two feature bottoms N x C (or "
                                   "N x C x 1 x 1) of the same shape")
        if similar[1:] != (1, 1, 1) or similar[0] != a[0]:
            raise self.shape_error(bottom_shapes, "one similarity label per pair (N or "
                                   "N x 1 x 1 x 1)")
        return [()]

    def forward(self, a: torch.Tensor, b: torch.Tensor, similar: torch.Tensor) -> torch.Tensor:
        self.output_shapes([tuple(a.shape), tuple(b.shape), tuple(similar.shape)])
        rows_a = a.reshape(a.shape[0], -1)
        rows_b = b.reshape(b.shape[0], -1)
        is_similar = as_labels(similar).reshape(-1) != 0
        return _Contrastive.apply(rows_a, rows_b, is_similar, self.margin, self.legacy_version)

    def extra_repr(self) -> str:
        parts = [] if self.margin == 1.0 else [f"margin={self.margin:g}"]
        if self.legacy_version:
            parts.append("legacy_version=True")
        return ", ".join(parts)
