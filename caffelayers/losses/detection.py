"""The detection forks' training losses: SmoothL1Loss (Fast R-CNN, Faster R-CNN, SSD and
R-FCN define the same type four ways) and SSD's MultiBoxLoss (weiliu89/caffe, branch ``ssd``).

MultiBoxLoss follows the fork's ``bbox_util.cpp``: ground truth read from the
``[1, 1, num_gt, 8]`` rows, priors matched (greedy bipartite, then per prediction), the
offsets encoded in float32 (``EncodeBBox``), hard negatives (or hard examples) mined from
the per-prior losses, and the loss assembled from the fork's inner SmoothL1Loss (or
EuclideanLoss) and SoftmaxWithLoss (or SigmoidCrossEntropyLoss). The matching and the
mining are not differentiated; the gradients reach the location and confidence bottoms as
the fork's backward copies them. Box decoding and Jaccard overlaps come from
:mod:`caffelayers.layers.ssd`, shared with DetectionOutput.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LabelError, UnsupportedParameterError
from ..layers.base import BuildContext, CaffeLayer, Shape, count
from ..layers.ssd import CODE_TYPES, box_sizes, decode_boxes, jaccard_overlaps, legacy_dims
from ..registry import register_layer
from .common import NORMALIZATIONS, normalization_from_caffe
from .infogain import softmax_loss

#: R-FCN's extra normalization: divide by ``loss_param.pre_fixed_normalizer``.
PRE_FIXED = "PRE_FIXED"
#: ``LossParameter.PRE_FIXED`` in our schema (R-FCN's 3, renumbered when read).
_PRE_FIXED_VALUE = 100

LOC_LOSS_TYPES = ("L2", "SMOOTH_L1")
CONF_LOSS_TYPES = ("SOFTMAX", "LOGISTIC")
MATCH_TYPES = ("BIPARTITE", "PER_PREDICTION")
MINING_TYPES = ("NONE", "MAX_NEGATIVE", "HARD_EXAMPLE")


def smooth_l1(d: torch.Tensor, sigma2: float = 1.0) -> torch.Tensor:
    r"""Elementwise :math:`0.5 \sigma^2 d^2` where :math:`|d| < 1/\sigma^2`, else
    :math:`|d| - 0.5/\sigma^2`; its autograd derivative is :math:`\sigma^2 d` or
    :math:`\mathrm{sign}(d)`, the fork's ``f'``."""
    magnitude = d.abs()
    return torch.where(magnitude < 1.0 / sigma2, 0.5 * sigma2 * d * d, magnitude - 0.5 / sigma2)


# -- SmoothL1Loss ---------------------------------------------------------------------------
class _SmoothL1(torch.autograd.Function):
    """``sum(w_out * f(w_in * (a - b))) / divisor`` with the forks' backward:
    ``+-f'(w_in (a - b)) / divisor``, times ``w_in * w_out`` only with ``weighted``."""

    @staticmethod
    def forward(ctx, a, b, inside, outside, sigma2: float, divisor: float, weighted: bool):
        diff = a - b
        if inside is not None:
            diff = inside * diff
        errors = smooth_l1(diff, sigma2)
        if outside is not None:
            errors = outside * errors
        ctx.save_for_backward(diff, inside if weighted else None, outside if weighted else None)
        ctx.sigma2, ctx.divisor = sigma2, divisor
        return errors.sum() / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        diff, inside, outside = ctx.saved_tensors
        slope = torch.where(diff.abs() < 1.0 / ctx.sigma2, ctx.sigma2 * diff, torch.sign(diff))
        grad_a = slope * (grad / ctx.divisor)
        if inside is not None:
            grad_a = grad_a * inside * outside
        grad_b = -grad_a if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None, None, None, None


@register_layer("SmoothL1Loss")
class SmoothL1Loss(CaffeLayer):
    r"""The smooth L1 (Huber) loss of box regression, as Fast/Faster R-CNN, SSD and R-FCN
    define it.

    .. math::
        \ell = \frac{1}{D} \sum_i w^{out}_i f\big(w^{in}_i (a_i - b_i)\big), \qquad
        f(d) = \begin{cases} 0.5\,\sigma^2 d^2 & |d| < 1/\sigma^2 \\
                             |d| - 0.5/\sigma^2 & \text{otherwise} \end{cases}

    The bottoms say which fork's layer it is:

    * 2 bottoms: no weights. With ``sigma`` it is py-faster-rcnn's.
    * 3 bottoms (Fast R-CNN, SSD, R-FCN): ``w_in`` only. The backward sends
      :math:`\pm f'(w^{in} (a - b)) / D`, **not** multiplied by ``w_in`` (the derivative is,
      unless the weights are 0 or 1, as in those forks' data).
    * 4 bottoms (py-faster-rcnn): ``w_in`` and ``w_out``; the backward is the derivative,
      :math:`\pm w^{in} w^{out} f'(\cdot) / D`.

    Args:
        sigma: py-faster-rcnn's ``sigma`` (1 in the other forks).
        normalization: None for :math:`D = N` (Fast/Faster R-CNN, SSD), or R-FCN's
            (daijifeng001/caffe-rfcn) mode: ``"FULL"`` or ``"VALID"`` (:math:`N H W`, the
            channels not counted), ``"BATCH_SIZE"`` (:math:`N`), ``"PRE_FIXED"``
            (``pre_fixed_normalizer``) or ``"NONE"`` (1), floored at 1.
        pre_fixed_normalizer: R-FCN's divisor for ``"PRE_FIXED"``.
        instance_loss: R-FCN's second top, each position's loss summed over the channels
            (not normalized, not differentiated).

    Shape:
        - Inputs: predictions ``a``, targets ``b`` and weights, of one shape of at most 4
          axes :math:`(N, C, H, W)`.
        - Output: :math:`()`, and :math:`(N, 1, H, W)` with ``instance_loss``.

    Caffe: ``smooth_l1_loss_param { sigma }`` (py-faster-rcnn, py-R-FCN); ``loss_param {
    normalization normalize pre_fixed_normalizer }`` selects R-FCN's divisor (a
    ``loss_param`` normalization, or a second top, means R-FCN's layer, whose default mode is
    VALID, unless a ``sigma`` or a fourth bottom says py-faster-rcnn, which ignores it).
    Both ``a`` and ``b`` get gradients (``AllowForceBackward``), the weights none.
    py-faster-rcnn refuses 3 bottoms and R-FCN 4, so ``sigma != 1`` with 3 bottoms, or a
    normalization with 4, is an error.
    """

    is_loss = True
    num_bottoms = (2, 4)
    num_tops = (1, 2)
    __constants__ = ["sigma", "normalization", "pre_fixed_normalizer", "instance_loss"]

    def __init__(self, sigma: float = 1.0, normalization: Optional[str] = None,
                 pre_fixed_normalizer: float = 1.0, instance_loss: bool = False):
        super().__init__()
        self.sigma = float(sigma)
        self.normalization = None if normalization is None else str(normalization).upper()
        self.pre_fixed_normalizer = float(pre_fixed_normalizer)
        self.instance_loss = bool(instance_loss)
        problem = ""
        if self.normalization not in (None, PRE_FIXED) + NORMALIZATIONS:
            problem = (f"normalization must be None or one of "
                       f"{', '.join(NORMALIZATIONS + (PRE_FIXED,))}, got {normalization!r}")
        elif self.sigma <= 0:
            problem = f"sigma must be positive, got {self.sigma:g}"
        elif self.normalization is not None and self.sigma != 1:
            problem = "R-FCN's layer (a normalization) has no sigma; sigma is py-faster-rcnn's"
        elif self.instance_loss and self.normalization is None:
            problem = "the per-instance top is R-FCN's: give a normalization (R-FCN: VALID)"
        if problem:
            raise UnsupportedParameterError(f"SmoothL1Loss: {problem}")

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        lp = param.loss_param
        # py-faster-rcnn ignores loss_param: a sigma or a fourth bottom means its layer.
        rfcn = (lp.HasField("normalization") or lp.HasField("normalize") or len(param.top) == 2
                ) and not param.smooth_l1_loss_param.HasField("sigma") and len(param.bottom) < 4
        mode = None
        if rfcn:
            mode = (PRE_FIXED if lp.HasField("normalization") and
                    lp.normalization == _PRE_FIXED_VALUE else normalization_from_caffe(lp))
        try:
            return cls(param.smooth_l1_loss_param.sigma, mode, lp.pre_fixed_normalizer,
                       len(param.top) == 2)
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(str(error).replace(
                "SmoothL1Loss", f"layer {param.name!r} (SmoothL1Loss)", 1)) from None

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if not 2 <= len(bottom_shapes) <= 4 or any(len(s) > 4 for s in bottom_shapes):
            raise self.shape_error(bottom_shapes, "2 to 4 bottoms (predictions, targets, "
                                   "inside and outside weights) of at most 4 axes")
        dims = legacy_dims(bottom_shapes[0])
        if any(legacy_dims(s) != dims for s in bottom_shapes[1:]):
            raise self.shape_error(bottom_shapes, "bottoms of one shape N x C x H x W")
        if len(bottom_shapes) == 3 and self.sigma != 1:
            raise self.shape_error(bottom_shapes, "2 or 4 bottoms with sigma (py-faster-rcnn "
                                   "needs both inside and outside weights)")
        if len(bottom_shapes) == 4 and self.normalization is not None:
            raise self.shape_error(bottom_shapes, "at most 3 bottoms with a normalization "
                                   "(R-FCN's layer has no outside weights)")
        if self.instance_loss:
            return [(), (dims[0], 1, dims[2], dims[3])]
        return [()]

    @property
    def sigma2(self) -> float:
        """``sigma * sigma`` as the fork computes it: a float32 product."""
        return float(np.float32(self.sigma) * np.float32(self.sigma))

    def divisor(self, shape: Sequence[int]) -> float:
        """The forks' divisor :math:`D` for a bottom of this shape."""
        num, _, height, width = legacy_dims(shape)
        mode = self.normalization
        if mode is None:
            return float(num)
        value = {"FULL": num * height * width, "VALID": num * height * width,
                 "BATCH_SIZE": num, PRE_FIXED: self.pre_fixed_normalizer, "NONE": 1}[mode]
        return max(1.0, float(value))

    def forward(self, a: torch.Tensor, b: torch.Tensor, *weights: torch.Tensor):
        shapes = [tuple(t.shape) for t in (a, b) + weights]
        self.output_shapes(shapes)
        b = b.reshape(a.shape)
        inside, outside = (list(w.detach().reshape(a.shape) for w in weights) + [None, None])[:2]
        loss = _SmoothL1.apply(a, b, inside, outside, self.sigma2, self.divisor(shapes[0]),
                               outside is not None)
        if not self.instance_loss:
            return loss
        with torch.no_grad():
            diff = (a - b) if inside is None else inside * (a - b)
            num, channels, height, width = legacy_dims(shapes[0])
            errors = smooth_l1(diff).reshape(num, channels, height, width)
        return loss, errors.sum(dim=1, keepdim=True)

    def extra_repr(self) -> str:
        parts = [] if self.sigma == 1 else [f"sigma={self.sigma:g}"]
        if self.normalization is not None:
            parts.append(f"normalization={self.normalization!r}")
        if self.normalization == PRE_FIXED:
            parts.append(f"pre_fixed_normalizer={self.pre_fixed_normalizer:g}")
        if self.instance_loss:
            parts.append("instance_loss=True")
        return ", ".join(parts)


# -- box matching (bbox_util.cpp) -----------------------------------------------------------
def encode_boxes(boxes: np.ndarray, priors: np.ndarray, variances: np.ndarray,
                 code_type: str = "CORNER", encode_variance_in_target: bool = False
                 ) -> np.ndarray:
    """The fork's ``EncodeBBox`` of ``(..., 4)`` boxes against their priors, float32.

    CORNER: ``(box - prior) / v``; CORNER_SIZE: ``(box - prior) / size / v``; CENTER_SIZE:
    the centre offset over the prior's size, and ``log(size / prior size)``, each over its
    variance. ``encode_variance_in_target`` leaves the variances out. The log is taken in
    double (C's ``log`` of a float ratio) and rounded once, as in the fork.
    """
    f32 = np.float32
    boxes, priors, variances = (np.asarray(x, dtype=f32) for x in (boxes, priors, variances))
    width = priors[..., 2] - priors[..., 0]
    height = priors[..., 3] - priors[..., 1]
    if code_type in ("CORNER", "CORNER_SIZE"):
        offsets = boxes - priors
        if code_type == "CORNER_SIZE":
            offsets = offsets / np.stack([width, height, width, height], axis=-1)
        return offsets if encode_variance_in_target else offsets / variances
    if code_type != "CENTER_SIZE":
        raise UnsupportedParameterError(f"code_type must be one of "
                                        f"{', '.join(CODE_TYPES.values())}, got {code_type!r}")
    dx = ((boxes[..., 0] + boxes[..., 2]) / f32(2) - (priors[..., 0] + priors[..., 2]) / f32(2))
    dy = ((boxes[..., 1] + boxes[..., 3]) / f32(2) - (priors[..., 1] + priors[..., 3]) / f32(2))
    logs = [np.log(((boxes[..., 2 + k] - boxes[..., k]) / size).astype(np.float64))
            for k, size in ((0, width), (1, height))]
    if encode_variance_in_target:
        columns = [dx / width, dy / height] + [value.astype(f32) for value in logs]
    else:
        columns = [dx / width / variances[..., 0], dy / height / variances[..., 1]] + [
            (value / variances[..., 2 + k].astype(np.float64)).astype(f32)
            for k, value in enumerate(logs)]
    return np.stack(columns, axis=-1).astype(f32)


def match_boxes(gt_boxes: np.ndarray, gt_labels: np.ndarray, pred_boxes: np.ndarray,
                label: int = -1, match_type: str = "PER_PREDICTION",
                overlap_threshold: float = 0.5, ignore_cross_boundary_bbox: bool = False
                ) -> Tuple[np.ndarray, np.ndarray]:
    """The fork's ``MatchBBox``: ``(indices, overlaps)``, one per prediction.

    ``indices`` holds the matched ground-truth index, -1 (unmatched) or -2 (ignored: it
    crosses the image boundary). Only the ground truth of ``label`` takes part (-1: all).
    First a greedy bipartite matching: the largest overlap above 1e-6 among unmatched
    predictions and ground truth is matched, repeatedly (ties: lowest prediction, then lowest
    ground truth); with PER_PREDICTION each prediction left then takes its best ground truth
    with an overlap of at least ``overlap_threshold``. ``overlaps`` is each prediction's
    largest overlap (above 1e-6, else 0), or its match's; all in float32.
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    pred_boxes = np.asarray(pred_boxes, dtype=np.float32).reshape(-1, 4)
    indices = np.full(len(pred_boxes), -1, dtype=np.int64)
    overlaps = np.zeros(len(pred_boxes), dtype=np.float32)
    gt_indices = (np.arange(len(gt_boxes)) if label == -1
                  else np.flatnonzero(np.asarray(gt_labels) == label))
    if not len(gt_indices):
        return indices, overlaps
    if ignore_cross_boundary_bbox:
        indices[((pred_boxes < 0) | (pred_boxes > 1)).any(axis=1)] = -2
    pred_sizes, gt_sizes = box_sizes(pred_boxes), box_sizes(gt_boxes)
    table = np.stack([jaccard_overlaps(gt_boxes[g], gt_sizes[g], pred_boxes, pred_sizes)
                      for g in gt_indices], axis=1)
    # The fork compares the float overlap with the double 1e-6.
    stored = (table.astype(np.float64) > 1e-6) & (indices == -1)[:, None]
    table = np.where(stored, table, np.float32(0))
    overlaps[:] = table.max(axis=1)
    pool = np.ones(len(gt_indices), dtype=bool)
    while pool.any():
        free = stored & pool[None, :] & (indices == -1)[:, None]
        if not free.any():
            break
        i, j = divmod(int(np.argmax(np.where(free, table, -1.0))), len(gt_indices))
        indices[i], overlaps[i], pool[j] = gt_indices[j], table[i, j], False
    if match_type == "PER_PREDICTION":
        eligible = stored & (table >= np.float32(overlap_threshold))
        rest = np.flatnonzero((indices == -1) & eligible.any(axis=1))
        best = np.argmax(np.where(eligible[rest], table[rest], -1.0), axis=1)
        indices[rest], overlaps[rest] = gt_indices[best], table[rest, best]
    elif match_type != "BIPARTITE":
        raise UnsupportedParameterError(f"match_type must be one of {', '.join(MATCH_TYPES)}, "
                                        f"got {match_type!r}")
    return indices, overlaps


def apply_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, top_k: int
              ) -> List[int]:
    """The fork's ``ApplyNMS`` (the mining one, without ``eta``): positions kept, best first.

    Scores sorted stably, cut to ``top_k`` (-1: all); boxes smaller than 1e-5 are dropped;
    each kept box removes the later ones overlapping it by more than ``threshold``; the
    search stops at ``top_k`` kept boxes.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    sizes = box_sizes(boxes)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    if -1 < top_k < len(order):
        order = order[:top_k]
    order = order[sizes[order].astype(np.float64) >= 1e-5]
    kept: List[int] = []
    while len(order):
        best, order = int(order[0]), order[1:]
        kept.append(best)
        if -1 < top_k <= len(kept):
            break
        overlap = jaccard_overlaps(boxes[best], sizes[best], boxes[order], sizes[order])
        order = order[~(overlap > np.float32(threshold))]
    return kept


class _DivideKeepGradient(torch.autograd.Function):
    """``x / v`` whose gradient passes undivided: with ``encode_variance_in_target`` the
    fork divides the predictions by the variances and copies their gradient back as is."""

    @staticmethod
    def forward(ctx, x, v):
        return x / v

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# -- MultiBoxLoss ---------------------------------------------------------------------------
GroundTruth = Dict[int, Tuple[np.ndarray, np.ndarray]]
Matches = List[Dict[int, np.ndarray]]


@register_layer("MultiBoxLoss")
class MultiBoxLoss(CaffeLayer):
    r"""SSD's training loss: box offsets of the matched priors plus confidences of the matched
    priors and the mined negatives.

    :math:`\ell = (\lambda\, L_{loc} + L_{conf}) / D`. :math:`L_{loc}` sums the smooth L1
    (or half squared) differences between the matched priors' predicted offsets and their
    encoded ground truth; :math:`L_{conf}` sums
    :math:`-\log \max(\mathrm{softmax}(x)_y, \mathrm{FLT\_MIN})` (or the sigmoid
    cross-entropy against one-hot targets) over the matched priors, labelled with their ground
    truth, and the mined negatives (every prior without mining), labelled background.
    Mining ranks the eligible priors by their confidence loss (plus, for HARD_EXAMPLE, their
    location loss): MAX_NEGATIVE keeps ``neg_pos_ratio`` negatives per positive among the
    unmatched priors whose best overlap is below ``neg_overlap``; HARD_EXAMPLE keeps the
    ``sample_size`` hardest priors of all, and matched priors not kept leave the loss.

    Args:
        num_classes: classes of the confidences, background included.
        loc_loss_type: ``"SMOOTH_L1"`` or ``"L2"`` (:math:`\sum d^2 / 2`).
        conf_loss_type: ``"SOFTMAX"`` or ``"LOGISTIC"``.
        loc_weight: :math:`\lambda`.
        share_location: one box per prior for all classes (else one per class).
        match_type: ``"BIPARTITE"`` or ``"PER_PREDICTION"`` (see :func:`match_boxes`).
        overlap_threshold: PER_PREDICTION's least overlap.
        use_prior_for_matching: match the priors (else the decoded predictions).
        background_label_id: the background class.
        use_difficult_gt: keep ground truth marked difficult.
        mining_type: ``"NONE"``, ``"MAX_NEGATIVE"`` or ``"HARD_EXAMPLE"``.
        neg_pos_ratio, neg_overlap: MAX_NEGATIVE's settings.
        code_type: ``"CORNER"``, ``"CENTER_SIZE"`` or ``"CORNER_SIZE"``.
        encode_variance_in_target: encode without variances, then divide predictions and
            targets by them.
        map_object_to_agnostic: every object is class ``background_label_id + 1``.
        ignore_cross_boundary_bbox: priors (or predictions) crossing the image boundary are
            neither positive nor MAX_NEGATIVE negatives.
        bp_inside: a coordinate whose matched box lies outside ``[0, 1]`` sends no gradient.
        nms_threshold, nms_top_k, use_prior_for_nms: mining through :func:`apply_nms` on the
            priors or the decoded predictions when ``nms_threshold`` is above 0.
        sample_size: HARD_EXAMPLE's number of priors per image.
        normalization: :math:`D`: ``"VALID"`` (matched priors), ``"FULL"`` (:math:`N P`),
            ``"BATCH_SIZE"`` (:math:`N`) or ``"NONE"``, floored at 1.
        propagate_down: whether the location and the confidence terms are in the loss (the
            fork adds a term only where its bottom is backpropagated).

    Shape:
        - Locations :math:`(N, P L 4)` (``L`` = 1, or ``num_classes`` without
          ``share_location``), confidences :math:`(N, P C)`, priors :math:`(1, 2, 4 P)` (as
          PriorBox writes them), ground truth :math:`(1, 1, G, 8)`: rows ``(image, label,
          instance, xmin, ymin, xmax, ymax, difficult)``, image -1 for padding.
        - Output: :math:`()`.

    Caffe: ``multibox_loss_param`` (fields as above; defaults SMOOTH_L1, SOFTMAX, 1, true,
    PER_PREDICTION, 0.5, true, 0, true, MAX_NEGATIVE, 3, 0.5, CORNER, sample_size 64) and
    ``loss_param { normalization normalize }`` (VALID; ``normalize: false`` is BATCH_SIZE).
    The fork's quirks are kept: a ground-truth label equal to the background aborts; without
    mining, LOGISTIC writes image ``i``'s one-hot targets ``i P`` values (not ``i P C``)
    further on; the targets of LOGISTIC start at ``background_label_id`` everywhere;
    ``nms_param`` without ``top_k`` keeps no sample; images without ground truth contribute
    no mined negatives. Ties in the mining sort are broken by prior order (the fork's
    ``std::sort`` agrees up to 16 candidates). In double, the fork rounds the predictions to
    float before the loss; here they keep their precision.
    """

    num_bottoms = (4, 4)
    num_tops = (1, 1)
    is_loss = True
    __constants__ = ["num_classes", "loc_loss_type", "conf_loss_type", "loc_weight",
                     "share_location", "match_type", "overlap_threshold",
                     "use_prior_for_matching", "background_label_id", "use_difficult_gt",
                     "mining_type", "neg_pos_ratio", "neg_overlap", "code_type",
                     "encode_variance_in_target", "map_object_to_agnostic",
                     "ignore_cross_boundary_bbox", "bp_inside", "nms_threshold", "nms_top_k",
                     "sample_size", "use_prior_for_nms", "normalization", "propagate_down"]
    _DEFAULTS = {"loc_loss_type": "SMOOTH_L1", "conf_loss_type": "SOFTMAX", "loc_weight": 1.0,
                 "share_location": True, "match_type": "PER_PREDICTION",
                 "overlap_threshold": 0.5, "use_prior_for_matching": True,
                 "background_label_id": 0, "use_difficult_gt": True,
                 "mining_type": "MAX_NEGATIVE", "neg_pos_ratio": 3.0, "neg_overlap": 0.5,
                 "code_type": "CORNER", "encode_variance_in_target": False,
                 "map_object_to_agnostic": False, "ignore_cross_boundary_bbox": False,
                 "bp_inside": False, "nms_threshold": None, "nms_top_k": -1,
                 "sample_size": 64, "use_prior_for_nms": False, "normalization": "VALID",
                 "propagate_down": (True, True)}

    def __init__(self, num_classes: int, loc_loss_type: str = "SMOOTH_L1",
                 conf_loss_type: str = "SOFTMAX", loc_weight: float = 1.0,
                 share_location: bool = True, match_type: str = "PER_PREDICTION",
                 overlap_threshold: float = 0.5, use_prior_for_matching: bool = True,
                 background_label_id: int = 0, use_difficult_gt: bool = True,
                 mining_type: str = "MAX_NEGATIVE", neg_pos_ratio: float = 3.0,
                 neg_overlap: float = 0.5, code_type: str = "CORNER",
                 encode_variance_in_target: bool = False, map_object_to_agnostic: bool = False,
                 ignore_cross_boundary_bbox: bool = False, bp_inside: bool = False,
                 nms_threshold: Optional[float] = None, nms_top_k: int = -1,
                 sample_size: int = 64, use_prior_for_nms: bool = False,
                 normalization: str = "VALID", propagate_down: Sequence[bool] = (True, True)):
        super().__init__()
        self.num_classes = int(num_classes)
        self.loc_loss_type, self.conf_loss_type = str(loc_loss_type), str(conf_loss_type)
        self.loc_weight = float(loc_weight)
        self.share_location = bool(share_location)
        self.match_type = str(match_type)
        self.overlap_threshold = float(overlap_threshold)
        self.use_prior_for_matching = bool(use_prior_for_matching)
        self.background_label_id = int(background_label_id)
        self.use_difficult_gt = bool(use_difficult_gt)
        self.mining_type = str(mining_type)
        self.neg_pos_ratio, self.neg_overlap = float(neg_pos_ratio), float(neg_overlap)
        self.code_type = str(code_type)
        self.encode_variance_in_target = bool(encode_variance_in_target)
        self.map_object_to_agnostic = bool(map_object_to_agnostic)
        self.ignore_cross_boundary_bbox = bool(ignore_cross_boundary_bbox)
        self.bp_inside = bool(bp_inside)
        self.nms_threshold = None if nms_threshold is None else float(nms_threshold)
        self.nms_top_k, self.sample_size = int(nms_top_k), int(sample_size)
        self.use_prior_for_nms = bool(use_prior_for_nms)
        self.normalization = str(normalization).upper()
        self.propagate_down = tuple(bool(p) for p in propagate_down)
        self._check()

    def _check(self) -> None:
        choices = {"loc_loss_type": LOC_LOSS_TYPES, "conf_loss_type": CONF_LOSS_TYPES,
                   "match_type": MATCH_TYPES, "mining_type": MINING_TYPES,
                   "code_type": tuple(CODE_TYPES.values()), "normalization": NORMALIZATIONS}
        problems = [f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                    for name, allowed in choices.items() if getattr(self, name) not in allowed]
        background = self.background_label_id
        rules = [
            (self.num_classes < 1, f"num_classes must be at least 1, got {self.num_classes}"),
            (self.mining_type != "NONE" and not self.share_location,
             "negative mining needs share_location (the fork supports no other)"),
            (self.conf_loss_type == "SOFTMAX" and not 0 <= background < self.num_classes,
             f"background_label_id must lie in [0, {self.num_classes}) for SOFTMAX, got "
             f"{background}"),
            (self.map_object_to_agnostic and self.num_classes != (2 if background >= 0 else 1),
             "map_object_to_agnostic needs num_classes 2 (1 without a background), got "
             f"{self.num_classes}"),
            (self.mining_type == "HARD_EXAMPLE" and self.sample_size <= 0,
             f"HARD_EXAMPLE needs a positive sample_size, got {self.sample_size}"),
            (len(self.propagate_down) != 2,
             "propagate_down takes two flags (locations, confidences)")]
        problems += [message for broken, message in rules if broken]
        if problems:
            raise UnsupportedParameterError(f"MultiBoxLoss: {problems[0]}")

    @property
    def num_loc_classes(self) -> int:
        return 1 if self.share_location else self.num_classes

    @property
    def mining(self) -> bool:
        return self.mining_type != "NONE"

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.multibox_loss_param
        where = f"layer {param.name!r} (MultiBoxLoss)"
        problem = ""
        mining = MINING_TYPES[p.mining_type]
        if not p.HasField("num_classes"):
            problem = "num_classes is required"
        elif p.HasField("do_neg_mining") and p.do_neg_mining != (mining != "NONE"):
            problem = (f"do_neg_mining: {str(p.do_neg_mining).lower()} contradicts mining_type "
                       f"{mining} (the fork aborts); drop do_neg_mining, it is deprecated")
        elif getattr(p, "ignore_difficult_gt", False):
            problem = "ignore_difficult_gt is NVCaffe's, not supported; use use_difficult_gt"
        elif param.loss_param.normalization == _PRE_FIXED_VALUE:
            problem = "normalization PRE_FIXED is R-FCN's; SSD's are FULL, VALID, BATCH_SIZE, NONE"
        if problem:
            raise UnsupportedParameterError(f"{where}: {problem}")
        # An empty propagate_down is the fork's (true, true, false, false).
        propagate = (list(param.propagate_down) + [True, True])[:2]
        has_nms = p.HasField("nms_param")
        try:
            return cls(p.num_classes, LOC_LOSS_TYPES[p.loc_loss_type],
                       CONF_LOSS_TYPES[p.conf_loss_type], p.loc_weight, p.share_location,
                       MATCH_TYPES[p.match_type], p.overlap_threshold,
                       p.use_prior_for_matching, p.background_label_id, p.use_difficult_gt,
                       mining, p.neg_pos_ratio, p.neg_overlap,
                       CODE_TYPES.get(p.code_type, str(p.code_type)),
                       p.encode_variance_in_target, p.map_object_to_agnostic,
                       p.ignore_cross_boundary_bbox, p.bp_inside,
                       p.nms_param.nms_threshold if has_nms else None,
                       p.nms_param.top_k if has_nms else -1, p.sample_size,
                       p.use_prior_for_nms, normalization_from_caffe(param.loss_param),
                       propagate)
        except UnsupportedParameterError as error:
            raise UnsupportedParameterError(
                str(error).replace("MultiBoxLoss", where, 1)) from None

    # -- shapes -----------------------------------------------------------------------------
    def num_priors(self, bottom_shapes: Sequence[Shape]) -> int:
        """``P`` (the prior bottom's height / 4), after checking that the bottoms fit."""
        if len(bottom_shapes) != 4 or any(len(s) > 4 for s in bottom_shapes):
            raise self.shape_error(bottom_shapes, "four bottoms of at most 4 axes: locations, "
                                   "confidences, priors and ground truth")
        loc, conf, prior, gt = (legacy_dims(s) for s in bottom_shapes)
        priors = prior[2] // 4
        if prior[2] % 4 or prior[1] != 2 or priors == 0:
            raise self.shape_error(bottom_shapes, "priors shaped 1 x 2 x (P * 4), as PriorBox "
                                   "writes them")
        if loc[0] != conf[0]:
            raise self.shape_error(bottom_shapes, "as many location as confidence samples")
        loc_values = priors * self.num_loc_classes * 4
        if loc[1] != loc_values or count(bottom_shapes[0], 1) != loc_values:
            raise self.shape_error(bottom_shapes, f"{loc_values} location values per sample "
                                   f"({priors} priors x {self.num_loc_classes} location "
                                   "classes x 4)")
        if conf[1] != priors * self.num_classes or count(bottom_shapes[1], 1) != conf[1]:
            raise self.shape_error(bottom_shapes, f"{priors * self.num_classes} confidences "
                                   f"per sample ({priors} priors x num_classes "
                                   f"{self.num_classes})")
        if gt[3] != 8 or count(bottom_shapes[3]) != gt[2] * 8:
            raise self.shape_error(bottom_shapes, "ground truth shaped 1 x 1 x G x 8 "
                                   "(image, label, instance, xmin, ymin, xmax, ymax, difficult)")
        return priors

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self.num_priors(bottom_shapes)
        return [()]

    # -- matching and mining ----------------------------------------------------------------
    def ground_truth(self, gt: torch.Tensor, num: int) -> GroundTruth:
        """``{image: (boxes (G, 4) float32, labels (G,))}`` for the images that have any, as
        the fork's ``GetGroundTruth`` reads the rows (padding image -1 skipped)."""
        rows = gt.detach().to(torch.float64).cpu().numpy().reshape(-1, 8)
        images, labels = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
        keep = images != -1
        if (labels[keep] == self.background_label_id).any():
            raise LabelError(f"layer {self.layer_name!r} (MultiBoxLoss): a ground-truth box has "
                             f"the background label {self.background_label_id} (the fork "
                             "aborts: \"Found background label in the dataset\")")
        if not self.use_difficult_gt:
            keep &= rows[:, 7] == 0
        boxes = rows[:, 3:7].astype(np.float32)
        found = {}
        for image in range(num):
            chosen = keep & (images == image)
            if chosen.any():
                found[image] = (boxes[chosen], labels[chosen])
        return found

    def find_matches(self, truth: GroundTruth, prior_boxes: np.ndarray,
                     decoded: Optional[np.ndarray], num: int) -> Tuple[Matches, Matches]:
        """The fork's ``FindMatches``: per image, ``{label: indices}`` and ``{label:
        overlaps}`` (label -1 with ``share_location``; none for an image without ground
        truth)."""
        settings = (self.match_type, self.overlap_threshold, self.ignore_cross_boundary_bbox)
        all_indices: Matches = []
        all_overlaps: Matches = []
        for image in range(num):
            indices: Dict[int, np.ndarray] = {}
            overlaps: Dict[int, np.ndarray] = {}
            if image in truth:
                boxes, labels = truth[image]
                if not self.use_prior_for_matching:
                    for c in range(self.num_loc_classes):
                        label = -1 if self.share_location else c
                        if label == self.background_label_id:
                            continue
                        indices[label], overlaps[label] = match_boxes(
                            boxes, labels, decoded[image, c], label, *settings)
                else:
                    matched, overlap = match_boxes(boxes, labels, prior_boxes, -1, *settings)
                    if self.share_location:
                        indices[-1], overlaps[-1] = matched, overlap
                    for c in range(0 if self.share_location else self.num_classes):
                        if c != self.background_label_id:
                            hit = (matched > -1) & (labels[np.maximum(matched, 0)] == c)
                            indices[c] = np.where(hit, matched, -1)
                            overlaps[c] = overlap
            all_indices.append(indices)
            all_overlaps.append(overlaps)
        return all_indices, all_overlaps

    def _labels_of(self, truth: GroundTruth, image: int, gt_index: np.ndarray,
                   agnostic: bool) -> np.ndarray:
        """The class of each matched ground truth; a label outside ``[0, num_classes)``
        raises, where the fork checks (or would index out of bounds)."""
        if agnostic and self.map_object_to_agnostic:
            return np.full(len(gt_index), self.background_label_id + 1, dtype=np.int64)
        if not len(gt_index):
            return np.zeros(0, dtype=np.int64)
        labels = truth[image][1][gt_index]
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise LabelError(f"layer {self.layer_name!r} (MultiBoxLoss): ground-truth labels "
                             f"must lie in [0, {self.num_classes}), got "
                             f"{sorted(set(labels[bad].tolist()))}")
        return labels

    def prior_conf_losses(self, conf: torch.Tensor, truth: GroundTruth, matches: Matches
                           ) -> np.ndarray:
        """``(N, P)`` float32: each prior's confidence loss against its matched class (its
        first label's match), or the background (the fork's ``ComputeConfLoss``)."""
        num, priors = len(matches), conf.shape[1] // self.num_classes
        labels = np.full((num, priors), self.background_label_id, dtype=np.int64)
        for image, indices in enumerate(matches):
            done = np.zeros(priors, dtype=bool)
            for label in sorted(indices):
                hit = np.flatnonzero((indices[label] > -1) & ~done)
                labels[image, hit] = self._labels_of(truth, image, indices[label][hit], False)
                done[hit] = True
        scores = conf.detach().reshape(num, priors, self.num_classes)
        target = torch.from_numpy(labels).to(scores.device)
        if self.conf_loss_type == "SOFTMAX":
            picked = torch.log_softmax(scores, dim=2).gather(2, target.unsqueeze(2))[..., 0]
            losses = -picked.clamp(min=float(np.log(np.finfo(np.float32).tiny)))
        else:
            one_hot = (torch.arange(self.num_classes, device=scores.device) == target[..., None])
            losses = F.binary_cross_entropy_with_logits(
                scores, one_hot.to(scores.dtype), reduction="none").sum(dim=2)
        return losses.float().cpu().numpy()

    def mine(self, matches: Matches, overlaps: Matches, losses: np.ndarray,
             prior_boxes: np.ndarray, decoded: Optional[np.ndarray]) -> List[np.ndarray]:
        """The fork's ``MineHardExamples``: each image's negative priors (ascending); with
        HARD_EXAMPLE the matched priors not selected are unmatched in ``matches``."""
        hard = self.mining_type == "HARD_EXAMPLE"
        use_nms = self.nms_threshold is not None and self.nms_threshold > 0
        negatives = []
        for image, indices in enumerate(matches):
            chosen_negatives = np.zeros(0, dtype=np.int64)
            for label, index in indices.items():
                if hard:
                    candidates = np.arange(len(index))
                    wanted = min(self.sample_size, len(candidates))
                else:
                    candidates = np.flatnonzero((index == -1) & (overlaps[image][label] <
                                                                 np.float32(self.neg_overlap)))
                    positives = np.float32((index > -1).sum()) * np.float32(self.neg_pos_ratio)
                    wanted = min(int(positives), len(candidates))
                if use_nms:
                    boxes = (prior_boxes if self.use_prior_for_nms else decoded[image, 0])
                    kept = apply_nms(boxes[candidates], losses[image, candidates],
                                     self.nms_threshold, self.nms_top_k)
                    selected = candidates[kept[:wanted]]
                else:
                    order = np.argsort(-losses[image, candidates], kind="stable")
                    selected = candidates[order[:wanted]]
                chosen = np.zeros(len(index), dtype=bool)
                chosen[selected] = True
                new_negatives = np.flatnonzero((index == -1) & chosen)
                if hard:
                    index[(index > -1) & ~chosen] = -1
                chosen_negatives = np.union1d(chosen_negatives, new_negatives)
            negatives.append(chosen_negatives)
        return negatives

    # -- the loss ---------------------------------------------------------------------------
    def _loc_rows(self, matches: Matches) -> np.ndarray:
        """``(M, 4)`` int64 ``(image, label, prior, gt)`` of every match, in the fork's order
        (image, label, prior)."""
        rows = [np.stack([np.full(len(hit), image), np.full(len(hit), label), hit,
                          index[hit]], axis=1)
                for image, indices in enumerate(matches) for label, index in
                sorted(indices.items()) for hit in [np.flatnonzero(index > -1)]]
        return np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)

    def _loc_losses(self, loc: torch.Tensor, rows: np.ndarray, truth: GroundTruth,
                    prior_boxes: np.ndarray, prior_variances: np.ndarray,
                    decoded: Optional[np.ndarray]) -> torch.Tensor:
        """``(M,)``: each match's location loss, differentiable as the fork's backward."""
        num = loc.shape[0]
        priors = len(prior_boxes)
        gt_boxes = np.stack([truth[i][0][g] for i, g in rows[:, [0, 3]]]) if len(rows) else (
            np.zeros((0, 4), dtype=np.float32))
        image, prior = rows[:, 0], rows[:, 2]
        loc_class = np.zeros_like(prior) if self.share_location else rows[:, 1]
        targets = encode_boxes(gt_boxes, prior_boxes[prior], prior_variances[prior],
                               self.code_type, self.encode_variance_in_target)
        where = [torch.from_numpy(a).to(loc.device) for a in (image, prior, loc_class)]
        pred = loc.reshape(num, priors, self.num_loc_classes, 4)[where[0], where[1], where[2]]
        target = torch.from_numpy(targets).to(device=loc.device, dtype=loc.dtype)
        if self.bp_inside:
            matched = (prior_boxes[prior] if self.use_prior_for_matching
                       else decoded[image, loc_class, prior])
            outside = torch.from_numpy((matched < 0) | (matched > 1)).to(loc.device)
            pred = torch.where(outside, target, pred)
        if self.encode_variance_in_target:
            variance = torch.from_numpy(prior_variances[prior]).to(loc.device, loc.dtype)
            pred, target = _DivideKeepGradient.apply(pred, variance), target / variance
        d = pred - target
        per = smooth_l1(d) if self.loc_loss_type == "SMOOTH_L1" else 0.5 * d * d
        return per.sum(dim=1)

    def _conf_loss(self, conf: torch.Tensor, truth: GroundTruth, matches: Matches,
                   negatives: Optional[List[np.ndarray]]) -> torch.Tensor:
        """The inner SoftmaxWithLoss (normalization NONE) or SigmoidCrossEntropyLoss sum,
        with the fork's ``EncodeConfPrediction`` rows and targets."""
        num, classes = conf.shape[0], self.num_classes
        priors, background = conf.shape[1] // classes, self.background_label_id
        scores = conf.reshape(num, priors, classes)
        positives = [(image, label, hit, self._labels_of(truth, image, index[hit], True))
                     for image, indices in enumerate(matches)
                     for label, index in sorted(indices.items())
                     for hit in [np.flatnonzero(index > -1)]]
        logistic = self.conf_loss_type == "LOGISTIC"
        if negatives is not None:
            picks, labels = [], []
            for image in range(num):
                for _, _, hit, gt_labels in (p for p in positives if p[0] == image):
                    picks.append(np.stack([np.full(len(hit), image), hit], axis=1))
                    labels.append(gt_labels)
                picks.append(np.stack([np.full(len(negatives[image]), image),
                                       negatives[image]], axis=1))
                labels.append(np.full(len(negatives[image]), -1 if logistic else background))
            picks, labels = np.concatenate(picks), np.concatenate(labels)
            if not len(picks):
                return scores.reshape(-1)[:0].sum()
            index = torch.from_numpy(picks).to(conf.device)
            rows = scores[index[:, 0], index[:, 1]]
            if logistic:
                targets = np.full((len(picks), classes), background, dtype=np.float64)
                targets[labels >= 0, labels[labels >= 0]] = 1
                if 0 <= background < classes:
                    targets[labels == -1, background] = 1
        else:
            rows = scores.reshape(num * priors, classes)
            flat_labels = np.full(num * priors, background, dtype=np.int64)
            targets = np.full(num * priors * classes, background, dtype=np.float64)
            for image, _, hit, gt_labels in positives:
                flat_labels[image * priors + hit] = gt_labels
                # The fork steps its LOGISTIC target pointer by P per image, not P * C.
                targets[image * priors + hit * classes + gt_labels] = 1
            labels, targets = flat_labels, targets.reshape(num * priors, classes)
        if logistic:
            return F.binary_cross_entropy_with_logits(
                rows, torch.from_numpy(targets).to(rows), reduction="sum")
        return softmax_loss(rows, torch.from_numpy(labels).to(conf.device), normalization="none",
                            mode="caffe")

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor,
                gt: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(t.shape) for t in (loc, conf, prior, gt)]
        priors, num = self.num_priors(shapes), loc.shape[0]
        truth = self.ground_truth(gt, num)
        table = prior.detach().float().reshape(-1)[:2 * priors * 4].reshape(2, priors, 4)
        prior_boxes, prior_variances = (a.cpu().numpy() for a in table)
        decoded = None
        if not self.use_prior_for_matching or self.bp_inside or (
                self.nms_threshold and not self.use_prior_for_nms):
            offsets = loc.detach().float().reshape(num, priors, self.num_loc_classes, 4)
            decoded = decode_boxes(offsets.transpose(1, 2), table[0].to(loc.device),
                                   table[1].to(loc.device), self.code_type,
                                   self.encode_variance_in_target).cpu().numpy()
        matches, overlaps = self.find_matches(truth, prior_boxes, decoded, num)
        rows = self._loc_rows(matches)
        loc_losses = self._loc_losses(loc, rows, truth, prior_boxes, prior_variances, decoded)
        negatives = None
        if self.mining:
            hardness = self.prior_conf_losses(conf, truth, matches)
            if self.mining_type == "HARD_EXAMPLE" and len(rows):
                np.add.at(hardness, (rows[:, 0], rows[:, 2]),
                          loc_losses.detach().float().cpu().numpy())
            negatives = self.mine(matches, overlaps, hardness, prior_boxes, decoded)
        still = np.array([matches[i][label][j] > -1 for i, label, j, _ in rows], dtype=bool)
        num_matches = int(still.sum())
        divisor = {"FULL": num * priors, "VALID": num_matches, "BATCH_SIZE": num,
                   "NONE": 1}[self.normalization]
        divisor = float(max(1, divisor))
        # An empty sum anchors the loss to both bottoms: a zero gradient, as the fork's.
        total = loc.reshape(-1)[:0].sum() + conf.reshape(-1)[:0].sum()
        if self.propagate_down[0] and num_matches:
            keep = torch.from_numpy(np.flatnonzero(still)).to(loc.device)
            total = total + self.loc_weight * loc_losses[keep].sum() / divisor
        if self.propagate_down[1]:
            total = total + self._conf_loss(conf, truth, matches, negatives) / divisor
        return total

    def extra_repr(self) -> str:
        parts = [f"num_classes={self.num_classes}"]
        for name, default in self._DEFAULTS.items():
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)
