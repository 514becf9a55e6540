"""The two-stage detector layers of the Caffe forks: Fast/Faster R-CNN's ``ROIPooling``
(rbgirshick/caffe-fast-rcnn), R-FCN's ``PSROIPooling`` (daijifeng001/caffe-rfcn) and the RPN's
``Proposal`` (py-faster-rcnn's ``rpn.proposal_layer.ProposalLayer``, a Python layer that is
replaced by this native module, never executed; OpenCV's ``Proposal`` type with
``proposal_param``).

The forks compute ROI geometry in the net's float type (``Dtype``), and these modules repeat
each operation in that type in Caffe's order, so that bins land exactly where the forks put
them, including the rare bins that float rounding widens by one row (a ROI 57 rows high in 7
bins: ``7 * float(57 / 7)`` is ``57.000004``, and the last bin reaches row 57).

* ``ROIPooling`` takes the maximum over each bin with a sparse table: window maxima of
  ``2^a x 2^b`` rows and columns (with the position of their first maximum in row-major
  order) built by doubling, so that a bin's maximum is the best of four overlapping
  windows. Memory is the feature map times the number of levels, never ROIs x feature map.
* ``PSROIPooling`` averages over each bin with an integral image in float64 (the four-corner
  difference loses nothing to cancellation at float32 sizes).
* ``Proposal`` decodes anchors, clips, filters and sorts in float32 as numpy does in
  py-faster-rcnn, and runs its greedy NMS.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import CaffeFormatError, UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, check_label_range, count

#: Caffe's max pooling starts from -FLT_MAX; a bin holding nothing larger reports it.
FLT_MAX = 3.4028234663852886e38


def caffe_round(value: torch.Tensor) -> torch.Tensor:
    """C's ``round``: halves go away from zero (``torch.round`` rounds them to even).

    ``|v| - floor(|v|)`` is exact in floating point, so the half test never rounds (adding
    0.5 first would turn 0.49999997 into 1 in float32).
    """
    magnitude = value.abs()
    whole = magnitude.floor()
    return torch.copysign(whole + (magnitude - whole >= 0.5).to(value.dtype), value)


def _rois_2d(rois: torch.Tensor) -> torch.Tensor:
    """ROIs ``R x 5`` (Caffe also stores them as ``R x 5 x 1 x 1``)."""
    return rois.reshape(rois.shape[0], 5)


def _check_rois(layer: CaffeLayer, bottom_shapes: Sequence[Shape]) -> None:
    if len(bottom_shapes) != 2:
        raise layer.shape_error(bottom_shapes, "two bottoms: the feature map N x C x H x W and "
                                "the ROIs R x 5 (batch index, x1, y1, x2, y2)")
    data, rois = bottom_shapes
    if len(data) != 4:
        raise layer.shape_error(bottom_shapes, "a 4-axis feature map N x C x H x W")
    if len(rois) < 1 or count(rois, 1) != 5:
        raise layer.shape_error(bottom_shapes, "ROIs of 5 values each (R x 5): batch index, "
                                "x1, y1, x2, y2")


def _refuse_tracing(layer: CaffeLayer) -> None:
    """These layers choose their work from the data (ROI sizes, NMS survivors), which a
    TorchScript trace would freeze to its example: refuse rather than record it."""
    if torch.jit.is_tracing():
        raise UnsupportedParameterError(
            f"a {layer.caffe_type} layer chooses its work from the values of its inputs, "
            "which a TorchScript trace would fix to the example; convert the net to ONNX "
            "or PyTorch source instead")


def _batch_indices(layer: CaffeLayer, rois: torch.Tensor, batch: int) -> torch.Tensor:
    """Caffe's ``int roi_batch_ind = rois[0]`` (truncation), checked against the batch."""
    index = rois[:, 0].detach().long()
    check_label_range(layer, index, batch, what="ROI batch indices")
    return index


# -- ROIPooling ---------------------------------------------------------------------------
def roi_bins(rois: torch.Tensor, pooled: Tuple[int, int], spatial_scale: float,
             size: Tuple[int, int]):
    """Caffe's ROIPooling bins: ``(start, end, roi_start, roi_end, bin_size)`` per axis.

    For each axis (height from y, width from x): ``start`` and ``end`` (``R x P``, int64) are
    the clipped half-open bin bounds, ``roi_start``/``roi_end`` (``R``, int64) the rounded ROI
    corners and ``bin_size`` (``R``, the ROI's float type) the bin length, all computed in the
    ROIs' float type as Caffe does in ``Dtype``.
    """
    dtype = rois.dtype
    scale = torch.tensor(spatial_scale, dtype=torch.float32).to(dtype)
    axes = []
    for column, bins, limit in ((2, pooled[0], size[0]), (1, pooled[1], size[1])):
        roi_start = caffe_round(rois[:, column] * scale).long()
        roi_end = caffe_round(rois[:, column + 2] * scale).long()
        length = torch.clamp(roi_end - roi_start + 1, min=1)  # malformed ROIs become 1 x 1
        bin_size = length.to(dtype) / bins
        steps = torch.arange(bins + 1, dtype=dtype, device=rois.device)
        start = torch.floor(steps[None, :-1] * bin_size[:, None]).long() + roi_start[:, None]
        end = torch.ceil(steps[None, 1:] * bin_size[:, None]).long() + roi_start[:, None]
        axes.append((start.clamp(0, limit), end.clamp(0, limit), roi_start, roi_end, bin_size))
    return axes


def sparse_levels(size: int) -> int:
    """Levels of a sparse table over ``size`` positions: windows of 1, 2, ..., ``2^(L-1)``."""
    return max(size, 1).bit_length()


def _span(length: torch.Tensor, levels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, 2^a)`` with ``2^a`` the largest power of two not above ``length`` (``a = 0`` for
    an empty bin)."""
    level = torch.zeros_like(length)
    for k in range(1, levels):
        level += (length >= 2 ** k).long()
    return level, torch.ones_like(length) << level


def _double(value: torch.Tensor, at: torch.Tensor, step: int, dim: int,
            compare_index: bool):
    """One doubling of a sparse table along ``dim``: the window at ``i`` joined with the one
    at ``i + step``. Along rows the later window's positions are all larger, so ties keep
    the first; along columns a later column can be on an earlier row, so ties compare the
    positions. Entries past the end become -inf."""
    size = value.shape[dim]
    shifted = torch.full_like(value, float("-inf"))
    shifted_at = torch.zeros_like(at)
    if step < size:
        shifted.narrow(dim, 0, size - step).copy_(value.narrow(dim, step, size - step))
        shifted_at.narrow(dim, 0, size - step).copy_(at.narrow(dim, step, size - step))
    take = (_better(value, at, shifted, shifted_at) if compare_index else shifted > value)
    return torch.where(take, shifted, value), torch.where(take, shifted_at, at)


def _better(value, index, other_value, other_index):
    """Whether ``other`` beats ``(value, index)``: larger, or equal and earlier in row-major
    order (Caffe's ``>`` scan keeps the first maximum)."""
    return (other_value > value) | ((other_value == value) & (other_index < index))


def _check_pooling(layer_type: str, sizes: dict, spatial_scale: float) -> None:
    """The settings every ROI pooling shares: sizes of at least 1, a finite scale."""
    if any(int(value) < 1 for value in sizes.values()):
        raise UnsupportedParameterError(
            f"{layer_type}: {' and '.join(sizes)} must be at least 1, got "
            f"{' and '.join(str(value) for value in sizes.values())}")
    if not math.isfinite(float(spatial_scale)):
        raise UnsupportedParameterError(
            f"{layer_type}: spatial_scale must be finite, got {spatial_scale}")


@register_layer("ROIPooling")
class ROIPooling(CaffeLayer):
    r"""Max pooling of each region of interest into a fixed ``pooled_h x pooled_w`` grid
    (Fast R-CNN).

    For ROI ``r = (n, x_1, y_1, x_2, y_2)`` the corners are ``round(x s)`` (C's ``round``,
    halves away from zero; ``s = spatial_scale``), the ROI is
    :math:`h_r = \max(y_2' - y_1' + 1, 1)` rows and :math:`w_r` columns, and bin
    ``(i, j)`` covers rows :math:`[\lfloor i\,h_r/P_h \rfloor, \lceil (i+1)\,h_r/P_h \rceil)
    + y_1'` (the bin size ``h_r / P_h`` computed in the net's float type, as Caffe does),
    clipped to the feature map; likewise columns. :math:`y_{r,c,i,j} = \max x_{n,c,bin}`,
    0 for an empty bin.

    Args:
        pooled_h: ``P_h``, bins per column.
        pooled_w: ``P_w``, bins per row.
        spatial_scale: ``s``, from ROI (image) coordinates to feature-map coordinates
            (``1/16`` after four stride-2 stages).

    Shape:
        - Input: features :math:`(N, C, H, W)`, ROIs :math:`(R, 5)` (or ``R x 5 x 1 x 1``)
          holding ``(batch index, x1, y1, x2, y2)``.
        - Output: :math:`(R, C, P_h, P_w)`.

    Caffe: ``roi_pooling_param { pooled_h pooled_w spatial_scale }`` (rbgirshick's
    caffe-fast-rcnn). Each bin reports its first maximum in row-major order; a bin whose
    values are all ``-inf`` or NaN reports ``-FLT_MAX`` (Caffe's ``>`` skips NaN). The
    gradient follows Caffe's GPU backward (the CPU one is not implemented): each bin's
    gradient goes to its maximum, but only where Caffe's backward finds it, which is inside
    the rounded ROI (a malformed ROI with ``x_2' < x_1'`` passes no gradient, nor does a bin
    that float rounding stretched past the ROI) and in the bins Caffe's feasible-range
    arithmetic ``[floor((h - y_1')/bin), ceil((h - y_1' + 1)/bin))`` lists. The ROIs get no
    gradient. A batch index outside ``[0, N)`` is an error (Caffe's CPU code checks it too).
    """

    __constants__ = ["pooled_h", "pooled_w", "spatial_scale"]
    num_bottoms = (2, 2)
    num_tops = (1, 1)

    def __init__(self, pooled_h: int, pooled_w: int, spatial_scale: float = 1.0):
        super().__init__()
        _check_pooling("ROIPooling", {"pooled_h": pooled_h, "pooled_w": pooled_w},
                       spatial_scale)
        self.pooled_h = int(pooled_h)
        self.pooled_w = int(pooled_w)
        self.spatial_scale = float(spatial_scale)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.roi_pooling_param
        return cls(p.pooled_h, p.pooled_w, p.spatial_scale)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        _check_rois(self, bottom_shapes)
        data, rois = bottom_shapes
        return [(rois[0], data[1], self.pooled_h, self.pooled_w)]

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        _refuse_tracing(self)
        self.output_shapes([tuple(x.shape), tuple(rois.shape)])
        num, channels, height, width = x.shape
        rois = _rois_2d(rois).detach().to(x.dtype)
        batch = _batch_indices(self, rois, num)
        (h0, h1, y_start, y_end, bin_h), (w0, w1, x_start, x_end, bin_w) = roi_bins(
            rois, (self.pooled_h, self.pooled_w), self.spatial_scale, (height, width))
        if rois.shape[0] == 0:
            return x.new_zeros((0, channels, self.pooled_h, self.pooled_w))
        rows, cols = h1 - h0, w1 - w0
        levels = (sparse_levels(int(rows.max())), sparse_levels(int(cols.max())))
        values, positions = self._sparse_table(x.detach(), levels)
        level_h, span_h = _span(rows, levels[0])
        level_w, span_w = _span(cols, levels[1])
        # Four windows of 2^a x 2^b cover each bin: top-left, bottom-left, top-right,
        # bottom-right (clamped for empty bins, which are masked below).
        top, bottom = h0.clamp(max=height - 1), (h1 - span_h).clamp(min=0)
        left, right = w0.clamp(max=width - 1), (w1 - span_w).clamp(min=0)
        level = (level_h[:, :, None] * levels[1] + level_w[:, None, :])  # R x Ph x Pw
        corner_rows = torch.stack([top, bottom, top, bottom], -1)[:, :, None, :]
        corner_cols = torch.stack([left, left, right, right], -1)[:, None, :, :]
        flat = ((batch[:, None, None, None] * (levels[0] * levels[1]) + level[..., None])
                * height + corner_rows) * width + corner_cols  # R x Ph x Pw x 4
        # Tables as rows of C values: one gather of R x Ph x Pw x 4 x C.
        candidates = values.permute(0, 2, 3, 4, 1).reshape(-1, channels)[flat]
        where = positions.permute(0, 2, 3, 4, 1).reshape(-1, channels)[flat]
        best, best_at = candidates[..., 0, :], where[..., 0, :]
        for k in range(1, 4):
            take = _better(best, best_at, candidates[..., k, :], where[..., k, :])
            best = torch.where(take, candidates[..., k, :], best)
            best_at = torch.where(take, where[..., k, :], best_at)
        # R x Ph x Pw x C -> R x C x Ph x Pw; the value is read from x so that autograd
        # routes the gradient to the argmax.
        best_at = best_at.permute(0, 3, 1, 2)
        best = best.permute(0, 3, 1, 2)
        plane = (batch[:, None] * channels + torch.arange(channels, device=x.device))
        pooled = x.reshape(-1).gather(
            0, (plane[:, :, None, None] * (height * width) + best_at).reshape(-1)
        ).reshape(best_at.shape)
        found = best > -FLT_MAX
        empty = ((rows == 0)[:, :, None] | (cols == 0)[:, None, :])[:, None]
        flows = found & self._gradient_reaches(best_at, width, (y_start, y_end, bin_h),
                                               (x_start, x_end, bin_w))
        pooled = torch.where(flows, pooled, pooled.detach())
        pooled = torch.where(found, pooled, pooled.new_tensor(-FLT_MAX))
        return torch.where(empty, pooled.new_zeros(()), pooled)

    @staticmethod
    def _sparse_table(x: torch.Tensor, levels: Tuple[int, int]):
        """Window maxima of ``2^a x 2^b`` at every top-left corner, with the plane index
        ``h W + w`` of their first maximum: ``N x C x (L_h L_w) x H x W`` each (entries whose
        window leaves the map are -inf and never read)."""
        height, width = x.shape[2:]
        base = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
        base_at = torch.arange(height * width, device=x.device).view(height, width)
        base_at = base_at.expand(x.shape)
        rows = [(base, base_at)]
        for a in range(1, levels[0]):
            rows.append(_double(*rows[-1], 2 ** (a - 1), dim=2, compare_index=False))
        values, positions = [], []
        for value, at in rows:
            for b in range(levels[1]):
                if b:
                    value, at = _double(value, at, 2 ** (b - 1), dim=3, compare_index=True)
                values.append(value)
                positions.append(at)
        return torch.stack(values, 2), torch.stack(positions, 2)

    def _gradient_reaches(self, best_at: torch.Tensor, width: int, rows, cols) -> torch.Tensor:
        """Where Caffe's GPU backward passes a bin's gradient to its argmax ``(h, w)``: the
        argmax lies inside the rounded ROI, and the bin is among those Caffe's feasible-range
        arithmetic ``[floor((h - y_1') / bin), ceil((h - y_1' + 1) / bin))`` gives for it
        (likewise for ``w``)."""
        reaches = torch.ones_like(best_at, dtype=torch.bool)
        axes = ((torch.div(best_at, width, rounding_mode="floor"), rows, self.pooled_h,
                 (1, 1, -1, 1)),
                (best_at % width, cols, self.pooled_w, (1, 1, 1, -1)))
        for position, (roi_start, roi_end, bin_size), bins, bin_view in axes:
            roi_start, roi_end, bin_size = (t.view(-1, 1, 1, 1)
                                            for t in (roi_start, roi_end, bin_size))
            offset = (position - roi_start).to(bin_size.dtype)
            first = torch.floor(offset / bin_size).clamp(0, bins)
            last = torch.ceil((offset + 1) / bin_size).clamp(0, bins)
            index = torch.arange(bins, device=best_at.device, dtype=bin_size.dtype)
            index = index.view(bin_view)
            reaches &= (position >= roi_start) & (position <= roi_end)
            reaches &= (first <= index) & (index < last)
        return reaches

    def extra_repr(self) -> str:
        return (f"pooled_h={self.pooled_h}, pooled_w={self.pooled_w}, "
                f"spatial_scale={self.spatial_scale}")


# -- PSROIPooling -------------------------------------------------------------------------
#: R-FCN's floor on a ROI's side in feature-map units (``0.1f``, so a ROI is never empty).
PSROI_MIN_SIDE = float(np.float32(0.1))


def psroi_bins(rois: torch.Tensor, group_size: int, spatial_scale: float,
               size: Tuple[int, int]):
    """R-FCN's bins ``(start, end)`` per axis (height, width), each ``R x G`` int64, clipped
    to the map; computed in the ROIs' float type in the fork's order of operations."""
    dtype = rois.dtype
    scale = torch.tensor(spatial_scale, dtype=torch.float32).to(dtype)
    steps = torch.arange(group_size + 1, dtype=dtype, device=rois.device)
    axes = []
    for column, limit in ((2, size[0]), (1, size[1])):
        roi_start = caffe_round(rois[:, column]) * scale
        roi_end = (caffe_round(rois[:, column + 2]) + 1) * scale
        length = torch.clamp(roi_end - roi_start, min=PSROI_MIN_SIDE)
        bin_size = length / group_size
        start = torch.floor(steps[None, :-1] * bin_size[:, None] + roi_start[:, None])
        end = torch.ceil(steps[None, 1:] * bin_size[:, None] + roi_start[:, None])
        axes.append((start.long().clamp(0, limit), end.long().clamp(0, limit)))
    return axes


@register_layer("PSROIPooling")
class PSROIPooling(CaffeLayer):
    r"""Position-sensitive ROI average pooling (R-FCN): bin ``(i, j)`` of output channel
    ``k`` averages input channel ``(k G + i) G + j`` over the bin.

    ROI corners are ``round(x)`` (halves away from zero) times ``s = spatial_scale``, the far
    corner one pixel further (``(round(x_2) + 1) s``); the ROI's side is at least 0.1 and is
    split into ``G`` bins of ``side / G``; bin ``i`` covers rows
    :math:`[\lfloor i\,b + y_1 \rfloor, \lceil (i+1)\,b + y_1 \rceil)` clipped to the map,
    likewise columns. :math:`y_{r,k,i,j} = \frac{1}{|bin|}\sum_{bin} x_{n,(kG+i)G+j}`, 0 for
    an empty bin.

    Args:
        spatial_scale: ``s``, from ROI (image) coordinates to feature-map coordinates.
        output_dim: ``D``, output channels (classes, or 4 box coordinates times classes).
        group_size: ``G``, the ``G x G`` grid of bins (the pooled size).

    Shape:
        - Input: features :math:`(N, D G^2, H, W)`, ROIs :math:`(R, 5)` (or
          ``R x 5 x 1 x 1``) holding ``(batch index, x1, y1, x2, y2)``.
        - Output: :math:`(R, D, G, G)`.

    Caffe: ``psroi_pooling_param { spatial_scale output_dim group_size }`` (R-FCN's
    caffe-rfcn). Float operations follow its CPU code (``i * b + y_1`` rounded twice; nvcc
    may fuse it into one FMA on the GPU, which moves a bound only when the product lands
    within an ulp of an integer). The sums are exact to float64 where Caffe accumulates in
    the net's type. Backward: each element of a bin gets the bin's gradient over its area,
    as Caffe's GPU kernel; the ROIs get none.
    """

    __constants__ = ["spatial_scale", "output_dim", "group_size"]
    num_bottoms = (2, 2)
    num_tops = (1, 1)

    def __init__(self, spatial_scale: float, output_dim: int, group_size: int):
        super().__init__()
        _check_pooling("PSROIPooling", {"output_dim": output_dim, "group_size": group_size},
                       spatial_scale)
        self.spatial_scale = float(spatial_scale)
        self.output_dim = int(output_dim)
        self.group_size = int(group_size)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.psroi_pooling_param
        # R-FCN declares all three `required`.
        missing = [name for name in ("spatial_scale", "output_dim", "group_size")
                   if not p.HasField(name)]
        if missing:
            raise CaffeFormatError(
                f"layer {param.name!r} (PSROIPooling): psroi_pooling_param needs "
                f"{', '.join(missing)} (R-FCN requires spatial_scale, output_dim and "
                "group_size)")
        return cls(p.spatial_scale, p.output_dim, p.group_size)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        _check_rois(self, bottom_shapes)
        data, rois = bottom_shapes
        groups = self.group_size ** 2
        if data[1] != self.output_dim * groups:
            raise self.shape_error(
                bottom_shapes, f"output_dim x group_size^2 = {self.output_dim} x {groups} = "
                f"{self.output_dim * groups} feature channels, got {data[1]}")
        return [(rois[0], self.output_dim, self.group_size, self.group_size)]

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        _refuse_tracing(self)
        self.output_shapes([tuple(x.shape), tuple(rois.shape)])
        num, channels, height, width = x.shape
        rois = _rois_2d(rois).detach().to(x.dtype)
        batch = _batch_indices(self, rois, num)
        (h0, h1), (w0, w1) = psroi_bins(rois, self.group_size, self.spatial_scale,
                                        (height, width))
        # Integral image with a zero first row and column: S[h, w] = sum x[:h, :w].
        wide = x.double() if x.dtype != torch.float64 else x
        integral = torch.nn.functional.pad(wide.cumsum(2).cumsum(3), (1, 0, 1, 0))
        integral = integral.reshape(-1)
        groups = self.group_size
        channel = torch.arange(channels, device=x.device).view(1, self.output_dim, groups,
                                                               groups)
        plane = (batch.view(-1, 1, 1, 1) * channels + channel) * (height + 1)

        def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            index = (plane + rows[:, None, :, None]) * (width + 1) + cols[:, None, None, :]
            return integral.gather(0, index.reshape(-1)).view(index.shape)

        total = corner(h1, w1) - corner(h0, w1) - corner(h1, w0) + corner(h0, w0)
        area = (h1 - h0)[:, None, :, None] * (w1 - w0)[:, None, None, :]
        # An empty bin is 0; dividing it by 1 keeps NaN out of its (zero) gradient.
        mean = total.to(x.dtype) / area.clamp(min=1).to(x.dtype)
        return torch.where(area > 0, mean, mean.new_zeros(()))

    def extra_repr(self) -> str:
        return (f"spatial_scale={self.spatial_scale}, output_dim={self.output_dim}, "
                f"group_size={self.group_size}")


# -- Proposal -----------------------------------------------------------------------------
#: py-faster-rcnn's Python proposal layer, which a native Proposal replaces.
PYTHON_PROPOSAL = ("rpn.proposal_layer", "ProposalLayer")
#: py-faster-rcnn's ``lib/fast_rcnn/config.py``: RPN settings per phase.
RPN_CONFIG = {
    "TEST": {"pre_nms_topn": 6000, "post_nms_topn": 300, "nms_thresh": 0.7, "min_size": 16},
    "TRAIN": {"pre_nms_topn": 12000, "post_nms_topn": 2000, "nms_thresh": 0.7, "min_size": 16},
}
DEFAULT_RATIOS = (0.5, 1.0, 2.0)
DEFAULT_SCALES = (8.0, 16.0, 32.0)
#: The ``param_str`` keys read: py-faster-rcnn's, and ``ratios`` that its forks add.
PARAM_STR_KEYS = ("feat_stride", "scales", "ratios")


def generate_anchors(base_size: int = 16, ratios: Sequence[float] = DEFAULT_RATIOS,
                     scales: Sequence[float] = DEFAULT_SCALES) -> np.ndarray:
    """py-faster-rcnn's reference anchors, ``A x 4`` float64 ``(x1, y1, x2, y2)``, ratio-major.

    The base box is ``[0, base - 1]^2`` centred at ``c = (base - 1) / 2``; for each ratio
    ``r`` the side ``w = round(sqrt(base^2 / r))``, ``h = round(w r)`` (numpy's rounding, halves
    to even), then for each scale the box of ``w s x h s`` pixels around ``c``:
    ``c -+ (w s - 1) / 2``.
    """
    center = (base_size - 1) / 2.0
    anchors = []
    for ratio in ratios:
        width = np.round(np.sqrt(base_size * base_size / ratio))
        height = np.round(width * ratio)
        for scale in scales:
            half_w, half_h = (width * scale - 1) / 2.0, (height * scale - 1) / 2.0
            anchors.append([center - half_w, center - half_h, center + half_w,
                            center + half_h])
    return np.array(anchors, dtype=np.float64).reshape(-1, 4)


def shifted_anchors(anchors: np.ndarray, height: int, width: int, stride: int) -> np.ndarray:
    """Every anchor at every cell, ``(H W A) x 4`` float32 in py-faster-rcnn's ``(h, w, a)``
    order (cell ``(h, w)`` shifts by ``(w, h) * stride``)."""
    shift_x, shift_y = np.meshgrid(np.arange(width) * stride, np.arange(height) * stride)
    shifts = np.stack([shift_x.ravel(), shift_y.ravel()] * 2, axis=1)
    return (anchors[None, :, :] + shifts[:, None, :]).reshape(-1, 4).astype(np.float32)


def anchor_geometry(anchors: np.ndarray) -> np.ndarray:
    """``4 x K`` float32 widths, heights and centres of anchors, as ``bbox_transform_inv``
    computes them in float32: ``w = x2 - x1 + 1``, ``cx = x1 + 0.5 w``."""
    widths = anchors[:, 2] - anchors[:, 0] + np.float32(1)
    heights = anchors[:, 3] - anchors[:, 1] + np.float32(1)
    return np.stack([widths, heights, anchors[:, 0] + np.float32(0.5) * widths,
                     anchors[:, 1] + np.float32(0.5) * heights])


def parse_param_str(text: str, where: str) -> Dict[str, object]:
    """py-faster-rcnn's ``param_str`` as data: a dict literal (``{'feat_stride': 16}``) or
    the YAML-ish ``'feat_stride': 16`` it writes (one ``key: value`` per line, keys quoted
    or bare, ``!!python/tuple [...]`` read as a list), evaluated by ``ast.literal_eval``
    only. Nothing is imported, executed or YAML-loaded; anything else raises a
    :class:`CaffeFormatError` naming ``where``."""
    body = re.sub(r"!!python/tuple\s*(?=\[)", "", text.strip())
    if body and not body.startswith("{"):
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        lines = [re.sub(r"^([A-Za-z_]\w*)\s*:", r"'\1':", line) for line in lines]
        body = "{" + ", ".join(lines) + "}"
    try:
        value = ast.literal_eval(body) if body else {}
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CaffeFormatError(
            f"{where}: param_str {text!r} is not a plain literal; write a dict of numbers "
            "such as \"'feat_stride': 16\" or \"{'feat_stride': 16, 'scales': [8, 16, 32]}\" "
            "(it is read as data, never executed)")
    return value


def _numbers(value, key: str, where: str) -> Tuple[float, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             and math.isfinite(v) and v > 0 for v in values):
        raise CaffeFormatError(f"{where}: param_str {key!r} must be positive numbers, got "
                               f"{value!r}")
    return tuple(float(v) for v in values)


def _greedy_nms(boxes: torch.Tensor, threshold: float, limit: int) -> List[int]:
    """py-faster-rcnn's NMS on boxes sorted by score: keep a box unless an earlier kept box
    overlaps it by IoU ``> threshold`` (float32, pixel areas ``(x2 - x1 + 1)(y2 - y1 + 1)``);
    stop after ``limit`` boxes (``limit <= 0``: no limit). Overlaps are computed for kept
    boxes only, one row against all boxes each."""
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    bound = torch.tensor(threshold, dtype=torch.float32).to(boxes.dtype)
    removed = np.zeros(boxes.shape[0], dtype=bool)
    keep: List[int] = []
    for i in range(boxes.shape[0]):
        if removed[i]:
            continue
        keep.append(i)
        if len(keep) == limit:
            break
        width = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1) + 1).clamp(min=0)
        height = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1) + 1).clamp(min=0)
        inter = width * height
        removed |= (inter / (areas[i] + areas - inter) > bound).cpu().numpy()
    return keep


@register_layer("Proposal")
class Proposal(CaffeLayer):
    r"""Region proposals from an RPN (Faster R-CNN), as py-faster-rcnn's ``ProposalLayer``.

    For each image: the anchors (:func:`generate_anchors`, ``A = |ratios| |scales|``) at
    every cell, shifted by ``feat_stride``, are moved by the predicted deltas
    (:math:`c' = d_x w + c`, :math:`w' = e^{d_w} w`, box :math:`c' \mp w'/2`), clipped to
    ``[0, W_img - 1] x [0, H_img - 1]``, boxes with a side ``x2 - x1 + 1`` below
    ``min_size * im_scale`` dropped, the rest sorted by foreground score, the best
    ``pre_nms_topn`` kept, greedy NMS at ``nms_thresh`` applied and the first
    ``post_nms_topn`` survivors returned as ``(n, x1, y1, x2, y2)``.

    Args:
        feat_stride: pixels between anchor centres (the feature map's stride).
        base_size: side of the reference anchor.
        min_size: smallest box side kept, in pixels of the original image (multiplied by
            ``im_info``'s scale).
        ratios: anchor aspect ratios ``h / w``.
        scales: anchor scales (multiples of ``base_size``).
        pre_nms_topn: boxes entering NMS (``<= 0``: all).
        post_nms_topn: boxes kept after NMS (``<= 0``: all).
        nms_thresh: IoU above which NMS suppresses a box.
        scores_top: also return the kept boxes' scores.

    Shape:
        - Input: scores :math:`(N, 2A, H, W)` (background for the first ``A`` channels,
          foreground for the next ``A``), deltas :math:`(N, 4A, H, W)` (``dx, dy, dw, dh``
          per anchor), ``im_info`` :math:`(N, 3)` (image height, width, scale).
        - Output: ROIs :math:`(R, 5)` and, with ``scores_top``, scores :math:`(R, 1)`.
          ``R`` depends on the data; the shape rule reports its bound,
          :math:`N \min(\text{post\_nms\_topn}, \text{pre\_nms\_topn}, H W A)`.

    Caffe: the ``Python`` layer ``python_param { module: "rpn.proposal_layer" layer:
    "ProposalLayer" param_str: "'feat_stride': 16" }`` is replaced by this module: its
    ``param_str`` is read as a literal (``feat_stride``, ``scales``, and ``ratios`` as some
    forks add), the rest from py-faster-rcnn's config for the net's phase (TEST: 6000, 300,
    0.7, 16; TRAIN: 12000, 2000, 0.7, 16). The ``Proposal`` type reads OpenCV's
    ``proposal_param { feat_stride base_size min_size ratio scale pre_nms_topn
    post_nms_topn nms_thresh }``. py-faster-rcnn takes one image; here each image of a
    batch gets its own proposals with its batch index and ``im_info`` row. Float32
    arithmetic follows numpy's in py-faster-rcnn, with ``exp`` correctly rounded (numpy's
    float32 ``exp`` depends on its build: its SIMD kernels differ by up to 2 ulps); NMS
    suppresses at IoU ``>`` the float32 threshold (py-faster-rcnn's GPU NMS
    and its CPU NMS agree on it at 0.7). Equal scores are ordered by their position in
    ``(h, w, a)`` order, where py-faster-rcnn's unstable ``argsort`` leaves them in no
    defined order. No gradient (py-faster-rcnn's backward is empty).
    """

    __constants__ = ["feat_stride", "base_size", "min_size", "ratios", "scales",
                     "pre_nms_topn", "post_nms_topn", "nms_thresh", "scores_top"]
    num_bottoms = (3, 3)
    num_tops = (1, 2)  # ROIs, and optionally their scores
    has_backward = False  # py-faster-rcnn's backward passes nothing

    def __init__(self, feat_stride: int = 16, base_size: int = 16, min_size: float = 16.0,
                 ratios: Sequence[float] = DEFAULT_RATIOS,
                 scales: Sequence[float] = DEFAULT_SCALES, pre_nms_topn: int = 6000,
                 post_nms_topn: int = 300, nms_thresh: float = 0.7, scores_top: bool = False):
        super().__init__()
        self.feat_stride = int(feat_stride)
        self.base_size = int(base_size)
        self.min_size = float(min_size)
        self.ratios = tuple(float(r) for r in ratios)
        self.scales = tuple(float(s) for s in scales)
        self.pre_nms_topn = int(pre_nms_topn)
        self.post_nms_topn = int(post_nms_topn)
        self.nms_thresh = float(nms_thresh)
        self.scores_top = bool(scores_top)
        problem = ""
        if self.feat_stride < 1 or self.base_size < 1:
            problem = "feat_stride and base_size must be at least 1"
        elif not self.ratios or not self.scales or not all(
                math.isfinite(v) and v > 0 for v in self.ratios + self.scales):
            problem = "ratios and scales must be non-empty, positive and finite"
        elif not math.isfinite(self.min_size):
            problem = f"min_size must be finite, got {self.min_size}"
        elif not 0 <= self.nms_thresh <= 1:
            problem = f"nms_thresh must lie in [0, 1], got {self.nms_thresh}"
        if problem:
            raise UnsupportedParameterError(f"Proposal: {problem}")
        self._anchors = generate_anchors(self.base_size, self.ratios, self.scales)
        self._cells: Dict[Tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        tops = len(param.top)
        if param.type == "Python":
            where = (f"layer {param.name!r} (Python {PYTHON_PROPOSAL[0]}."
                     f"{PYTHON_PROPOSAL[1]})")
            values = parse_param_str(param.python_param.param_str, where)
            unknown = sorted(set(values) - set(PARAM_STR_KEYS))
            if unknown or "feat_stride" not in values:
                raise CaffeFormatError(
                    f"{where}: param_str needs 'feat_stride' and may give "
                    f"{', '.join(repr(k) for k in PARAM_STR_KEYS[1:])}; got "
                    f"{', '.join(repr(k) for k in values) or 'nothing'}")
            stride = values["feat_stride"]
            if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
                raise CaffeFormatError(f"{where}: param_str 'feat_stride' must be a positive "
                                       f"integer, got {stride!r}")
            config = RPN_CONFIG[ctx.phase]
            return cls(feat_stride=stride,
                       ratios=_numbers(values.get("ratios", DEFAULT_RATIOS), "ratios", where),
                       scales=_numbers(values.get("scales", DEFAULT_SCALES), "scales", where),
                       scores_top=tops == 2, **config)
        p = param.proposal_param
        return cls(p.feat_stride, p.base_size, p.min_size, tuple(p.ratio) or DEFAULT_RATIOS,
                   tuple(p.scale) or DEFAULT_SCALES, p.pre_nms_topn, p.post_nms_topn,
                   p.nms_thresh, scores_top=tops == 2)

    @property
    def num_anchors(self) -> int:
        return len(self._anchors)

    def _bound(self, cells: int) -> int:
        """Most proposals one image can give."""
        bound = cells * self.num_anchors
        for limit in (self.pre_nms_topn, self.post_nms_topn):
            if limit > 0:
                bound = min(bound, limit)
        return bound

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 3:
            raise self.shape_error(bottom_shapes, "three bottoms: scores, box deltas, im_info")
        scores, deltas, info = bottom_shapes
        anchors = self.num_anchors
        if len(scores) != 4 or scores[1] != 2 * anchors:
            raise self.shape_error(bottom_shapes, f"scores N x {2 * anchors} x H x W (two per "
                                   f"anchor, {anchors} anchors)")
        if tuple(deltas) != (scores[0], 4 * anchors) + tuple(scores[2:]):
            raise self.shape_error(bottom_shapes, f"deltas {scores[0]} x {4 * anchors} x "
                                   f"{scores[2]} x {scores[3]} (four per anchor)")
        if len(info) < 2 or info[0] != scores[0] or count(info, 1) < 3:
            raise self.shape_error(bottom_shapes, f"im_info {scores[0]} x 3 (height, width, "
                                   "scale per image)")
        rows = scores[0] * self._bound(scores[2] * scores[3])
        return [(rows, 5), (rows, 1)][:2 if self.scores_top else 1]

    def anchor_geometry(self, height: int, width: int) -> np.ndarray:
        """:func:`anchor_geometry` of every shifted anchor for an ``H x W`` map (cached)."""
        key = (height, width)
        if key not in self._cells:
            self._cells[key] = anchor_geometry(
                shifted_anchors(self._anchors, height, width, self.feat_stride))
        return self._cells[key]

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, deltas: torch.Tensor, im_info: torch.Tensor):
        _refuse_tracing(self)
        self.output_shapes([tuple(scores.shape), tuple(deltas.shape), tuple(im_info.shape)])
        num, _, height, width = scores.shape
        anchors = self.num_anchors
        dtype = scores.dtype
        geometry = torch.from_numpy(self.anchor_geometry(height, width)).to(scores.device, dtype)
        info = im_info.reshape(num, -1)[:, :3].to(dtype)
        rois, kept_scores = [], []
        for n in range(num):
            score = scores[n, anchors:].permute(1, 2, 0).reshape(-1)
            delta = deltas[n].permute(1, 2, 0).reshape(-1, 4).to(dtype)
            boxes = self._decode(delta, geometry, info[n])
            sides = boxes[:, 2:] - boxes[:, :2] + 1
            floor_ = torch.tensor(self.min_size, dtype=dtype, device=boxes.device) * info[n, 2]
            keep = torch.nonzero((sides >= floor_).all(dim=1)).squeeze(1)
            order = torch.sort(score[keep], descending=True, stable=True).indices
            if self.pre_nms_topn > 0:
                order = order[:self.pre_nms_topn]
            chosen = keep[order]
            kept = chosen[_greedy_nms(boxes[chosen], self.nms_thresh, self.post_nms_topn)]
            column = torch.full((len(kept), 1), float(n), dtype=dtype, device=boxes.device)
            rois.append(torch.cat([column, boxes[kept]], dim=1))
            kept_scores.append(score[kept].unsqueeze(1))
        rois_top = torch.cat(rois)
        return (rois_top, torch.cat(kept_scores)) if self.scores_top else rois_top

    @staticmethod
    def _decode(delta: torch.Tensor, geometry: torch.Tensor, info: torch.Tensor):
        """``bbox_transform_inv`` then ``clip_boxes``, operation by operation in float32."""
        widths, heights, center_x, center_y = geometry
        x = delta[:, 0] * widths + center_x
        y = delta[:, 1] * heights + center_y
        # exp correctly rounded (from float64): numpy's float32 exp depends on its build.
        half_w = 0.5 * (torch.exp(delta[:, 2].double()).to(delta.dtype) * widths)
        half_h = 0.5 * (torch.exp(delta[:, 3].double()).to(delta.dtype) * heights)
        right, bottom = info[1] - 1, info[0] - 1
        zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
        return torch.stack([torch.clamp(x - half_w, max=right).maximum(zero),
                            torch.clamp(y - half_h, max=bottom).maximum(zero),
                            torch.clamp(x + half_w, max=right).maximum(zero),
                            torch.clamp(y + half_h, max=bottom).maximum(zero)], dim=1)

    def extra_repr(self) -> str:
        parts = [f"feat_stride={self.feat_stride}"]
        defaults = {"base_size": 16, "min_size": 16.0, "ratios": DEFAULT_RATIOS,
                    "scales": DEFAULT_SCALES, "pre_nms_topn": 6000, "post_nms_topn": 300,
                    "nms_thresh": 0.7, "scores_top": False}
        parts += [f"{key}={getattr(self, key)}" for key, default in defaults.items()
                  if getattr(self, key) != default]
        return ", ".join(parts)
