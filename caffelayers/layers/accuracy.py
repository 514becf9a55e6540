"""Caffe's ``Accuracy`` layer: top-k classification accuracy, optionally per class."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, as_labels, check_label_range, count


@register_layer("Accuracy")
class Accuracy(CaffeLayer):
    r"""The fraction of labels found among the ``top_k`` highest scores.

    .. math::
        \text{accuracy} = \frac{1}{|V|} \sum_{i \in V} [\operatorname{rank}_i(\ell_i) < k]

    over the positions :math:`V` whose label is not ``ignore_label``, where
    :math:`\operatorname{rank}_i(c)` counts the classes ranked before class :math:`c` at
    position :math:`i`.

    Args:
        top_k: how many of the highest scores count as a hit.
        axis: the class axis of the scores (negative counts from the end).
        ignore_label: a label value left out of both the hits and the count, or None.
        per_class: also return the accuracy of each class (Caffe's optional second top).

    Shape:
        - Scores: :math:`(d_0, \dots, C, \dots, d_{n-1})` with :math:`C` on ``axis``.
        - Labels: the scores' element count divided by :math:`C`, any shape (e.g.
          :math:`(N, H, W)` for :math:`(N, C, H, W)` scores).
        - Output: :math:`()`; with ``per_class`` also :math:`(C,)`.

    Caffe: ``accuracy_param { top_k axis ignore_label }``; a second top asks for the
    per-class accuracies (0 for a class with no labels). Quirks of Caffe 1.0, reproduced:
    ranks come from sorting ``(score, class)`` pairs in descending order, so a tie goes to
    the **higher** class index; and with every label ignored the accuracy is 0/0 = NaN
    (later BVLC versions return 0 and count ties differently). The label is the value
    truncated to an integer. No gradient flows through this layer.
    """

    has_backward = False  # Caffe's Backward_cpu is NOT_IMPLEMENTED

    __constants__ = ["top_k", "axis", "ignore_label", "per_class"]

    def __init__(self, top_k: int = 1, axis: int = 1, ignore_label: Optional[int] = None,
                 per_class: bool = False):
        super().__init__()
        self.top_k = int(top_k)
        self.axis = int(axis)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.per_class = bool(per_class)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "Accuracy":
        p = param.accuracy_param
        ignore = p.ignore_label if p.HasField("ignore_label") else None
        return cls(p.top_k, p.axis, ignore, per_class=len(param.top) > 1)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 2:
            raise self.shape_error(bottom_shapes, "2 bottoms: scores and labels")
        scores, labels = (tuple(s) for s in bottom_shapes)
        axis = self.canonical_axis(self.axis, len(scores), bottom_shapes)
        outer, classes, inner = count(scores, 0, axis), scores[axis], count(scores, axis + 1)
        if outer * inner != count(labels):
            raise self.shape_error(bottom_shapes, f"one label per score vector: the scores "
                                   f"hold {outer * inner} vectors of {classes} classes (on "
                                   f"axis {axis}), so {outer * inner} labels are expected; "
                                   f"the labels hold {count(labels)}")
        if self.top_k > classes:
            raise self.shape_error(bottom_shapes, f"top_k {self.top_k} must not exceed the "
                                   f"{classes} classes")
        return [()] + ([(classes,)] if self.per_class else [])

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, label: torch.Tensor):
        bottom_shapes = [tuple(scores.shape), tuple(label.shape)]
        self.output_shapes(bottom_shapes)
        axis = self.canonical_axis(self.axis, scores.dim(), bottom_shapes)
        classes = scores.shape[axis]
        scores = scores.detach().reshape(count(scores.shape, 0, axis), classes, -1)
        # Caffe's static_cast<int>: truncation toward zero.
        labels = as_labels(label)
        labels = labels.reshape(scores.shape[0], scores.shape[2])
        counted = (torch.ones_like(labels, dtype=torch.bool) if self.ignore_label is None
                   else labels != self.ignore_label)
        check_label_range(self, labels, classes, self.ignore_label)
        safe_labels = torch.where(counted, labels, torch.zeros_like(labels)).unsqueeze(1)
        true_score = scores.gather(1, safe_labels)
        class_index = torch.arange(classes, device=scores.device).view(1, classes, 1)
        ranked_before = (scores > true_score) | ((scores == true_score)
                                                 & (class_index > safe_labels))
        hits = (ranked_before.sum(dim=1) < self.top_k) & counted
        # Caffe 1.0 divides without a guard: no counted label gives 0/0 = NaN.
        accuracy = hits.sum().to(scores.dtype) / counted.sum().to(scores.dtype)
        if not self.per_class:
            return accuracy
        per_label = torch.bincount(labels[counted], minlength=classes).to(scores.dtype)
        per_hit = torch.bincount(labels[hits], minlength=classes).to(scores.dtype)
        per_class = torch.where(per_label == 0, torch.zeros_like(per_label),
                                per_hit / per_label.clamp(min=1))
        return accuracy, per_class

    def extra_repr(self) -> str:
        parts = []
        if self.top_k != 1:
            parts.append(f"top_k={self.top_k}")
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        if self.ignore_label is not None:
            parts.append(f"ignore_label={self.ignore_label}")
        if self.per_class:
            parts.append("per_class=True")
        return ", ".join(parts)
