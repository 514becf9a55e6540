"""ROIPooling (caffe-fast-rcnn), PSROIPooling (R-FCN) and Proposal (py-faster-rcnn's RPN layer).

The references here are the forks' loops written out in numpy, every float operation in the
net's type as the fork's ``Dtype`` code does it: ``roi_pooling_layer.cpp``,
``psroi_pooling_layer.cpp`` and py-faster-rcnn's ``proposal_layer.py`` (with
``generate_anchors.py``, ``bbox_transform.py`` and its NMS). caffe-fast-rcnn's only unit test
is a gradient check (4 x 3 x 12 x 8 data of std 10, four fixed ROIs, 6 x 6 bins); it is
repeated in float64 with those inputs.
"""

import math

import numpy as np
import pytest
import torch

from caffelayers import Net
from caffelayers.errors import (CaffeFormatError, LabelError, ShapeError, UnknownLayerError,
                                UnsupportedParameterError)
from caffelayers.layers.roi import (FLT_MAX, Proposal, PSROIPooling, ROIPooling, caffe_round,
                                    generate_anchors, parse_param_str)
from caffelayers.proto import io

N, C, H, W = 2, 5, 7, 3
F32 = np.float32


# -- references -----------------------------------------------------------------------------
def c_round(value):
    """C's ``round`` on a numpy float: halves away from zero."""
    magnitude = abs(value)
    whole = math.floor(magnitude)
    return math.copysign(whole + (1 if magnitude - whole >= 0.5 else 0), value)


def roi_pooling_loops(x, rois, pooled_h, pooled_w, scale, dtype=F32):
    """caffe-fast-rcnn's ``ROIPoolingLayer::Forward_cpu``: values and argmax (-1: none)."""
    x, rois = x.astype(dtype), rois.astype(dtype)
    height, width = x.shape[2:]
    scale = dtype(F32(scale))
    top = np.zeros((len(rois), x.shape[1], pooled_h, pooled_w), dtype)
    argmax = -np.ones(top.shape, np.int64)
    for r, roi in enumerate(rois):
        n = int(roi[0])
        start_w, start_h, end_w, end_h = (int(c_round(roi[k] * scale)) for k in (1, 2, 3, 4))
        bin_h = dtype(max(end_h - start_h + 1, 1)) / dtype(pooled_h)
        bin_w = dtype(max(end_w - start_w + 1, 1)) / dtype(pooled_w)
        for c in range(x.shape[1]):
            for i in range(pooled_h):
                for j in range(pooled_w):
                    h0 = min(max(int(np.floor(dtype(i) * bin_h)) + start_h, 0), height)
                    h1 = min(max(int(np.ceil(dtype(i + 1) * bin_h)) + start_h, 0), height)
                    w0 = min(max(int(np.floor(dtype(j) * bin_w)) + start_w, 0), width)
                    w1 = min(max(int(np.ceil(dtype(j + 1) * bin_w)) + start_w, 0), width)
                    if h1 <= h0 or w1 <= w0:
                        continue
                    best = -dtype(FLT_MAX)
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            if x[n, c, h, w] > best:
                                best, argmax[r, c, i, j] = x[n, c, h, w], h * width + w
                    top[r, c, i, j] = best
    return top, argmax


def psroi_pooling_loops(x, rois, scale, output_dim, group, dtype=F32):
    """R-FCN's ``PSROIPoolingForward_cpu``."""
    x, rois = x.astype(dtype), rois.astype(dtype)
    height, width = x.shape[2:]
    scale = dtype(F32(scale))
    top = np.zeros((len(rois), output_dim, group, group), dtype)
    for r, roi in enumerate(rois):
        n = int(roi[0])
        start_w, start_h = dtype(c_round(roi[1])) * scale, dtype(c_round(roi[2])) * scale
        end_w, end_h = dtype(c_round(roi[3]) + 1) * scale, dtype(c_round(roi[4]) + 1) * scale
        bin_w = max(end_w - start_w, dtype(F32(0.1))) / dtype(group)
        bin_h = max(end_h - start_h, dtype(F32(0.1))) / dtype(group)
        for k in range(output_dim):
            for i in range(group):
                for j in range(group):
                    h0 = min(max(int(np.floor(dtype(i) * bin_h + start_h)), 0), height)
                    h1 = min(max(int(np.ceil(dtype(i + 1) * bin_h + start_h)), 0), height)
                    w0 = min(max(int(np.floor(dtype(j) * bin_w + start_w)), 0), width)
                    w1 = min(max(int(np.ceil(dtype(j + 1) * bin_w + start_w)), 0), width)
                    if h1 <= h0 or w1 <= w0:
                        continue
                    channel = (k * group + i) * group + j
                    total = dtype(0)
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            total += x[n, channel, h, w]
                    top[r, k, i, j] = total / dtype((h1 - h0) * (w1 - w0))
    return top


def proposals_reference(prob, deltas, im_info, feat_stride=16, pre=6000, post=300,
                        thresh=0.7, min_size=16, anchors=None):
    """py-faster-rcnn's ``ProposalLayer.forward`` for one image, numpy float32 throughout;
    the sort is stable (the inputs have no ties, where py-faster-rcnn's order is undefined)
    and NMS suppresses at IoU > 0.7 (its GPU and CPU NMS agree there)."""
    anchors = generate_anchors() if anchors is None else anchors
    count = len(anchors)
    height, width = prob.shape[-2:]
    shift_x, shift_y = np.meshgrid(np.arange(width) * feat_stride,
                                   np.arange(height) * feat_stride)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).T
    boxes = (anchors.reshape(1, count, 4) + shifts.reshape(-1, 1, 4)).reshape(-1, 4)
    boxes = boxes.astype(F32)
    delta = deltas.transpose(0, 2, 3, 1).reshape(-1, 4)
    score = prob[:, count:].transpose(0, 2, 3, 1).reshape(-1)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    center_x = boxes[:, 0] + 0.5 * widths
    center_y = boxes[:, 1] + 0.5 * heights
    x = delta[:, 0] * widths + center_x
    y = delta[:, 1] * heights + center_y
    # exp correctly rounded: numpy's own float32 exp varies with its build (SIMD kernels).
    box_w, box_h = (np.exp(delta[:, k].astype(np.float64)).astype(F32) * side
                    for k, side in ((2, widths), (3, heights)))
    boxes = np.stack([x - 0.5 * box_w, y - 0.5 * box_h, x + 0.5 * box_w, y + 0.5 * box_h], 1)
    info = im_info[0]
    boxes[:, 0::2] = np.maximum(np.minimum(boxes[:, 0::2], info[1] - 1), 0)
    boxes[:, 1::2] = np.maximum(np.minimum(boxes[:, 1::2], info[0] - 1), 0)
    sides = boxes[:, 2:] - boxes[:, :2] + 1
    keep = np.where((sides >= F32(min_size * info[2])).all(1))[0]
    boxes, score = boxes[keep], score[keep]
    order = np.argsort(-score, kind="stable")
    if pre > 0:
        order = order[:pre]
    boxes, score = boxes[order], score[order]
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    suppressed = np.zeros(len(boxes), bool)
    kept = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        kept.append(i)
        inter = (np.maximum(F32(0), np.minimum(x2[i], x2) - np.maximum(x1[i], x1) + 1) *
                 np.maximum(F32(0), np.minimum(y2[i], y2) - np.maximum(y1[i], y1) + 1))
        suppressed |= inter / (areas[i] + areas - inter) > F32(thresh)
    if post > 0:
        kept = kept[:post]
    return np.hstack([np.zeros((len(kept), 1), F32), boxes[kept]]), score[kept]


def rpn_outputs(seed, anchors=9, height=6, width=11, delta_std=0.3, images=1):
    """Softmax scores (background then foreground per anchor) without ties, and deltas."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((images, 2, anchors * height, width)).astype(F32) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    prob = probabilities.reshape(images, 2 * anchors, height, width).astype(F32)
    foreground = prob[:, anchors:].ravel()
    assert len(np.unique(foreground)) == foreground.size, "tied scores: pick another seed"
    deltas = (rng.standard_normal((images, 4 * anchors, height, width)) * delta_std).astype(F32)
    return prob, deltas


def tensors(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


# -- ROIPooling -----------------------------------------------------------------------------
# Corners that land on halves after scaling, ROIs past the map, a malformed one (x2 < x1),
# one of a single pixel, and one whose corners truncate/round differently.
ROIS = np.array([[0, 0, 0, 5, 13], [1, 2, 4, 5, 9], [1, -7, -3, 30, 40], [0, 4, 6, 1, 1],
                 [1, 3, 3, 3, 3], [0, 1.5, 0.5, 4.49, 12.5], [1, 20, 20, 40, 40]], F32)


@pytest.mark.parametrize("pooled, scale", [((3, 2), 1.0), ((2, 3), 0.5), ((4, 1), 0.625)])
def test_roi_pooling_matches_caffe_loops(pooled, scale):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, 14, 6)).astype(F32)
    x[0, :, 2:5, 1:4] = 0  # a block of ties: the first maximum in row-major order wins
    got = ROIPooling(*pooled, scale)(*tensors(x, ROIS))
    want, _ = roi_pooling_loops(x, ROIS, *pooled, scale)
    assert got.shape == (len(ROIS), C) + pooled
    np.testing.assert_array_equal(got.numpy(), want)


def test_roi_pooling_rounds_halves_away_from_zero():
    """x * scale = +-0.5 and 2.5 round to +-1 and 3 (C's round), not to even."""
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(1, 2, 3, 8)
    rois = torch.tensor([[0, 8, 0, 40, 0], [0, -8, 0, 8, 0]])
    got = ROIPooling(1, 1, 1 / 16)(x, rois)
    assert torch.equal(caffe_round(torch.tensor([0.5, -0.5, 2.5, 0.49999997])),
                       torch.tensor([1.0, -1.0, 3.0, 0.0]))
    # ROI 0 covers columns 1..3 of row 0 (max at column 3), ROI 1 columns 0..1 (clipped).
    assert got[:, 0, 0, 0].tolist() == [3.0, 1.0]


def test_roi_pooling_float_bins_stretch_like_caffe():
    """A ROI of 57 rows in 7 bins: ``7 * float(57 / 7) = 57.000004``, so Caffe's last bin
    ends at row 58, one past the ROI; its gradient there is dropped by Caffe's backward,
    which only looks inside the ROI."""
    x = torch.zeros(1, 1, 60, 1)
    x[0, 0, 57, 0] = 5.0
    x.requires_grad_(True)
    rois = torch.tensor([[0.0, 0, 0, 0, 56]])
    top = ROIPooling(7, 1, 1.0)(x, rois)
    want, argmax = roi_pooling_loops(x.detach().numpy(), rois.numpy(), 7, 1, 1.0)
    assert top[0, 0, -1, 0].item() == 5.0 and argmax[0, 0, -1, 0] == 57
    np.testing.assert_array_equal(top.detach().numpy(), want)
    top.sum().backward()
    assert x.grad[0, 0, 57, 0].item() == 0.0


def test_roi_pooling_special_values():
    """Negative maxima stay; a bin of -inf reports -FLT_MAX; NaN never wins (Caffe's ``>``);
    a bin outside the map is 0."""
    x = -torch.rand(1, 1, 4, 3) - 1
    x[0, 0, 0, 0] = float("nan")
    x[0, 0, 3, :] = float("-inf")
    rois = torch.tensor([[0.0, 0, 0, 2, 1], [0, 0, 3, 2, 3], [0, 5, 5, 9, 9]])
    got = ROIPooling(1, 1, 1.0)(x, rois)[:, 0, 0, 0]
    assert got[0].item() == x[0, 0, :2, :].flatten()[1:].max().item() < 0
    assert got[1].item() == -FLT_MAX and got[2].item() == 0.0


def test_roi_pooling_backward_routes_to_the_argmax():
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((N, C, 14, 6)), 0).astype(F32)  # ReLU zeros: ties
    grad = rng.standard_normal((len(ROIS), C, 3, 2)).astype(F32)
    xt = torch.from_numpy(x).requires_grad_(True)
    ROIPooling(3, 2, 1.0)(xt, torch.from_numpy(ROIS)).backward(torch.from_numpy(grad))
    _, argmax = roi_pooling_loops(x, ROIS, 3, 2, 1.0)
    want = np.zeros((N, C, 14 * 6), F32)
    for r, roi in enumerate(ROIS):
        malformed = roi[3] < roi[1] or roi[4] < roi[2]  # Caffe's backward skips it
        for index in np.ndindex(argmax.shape[1:]):
            if argmax[(r,) + index] >= 0 and not malformed:
                want[int(roi[0]), index[0], argmax[(r,) + index]] += grad[(r,) + index]
    np.testing.assert_allclose(xt.grad.numpy().reshape(N, C, -1), want, rtol=1e-6, atol=1e-6)


def test_roi_pooling_gradcheck_caffe_unit_test():
    """caffe-fast-rcnn's ``TestGradient``: 4 x 3 x 12 x 8 of std 10, its four ROIs, 6 x 6."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 12, 8, generator=generator, dtype=torch.float64) * 10)
    rois = torch.tensor([[0, 1, 1, 6, 6], [2, 6, 2, 7, 11], [1, 3, 1, 5, 10], [0, 3, 3, 3, 3]],
                        dtype=torch.float64)
    layer = ROIPooling(6, 6, 1.0)
    assert torch.autograd.gradcheck(lambda t: layer(t, rois), (x.requires_grad_(True),))


def test_roi_pooling_gradcheck_distinct_sizes():
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[1, 0, 0, 2, 6], [0, 0.5, 1.5, 2, 5], [1, -4, -4, 9, 9]],
                        dtype=torch.float64)
    layer = ROIPooling(3, 2, 0.5)
    assert torch.autograd.gradcheck(lambda t: layer(t, rois), (x,))


def test_roi_pooling_errors_name_the_layer():
    layer = ROIPooling(2, 2)
    layer.layer_name = "roi_pool5"
    with pytest.raises(ShapeError, match="roi_pool5.*5 values"):
        layer.output_shapes([(N, C, H, W), (4, 4)])
    with pytest.raises(LabelError, match="roi_pool5.*batch indices"):
        layer(torch.zeros(N, C, H, W), torch.tensor([[2.0, 0, 0, 1, 1]]))
    with pytest.raises(UnsupportedParameterError, match="pooled_h"):
        ROIPooling(0, 2)


def input_layers(**shapes):
    return "".join(f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
                   f'{" ".join(f"dim: {d}" for d in shape)} }} }} }}\n'
                   for name, shape in shapes.items())


def test_roi_layers_from_prototxt():
    text = input_layers(x=(N, 12, H, W), rois=(4, 5, 1, 1)) + (
        'layer { name: "pool" type: "ROIPooling" bottom: "x" bottom: "rois" top: "pool" '
        'roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.0625 } }\n'
        'layer { name: "ps" type: "PSROIPooling" bottom: "x" bottom: "rois" top: "ps" '
        'psroi_pooling_param { spatial_scale: 0.5 output_dim: 3 group_size: 2 } }\n')
    net = Net(io.parse_prototxt(text))
    assert net.graph.blob_shapes["pool"] == (4, 12, 3, 2)
    assert net.graph.blob_shapes["ps"] == (4, 3, 2, 2)
    pool, ps = (node.module for node in net.graph.nodes[2:])
    assert (pool.pooled_h, pool.pooled_w, pool.spatial_scale) == (3, 2, 0.0625)
    assert (ps.spatial_scale, ps.output_dim, ps.group_size) == (0.5, 3, 2)
    with pytest.raises(CaffeFormatError, match="'bad'.*group_size"):
        Net(io.parse_prototxt(input_layers(x=(N, 12, H, W), rois=(4, 5)) + (
            'layer { name: "bad" type: "PSROIPooling" bottom: "x" bottom: "rois" top: "y" '
            'psroi_pooling_param { spatial_scale: 0.5 output_dim: 3 } }\n')))


# -- PSROIPooling ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3])
def test_psroi_pooling_matches_rfcn_loops(dtype, scale):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, 3 * 2 * 2, 9, 5)).astype(dtype)
    got = PSROIPooling(scale, 3, 2)(*tensors(x, ROIS.astype(dtype)))
    want = psroi_pooling_loops(x, ROIS, scale, 3, 2, dtype)
    assert got.shape == (len(ROIS), 3, 2, 2)
    # The bin sums are exact to float64 here; R-FCN accumulates in the net's type.
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_psroi_pooling_backward_spreads_over_the_bin():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((N, 12, H, W)).astype(F32)).requires_grad_(True)
    rois = torch.tensor([[1, 0, 1, 2, 5], [0, 1, 1, 1, 1]], dtype=torch.float32)
    grad = torch.from_numpy(rng.standard_normal((2, 3, 2, 2)).astype(F32))
    PSROIPooling(1.0, 3, 2)(x, rois).backward(grad)
    want = np.zeros((N, 12, H, W), F32)
    # ROI 0: columns [0, 3) in 1.5-wide bins -> [0, 2), [1, 3); rows [1, 6) -> [1, 4), [3, 6).
    # ROI 1: one pixel, bins of 0.5 -> every bin is pixel (1, 1).
    bins = {0: ([(1, 4), (3, 6)], [(0, 2), (1, 3)]), 1: ([(1, 2), (1, 2)], [(1, 2), (1, 2)])}
    for r, (rows, cols) in bins.items():
        n = int(rois[r, 0])
        for k in range(3):
            for i, (h0, h1) in enumerate(rows):
                for j, (w0, w1) in enumerate(cols):
                    area = (h1 - h0) * (w1 - w0)
                    want[n, (k * 2 + i) * 2 + j, h0:h1, w0:w1] += grad[r, k, i, j].item() / area
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-6, atol=1e-7)


def test_psroi_pooling_gradcheck():
    x = torch.randn(N, 12, H, W, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 2, 6], [1, 1, 2, 2, 5], [0, -1, -1, 9, 9], [1, 5, 0, 9, 9]],
                        dtype=torch.float64)
    layer = PSROIPooling(0.5, 3, 2)
    assert torch.autograd.gradcheck(lambda t: layer(t, rois), (x,))


def test_psroi_pooling_channel_check():
    layer = PSROIPooling(1.0, 3, 2)
    layer.layer_name = "psroi_cls"
    with pytest.raises(ShapeError, match="psroi_cls.*12 feature channels, got 10"):
        layer.output_shapes([(N, 10, H, W), (4, 5)])


# -- Proposal -------------------------------------------------------------------------------
def test_generate_anchors_matches_py_faster_rcnn():
    """py-faster-rcnn's ``generate_anchors()`` output (base 16, ratios 0.5/1/2, scales 8/16/32;
    the comment in its file lists Matlab's 1-based copy of the same boxes)."""
    want = [[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
            [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
            [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]]
    np.testing.assert_array_equal(generate_anchors(), want)


def run_proposal(layer, prob, deltas, info):
    out = layer(*tensors(prob, deltas, info))
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("pre, post, scale", [(6000, 300, 1.0), (60, 20, 1.0), (6000, 300, 2.5),
                                              (0, 0, 0.5)])
def test_proposal_matches_py_faster_rcnn(pre, post, scale):
    """Every stage at work: boxes leave the image (clipped), small ones are dropped (min_size
    16 at im_info's scale), the pre-NMS cut, NMS at 0.7 and the post-NMS cut."""
    prob, deltas = rpn_outputs(seed=4)
    info = np.array([[90, 170, scale]], F32)
    layer = Proposal(16, pre_nms_topn=pre, post_nms_topn=post, scores_top=True)
    rois, scores = run_proposal(layer, prob, deltas, info)
    want_rois, want_scores = proposals_reference(prob, deltas, info, pre=pre, post=post)
    assert rois.shape == want_rois.shape and len(rois) > 0
    np.testing.assert_array_equal(rois.numpy(), want_rois)
    np.testing.assert_array_equal(scores.numpy()[:, 0], want_scores)
    assert layer.output_shapes([prob.shape, deltas.shape, info.shape])[0][0] >= len(rois)


def test_proposal_filters_and_suppresses():
    """The stages change the result: without the size filter or NMS there would be more."""
    prob, deltas = rpn_outputs(seed=4)
    info = np.array([[90, 170, 2.5]], F32)
    (rois,) = run_proposal(Proposal(16), prob, deltas, info)
    (loose,) = run_proposal(Proposal(16, min_size=0, nms_thresh=1.0), prob, deltas, info)
    assert len(rois) < len(loose) == min(300, prob.size // 2)
    sides = rois[:, 3:] - rois[:, 1:3] + 1
    assert float(sides.min()) >= 16 * 2.5


def test_proposal_batch_gives_each_image_its_rows():
    """py-faster-rcnn takes one image; here each image gets its own proposals."""
    prob, deltas = rpn_outputs(seed=5, images=2)
    info = np.array([[90, 170, 1.0], [70, 120, 0.5]], F32)
    (rois,) = run_proposal(Proposal(16, post_nms_topn=40), prob, deltas, info)
    for n in range(2):
        want, _ = proposals_reference(prob[n:n + 1], deltas[n:n + 1], info[n:n + 1], post=40)
        mine = rois[rois[:, 0] == n].numpy()
        np.testing.assert_array_equal(mine[:, 1:], want[:, 1:])
    assert rois[:, 0].tolist() == sorted(rois[:, 0].tolist())


def test_proposal_custom_anchors():
    ratios, scales = (0.5, 1.0), (2.0, 4.0, 8.0, 16.0)
    anchors = generate_anchors(16, ratios, scales)
    prob, deltas = rpn_outputs(seed=6, anchors=len(anchors))
    info = np.array([[90, 170, 1.0]], F32)
    (rois,) = run_proposal(Proposal(16, ratios=ratios, scales=scales), prob, deltas, info)
    want, _ = proposals_reference(prob, deltas, info, anchors=anchors)
    np.testing.assert_array_equal(rois.numpy(), want)


def test_proposal_shape_errors():
    layer = Proposal(16)
    layer.layer_name = "proposal"
    with pytest.raises(ShapeError, match="proposal.*18"):
        layer.output_shapes([(1, 16, 5, 7), (1, 36, 5, 7), (1, 3)])
    with pytest.raises(ShapeError, match="deltas"):
        layer.output_shapes([(1, 18, 5, 7), (1, 36, 5, 6), (1, 3)])
    with pytest.raises(ShapeError, match="im_info"):
        layer.output_shapes([(1, 18, 5, 7), (1, 36, 5, 7), (1, 2)])


# -- Proposal from the prototxt: py-faster-rcnn's Python layer and OpenCV's type -------------
def proposal_net(layer: str, tops=("rois",)) -> str:
    text = input_layers(prob=(1, 18, 5, 7), deltas=(1, 36, 5, 7), im_info=(1, 3))
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return text + (f'layer {{ name: "proposal" type: {layer.split(" ", 1)[0]} bottom: "prob" '
                   f'bottom: "deltas" bottom: "im_info" {top_lines} {layer.split(" ", 1)[1]} }}\n')


def python_layer(param_str: str, module="rpn.proposal_layer", name="ProposalLayer") -> str:
    return (f"'Python' python_param {{ module: '{module}' layer: '{name}' "
            f"param_str: {param_str} }}")


@pytest.mark.parametrize("param_str, stride, scales", [
    ("\"'feat_stride': 16\"", 16, (8.0, 16.0, 32.0)),  # py-faster-rcnn's own text
    ("\"{'feat_stride': 8, 'scales': (4, 8)}\"", 8, (4.0, 8.0)),
    ("\"'feat_stride': 16\\n'scales': !!python/tuple [2, 4]\"", 16, (2.0, 4.0)),
    ("\"feat_stride: 32\"", 32, (8.0, 16.0, 32.0)),
])
def test_python_proposal_layer_is_replaced(param_str, stride, scales, tmp_path):
    path = tmp_path / "test.prototxt"
    anchors = 3 * len(scales)
    text = proposal_net(python_layer(param_str), tops=("rois", "scores"))
    path.write_text(text.replace("dim: 18", f"dim: {2 * anchors}")
                    .replace("dim: 36", f"dim: {4 * anchors}"))
    net = Net(path)
    node = net.graph.nodes[-1]
    assert node.type == "Proposal" and node.param.type == "Python"
    layer = node.module
    assert (layer.feat_stride, layer.scales, layer.ratios) == (stride, scales, (0.5, 1.0, 2.0))
    assert (layer.pre_nms_topn, layer.post_nms_topn, layer.nms_thresh, layer.min_size) == \
        (6000, 300, 0.7, 16.0)  # py-faster-rcnn's TEST config
    bound = min(300, 5 * 7 * anchors)  # post_nms_topn, or every anchor when fewer
    assert net.graph.blob_shapes["rois"] == (bound, 5)
    assert net.graph.blob_shapes["scores"] == (bound, 1)
    train = Net(path, phase="TRAIN").graph.nodes[-1].module
    assert (train.pre_nms_topn, train.post_nms_topn) == (12000, 2000)


@pytest.mark.parametrize("param_str", [
    "\"'feat_stride': __import__('os').getpid()\"",
    "\"{'feat_stride': open('/etc/passwd').read()}\"",
    "\"!!python/object/apply:os.getpid []\"",
])
def test_param_str_that_is_not_a_literal_is_refused(param_str, tmp_path):
    path = tmp_path / "evil.prototxt"
    path.write_text(proposal_net(python_layer(param_str)))
    with pytest.raises(CaffeFormatError) as error:
        Net(path)
    message = str(error.value)
    assert str(path) in message and "'proposal'" in message and "not a plain literal" in message


@pytest.mark.parametrize("param_str, problem", [
    ("\"'scales': [8]\"", "needs 'feat_stride'"),
    ("\"'feat_stride': 16, 'base_size': 8\"", "'base_size'"),
    ("\"'feat_stride': 1.5\"", "positive integer"),
    ("\"'feat_stride': 16, 'scales': [0]\"", "positive numbers"),
])
def test_param_str_bad_values(param_str, problem, tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text(proposal_net(python_layer(param_str)))
    with pytest.raises(CaffeFormatError, match=problem):
        Net(path)


def test_parse_param_str_reads_data_only():
    assert parse_param_str("'feat_stride': 16", "x") == {"feat_stride": 16}
    assert parse_param_str("", "x") == {}
    with pytest.raises(CaffeFormatError, match="x: param_str"):
        parse_param_str("[1, 2]", "x")


def test_other_python_layers_stay_refused():
    for module, name in (("rpn.anchor_target_layer", "AnchorTargetLayer"),
                         ("rpn.proposal_layer", "SomethingElse"), ("my.proposal_layer",
                                                                   "ProposalLayer")):
        text = proposal_net(python_layer("\"'feat_stride': 16\"", module, name))
        with pytest.raises(UnknownLayerError, match="'proposal' \\(Python\\).*never executed"):
            Net(io.parse_prototxt(text))


def test_native_proposal_type():
    text = proposal_net("'Proposal' proposal_param { feat_stride: 16 base_size: 16 "
                        "min_size: 8 ratio: 0.5 ratio: 1 ratio: 2 scale: 8 scale: 16 "
                        "scale: 32 pre_nms_topn: 100 post_nms_topn: 30 nms_thresh: 0.6 }")
    layer = Net(io.parse_prototxt(text)).graph.nodes[-1].module
    assert (layer.min_size, layer.pre_nms_topn, layer.post_nms_topn) == (8.0, 100, 30)
    assert layer.nms_thresh == pytest.approx(0.6) and layer.scales == (8.0, 16.0, 32.0)
    defaults = proposal_net("'Proposal' proposal_param { feat_stride: 16 }")
    layer = Net(io.parse_prototxt(defaults)).graph.nodes[-1].module
    assert (layer.ratios, layer.scales, layer.post_nms_topn) == ((0.5, 1.0, 2.0),
                                                                 (8.0, 16.0, 32.0), 300)
