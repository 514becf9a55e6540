"""The SSD fork's layers: Normalize, Permute, PriorBox, DetectionOutput.

The expected numbers of weiliu89/caffe's own unit tests (branch ``ssd``:
``test_prior_box_layer.cpp``, ``test_detection_output_layer.cpp``,
``test_normalize_layer.cpp``, ``test_permute_layer.cpp``) are carried here as facts; the
rest checks against the fork's loops written out (DetectionOutput's ``ApplyNMSFast`` and
decoding, Normalize's ``Backward_cpu``), float64 gradient checks, and the ONNX (onnxruntime)
and PyTorch-source conversions of every layer against ``Net``.
"""

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers import Net
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.converters.pytorch import ConvertedNet
from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.ssd import DetectionOutput, Normalize, Permute, PriorBox
from caffelayers.proto import caffe_pb2, io
from caffelayers.verify import compare

N, C, H, W = 2, 5, 7, 3
EPS = 1e-6  # the fork's tests' tolerance
f32 = np.float32


def layer_param(text: str, type_: str, name: str = "layer"):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name, param.type = name, type_
    return param


def build(cls, text: str, bottom_shapes, name: str = "layer"):
    layer = cls.from_caffe(layer_param(text, cls.caffe_type, name),
                           [tuple(s) for s in bottom_shapes], BuildContext())
    layer.layer_name = name
    return layer


def make_net(layers: str, inputs) -> Net:
    text = 'name: "t"\n'
    for name, shape in inputs.items():
        dims = " ".join(f"dim: {d}" for d in shape)
        text += (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
                 f'input_param {{ shape {{ {dims} }} }} }}\n')
    return Net(io.parse_prototxt(text + layers), seed=0)


def assert_close(key, ours, theirs):
    check = compare(key, ours, theirs)
    assert check.passed, check.describe()


def check_conversions(net: Net, inputs):
    """onnxruntime and the generated PyTorch source against ``Net`` on every output."""
    feed = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in inputs.items()}
    with torch.no_grad():
        want = {k: v.numpy() for k, v in net(**feed).items()}
    got = run_onnx(convert_to_onnx(net), inputs, threads=1)
    with torch.no_grad():
        source = ConvertedNet(net, "pytorch-source")(**feed)
    for blob, value in want.items():
        assert_close(f"onnx {blob}", got[blob], value)
        assert_close(f"source {blob}", source[blob], value)
    return want


# == PriorBox: test_prior_box_layer.cpp ======================================================
FEATURE, IMAGE = (10, 10, 10, 10), (10, 3, 100, 100)  # the fork's bottoms
MIN_SIZE, MAX_SIZE = 4, 9
ROOT2 = math.sqrt(2.0)


def prior_box(text, feature=FEATURE, image=IMAGE):
    layer = build(PriorBox, f"prior_box_param {{ {text} }}", [feature, image])
    top = layer(torch.zeros(feature), torch.zeros(image))
    assert tuple(top.shape) == tuple(layer.output_shapes([feature, image])[0])
    return top[0].numpy()


@pytest.mark.parametrize("text, priors", [
    ("min_size: 4 max_size: 9", 2),
    ("min_size: 4 min_size: 14 max_size: 9 max_size: 19", 4),
    ("min_size: 4", 1),
    ("min_size: 4 min_size: 14", 2),
    ("min_size: 4 max_size: 9 aspect_ratio: 1 aspect_ratio: 2 flip: false", 3),
    ("min_size: 4 max_size: 9 aspect_ratio: 2 aspect_ratio: 3 flip: false", 4),
    ("min_size: 4 max_size: 9 aspect_ratio: 2 aspect_ratio: 3", 6),
    ("min_size: 4 min_size: 14 max_size: 9 max_size: 19 aspect_ratio: 2 aspect_ratio: 3", 12),
])
def test_prior_box_setup_shapes(text, priors):
    """TestSetup* : top 1 x 2 x (10 * 10 * priors * 4)."""
    layer = build(PriorBox, f"prior_box_param {{ {text} }}", [FEATURE, IMAGE])
    assert layer.output_shapes([FEATURE, IMAGE]) == [(1, 2, 100 * priors * 4)]
    assert layer.num_priors == priors


def cell(priors, row=4, col=4, width=10):
    return (row * width + col) * priors * 4


@pytest.mark.parametrize("variance, expected", [
    ("", [0.1] * 4), ("variance: 1", [1.0] * 4),
    ("variance: 0.1 variance: 0.2 variance: 0.3 variance: 0.4", [0.1, 0.2, 0.3, 0.4])])
def test_prior_box_forward_min_max(variance, expected):
    """TestCPU, TestCPUVariance1, TestCPUVarianceMulti."""
    boxes, variances = prior_box(f"min_size: {MIN_SIZE} max_size: {MAX_SIZE} {variance}")
    np.testing.assert_allclose(boxes[:8], [0.03, 0.03, 0.07, 0.07, 0.02, 0.02, 0.08, 0.08],
                               atol=EPS)
    np.testing.assert_allclose(boxes[cell(2):cell(2) + 4], [0.43, 0.43, 0.47, 0.47], atol=EPS)
    np.testing.assert_allclose(variances, np.tile(expected, len(variances) // 4), atol=EPS)


def test_prior_box_forward_no_max_size():
    """TestCPUNoMaxSize."""
    boxes, variances = prior_box(f"min_size: {MIN_SIZE}")
    np.testing.assert_allclose(boxes[:4], [0.03, 0.03, 0.07, 0.07], atol=EPS)
    np.testing.assert_allclose(boxes[cell(1):cell(1) + 4], [0.43, 0.43, 0.47, 0.47], atol=EPS)
    np.testing.assert_allclose(variances, 0.1, atol=EPS)


def ratio_boxes(cx, cy, scale=1.0):
    """A 2:1 and a 1:2 box of min_size 4 around (cx, cy), in the fork's expected form."""
    a, b = 0.02 * ROOT2 * scale, 0.01 * ROOT2 * scale
    return [cx - a, cy - b, cx + a, cy + b], [cx - b, cy - a, cx + b, cy + a]


@pytest.mark.parametrize("flip", [False, True])
def test_prior_box_forward_aspect_ratio(flip):
    """TestCPUAspectRatioNoFlip and TestCPUAspectRatio."""
    text = f"min_size: {MIN_SIZE} max_size: {MAX_SIZE} aspect_ratio: 2"
    boxes, _ = prior_box(text + ("" if flip else " flip: false"))
    priors = 4 if flip else 3
    wide, tall = ratio_boxes(0.05, 0.05)
    expected = [0.03, 0.03, 0.07, 0.07, 0.02, 0.02, 0.08, 0.08] + wide + (tall if flip else [])
    np.testing.assert_allclose(boxes[:4 * priors], expected, atol=EPS)
    wide, tall = ratio_boxes(0.45, 0.45)
    start = cell(priors)
    np.testing.assert_allclose(boxes[start:start + 4], [0.43, 0.43, 0.47, 0.47], atol=EPS)
    np.testing.assert_allclose(boxes[start + 8:start + 4 * priors],
                               wide + (tall if flip else []), atol=EPS)


def test_prior_box_forward_multi_size_clip():
    """TestCPUAspectRatioMultiSize: two min/max pairs, in the fork's prior order, clipped."""
    boxes, variances = prior_box("min_size: 4 min_size: 8 max_size: 9 max_size: 18 "
                                 "aspect_ratio: 2 clip: true")
    wide, tall = ratio_boxes(0.05, 0.05)
    a, b = 0.04 * ROOT2, 0.04 / ROOT2
    expected = ([0.03, 0.03, 0.07, 0.07, 0.02, 0.02, 0.08, 0.08] + wide + tall
                + [0.01, 0.01, 0.09, 0.09, 0.0, 0.0, 0.11, 0.11]
                + [0.0, 0.05 - b, 0.05 + a, 0.05 + b] + [0.05 - b, 0.0, 0.05 + b, 0.05 + a])
    np.testing.assert_allclose(boxes[:32], expected, atol=EPS)
    start = cell(8)
    wide, tall = ratio_boxes(0.45, 0.45)
    np.testing.assert_allclose(boxes[start:start + 16],
                               [0.43, 0.43, 0.47, 0.47, 0.42, 0.42, 0.48, 0.48] + wide + tall,
                               atol=EPS)
    np.testing.assert_allclose(variances, 0.1, atol=EPS)


def test_prior_box_forward_fixed_step():
    """TestCPUFixStep: img_size 100 and step 10 on a 20 x 10 map of a 200 x 100 image."""
    boxes, _ = prior_box(f"min_size: {MIN_SIZE} max_size: {MAX_SIZE} aspect_ratio: 2 "
                         "img_size: 100 step: 10", feature=(10, 10, 20, 10),
                         image=(10, 3, 200, 100))
    wide, tall = ratio_boxes(0.05, 0.05)
    np.testing.assert_allclose(boxes[:16], [0.03, 0.03, 0.07, 0.07, 0.02, 0.02, 0.08, 0.08]
                               + wide + tall, atol=EPS)
    start = cell(4, row=14)
    wide, tall = ratio_boxes(0.45, 1.45)
    np.testing.assert_allclose(boxes[start:start + 16],
                               [0.43, 1.43, 0.47, 1.47, 0.42, 1.42, 0.48, 1.48] + wide + tall,
                               atol=EPS)


def test_prior_box_sizes_are_integers_and_ratios_unique():
    """The fork truncates min/max sizes to int (4.9 acts as 4) and ignores repeated ratios;
    with flip the reciprocal follows each new ratio, so 0.5 after 2 adds nothing."""
    truncated = prior_box("min_size: 4.9 max_size: 9.9")
    np.testing.assert_allclose(truncated, prior_box("min_size: 4 max_size: 9"), atol=1e-7)
    layer = build(PriorBox, "prior_box_param { min_size: 4 aspect_ratio: 2 aspect_ratio: 2 "
                  "aspect_ratio: 0.5 aspect_ratio: 3 }", [FEATURE, IMAGE])
    np.testing.assert_allclose(layer.ratios, [1, 2, 0.5, 3, 1 / 3], rtol=1e-6)
    assert layer.num_priors == 5


def test_prior_box_default_steps_are_per_axis():
    """Without step, each axis's step is image / map: a 300 x 150 image on a 10 x 5 map."""
    boxes, _ = prior_box("min_size: 30", feature=(1, 1, 10, 5), image=(1, 3, 300, 150))
    boxes = boxes.reshape(10, 5, 4)
    np.testing.assert_allclose(boxes[2, 3], [(3.5 * 30 - 15) / 150, (2.5 * 30 - 15) / 300,
                                             (3.5 * 30 + 15) / 150, (2.5 * 30 + 15) / 300],
                               rtol=1e-6)


@pytest.mark.parametrize("text, message", [
    ("max_size: 9", "min_size is required"),
    ("min_size: 4 max_size: 3", "greater than its min_size"),
    ("min_size: 4 min_size: 8 max_size: 9", "one per min_size"),
    ("min_size: 4 variance: 0.1 variance: 0.2", "1 or 4 values"),
    ("min_size: 4 variance: 0", "variance must be positive"),
    ("min_size: 4 img_size: 100 img_h: 100 img_w: 100", "not both"),
    ("min_size: 4 step: 8 step_h: 8 step_w: 8", "not both"),
    ("min_size: 4 img_h: 100", "img_h and img_w must both be positive"),
])
def test_prior_box_bad_parameters_name_the_layer(text, message):
    with pytest.raises(UnsupportedParameterError, match=f"'conv4_priorbox'.*{message}"):
        build(PriorBox, f"prior_box_param {{ {text} }}", [FEATURE, IMAGE],
              name="conv4_priorbox")


def test_prior_box_without_min_size_in_a_net_names_the_layer():
    with pytest.raises(UnsupportedParameterError, match="'fc7_mbox_priorbox'.*min_size"):
        make_net('layer { name: "fc7_mbox_priorbox" type: "PriorBox" bottom: "f" bottom: "d" '
                 'top: "p" prior_box_param { max_size: 9 } }',
                 {"f": (1, 4, 5, 5), "d": (1, 3, 50, 50)})


def test_prior_box_has_no_gradient():
    """The fork's Backward_cpu does nothing: the priors do not depend on the values."""
    layer = PriorBox([4])
    feature = torch.randn(FEATURE, requires_grad=True)
    assert not layer(feature, torch.zeros(IMAGE)).requires_grad


# == DetectionOutput: test_detection_output_layer.cpp ========================================
def fork_detection_inputs(share_location: bool, dtype=np.float32):
    """The fork's fixture: 2 images, 4 priors (0.3-wide boxes on a 2 x 2 grid, variance
    0.1), 2 classes, confidences j * 0.2 and 1 - j * 0.2, locations +-(i + c / 2 + 0.5)."""
    num, priors, classes = 2, 4, 2
    loc_classes = 1 if share_location else classes
    prior = np.zeros((num, 2, priors * 4, 1), dtype)
    boxes = []
    for h in range(2):
        for w in range(2):
            cx, cy = (w + 0.5) * 0.5, (h + 0.5) * 0.5
            boxes += [cx - 0.15, cy - 0.15, cx + 0.15, cy + 0.15]
    prior[0, 0, :, 0], prior[0, 1, :, 0] = boxes, 0.1
    conf = np.zeros((num, priors * classes, 1, 1), dtype)
    for i in range(num):
        for j in range(priors):
            for c in range(classes):
                conf[i, j * classes + c] = j * 0.2 if i % 2 == c % 2 else 1 - j * 0.2
    loc = np.zeros((num, priors * loc_classes * 4, 1, 1), dtype)
    for i in range(num):
        values = []
        for h in range(2):
            for w in range(2):
                for c in range(loc_classes):
                    step = i + c / 2.0 + 0.5
                    x, y = (-1 if w % 2 else 1) * step, (-1 if h % 2 else 1) * step
                    values += [x, y, x, y]
        loc[i, :, 0, 0] = values
    return loc, conf, prior


FORK_DETECTIONS = {
    # (share_location, background_label_id, top_k): rows
    (True, 0, -1): ["0 1 1.0 0.15 0.15 0.45 0.45", "0 1 0.8 0.55 0.15 0.85 0.45",
                    "0 1 0.6 0.15 0.55 0.45 0.85", "0 1 0.4 0.55 0.55 0.85 0.85",
                    "1 1 0.6 0.45 0.45 0.75 0.75", "1 1 0.0 0.25 0.25 0.55 0.55"],
    (True, 0, 2): ["0 1 1.0 0.15 0.15 0.45 0.45", "0 1 0.8 0.55 0.15 0.85 0.45",
                   "1 1 0.6 0.45 0.45 0.75 0.75"],
    (False, -1, -1): ["0 0 0.6 0.55 0.55 0.85 0.85", "0 0 0.4 0.15 0.55 0.45 0.85",
                      "0 0 0.2 0.55 0.15 0.85 0.45", "0 0 0.0 0.15 0.15 0.45 0.45",
                      "0 1 1.0 0.20 0.20 0.50 0.50", "0 1 0.8 0.50 0.20 0.80 0.50",
                      "0 1 0.6 0.20 0.50 0.50 0.80", "0 1 0.4 0.50 0.50 0.80 0.80",
                      "1 0 1.0 0.25 0.25 0.55 0.55", "1 0 0.4 0.45 0.45 0.75 0.75",
                      "1 1 0.6 0.40 0.40 0.70 0.70"],
    (False, -1, 2): ["0 0 0.6 0.55 0.55 0.85 0.85", "0 0 0.4 0.15 0.55 0.45 0.85",
                     "0 1 1.0 0.20 0.20 0.50 0.50", "0 1 0.8 0.50 0.20 0.80 0.50",
                     "1 0 1.0 0.25 0.25 0.55 0.55", "1 1 0.6 0.40 0.40 0.70 0.70"],
    (False, 0, -1): ["0 1 1.0 0.20 0.20 0.50 0.50", "0 1 0.8 0.50 0.20 0.80 0.50",
                     "0 1 0.6 0.20 0.50 0.50 0.80", "0 1 0.4 0.50 0.50 0.80 0.80",
                     "1 1 0.6 0.40 0.40 0.70 0.70"],
    (False, 0, 2): ["0 1 1.0 0.20 0.20 0.50 0.50", "0 1 0.8 0.50 0.20 0.80 0.50",
                    "1 1 0.6 0.40 0.40 0.70 0.70"],
}


def detection_text(share, background, top_k, extra=""):
    top = f" top_k: {top_k}" if top_k > -1 else ""
    return (f"detection_output_param {{ num_classes: 2 share_location: "
            f"{'true' if share else 'false'} background_label_id: {background} "
            f"nms_param {{ nms_threshold: 0.1{top} }} {extra} }}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(FORK_DETECTIONS))
def test_detection_output_fork_cases(case, dtype):
    """TestForward{ShareLocation,NoShareLocation,NoShareLocationNeg0}[TopK]: rows in the
    fork's order, labels and image ids exact, values within 1e-6 (CheckEqual)."""
    loc, conf, prior = fork_detection_inputs(case[0], dtype)
    layer = build(DetectionOutput, detection_text(*case), [loc.shape, conf.shape, prior.shape])
    assert layer.output_shapes([loc.shape, conf.shape, prior.shape]) == [(1, 1, 1, 7)]
    top = layer(*(torch.from_numpy(a) for a in (loc, conf, prior)))
    expected = np.array([[float(v) for v in row.split()] for row in FORK_DETECTIONS[case]])
    assert top.dtype == torch.from_numpy(loc).dtype
    assert tuple(top.shape) == (1, 1, len(expected), 7)
    rows = top[0, 0].numpy()
    np.testing.assert_array_equal(rows[:, :2], expected[:, :2])
    np.testing.assert_allclose(rows[:, 2:], expected[:, 2:], atol=EPS)


def test_detection_output_no_detection_rows():
    """Nothing above the threshold in any image: one row (i, -1, ..., -1) per image."""
    loc, conf, prior = fork_detection_inputs(True)
    layer = build(DetectionOutput, detection_text(True, 0, -1, "confidence_threshold: 1"),
                  [loc.shape, conf.shape, prior.shape])
    top = layer(*(torch.from_numpy(a) for a in (loc, conf, prior)))
    np.testing.assert_array_equal(top.numpy(), [[[[0, -1, -1, -1, -1, -1, -1],
                                                  [1, -1, -1, -1, -1, -1, -1]]]])


def test_detection_output_num_classes_must_match_the_confidences():
    loc, conf, prior = fork_detection_inputs(True)
    with pytest.raises(ShapeError, match=r"'detection_out'.*12 confidences per sample.*"
                                         r"hold 2 per prior"):
        make_net('layer { name: "detection_out" type: "DetectionOutput" bottom: "loc" '
                 'bottom: "conf" bottom: "prior" top: "out" '
                 'detection_output_param { num_classes: 3 } }',
                 {"loc": loc.shape, "conf": conf.shape, "prior": prior.shape})


@pytest.mark.parametrize("text, message", [
    ("nms_param { eta: 0 }", "eta must lie in"),
    ("nms_param { eta: 1.5 }", "eta must lie in"),
    ("nms_param { nms_threshold: -0.1 }", "nms_threshold must be non-negative"),
    ("", "num_classes is required"),
    ("background_label_id: -1", "share_location with background_label_id -1"),
])
def test_detection_output_bad_parameters_name_the_layer(text, message):
    num = "" if message == "num_classes is required" else "num_classes: 2"
    with pytest.raises(UnsupportedParameterError, match=f"'det'.*{message}"):
        build(DetectionOutput, f"detection_output_param {{ {num} {text} }}",
              [(1, 16), (1, 8), (1, 2, 16)], name="det")


def test_detection_output_reads_every_field():
    layer = build(DetectionOutput, "detection_output_param { num_classes: 21 "
                  "share_location: false background_label_id: 3 nms_param { nms_threshold: 0.45 "
                  "top_k: 100 eta: 0.9 } code_type: CORNER_SIZE variance_encoded_in_target: true "
                  "keep_top_k: 50 confidence_threshold: 0.25 save_output_param { "
                  "output_directory: '/nonexistent' } }", [(1, 21 * 16), (1, 21 * 4), (1, 2, 16)])
    assert (layer.num_classes, layer.share_location, layer.background_label_id) == (21, False, 3)
    assert (layer.nms_threshold, layer.top_k, layer.code_type) == (
        pytest.approx(0.45), 100, "CORNER_SIZE")
    assert layer.eta == pytest.approx(0.9) and layer.variance_encoded_in_target
    assert (layer.keep_top_k, layer.confidence_threshold) == (50, pytest.approx(0.25))
    default = build(DetectionOutput, "detection_output_param { num_classes: 2 }",
                    [(1, 16), (1, 8), (1, 2, 16)])
    assert (default.code_type, default.top_k, default.keep_top_k, default.eta) == (
        "CORNER", -1, -1, 1.0)
    assert default.confidence_threshold is None and default.nms_threshold == pytest.approx(0.3)


# -- the fork's loops written out (bbox_util.cpp), one box at a time in float32 -------------
def caffe_decode(prior, variance, code, encoded, offsets):
    """DecodeBBox: returns (xmin, ymin, xmax, ymax) as float32 numbers."""
    px0, py0, px1, py1 = prior
    lx0, ly0, lx1, ly1 = offsets
    if not encoded:
        lx0, ly0, lx1, ly1 = (variance[0] * lx0, variance[1] * ly0, variance[2] * lx1,
                              variance[3] * ly1)
    if code == "CORNER":
        return px0 + lx0, py0 + ly0, px1 + lx1, py1 + ly1
    width, height = px1 - px0, py1 - py0
    if code == "CORNER_SIZE":
        return px0 + lx0 * width, py0 + ly0 * height, px1 + lx1 * width, py1 + ly1 * height
    cx, cy = lx0 * width + (px0 + px1) / f32(2), ly0 * height + (py0 + py1) / f32(2)
    bw, bh = np.exp(lx1) * width, np.exp(ly1) * height
    return (f32(float(cx) - float(bw) / 2.0), f32(float(cy) - float(bh) / 2.0),
            f32(float(cx) + float(bw) / 2.0), f32(float(cy) + float(bh) / 2.0))


def caffe_size(box):
    if box[2] < box[0] or box[3] < box[1]:
        return f32(0)
    return (box[2] - box[0]) * (box[3] - box[1])


def caffe_jaccard(a, b, size_a, size_b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return f32(0)
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width > 0 and height > 0:
        inter = width * height
        return inter / (size_a + size_b - inter)
    return f32(0)


def caffe_apply_nms_fast(boxes, sizes, scores, threshold, nms_threshold, eta, top_k):
    pairs = sorted(((s, i) for i, s in enumerate(scores) if s > threshold),
                   key=lambda pair: -pair[0])  # stable: ties in index order
    if top_k > -1:
        pairs = pairs[:top_k]
    adaptive, indices = f32(nms_threshold), []
    for _, index in pairs:
        keep = True
        for kept in indices:
            if not keep:
                break
            keep = caffe_jaccard(boxes[index], boxes[kept], sizes[index], sizes[kept]) <= adaptive
        if keep:
            indices.append(index)
        if keep and eta < 1 and adaptive > 0.5:
            adaptive = f32(adaptive * f32(eta))
    return indices


def caffe_detection_output(layer: DetectionOutput, loc, conf, prior):
    """DetectionOutputLayer::Forward_cpu with GetLocPredictions, GetConfidenceScores,
    GetPriorBBoxes, DecodeBBoxesAll and ApplyNMSFast, element by element."""
    num, priors = loc.shape[0], prior.shape[2] // 4
    loc_classes = 1 if layer.share_location else layer.num_classes
    flat_prior = prior.reshape(-1).astype(f32)
    prior_boxes = [tuple(flat_prior[4 * p:4 * p + 4]) for p in range(priors)]
    variances = [tuple(flat_prior[4 * (priors + p):4 * (priors + p) + 4]) for p in range(priors)]
    loc, conf = loc.reshape(num, -1).astype(f32), conf.reshape(num, -1).astype(f32)
    threshold = f32(-3.4028234663852886e38 if layer.confidence_threshold is None
                    else layer.confidence_threshold)
    rows, kept_total = [], 0
    for i in range(num):
        decoded = {}
        for c in range(loc_classes):
            label = -1 if layer.share_location else c
            if label == layer.background_label_id:
                continue
            boxes = []
            for p in range(priors):
                start = (p * loc_classes + c) * 4
                box = caffe_decode(prior_boxes[p], variances[p], layer.code_type,
                                   layer.variance_encoded_in_target, tuple(loc[i, start:start + 4]))
                if layer.clip:
                    box = tuple(max(min(v, f32(1)), f32(0)) for v in box)
                boxes.append(box)
            decoded[label] = (boxes, [caffe_size(b) for b in boxes])
        scores = {c: [conf[i, p * layer.num_classes + c] for p in range(priors)]
                  for c in range(layer.num_classes)}
        indices, detections = {}, 0
        for c in range(layer.num_classes):
            if c == layer.background_label_id:
                continue
            boxes, sizes = decoded[-1 if layer.share_location else c]
            indices[c] = caffe_apply_nms_fast(boxes, sizes, scores[c], threshold,
                                              layer.nms_threshold, layer.eta, layer.top_k)
            detections += len(indices[c])
        if -1 < layer.keep_top_k < detections:
            pairs = sorted(((scores[c][p], c, p) for c in sorted(indices) for p in indices[c]),
                           key=lambda t: -t[0])[:layer.keep_top_k]
            indices = {}
            for _, c, p in pairs:
                indices.setdefault(c, []).append(p)
            kept_total += layer.keep_top_k
        else:
            kept_total += detections
        for c in sorted(indices):
            boxes, _ = decoded[-1 if layer.share_location else c]
            rows += [[i, c, scores[c][p], *boxes[p]] for p in indices[c]]
    if kept_total == 0:
        return np.array([[i] + [-1] * 6 for i in range(num)], dtype=np.float64)
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def random_detection_case(rng):
    """Random priors, offsets and confidences (with ties), and random settings."""
    num, priors, classes = int(rng.integers(1, 4)), int(rng.integers(1, 30)), int(rng.integers(2, 5))
    share = bool(rng.integers(0, 2))
    loc_classes = 1 if share else classes
    code = ("CORNER", "CENTER_SIZE", "CORNER_SIZE")[int(rng.integers(0, 3))]
    centres, sizes = rng.random((priors, 2)), rng.random((priors, 2)) * 0.5 + 0.02
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    variances = (np.full((priors, 4), 0.1) if rng.random() < 0.5
                 else rng.random((priors, 4)) + 0.05)
    prior = np.stack([boxes.reshape(-1), variances.reshape(-1)])[None].astype(f32)
    conf = rng.random((num, priors * classes)).astype(f32)
    if rng.random() < 0.5:
        conf = np.round(conf * 4) / 4  # equal scores
    loc = (rng.standard_normal((num, priors * loc_classes * 4)) * 1.5).astype(f32)
    # The fork aborts on shared locations with background -1 (tested below).
    background = int(rng.integers(0 if share else -1, classes))
    settings = dict(share_location=share, background_label_id=background,
                    nms_threshold=float(rng.choice([0.0, 0.1, 0.45, 0.7, 1.0])),
                    top_k=int(rng.choice([-1, 1, 3, 10])), code_type=code,
                    variance_encoded_in_target=bool(rng.integers(0, 2)),
                    keep_top_k=int(rng.choice([-1, 0, 1, 4, 20])),
                    confidence_threshold=(None if rng.random() < 0.3
                                          else float(rng.choice([0.0, 0.3, 0.5]))),
                    clip=bool(rng.integers(0, 2)))
    return classes, settings, (loc, conf, prior)


@pytest.mark.parametrize("seed", range(40))
def test_detection_output_matches_the_fork_loops(seed):
    """Random settings (every code type, shared or not, ties, top_k, keep_top_k, clip,
    thresholds, inverted CORNER boxes, eta below 1 on half of them) against the loops."""
    rng = np.random.default_rng(seed)
    classes, settings, arrays = random_detection_case(rng)
    if seed % 2:
        settings["eta"] = float(rng.choice([0.5, 0.8, 0.95]))
        settings["nms_threshold"] = max(settings["nms_threshold"], 0.6)
    layer = DetectionOutput(classes, **settings)
    ours = layer(*(torch.from_numpy(a) for a in arrays))[0, 0].numpy()
    expected = caffe_detection_output(layer, *arrays)
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours[:, :3], expected[:, :3])
    np.testing.assert_allclose(ours[:, 3:], expected[:, 3:], rtol=1e-6, atol=1e-7)


def test_detection_output_adaptive_eta():
    """eta lowers the threshold after every kept box while it is above 0.5: three boxes in a
    row with overlaps 0.6 between neighbours; at 0.7 all survive, with eta 0.8 the second
    is checked against 0.7 * 0.8 = 0.56 and falls, the third (1/3 with the first) stays."""
    prior = np.array([[0, 0, 1, 1], [0.25, 0, 1.25, 1], [0.5, 0, 1.5, 1]], f32)
    # Neighbours overlap 0.75 / 1.25 = 0.6; the first and third 0.5 / 1.5 = 1/3.
    arrays = (np.zeros((1, 12), f32), np.array([[0, 0.9, 0, 0.8, 0, 0.7]], f32),
              np.stack([prior.reshape(-1), np.full(12, 0.1, f32)])[None])
    tensors = [torch.from_numpy(a) for a in arrays]
    plain = DetectionOutput(2, nms_threshold=0.7)(*tensors)[0, 0]
    adaptive = DetectionOutput(2, nms_threshold=0.7, eta=0.8)(*tensors)[0, 0]
    np.testing.assert_allclose(plain[:, 2].numpy(), [0.9, 0.8, 0.7], rtol=1e-6)
    np.testing.assert_allclose(adaptive[:, 2].numpy(), [0.9, 0.7], rtol=1e-6)


def test_detection_output_keep_top_k_across_classes():
    """keep_top_k keeps an image's best boxes over all classes, then lists them by label."""
    prior = np.array([[0, 0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]], f32)
    conf = np.array([[0, 0.3, 0.6, 0, 0.9, 0.2]], f32)  # prior 0: 0.3, 0.6; prior 1: 0.9, 0.2
    arrays = (np.zeros((1, 8), f32), conf, np.stack([prior.reshape(-1), np.full(8, 0.1, f32)])[None])
    rows = DetectionOutput(3, keep_top_k=2)(*(torch.from_numpy(a) for a in arrays))[0, 0]
    np.testing.assert_allclose(rows[:, :3].numpy(), [[0, 1, 0.9], [0, 2, 0.6]], rtol=1e-6)


# == Normalize: test_normalize_layer.cpp ======================================================
def normalize(text, shape=(2, 3, 2, 3), value=1.0, dtype=torch.float32):
    layer = build(Normalize, f"norm_param {{ {text} }}", [shape]).to(dtype)
    with torch.no_grad():
        return layer, layer(torch.full(shape, value, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("text, norm", [
    ("", 1.0), ("scale_filler { type: 'constant' value: 10 }", 10.0),
    ("channel_shared: false scale_filler { type: 'constant' value: 10 }", 10.0)])
def test_normalize_fork_forward_across_spatial(text, norm, dtype):
    """TestForward, TestForwardScale, TestForwardScaleChannels: each sample's norm."""
    _, top = normalize(text, dtype=dtype)
    np.testing.assert_allclose(top.flatten(1).norm(dim=1).numpy(), norm, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("text, norm", [
    ("across_spatial: false", 1.0),
    ("across_spatial: false scale_filler { type: 'constant' value: 10 }", 10.0),
    ("across_spatial: false channel_shared: false scale_filler { type: 'constant' value: 10 }",
     10.0)])
def test_normalize_fork_forward_per_position(text, norm, dtype):
    """TestForwardEltWise, ...Scale, ...ScaleChannel: every position's channel norm."""
    _, top = normalize(text, dtype=dtype)
    np.testing.assert_allclose(top.norm(dim=1).numpy(), norm, atol=1e-5)


@pytest.mark.parametrize("text", [
    "", "scale_filler { type: 'constant' value: 3 }",
    "channel_shared: false scale_filler { type: 'constant' value: 3 }",
    "across_spatial: false", "across_spatial: false scale_filler { type: 'constant' value: 3 }",
    "across_spatial: false channel_shared: false scale_filler { type: 'constant' value: 3 }"])
def test_normalize_gradcheck(text):
    """The fork's TestGradient* settings (one scale value, where its backward is the
    derivative), in float64 on N=2, C=5, H=7, W=3, for the bottom and the scale."""
    layer = build(Normalize, f"norm_param {{ {text} }}", [(N, C, H, W)]).double()
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def caffe_normalize_backward(x, scale, top_diff, across_spatial, eps):
    """NormalizeLayer::Backward_cpu, one sample at a time (float64)."""
    num, channels = x.shape[:2]
    x3 = x.reshape(num, channels, -1)
    g3 = top_diff.reshape(num, channels, -1)
    scale_c = np.broadcast_to(np.asarray(scale).reshape(-1, 1), (channels, 1))
    bottom_diff = np.empty_like(x3)
    scale_diff = np.zeros(np.asarray(scale).shape)
    for n in range(num):
        if across_spatial:
            norm = math.sqrt((x3[n] ** 2).sum() + eps)
            a = (x3[n] * g3[n]).sum()
            diff = (g3[n] - x3[n] * (a / norm / norm)) / norm
        else:
            norm = np.sqrt((x3[n] ** 2).sum(axis=0) + eps)
            a = (x3[n] * g3[n]).sum(axis=0)
            diff = (g3[n] - x3[n] * a / norm ** 2) / norm
        top = x3[n] / norm * scale_c
        if np.ndim(scale) == 0:
            scale_diff = scale_diff + (top * g3[n]).sum() / scale
        else:
            scale_diff = scale_diff + (top * g3[n]).sum(axis=1) / scale
        bottom_diff[n] = diff * scale_c
    return bottom_diff.reshape(x.shape), scale_diff


@pytest.mark.parametrize("across_spatial", [True, False])
def test_normalize_backward_is_the_forks_with_distinct_channel_scales(across_spatial):
    """With different per-channel scales the fork's bottom gradient is not the derivative;
    ours is the fork's."""
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((N, C, H, W)), rng.standard_normal((N, C, H, W))
    layer = Normalize(C, across_spatial=across_spatial, channel_shared=False, eps=1e-3).double()
    scale = rng.uniform(0.5, 3.0, C)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(scale))
    xt = torch.from_numpy(x).requires_grad_()
    layer(xt).backward(torch.from_numpy(g))
    bottom_diff, scale_diff = caffe_normalize_backward(x, scale, g, across_spatial, 1e-3)
    np.testing.assert_allclose(xt.grad.numpy(), bottom_diff, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), scale_diff, rtol=1e-10)
    _, derivative = torch.autograd.functional.vjp(
        lambda v: _true_normalize(v, torch.from_numpy(scale), across_spatial, 1e-3),
        torch.from_numpy(x), torch.from_numpy(g))
    assert not np.allclose(bottom_diff, derivative.numpy(), rtol=1e-3)


def _true_normalize(x, scale, across_spatial, eps):
    dims = (1, 2, 3) if across_spatial else 1
    return x / torch.sqrt((x * x).sum(dim=dims, keepdim=True) + eps) * scale.view(1, -1, 1, 1)


def test_normalize_scale_blobs_save_and_load(tmp_path):
    """The shared scale is a 0-axis blob (Caffe's ``vector<int>(0)``), the per-channel one
    has C values; both go through a caffemodel and back."""
    text = ('layer { name: "norm" type: "Normalize" bottom: "x" top: "y" norm_param { '
            'channel_shared: %s scale_filler { type: "uniform" min: 1 max: 9 } } }')
    for shared in ("true", "false"):
        net = make_net(text % shared, {"x": (N, C, H, W)})
        path = tmp_path / f"{shared}.caffemodel"
        net.save_caffemodel(path)
        prototxt = tmp_path / f"{shared}.prototxt"
        prototxt.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { '
                            f'dim: {N} dim: {C} dim: {H} dim: {W} }} }} }}\n' + text % shared)
        again = Net(prototxt, path)
        assert torch.equal(again.layer("norm").weight, net.layer("norm").weight)


def test_normalize_blob_shapes_and_shape_errors():
    assert Normalize(C).caffe_blobs()[0].shape == ()
    assert Normalize(C, channel_shared=False).caffe_blobs()[0].shape == (C,)
    layer = build(Normalize, "norm_param { channel_shared: false }", [(N, C, H, W)], "norm")
    with pytest.raises(ShapeError, match="'norm'.*5 channels"):
        layer.output_shapes([(N, C + 1, H, W)])
    with pytest.raises(ShapeError, match="'norm'.*2 to 4 axes"):
        layer.output_shapes([(N, C, H, W, 2)])


# == Permute: test_permute_layer.cpp ==========================================================
def permute(order, shape):
    text = "permute_param { " + " ".join(f"order: {o}" for o in order) + " }"
    return build(Permute, text, [shape])


def test_permute_fork_setup_and_identity():
    """TestSetUp, TestSetUpIdentity, TestFowardIdentity."""
    assert permute([0, 2, 3, 1], (2, 3, 4, 5)).output_shapes([(2, 3, 4, 5)]) == [(2, 4, 5, 3)]
    identity = permute([], (2, 3, 4, 5))
    x = torch.randn(2, 3, 4, 5)
    assert identity.output_shapes([(2, 3, 4, 5)]) == [(2, 3, 4, 5)]
    assert torch.equal(identity(x), x)


def test_permute_fork_forward_2d_and_3d():
    """TestFowrad2D and TestFowrad3D: the fork's hand-written tops."""
    x = torch.tensor([1., 2, 3, 4, 5, 6]).view(1, 1, 2, 3).expand(2, 3, 2, 3)
    top = permute([0, 1, 3, 2], x.shape)(x)
    assert top.reshape(-1, 6).tolist() == [[1, 4, 2, 5, 3, 6]] * 6
    x = torch.arange(1., 13.).view(1, 2, 2, 3).expand(2, 2, 2, 3)
    top = permute([0, 2, 3, 1], x.shape)(x)
    assert top.reshape(2, 12).tolist() == [[1, 7, 2, 8, 3, 9, 4, 10, 5, 11, 6, 12]] * 2


def test_permute_fork_two_permutes_restore():
    """TestTwoPermute: (0, 2, 3, 1) then (0, 3, 1, 2) gives the input back."""
    x = torch.randn(2, 3, 4, 5)
    first = permute([0, 2, 3, 1], x.shape)
    middle = first(x)
    assert tuple(middle.shape) == (2, 4, 5, 3)
    assert torch.equal(permute([0, 3, 1, 2], middle.shape)(middle), x)


def test_permute_completes_missing_axes_in_order():
    layer = permute([0, 2], (N, C, H, W))
    assert layer.full_order(4) == (0, 2, 1, 3)
    assert layer.output_shapes([(N, C, H, W)]) == [(N, H, C, W)]


def test_permute_gradcheck():
    """The fork's TestGradient order, in float64 on distinct sizes."""
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(permute([0, 2, 3, 1], x.shape), (x,))


@pytest.mark.parametrize("order, message", [
    ([0, 2, 2, 1], "not a permutation: axis 2 appears twice"),
    ([0, 4, 1], "names axis 4, which a 4-axis bottom does not have")])
def test_permute_bad_order_names_the_layer(order, message):
    text = "permute_param { " + " ".join(f"order: {o}" for o in order) + " }"
    with pytest.raises(UnsupportedParameterError, match=f"'conf_perm'.*{message}"):
        make_net(f'layer {{ name: "conf_perm" type: "Permute" bottom: "x" top: "y" {text} }}',
                 {"x": (N, C, H, W)})


# == conversions: onnxruntime and the generated source against Net ==========================
@pytest.mark.parametrize("text", [
    "", "across_spatial: false", "channel_shared: false scale_filler { type: 'gaussian' }",
    ("across_spatial: false channel_shared: false scale_filler { type: 'uniform' min: 1 "
     "max: 20 } eps: 0.01")])
@pytest.mark.parametrize("shape", [(N, C, H, W), (N, C)])
def test_normalize_converts(text, shape):
    net = make_net(f'layer {{ name: "norm" type: "Normalize" bottom: "x" top: "y" '
                   f'norm_param {{ {text} }} }}', {"x": shape})
    check_conversions(net, {"x": np.random.default_rng(0).standard_normal(shape)})


@pytest.mark.parametrize("order", [[0, 2, 3, 1], [0, 1], [3, 1], [0, 1, 2, 3]])
def test_permute_converts(order):
    text = " ".join(f"order: {o}" for o in order)
    net = make_net(f'layer {{ name: "perm" type: "Permute" bottom: "x" top: "y" '
                   f'permute_param {{ {text} }} }}', {"x": (N, C, H, W)})
    check_conversions(net, {"x": np.random.default_rng(0).standard_normal((N, C, H, W))})


PRIOR_SETTINGS = [
    ("min_size: 30 max_size: 60 aspect_ratio: 2 flip: true clip: false variance: 0.1 "
     "variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5"),
    "min_size: 60 aspect_ratio: 2 aspect_ratio: 3 clip: true",
    ("min_size: 4 min_size: 8 max_size: 9 max_size: 18 aspect_ratio: 2 img_h: 40 img_w: 30 "
     "step_h: 6 step_w: 5 offset: 0.25"),
]


def prior_net(text, image=(N, 3, 35, 21)):
    return make_net(
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "feature" '
        'convolution_param { num_output: 2 kernel_size: 3 stride: 4 pad: 1 } }\n'
        f'layer {{ name: "priors" type: "PriorBox" bottom: "feature" bottom: "data" '
        f'top: "priors" prior_box_param {{ {text} }} }}', {"data": image})


@pytest.mark.parametrize("text", PRIOR_SETTINGS)
def test_prior_box_converts_as_a_constant(text):
    net = prior_net(text)
    model = convert_to_onnx(net, static_shape=True)
    assert any(node.op_type == "Constant" and node.output[0] == "priors"
               for node in model.graph.node)
    image = np.zeros((N, 3, 35, 21), np.float32)
    with torch.no_grad():
        want = net(data=torch.from_numpy(image))["priors"].numpy()
    assert_close("priors", run_onnx(model, {"data": image})["priors"], want)
    check_conversions(net, {"data": image})


@pytest.mark.parametrize("text", PRIOR_SETTINGS)
def test_prior_box_with_dynamic_image_size(text):
    """A fully convolutional net keeps symbolic heights and widths: the priors come from
    Shape/Range/arithmetic, and one model gives Net's priors at several image sizes."""
    net = prior_net(text)
    model = convert_to_onnx(net)
    assert not any(node.op_type == "Constant" for node in model.graph.node)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert (dims[2].dim_param, dims[3].dim_param) == ("height", "width")
    for size in [(35, 21), (64, 48), (17, 90)]:
        image = np.zeros((N, 3) + size, np.float32)
        with torch.no_grad():
            want = net(data=torch.from_numpy(image))["priors"].numpy()
        assert_close(f"priors at {size}", run_onnx(model, {"data": image})["priors"], want)


def detection_net(share, background, top_k, extra="", loc_shape=None):
    loc, conf, prior = fork_detection_inputs(share)
    net = make_net('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
                   f'bottom: "prior" top: "out" {detection_text(share, background, top_k, extra)} }}',
                   {"loc": loc.shape, "conf": conf.shape, "prior": prior.shape})
    return net, {"loc": loc, "conf": conf, "prior": prior}


@pytest.mark.parametrize("case", list(FORK_DETECTIONS))
def test_detection_output_converts_fork_cases(case):
    net, inputs = detection_net(*case)
    rows = check_conversions(net, inputs)["out"]
    assert rows.shape == (1, 1, len(FORK_DETECTIONS[case]), 7)


def test_detection_output_converts_no_detection_rows():
    net, inputs = detection_net(True, 0, -1, "confidence_threshold: 1 keep_top_k: 3")
    rows = check_conversions(net, inputs)["out"]
    np.testing.assert_array_equal(rows[0, 0, :, 1:], -1)


@pytest.mark.parametrize("seed", range(20))
def test_detection_output_onnx_matches_net_on_random_cases(seed):
    """Ties, inverted boxes, keep_top_k cuts, clip and every code type through
    TopK + NonMaxSuppression + NonZero, exactly the Net's rows and order."""
    classes, settings, (loc, conf, prior) = random_detection_case(np.random.default_rng(seed))
    text = (f'detection_output_param {{ num_classes: {classes} '
            f'share_location: {str(settings["share_location"]).lower()} '
            f'background_label_id: {settings["background_label_id"]} '
            f'nms_param {{ nms_threshold: {settings["nms_threshold"]}'
            + (f' top_k: {settings["top_k"]}' if settings["top_k"] > -1 else "") + ' } '
            f'code_type: {settings["code_type"]} '
            f'variance_encoded_in_target: {str(settings["variance_encoded_in_target"]).lower()} '
            f'keep_top_k: {settings["keep_top_k"]} '
            + (f'confidence_threshold: {settings["confidence_threshold"]} '
               if settings["confidence_threshold"] is not None else "") + '}')
    net = make_net('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
                   f'bottom: "prior" top: "out" {text} }}',
                   {"loc": loc.shape, "conf": conf.shape, "prior": prior.shape})
    net.layer("det").clip = settings["clip"]  # OpenCV's field; set on the module
    want = net(**{k: torch.from_numpy(v) for k, v in
                  (("loc", loc), ("conf", conf), ("prior", prior))})["out"].detach().numpy()
    got = run_onnx(convert_to_onnx(net), {"loc": loc, "conf": conf, "prior": prior})["out"]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got[..., :3], want[..., :3])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_detection_output_onnx_refuses_adaptive_eta():
    net, _ = detection_net(True, 0, -1)
    net.layer("det").eta = 0.9
    with pytest.raises(UnsupportedParameterError, match=r"'det'.*eta 0\.9.*adaptive NMS"):
        convert_to_onnx(net)


def test_detection_output_onnx_uses_standard_ops_only():
    net, _ = detection_net(True, 0, 2, "keep_top_k: 3")
    model = convert_to_onnx(net)
    ops = {node.op_type for node in model.graph.node}
    assert {"NonMaxSuppression", "TopK", "NonZero"} <= ops
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert [opset.domain for opset in model.opset_import] == [""]
