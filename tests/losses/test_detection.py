"""SmoothL1Loss (Fast/Faster R-CNN, SSD, R-FCN) and SSD's MultiBoxLoss.

Facts carried from the forks' unit tests: weiliu89/caffe (branch ssd)
``test_bbox_util.cpp``'s MatchBBox, EncodeBBox, ApplyNMS and ComputeConfLoss numbers, and
``test_multibox_loss_layer.cpp``'s settings grid (3 images, 3 classes, a 2 x 2 map with 4
priors per cell of a 20 x 20 image, its four ground-truth rows), run here as float64
gradchecks; rbgirshick/caffe-fast-rcnn's ``test_smooth_L1_loss_layer.cpp`` (sigma 2.4,
inside and outside weights, loss weight 3.7). The hand-computed MultiBoxLoss cases below
derive their numbers on paper, not from the module.
"""

import math

import numpy as np
import pytest
import torch

from caffelayers import Net, Solver
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.converters.pytorch import ConvertedNet
from caffelayers.errors import (LabelError, ShapeError, UnknownLayerError,
                                UnsupportedParameterError)
from caffelayers.layers.ssd import PriorBox
from caffelayers.losses.detection import (MultiBoxLoss, SmoothL1Loss, apply_nms, encode_boxes,
                                          match_boxes)

N, C, H, W = 2, 5, 7, 3
F64 = torch.float64


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# -- SmoothL1Loss ---------------------------------------------------------------------------
def smooth_l1_reference(a, b, w_in=None, w_out=None, sigma=1.0, divisor=None):
    """numpy float64: sum(w_out * f(w_in * (a - b))) / divisor (N by default)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a - b) * (1.0 if w_in is None else np.asarray(w_in))
    s2 = float(np.float32(sigma) * np.float32(sigma))  # the fork's float32 product
    errors = np.where(np.abs(d) < 1 / s2, 0.5 * s2 * d * d, np.abs(d) - 0.5 / s2)
    errors = errors * (1.0 if w_out is None else np.asarray(w_out))
    return errors.sum() / (a.shape[0] if divisor is None else divisor)


@pytest.mark.parametrize("sigma, weights", [(1.0, 0), (3.0, 0), (1.0, 1), (2.4, 2)])
def test_smooth_l1_forward_matches_numpy(sigma, weights):
    a, b = randn(N, C, H, W, seed=1, scale=0.6), randn(N, C, H, W, seed=2, scale=0.6)
    extra = [randn(N, C, H, W, seed=3 + k) for k in range(weights)]
    loss = SmoothL1Loss(sigma)(a, b, *extra)
    numpy = [t.numpy() for t in (a, b, *extra)]
    assert loss.shape == ()
    assert loss.item() == pytest.approx(smooth_l1_reference(*numpy, sigma=sigma), rel=1e-12)


def test_smooth_l1_gradcheck_two_and_four_bottoms():
    """The fork's test: sigma 2.4 with gaussian inside and outside weights (float64)."""
    a = randn(N, C, H, W, seed=1).requires_grad_()
    b = randn(N, C, H, W, seed=2).requires_grad_()
    w_in, w_out = randn(N, C, H, W, seed=3), randn(N, C, H, W, seed=4)
    assert torch.autograd.gradcheck(lambda x, y: SmoothL1Loss(2.4)(x, y, w_in, w_out), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: SmoothL1Loss()(x, y), (a, b))


def test_smooth_l1_three_bottoms_backward_is_the_forks():
    """Fast R-CNN and SSD: the gradient is +-f'(w (a - b)) / N, not multiplied by w."""
    a = randn(N, C, H, W, seed=1).requires_grad_()
    b = randn(N, C, H, W, seed=2).requires_grad_()
    w = randn(N, C, H, W, seed=3)
    loss = SmoothL1Loss()(a, b, w)
    loss.backward()
    d = (w * (a - b)).detach()
    slope = torch.where(d.abs() < 1, d, torch.sign(d)) / N
    torch.testing.assert_close(a.grad, slope, rtol=0, atol=1e-15)
    torch.testing.assert_close(b.grad, -slope, rtol=0, atol=1e-15)
    assert loss.item() == pytest.approx(
        smooth_l1_reference(a.detach(), b.detach(), w.numpy()), rel=1e-12)


@pytest.mark.parametrize("mode, divisor", [("VALID", N * H * W), ("FULL", N * H * W),
                                           ("BATCH_SIZE", N), ("PRE_FIXED", 128), ("NONE", 1)])
def test_smooth_l1_rfcn_normalization(mode, divisor):
    """R-FCN (daijifeng001/caffe-rfcn) divides by N H W for VALID and FULL (not by C)."""
    a, b, w = randn(N, C, H, W, seed=1), randn(N, C, H, W, seed=2), randn(N, C, H, W, seed=3)
    layer = SmoothL1Loss(normalization=mode, pre_fixed_normalizer=128, instance_loss=True)
    loss, per_instance = layer(a, b, w)
    assert loss.item() == pytest.approx(
        smooth_l1_reference(a, b, w.numpy(), divisor=divisor), rel=1e-12)
    d = (w * (a - b)).numpy()
    errors = np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)
    np.testing.assert_allclose(per_instance.numpy(), errors.sum(axis=1, keepdims=True),
                               rtol=1e-12)
    assert layer.output_shapes([a.shape] * 3) == [(), (N, 1, H, W)]


def test_smooth_l1_refuses_what_no_fork_defines():
    a = torch.zeros(N, C, H, W)
    with pytest.raises(ShapeError, match="both inside and outside"):
        SmoothL1Loss(3.0)(a, a, a)
    with pytest.raises(ShapeError, match="outside weights"):
        SmoothL1Loss(normalization="VALID")(a, a, a, a)
    with pytest.raises(ShapeError, match="one shape"):
        SmoothL1Loss()(a, torch.zeros(N, C, H, W + 1))
    with pytest.raises(UnsupportedParameterError, match="sigma must be positive"):
        SmoothL1Loss(0.0)
    with pytest.raises(UnsupportedParameterError, match="no sigma"):
        SmoothL1Loss(2.0, normalization="VALID")


SHAPE = f"shape {{ dim: {N} dim: {C} dim: {H} dim: {W} }}"
SMOOTH_L1_NET = 'name: "smooth_l1"\n' + "".join(
    f'layer {{ name: "{blob}" type: "Input" top: "{blob}" input_param {{ {SHAPE} }} }}\n'
    for blob in ("a", "b", "wi", "wo"))
SMOOTH_L1_LAYERS = {
    "faster": 'bottom: "a" bottom: "b" bottom: "wi" bottom: "wo" top: "loss" loss_weight: 3.7 '
              'smooth_l1_loss_param { sigma: 2.4 }',
    "ssd": 'bottom: "a" bottom: "b" bottom: "wi" top: "loss" loss_weight: 3.7',
    "rfcn": 'bottom: "a" bottom: "b" bottom: "wi" top: "loss" top: "per_roi" '
            'loss_param { normalization: VALID }',
}


def smooth_l1_net(tmp_path, kind, extra=""):
    path = tmp_path / f"{kind}.prototxt"
    path.write_text(SMOOTH_L1_NET + 'layer { name: "loss" type: "SmoothL1Loss" '
                    + SMOOTH_L1_LAYERS[kind] + extra + " }\n")
    return Net(path, phase="TRAIN")


def smooth_l1_inputs():
    # A net without parameters runs in float32 (the default dtype) whatever its dtype says.
    return {name: randn(N, C, H, W, seed=seed).float()
            for seed, name in enumerate("a b wi wo".split())}


@pytest.mark.parametrize("kind", sorted(SMOOTH_L1_LAYERS))
def test_smooth_l1_in_a_net_onnx_and_source(tmp_path, kind):
    """Net (backward scaled by loss_weight 3.7), onnxruntime and the generated source."""
    net = smooth_l1_net(tmp_path, kind)
    inputs = smooth_l1_inputs()
    out = net(**inputs)
    layer = net.graph.nodes[-1].module
    arrays = [inputs[name].numpy() for name in ("a", "b", "wi", "wo")]
    if kind == "faster":
        expected = smooth_l1_reference(*arrays, sigma=2.4)
    else:
        expected = smooth_l1_reference(*arrays[:3], divisor=N * H * W if kind == "rfcn" else N)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)  # float32 sums
    weight = 1.0 if kind == "rfcn" else 3.7
    net.backward()
    d = inputs["wi"] * (inputs["a"] - inputs["b"])
    s2 = layer.sigma2
    slope = torch.where(d.abs() < 1 / s2, s2 * d, torch.sign(d)) / layer.divisor(d.shape)
    if kind == "faster":
        slope = slope * inputs["wi"] * inputs["wo"]
    torch.testing.assert_close(net.diffs["a"], weight * slope)
    torch.testing.assert_close(net.diffs["b"], -weight * slope)
    assert not net.diffs["wi"].any()
    onnx_out = run_onnx(convert_to_onnx(net), {k: v.numpy() for k, v in inputs.items()})
    source_out = ConvertedNet(net, "pytorch-source")(**inputs)
    for blob in (b for b in out if b not in inputs):  # an unread input is an output too
        np.testing.assert_allclose(onnx_out[blob], out[blob].detach().numpy(), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(source_out[blob], out[blob].detach())


def test_smooth_l1_fork_is_read_from_the_layer(tmp_path):
    """A sigma or a fourth bottom is py-faster-rcnn's layer, which ignores loss_param."""
    net = smooth_l1_net(tmp_path, "faster", " loss_param { normalization: VALID }")
    layer = net.graph.nodes[-1].module
    assert (layer.sigma2, layer.normalization) == (pytest.approx(2.4 ** 2), None)
    rfcn = smooth_l1_net(tmp_path, "rfcn").graph.nodes[-1].module
    assert (rfcn.normalization, rfcn.instance_loss) == ("VALID", True)
    assert "normalization='VALID'" in repr(rfcn)


# -- the fork's bbox_util numbers -----------------------------------------------------------
GT = np.array([[0.1, 0.1, 0.3, 0.3], [0.3, 0.3, 0.6, 0.5]], np.float32)
GT_LABELS = np.array([1, 2])
PREDICTIONS = np.array([[0.1, 0, 0.4, 0.3], [0, 0.1, 0.2, 0.3], [0.2, 0.1, 0.4, 0.4],
                        [0.4, 0.3, 0.7, 0.5], [0.5, 0.4, 0.7, 0.7], [0.7, 0.7, 0.8, 0.8]],
                       np.float32)


@pytest.mark.parametrize("label, match_type, threshold, indices, overlaps", [
    (1, "BIPARTITE", -1, [0, -1, -1, -1, -1, -1], [4 / 9, 2 / 6, 2 / 8, 0, 0, 0]),
    (-1, "BIPARTITE", -1, [0, -1, -1, 1, -1, -1], [4 / 9, 2 / 6, 2 / 8, 4 / 8, 1 / 11, 0]),
    (1, "PER_PREDICTION", 0.3, [0, 0, -1, -1, -1, -1], [4 / 9, 2 / 6, 2 / 8, 0, 0, 0]),
    (-1, "PER_PREDICTION", 0.3, [0, 0, -1, 1, -1, -1], [4 / 9, 2 / 6, 2 / 8, 4 / 8, 1 / 11, 0]),
    (-1, "PER_PREDICTION", 0.001, [0, 0, 0, 1, 1, -1], [4 / 9, 2 / 6, 2 / 8, 4 / 8, 1 / 11, 0]),
])
def test_match_boxes_fork_numbers(label, match_type, threshold, indices, overlaps):
    got_indices, got_overlaps = match_boxes(GT, GT_LABELS, PREDICTIONS, label, match_type,
                                            threshold, True)
    assert got_indices.tolist() == indices
    np.testing.assert_allclose(got_overlaps, overlaps, atol=1e-6)


def test_match_boxes_ties_and_boundary():
    """Equal overlaps: the lower prediction wins; crossing boxes are -2 and never match."""
    gt = np.array([[0.1, 0.1, 0.5, 0.6]], np.float32)
    twins = np.array([[0.1, 0.1, 0.5, 0.5], [0.1, 0.2, 0.5, 0.6]], np.float32)
    assert match_boxes(gt, [1], twins, -1, "BIPARTITE")[0].tolist() == [0, -1]
    assert match_boxes(gt, [1], twins, -1, "PER_PREDICTION")[0].tolist() == [0, 0]
    crossing = np.array([[-0.1, 0.1, 0.5, 0.6], [0.1, 0.1, 0.5, 0.5]], np.float32)
    indices, overlaps = match_boxes(gt, [1], crossing, -1, "PER_PREDICTION", 0.5, True)
    assert indices.tolist() == [-2, 0] and overlaps[0] == 0


def test_encode_boxes_fork_numbers():
    prior, box = [0.1, 0.1, 0.3, 0.3], [0, 0.2, 0.4, 0.5]
    np.testing.assert_allclose(encode_boxes(box, prior, [0.1] * 4, "CORNER", True),
                               [-0.1, 0.1, 0.1, 0.2], atol=1e-6)
    np.testing.assert_allclose(encode_boxes(box, prior, [0.1] * 4, "CORNER", False),
                               [-1, 1, 1, 2], atol=1e-6)
    variance = [0.1, 0.1, 0.2, 0.2]
    np.testing.assert_allclose(encode_boxes(box, prior, variance, "CENTER_SIZE", True),
                               [0, 0.75, math.log(2), math.log(1.5)], atol=1e-6)
    np.testing.assert_allclose(encode_boxes(box, prior, variance, "CENTER_SIZE", False),
                               [0, 7.5, math.log(2) / 0.2, math.log(1.5) / 0.2], atol=1e-5)
    np.testing.assert_allclose(encode_boxes(box, prior, variance, "CORNER_SIZE", False),
                               [-0.1 / 0.2 / 0.1, 0.1 / 0.2 / 0.1, 0.1 / 0.2 / 0.2,
                                0.2 / 0.2 / 0.2], atol=1e-5)


def test_apply_nms_fork_numbers():
    boxes = [[0.1, 0.1, 0.3, 0.3], [0.2, 0.1, 0.4, 0.3], [0.2, 0.0, 0.4, 0.2],
             [0.1, 0.2, 0.4, 0.4]]
    scores = [0.8, 0.7, 0.4, 0.5]
    assert apply_nms(boxes, scores, 0.3, -1) == [0, 3, 2]
    assert apply_nms(boxes, scores, 0.3, 2) == [0]
    assert apply_nms(boxes, scores, 0.2, 3) == [0]
    assert apply_nms(boxes, scores, 0.3, 0) == []  # an nms_param without top_k


def test_prior_conf_losses_fork_numbers():
    """ComputeConfLoss with a match: image 1's prior 0 is matched to a label-1 box."""
    signs = torch.tensor([-1.0, 1.0], dtype=F64)[:, None]
    conf = signs * torch.arange(8, dtype=F64).reshape(2, 4) * 0.1
    truth = {1: (np.zeros((1, 4), np.float32), np.array([1]))}
    matches = [{-1: np.array([-1, -1])}, {-1: np.array([0, -1])}]

    def bce(x, t):
        return -math.log(1 / (1 + math.exp(-x))) if t else -math.log(1 / (1 + math.exp(x)))

    for background in (-1, 0):
        layer = MultiBoxLoss(2, conf_loss_type="LOGISTIC", background_label_id=background)
        losses = layer.prior_conf_losses(conf, truth, matches)
        for image, prior in np.ndindex(2, 2):
            label = 1 if (image, prior) == (1, 0) else background
            x = conf[image, 2 * prior: 2 * prior + 2].tolist()
            expected = bce(x[0], label == 0) + bce(x[1], label == 1)
            assert losses[image, prior] == pytest.approx(expected, abs=1e-6)
    softmax = MultiBoxLoss(2).prior_conf_losses(conf, truth, matches)
    low = -math.log(1 / (1 + math.exp(-0.1)))
    high = -math.log(math.exp(-0.1) / (1 + math.exp(-0.1)))
    np.testing.assert_allclose(softmax, [[low, low], [low, high]], atol=1e-6)


# -- hand-computed MultiBoxLoss cases -------------------------------------------------------
def prior_blob(boxes, variance=0.1):
    boxes = torch.tensor(boxes, dtype=F64).reshape(-1)
    return torch.stack([boxes, torch.full_like(boxes, variance)])[None]


def gt_blob(*rows):
    return torch.tensor(rows, dtype=F64).reshape(1, 1, len(rows), 8)


A, B, CORNERED = [0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9], [0.0, 0.6, 0.3, 0.9]
GT_ROW = [0, 1, 0, 0.1, 0.1, 0.5, 0.6, 0]


def one_match_case():
    """Image 0: prior A overlaps the ground truth by 0.16 / 0.2 = 0.8, B and C touch it
    (overlap 0). Image 1 has no ground truth."""
    loc = torch.zeros(2, 12, dtype=F64)
    loc[0, :4] = torch.tensor([0.5, -0.2, 0.0, 2.5])
    conf = torch.tensor([[0, 0, 2, 0, 0, 1], [0, 3, 1, 0, 0, 0]], dtype=F64)
    prior = prior_blob([A, B, CORNERED])
    return loc.requires_grad_(), conf.requires_grad_(), prior, gt_blob(GT_ROW)


# CORNER targets (gt - A) / 0.1 = (0, 0, 0, 1): d = (0.5, -0.2, 0, 1.5).
LOC_LOSS = 0.125 + 0.02 + 0.0 + 1.0
POSITIVE = math.log(2)                 # softmax((0, 0)) at class 1
MINED = math.log(1 + math.e)           # C, logits (0, 1), as background: the hardest
EASY = math.log(1 + math.exp(-2))      # B, logits (2, 0), as background


def test_one_prior_matched_one_negative_mined():
    loc, conf, prior, gt = one_match_case()
    layer = MultiBoxLoss(2, neg_pos_ratio=1.0)
    loss = layer(loc, conf, prior, gt)
    assert loss.item() == pytest.approx(LOC_LOSS + POSITIVE + MINED, rel=1e-6)
    loss.backward()
    expected_loc = torch.zeros(2, 12, dtype=F64)
    expected_loc[0, :4] = torch.tensor([0.5, -0.2, 0.0, 1.0])
    torch.testing.assert_close(loc.grad, expected_loc, rtol=1e-6, atol=1e-6)
    expected_conf = torch.zeros(2, 6, dtype=F64)
    expected_conf[0, :2] = torch.tensor([0.5, -0.5])
    expected_conf[0, 4:] = torch.tensor([1 / (1 + math.e) - 1, math.e / (1 + math.e)])
    torch.testing.assert_close(conf.grad, expected_conf, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("normalization, divisor", [("VALID", 1), ("FULL", 6),
                                                    ("BATCH_SIZE", 2), ("NONE", 1)])
def test_normalization_and_ratio(normalization, divisor):
    """neg_pos_ratio 3 mines both B and C (two eligible); image 1 adds nothing."""
    loc, conf, prior, gt = one_match_case()
    loss = MultiBoxLoss(2, normalization=normalization, loc_weight=2.0)(loc, conf, prior, gt)
    expected = (2.0 * LOC_LOSS + POSITIVE + MINED + EASY) / divisor
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_without_mining_every_prior_counts_as_background():
    loc, conf, prior, gt = one_match_case()
    loss = MultiBoxLoss(2, mining_type="NONE", normalization="NONE")(loc, conf, prior, gt)
    image1 = math.log(1 + math.exp(3)) + math.log(1 + math.exp(-1)) + math.log(2)
    assert loss.item() == pytest.approx(LOC_LOSS + POSITIVE + MINED + EASY + image1, rel=1e-6)


def test_hard_example_keeps_the_hardest():
    """Ranked by confidence plus location loss: A (0.69 + 1.145) > C (1.31) > B (0.13).
    sample_size 1 keeps A positive and mines nothing; sample_size 2 adds C as a negative."""
    loc, conf, prior, gt = one_match_case()
    one = MultiBoxLoss(2, mining_type="HARD_EXAMPLE", sample_size=1)(loc, conf, prior, gt)
    assert one.item() == pytest.approx(LOC_LOSS + POSITIVE, rel=1e-6)
    two = MultiBoxLoss(2, mining_type="HARD_EXAMPLE", sample_size=2)(loc, conf, prior, gt)
    assert two.item() == pytest.approx(LOC_LOSS + POSITIVE + MINED, rel=1e-6)
    # With a perfect location, C (1.31) outranks A (0.69): A leaves the loss, D = max(1, 0).
    with torch.no_grad():
        loc[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.0])
        loc[0, 3] = float(np.float32(np.float32(0.6) - np.float32(0.5)) / np.float32(0.1))
    demoted = MultiBoxLoss(2, mining_type="HARD_EXAMPLE", sample_size=1)(loc, conf, prior, gt)
    assert demoted.item() == pytest.approx(MINED, rel=1e-6)


def test_nms_mining_and_its_top_k():
    """An nms_param without top_k (the fork reads 0) mines nothing."""
    loc, conf, prior, gt = one_match_case()
    none = MultiBoxLoss(2, nms_threshold=0.5, nms_top_k=0, use_prior_for_nms=True)
    assert none(loc, conf, prior, gt).item() == pytest.approx(LOC_LOSS + POSITIVE, rel=1e-6)
    some = MultiBoxLoss(2, nms_threshold=0.5, nms_top_k=10, use_prior_for_nms=True)
    assert some(loc, conf, prior, gt).item() == pytest.approx(
        LOC_LOSS + POSITIVE + MINED + EASY, rel=1e-6)


def test_bipartite_versus_per_prediction():
    """P2 overlaps the box by 0.9 (bipartite match), P1 by 0.8 (a per-prediction match)."""
    p1, p2 = [0.1, 0.1, 0.5, 0.5], [0.1, 0.15, 0.5, 0.6]
    prior, gt = prior_blob([p1, p2]), gt_blob(GT_ROW)
    conf = torch.zeros(1, 4, dtype=F64)
    loc = torch.zeros(1, 8, dtype=F64)
    settings = dict(mining_type="NONE", loc_weight=0.0)  # every prior costs log 2
    assert MultiBoxLoss(2, match_type="BIPARTITE", **settings)(loc, conf, prior, gt).item() == \
        pytest.approx(2 * math.log(2))  # one match: VALID divides by 1
    assert MultiBoxLoss(2, **settings)(loc, conf, prior, gt).item() == \
        pytest.approx(math.log(2))  # two matches: VALID divides by 2


def test_logistic_without_mining_keeps_the_forks_target_offset():
    """Image i's one-hot target is written i P values (not i P C) further on."""
    prior = prior_blob([[0.6, 0.6, 0.9, 0.9], A])
    gt = gt_blob([1, 1, 0, 0.1, 0.1, 0.5, 0.6, 0])  # image 1, prior 1, class 1
    conf = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    loc = torch.zeros(2, 8, dtype=F64)
    layer = MultiBoxLoss(2, conf_loss_type="LOGISTIC", mining_type="NONE", loc_weight=0.0,
                         normalization="NONE")
    layer(loc, conf, prior, gt).backward()
    # Flat target index 1 * P + 1 * C + 1 = 5: image 1, prior 0, class 1 (not prior 1).
    expected = torch.full((2, 4), 0.5, dtype=F64)
    expected[1, 1] = -0.5
    torch.testing.assert_close(conf.grad, expected)


def test_encode_variance_in_target_gradient_skips_the_variance():
    """Predictions and targets are divided by the variance; the gradient is f'(d) as is."""
    prior, gt = prior_blob([A], variance=0.5), gt_blob(GT_ROW)
    loc = torch.tensor([[0.2, 0.0, 0.1, 0.3]], dtype=F64, requires_grad=True)
    conf = torch.zeros(1, 2, dtype=F64)
    layer = MultiBoxLoss(2, encode_variance_in_target=True, propagate_down=(True, False))
    loss = layer(loc, conf, prior, gt)
    target = np.float32(np.float32(0.6) - np.float32(0.5))
    d = np.array([0.2, 0.0, 0.1, 0.3]) / 0.5 - np.array([0, 0, 0, target / np.float32(0.5)])
    assert loss.item() == pytest.approx(0.5 * float((d * d).sum()), rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(loc.grad.numpy()[0], d, rtol=1e-6)


def test_bp_inside_stops_gradients_outside_the_image():
    prior, gt = prior_blob([[-0.1, 0.1, 0.5, 0.6], A]), gt_blob(GT_ROW)
    loc = torch.full((1, 8), 0.3, dtype=F64, requires_grad=True)
    conf = torch.zeros(1, 4, dtype=F64)
    layer = MultiBoxLoss(2, bp_inside=True, propagate_down=(True, False),
                         match_type="PER_PREDICTION", overlap_threshold=0.5)
    layer(loc, conf, prior, gt).backward()
    assert loc.grad[0, 0] == 0 and loc.grad[0, 1] != 0


def test_ground_truth_rows():
    """Padding rows (-1) are skipped, difficult boxes dropped without use_difficult_gt, and
    a box with the background label is refused as the fork aborts."""
    loc, conf, prior, _ = one_match_case()
    padded = gt_blob([-1, 0, 0, 0, 0, 0, 0, 0], GT_ROW)
    base = MultiBoxLoss(2, neg_pos_ratio=1.0)
    assert base(loc, conf, prior, padded).item() == pytest.approx(LOC_LOSS + POSITIVE + MINED,
                                                                  rel=1e-6)
    difficult = gt_blob(GT_ROW[:7] + [1])
    skipped = MultiBoxLoss(2, use_difficult_gt=False, normalization="NONE")
    assert skipped(loc, conf, prior, difficult).item() == 0.0
    with pytest.raises(LabelError, match="background label"):
        base(loc, conf, prior, gt_blob([0, 0, 0, 0.1, 0.1, 0.5, 0.6, 0]))
    with pytest.raises(LabelError, match=r"\[0, 2\)"):
        base(loc, conf, prior, gt_blob([0, 5, 0, 0.1, 0.1, 0.5, 0.6, 0]))


def test_map_object_to_agnostic_and_cross_boundary():
    loc, conf, prior, _ = one_match_case()
    gt = gt_blob([0, 7, 0, 0.1, 0.1, 0.5, 0.6, 0])
    agnostic = MultiBoxLoss(2, map_object_to_agnostic=True, mining_type="NONE",
                            normalization="NONE", loc_weight=0.0)
    plain_gt = gt_blob(GT_ROW)
    same = MultiBoxLoss(2, mining_type="NONE", normalization="NONE", loc_weight=0.0)
    assert agnostic(loc, conf, prior, gt).item() == pytest.approx(
        same(loc, conf, prior, plain_gt).item())
    crossing = prior_blob([[-0.1, 0.1, 0.5, 0.5], B, CORNERED])
    ignored = MultiBoxLoss(2, ignore_cross_boundary_bbox=True, normalization="NONE")
    # The crossing prior is neither positive nor a negative: nothing is left.
    assert ignored(loc, conf, crossing, plain_gt).item() == 0.0


def test_propagate_down_leaves_a_term_out():
    loc, conf, prior, gt = one_match_case()
    only_conf = MultiBoxLoss(2, neg_pos_ratio=1.0, propagate_down=(False, True))
    assert only_conf(loc, conf, prior, gt).item() == pytest.approx(POSITIVE + MINED, rel=1e-6)
    only_loc = MultiBoxLoss(2, neg_pos_ratio=1.0, propagate_down=(True, False))
    assert only_loc(loc, conf, prior, gt).item() == pytest.approx(LOC_LOSS, rel=1e-6)


def test_no_ground_truth_gives_zero_with_zero_gradients():
    loc, conf, prior, _ = one_match_case()
    loss = MultiBoxLoss(2)(loc, conf, prior, gt_blob([-1] * 8))
    loss.backward()
    assert loss.item() == 0 and not loc.grad.any() and not conf.grad.any()


def test_settings_and_shapes_are_checked():
    with pytest.raises(UnsupportedParameterError, match="share_location"):
        MultiBoxLoss(3, share_location=False)
    with pytest.raises(UnsupportedParameterError, match="background_label_id"):
        MultiBoxLoss(3, background_label_id=3)
    with pytest.raises(UnsupportedParameterError, match="map_object_to_agnostic"):
        MultiBoxLoss(3, map_object_to_agnostic=True)
    with pytest.raises(UnsupportedParameterError, match="code_type"):
        MultiBoxLoss(3, code_type="CENTER")
    layer = MultiBoxLoss(3)
    with pytest.raises(ShapeError, match="confidences per sample"):
        layer.output_shapes([(2, 16), (2, 8), (1, 2, 16), (1, 1, 1, 8)])
    with pytest.raises(ShapeError, match="ground truth"):
        layer.output_shapes([(2, 16), (2, 12), (1, 2, 16), (1, 1, 1, 7)])
    assert layer.output_shapes([(2, 16), (2, 12), (1, 2, 16), (1, 1, 3, 8)]) == [()]


# -- the fork's gradient grid (test_multibox_loss_layer.cpp) ---------------------------------
def fork_bottoms(share_location: bool, seed: int):
    """3 images, 3 classes, priors of a 2 x 2 map (min 5, max 10, aspect 3, flip) on a
    20 x 20 image, and the fork's four ground-truth rows."""
    priors = PriorBox([5], [10], [3.0], flip=True).priors((3, 5, 2, 2), (3, 3, 20, 20))
    loc_classes = 1 if share_location else 3
    loc = randn(3, 16 * loc_classes * 4, seed=seed, scale=0.3)
    conf = randn(3, 16 * 3, seed=seed + 1)
    gt = gt_blob([0, 1, 0, 0.1, 0.1, 0.3, 0.3, 0], [2, 1, 0, 0.1, 0.1, 0.3, 0.3, 0],
                 [2, 2, 0, 0.2, 0.2, 0.4, 0.4, 0], [2, 2, 1, 0.6, 0.6, 0.8, 0.9, 1])
    return loc, conf, torch.from_numpy(priors).double(), gt


GRID = [
    dict(loc_loss_type="SMOOTH_L1", match_type="PER_PREDICTION", mining_type="MAX_NEGATIVE"),
    dict(loc_loss_type="L2", match_type="BIPARTITE", normalization="FULL", mining_type="NONE",
         use_difficult_gt=False),
    dict(conf_loss_type="LOGISTIC", mining_type="HARD_EXAMPLE", normalization="BATCH_SIZE"),
    dict(conf_loss_type="LOGISTIC", share_location=False, mining_type="NONE",
         normalization="NONE", match_type="BIPARTITE"),
    dict(share_location=False, mining_type="NONE", use_difficult_gt=False),
    dict(mining_type="HARD_EXAMPLE", loc_loss_type="L2", sample_size=6, use_difficult_gt=False),
    dict(code_type="CENTER_SIZE", mining_type="MAX_NEGATIVE", neg_pos_ratio=2.0,
         overlap_threshold=0.3),
    dict(use_prior_for_matching=False, mining_type="NONE", overlap_threshold=0.2),
]


@pytest.mark.parametrize("settings", GRID, ids=lambda s: "-".join(map(str, s.values())))
def test_gradcheck_fork_grid(settings):
    """float64 gradients of the loss with respect to the locations and the confidences."""
    loc, conf, prior, gt = fork_bottoms(settings.get("share_location", True), seed=5)
    layer = MultiBoxLoss(3, **settings)
    assert layer(loc, conf, prior, gt).item() > 0.1
    assert torch.autograd.gradcheck(lambda x, y: layer(x, y, prior, gt),
                                    (loc.requires_grad_(), conf.requires_grad_()))


# -- from the prototxt, converters, training ------------------------------------------------
SSD_NET = '''name: "tiny_ssd"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 24 dim: 16 } } }
layer { name: "label" type: "Input" top: "label"
  input_param { shape { dim: 1 dim: 1 dim: 3 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "loc" type: "Convolution" bottom: "conv2" top: "loc"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "conv2" top: "conf"
  convolution_param { num_output: 12 kernel_size: 3 pad: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" }
layer { name: "prior" type: "PriorBox" bottom: "conv2" bottom: "data" top: "prior"
  prior_box_param { min_size: 6 max_size: 12 aspect_ratio: 2 flip: true
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "loc_flat" bottom: "conf_flat"
  bottom: "prior" bottom: "label" top: "mbox_loss"
  propagate_down: true propagate_down: true propagate_down: false propagate_down: false
  loss_param { normalization: VALID }
  multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1
    num_classes: 3 share_location: true match_type: PER_PREDICTION overlap_threshold: 0.5
    use_prior_for_matching: true background_label_id: 0 use_difficult_gt: true
    neg_pos_ratio: 3 neg_overlap: 0.5 code_type: CENTER_SIZE ignore_cross_boundary_bbox: false
    mining_type: MAX_NEGATIVE } }
'''
LABEL = [[0, 1, 0, 0.2, 0.3, 0.55, 0.55, 0], [1, 2, 0, 0.5, 0.6, 0.95, 0.95, 0],
         [1, 1, 1, 0.05, 0.05, 0.35, 0.3, 0]]


def ssd_inputs():
    """Images with each box painted in its class's channel over weak noise."""
    data = randn(2, 3, 24, 16, seed=9, scale=0.1).float()
    for image, label, _, x0, y0, x1, y1, _ in LABEL:
        rows, columns = slice(round(y0 * 24), round(y1 * 24)), slice(round(x0 * 16), round(x1 * 16))
        data[int(image), int(label), rows, columns] += 1
    return {"data": data, "label": torch.tensor(LABEL).reshape(1, 1, 3, 8)}


def test_from_caffe_reads_every_field(tmp_path):
    text = SSD_NET.replace("mining_type: MAX_NEGATIVE }", "mining_type: HARD_EXAMPLE "
                           "map_object_to_agnostic: false bp_inside: true sample_size: 32 "
                           "encode_variance_in_target: true use_prior_for_nms: true "
                           "nms_param { nms_threshold: 0.7 } }")
    text = text.replace("loss_param { normalization: VALID }", "loss_param { normalize: false }")
    (tmp_path / "net.prototxt").write_text(text)
    layer = Net(tmp_path / "net.prototxt", phase="TRAIN").graph.nodes[-1].module
    assert (layer.mining_type, layer.sample_size, layer.nms_threshold, layer.nms_top_k) == \
        ("HARD_EXAMPLE", 32, pytest.approx(0.7), 0)
    assert (layer.code_type, layer.normalization, layer.bp_inside, layer.use_prior_for_nms,
            layer.encode_variance_in_target, layer.propagate_down) == \
        ("CENTER_SIZE", "BATCH_SIZE", True, True, True, (True, True))
    assert "mining_type='HARD_EXAMPLE'" in repr(layer)
    (tmp_path / "bad.prototxt").write_text(SSD_NET.replace("mining_type: MAX_NEGATIVE",
                                                           "do_neg_mining: false"))
    with pytest.raises(UnsupportedParameterError, match="do_neg_mining"):
        Net(tmp_path / "bad.prototxt", phase="TRAIN")


def test_source_matches_net_and_onnx_refuses(tmp_path):
    (tmp_path / "net.prototxt").write_text(SSD_NET)
    net = Net(tmp_path / "net.prototxt", phase="TRAIN", seed=2)
    inputs = ssd_inputs()
    expected = net(**inputs)["mbox_loss"]
    got = ConvertedNet(net, "pytorch-source")(**inputs)["mbox_loss"]
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UnknownLayerError, match="data-dependent loops"):
        convert_to_onnx(net)


def test_tiny_ssd_trains(tmp_path):
    """conv -> loc / conf heads, PriorBox, MultiBoxLoss: Caffe's SGD lowers the loss."""
    (tmp_path / "net.prototxt").write_text(SSD_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.05\nmomentum: 0.9\nlr_policy: "fixed"\n'
        'random_seed: 4\nmax_iter: 40\n')
    inputs = ssd_inputs()
    solver = Solver(tmp_path / "solver.prototxt", inputs=lambda: inputs, root=tmp_path)
    first = solver.step(1)
    solver.step(38)
    last = solver.step(1)
    assert math.isfinite(first) and last < 0.5 * first
