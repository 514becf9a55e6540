"""Real SSD nets end to end: chuanqi305's MobileNet-SSD deploy net (BatchNorm + Scale kept,
or folded into the convolutions as in its ``voc/`` deploy file) and OpenCV's face detector
(``samples/dnn/face_detector/deploy.prototxt``, the res10 SSD with Normalize).

The generators below write the published topology and settings (layer and blob names,
depthwise convolutions with ``group`` = channels, in-place BatchNorm/Scale/ReLU, Permute,
Flatten, Concat, PriorBox, Reshape, Softmax, DetectionOutput, the old-style ``input`` /
``input_shape``); ``width`` scales the hidden channel counts so a test can run the real
spatial sizes cheaply. The weights come from the fillers with a fixed seed, then
:func:`seeded_detector` gives BatchNorm real statistics and scales the heads so that the
detections are real ones (dozens of boxes over several classes, cuts at ``top_k`` and
``keep_top_k``), never only the "no detection" row.

Checks: ``caffelayers inspect`` exits 0; ``Net``, onnxruntime (our ONNX) and the generated
PyTorch source give the same rows, and OpenCV 4.x's ``readNetFromCaffe`` gives the same
detections as a set of rows (it orders them by score and pads with zero rows), rtol 1e-4.
The benchmark ``benchmarks/bench_ssd.py`` loads these generators from this file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caffelayers import Net
from caffelayers.cli import main as cli_main
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.converters.pytorch import ConvertedNet
from caffelayers.proto import caffe_pb2

VARIANCES = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"
# OpenCV's schema adds ``clip`` to DetectionOutput (the face detector sets it).
HAS_DETECTION_CLIP = "clip" in caffe_pb2.DetectionOutputParameter.DESCRIPTOR.fields_by_name


def _channels(count: int, width: float) -> int:
    return max(1, round(count * width))


def _input(batch: int, size: int) -> str:
    return (f'input: "data"\ninput_shape {{ dim: {batch} dim: 3 dim: {size} dim: {size} }}\n')


def _conv(name, bottom, outputs, kernel, stride=1, pad=0, group=1, bias=True, dilation=1,
          filler="msra", top=None) -> str:
    settings = f"num_output: {outputs}"
    settings += "" if bias else " bias_term: false"
    settings += f" pad: {pad}" if pad else ""
    settings += f" kernel_size: {kernel}"
    settings += f" stride: {stride}" if stride != 1 else ""
    settings += f" group: {group}" if group != 1 else ""
    settings += f" dilation: {dilation}" if dilation != 1 else ""
    settings += f' weight_filler {{ type: "{filler}" }}'
    settings += ' bias_filler { type: "constant" value: 0 }' if bias else ""
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" '
            f'top: "{top or name}" convolution_param {{ {settings} }} }}\n')


def _batch_norm(name, bottom, top=None) -> str:
    return f'layer {{ name: "{name}" type: "BatchNorm" bottom: "{bottom}" top: "{top or bottom}" }}\n'


def _scale(name, blob, fillers=True) -> str:
    settings = "filler { value: 1 } bias_term: true bias_filler { value: 0 }" if fillers \
        else "bias_term: true"
    return (f'layer {{ name: "{name}" type: "Scale" bottom: "{blob}" top: "{blob}" '
            f'scale_param {{ {settings} }} }}\n')


def _relu(name, bottom, top=None) -> str:
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{bottom}" top: "{top or bottom}" }}\n'


def _head(source, prefix, priors, classes, prior_settings, kernel, pad, filler) -> str:
    """One source's loc and conf convolutions, each permuted to N x H x W x C and
    flattened, and its PriorBox on the image."""
    text = ""
    for kind, outputs in (("loc", priors * 4), ("conf", priors * classes)):
        name = f"{prefix}_mbox_{kind}"
        text += _conv(name, source, outputs, kernel, pad=pad, filler=filler)
        text += (f'layer {{ name: "{name}_perm" type: "Permute" bottom: "{name}" '
                 f'top: "{name}_perm" permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}\n'
                 f'layer {{ name: "{name}_flat" type: "Flatten" bottom: "{name}_perm" '
                 f'top: "{name}_flat" flatten_param {{ axis: 1 }} }}\n')
    return text + (f'layer {{ name: "{prefix}_mbox_priorbox" type: "PriorBox" '
                   f'bottom: "{source}" bottom: "data" top: "{prefix}_mbox_priorbox" '
                   f'prior_box_param {{ {prior_settings} flip: true clip: false {VARIANCES} '
                   f'offset: 0.5 }} }}\n')


def _detection_tail(prefixes, classes, detection_settings) -> str:
    """Concat the heads, softmax over the classes, DetectionOutput."""
    text = ""
    for kind, axis in (("loc", 1), ("conf", 1), ("priorbox", 2)):
        suffix = "" if kind == "priorbox" else "_flat"
        bottoms = " ".join(f'bottom: "{p}_mbox_{kind}{suffix}"' for p in prefixes)
        text += (f'layer {{ name: "mbox_{kind}" type: "Concat" {bottoms} top: "mbox_{kind}" '
                 f'concat_param {{ axis: {axis} }} }}\n')
    return text + (
        'layer { name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" '
        f'top: "mbox_conf_reshape" reshape_param {{ shape {{ dim: 0 dim: -1 dim: {classes} }} }} }}\n'
        'layer { name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape" '
        'top: "mbox_conf_softmax" softmax_param { axis: 2 } }\n'
        'layer { name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax" '
        'top: "mbox_conf_flatten" flatten_param { axis: 1 } }\n'
        'layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" '
        'bottom: "mbox_conf_flatten" bottom: "mbox_priorbox" top: "detection_out" '
        f'include {{ phase: TEST }} detection_output_param {{ num_classes: {classes} '
        f'share_location: true background_label_id: 0 {detection_settings} }} }}\n')


# -- chuanqi305/MobileNet-SSD deploy.prototxt ---------------------------------------------
MOBILENET_BLOCKS = [  # (pointwise outputs, depthwise stride) for conv1 .. conv13
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]
MOBILENET_EXTRAS = [("conv14", 256, 512), ("conv15", 128, 256), ("conv16", 128, 256),
                    ("conv17", 64, 128)]
MOBILENET_HEADS = [  # source, priors per cell, PriorBox sizes and ratios
    ("conv11", 3, "min_size: 60.0 aspect_ratio: 2.0"),
    ("conv13", 6, "min_size: 105.0 max_size: 150.0 aspect_ratio: 2.0 aspect_ratio: 3.0"),
    ("conv14_2", 6, "min_size: 150.0 max_size: 195.0 aspect_ratio: 2.0 aspect_ratio: 3.0"),
    ("conv15_2", 6, "min_size: 195.0 max_size: 240.0 aspect_ratio: 2.0 aspect_ratio: 3.0"),
    ("conv16_2", 6, "min_size: 240.0 max_size: 285.0 aspect_ratio: 2.0 aspect_ratio: 3.0"),
    ("conv17_2", 6, "min_size: 285.0 max_size: 300.0 aspect_ratio: 2.0 aspect_ratio: 3.0")]


def mobilenet_ssd_prototxt(width: float = 1.0, batch: int = 1, size: int = 300,
                           folded: bool = False) -> str:
    """MobileNet-SSD (VOC, 21 classes): conv0, 13 depthwise-separable blocks, four extra
    stages, six heads (1 x 1 loc/conf convolutions). Each convolution is followed by
    ``/bn`` BatchNorm and ``/scale`` Scale (no convolution bias), or, ``folded`` (the
    ``voc/MobileNetSSD_deploy.prototxt`` form), has a bias and neither; then ``/relu``."""
    text = 'name: "MobileNet-SSD"\n' + _input(batch, size)

    def unit(name, bottom, outputs, kernel, stride=1, pad=0, group=1):
        block = _conv(name, bottom, outputs, kernel, stride, pad, group, bias=folded)
        if not folded:
            block += _batch_norm(f"{name}/bn", name) + _scale(f"{name}/scale", name)
        return block + _relu(f"{name}/relu", name)

    channels = _channels(32, width)
    text += unit("conv0", "data", channels, 3, stride=2, pad=1)
    bottom = "conv0"
    for index, (outputs, stride) in enumerate(MOBILENET_BLOCKS, start=1):
        text += unit(f"conv{index}/dw", bottom, channels, 3, stride, 1, group=channels)
        channels = _channels(outputs, width)
        text += unit(f"conv{index}", f"conv{index}/dw", channels, 1)
        bottom = f"conv{index}"
    for stage, reduce, outputs in MOBILENET_EXTRAS:
        text += unit(f"{stage}_1", bottom, _channels(reduce, width), 1)
        text += unit(f"{stage}_2", f"{stage}_1", _channels(outputs, width), 3, 2, 1)
        bottom = f"{stage}_2"
    for source, priors, settings in MOBILENET_HEADS:
        text += _head(source, source, priors, 21, settings, kernel=1, pad=0, filler="msra")
    return text + _detection_tail(
        [source for source, _, _ in MOBILENET_HEADS], 21,
        "nms_param { nms_threshold: 0.45 top_k: 100 } code_type: CENTER_SIZE keep_top_k: 100 "
        "confidence_threshold: 0.25")


# -- opencv/opencv samples/dnn/face_detector/deploy.prototxt ------------------------------
FACE_HEADS = [  # PriorBox bottom, head prefix, priors per cell, sizes, ratios and step
    ("conv4_3_norm", "conv4_3_norm", 4, "min_size: 30.0 max_size: 60.0 aspect_ratio: 2 step: 8"),
    ("fc7", "fc7", 6, "min_size: 60.0 max_size: 111.0 aspect_ratio: 2 aspect_ratio: 3 step: 16"),
    ("conv6_2_h", "conv6_2", 6,
     "min_size: 111.0 max_size: 162.0 aspect_ratio: 2 aspect_ratio: 3 step: 32"),
    ("conv7_2_h", "conv7_2", 6,
     "min_size: 162.0 max_size: 213.0 aspect_ratio: 2 aspect_ratio: 3 step: 64"),
    ("conv8_2_h", "conv8_2", 4, "min_size: 213.0 max_size: 264.0 aspect_ratio: 2 step: 100"),
    ("conv9_2_h", "conv9_2", 4, "min_size: 264.0 max_size: 315.0 aspect_ratio: 2 step: 300")]


def face_detector_prototxt(width: float = 1.0, batch: int = 1, size: int = 300,
                           clip: bool = True) -> str:
    """OpenCV's res10 SSD face detector: BatchNorm + Scale on the input, a 7 x 7 stem and
    max pool, four residual stages (pre-activation BatchNorm/Scale/ReLU, 1 x 1 expand
    shortcuts, a dilated 3 x 3 in the last), extra layers, L2 ``Normalize`` (scale 20 per
    channel) on ``layer_256_1_bn1``, six 3 x 3 heads, 2 classes, DetectionOutput with
    OpenCV's ``clip`` (left out when the schema lacks it)."""
    c = {n: _channels(n, width) for n in (32, 64, 128, 256)}
    text = _input(batch, size)
    text += _batch_norm("data_bn", "data", "data_bn") + _scale("data_scale", "data_bn", False)
    text += _conv("conv1_h", "data_bn", c[32], 7, stride=2, pad=3)
    text += (_batch_norm("conv1_bn_h", "conv1_h") + _scale("conv1_scale_h", "conv1_h", False)
             + _relu("conv1_relu", "conv1_h"))
    text += ('layer { name: "conv1_pool" type: "Pooling" bottom: "conv1_h" top: "conv1_pool" '
             'pooling_param { kernel_size: 3 stride: 2 } }\n')

    def pre_activation(bn, scale, relu, bottom, top):
        return (_batch_norm(bn, bottom, top) + _scale(scale, top, False) + _relu(relu, top))

    def eltwise(name, a, b):
        return (f'layer {{ name: "{name}" type: "Eltwise" bottom: "{a}" bottom: "{b}" '
                f'top: "{name}" }}\n')

    text += _conv("layer_64_1_conv1_h", "conv1_pool", c[32], 3, pad=1, bias=False)
    text += pre_activation("layer_64_1_bn2_h", "layer_64_1_scale2_h", "layer_64_1_relu2",
                           "layer_64_1_conv1_h", "layer_64_1_conv1_h")
    text += _conv("layer_64_1_conv2_h", "layer_64_1_conv1_h", c[32], 3, pad=1, bias=False)
    text += eltwise("layer_64_1_sum", "layer_64_1_conv2_h", "conv1_pool")

    text += pre_activation("layer_128_1_bn1_h", "layer_128_1_scale1_h", "layer_128_1_relu1",
                           "layer_64_1_sum", "layer_128_1_bn1_h")
    text += _conv("layer_128_1_conv1_h", "layer_128_1_bn1_h", c[128], 3, 2, 1, bias=False)
    text += pre_activation("layer_128_1_bn2", "layer_128_1_scale2", "layer_128_1_relu2",
                           "layer_128_1_conv1_h", "layer_128_1_conv1_h")
    text += _conv("layer_128_1_conv2", "layer_128_1_conv1_h", c[128], 3, pad=1, bias=False)
    text += _conv("layer_128_1_conv_expand_h", "layer_128_1_bn1_h", c[128], 1, 2, bias=False)
    text += eltwise("layer_128_1_sum", "layer_128_1_conv2", "layer_128_1_conv_expand_h")

    text += pre_activation("layer_256_1_bn1", "layer_256_1_scale1", "layer_256_1_relu1",
                           "layer_128_1_sum", "layer_256_1_bn1")
    text += _conv("layer_256_1_conv1", "layer_256_1_bn1", c[256], 3, 2, 1, bias=False)
    text += pre_activation("layer_256_1_bn2", "layer_256_1_scale2", "layer_256_1_relu2",
                           "layer_256_1_conv1", "layer_256_1_conv1")
    text += _conv("layer_256_1_conv2", "layer_256_1_conv1", c[256], 3, pad=1, bias=False)
    text += _conv("layer_256_1_conv_expand", "layer_256_1_bn1", c[256], 1, 2, bias=False)
    text += eltwise("layer_256_1_sum", "layer_256_1_conv2", "layer_256_1_conv_expand")

    text += pre_activation("layer_512_1_bn1", "layer_512_1_scale1", "layer_512_1_relu1",
                           "layer_256_1_sum", "layer_512_1_bn1")
    text += _conv("layer_512_1_conv1_h", "layer_512_1_bn1", c[128], 3, pad=1, bias=False)
    text += pre_activation("layer_512_1_bn2_h", "layer_512_1_scale2_h", "layer_512_1_relu2",
                           "layer_512_1_conv1_h", "layer_512_1_conv1_h")
    text += _conv("layer_512_1_conv2_h", "layer_512_1_conv1_h", c[256], 3, pad=2, bias=False,
                  dilation=2)
    text += _conv("layer_512_1_conv_expand_h", "layer_512_1_bn1", c[256], 1, bias=False)
    text += eltwise("layer_512_1_sum", "layer_512_1_conv2_h", "layer_512_1_conv_expand_h")
    text += (_batch_norm("last_bn_h", "layer_512_1_sum") + _scale("last_scale_h",
                                                                  "layer_512_1_sum", False)
             + _relu("last_relu", "layer_512_1_sum", "fc7"))

    bottom = "fc7"
    for stage, stride in ((6, 2), (7, 2), (8, 1), (9, 1)):
        reduce, outputs = (c[128], c[256]) if stage == 6 else (c[64], c[128])
        text += _conv(f"conv{stage}_1_h", bottom, reduce, 1, filler="xavier")
        text += _relu(f"conv{stage}_1_relu", f"conv{stage}_1_h")
        text += _conv(f"conv{stage}_2_h", f"conv{stage}_1_h", outputs, 3, stride, 1,
                      filler="xavier")
        text += _relu(f"conv{stage}_2_relu", f"conv{stage}_2_h")
        bottom = f"conv{stage}_2_h"
    text += ('layer { name: "conv4_3_norm" type: "Normalize" bottom: "layer_256_1_bn1" '
             'top: "conv4_3_norm" norm_param { across_spatial: false scale_filler { '
             'type: "constant" value: 20 } channel_shared: false } }\n')
    for source, prefix, priors, settings in FACE_HEADS:
        text += _head(source, prefix, priors, 2, settings, kernel=3, pad=1, filler="xavier")
    return text + _detection_tail(
        [prefix for _, prefix, _, _ in FACE_HEADS], 2,
        "nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE keep_top_k: 200 "
        "confidence_threshold: 0.2" + (" clip: 1" if clip and HAS_DETECTION_CLIP else ""))


# -- weights that give real detections ----------------------------------------------------
def seeded_detector(prototxt: Path, data: np.ndarray, seed: int = 0, conf_scale: float = 3.0,
                    background: float = 2.0) -> Net:
    """The net with filler weights (``seed``), BatchNorm statistics and Scale values drawn
    around the identity, convolution biases drawn small, then the heads rescaled on
    ``data``: location offsets of standard deviation 1 and class logits of standard
    deviation ``conf_scale`` with the background's raised by ``background``, so that a
    minority of the priors passes the confidence threshold."""
    net = Net(prototxt, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)

    def draw(shape, low, high):
        return torch.rand(shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for node in net.graph.nodes:
            module = node.module
            if node.type == "BatchNorm":
                module.mean_sum.copy_(draw(module.mean_sum.shape, -0.1, 0.1))
                module.variance_sum.copy_(draw(module.variance_sum.shape, 0.5, 1.5))
                module.scale_factor.fill_(1.0)
            elif node.type == "Scale":
                module.weight.copy_(draw(module.weight.shape, 0.8, 1.2))
                module.bias.copy_(draw(module.bias.shape, -0.1, 0.1))
            elif node.type == "Convolution" and module.bias is not None:
                module.bias.copy_(draw(module.bias.shape, -0.1, 0.1))
        blobs = {}
        net(data=torch.from_numpy(data))
        blobs = {name: value.detach() for name, value in net.blobs.items()}
        classes = net.layer("detection_out").num_classes
        for node in net.graph.nodes:
            name = node.name
            if not name.endswith(("_mbox_loc", "_mbox_conf")):
                continue
            module = node.module
            values = blobs[name]
            if name.endswith("_mbox_loc"):
                factor = 1.0 / float(values.std())
                module.weight.mul_(factor)
                module.bias.mul_(factor)
                continue
            logits = values.permute(0, 2, 3, 1).reshape(-1, classes)
            factor = conf_scale / float(logits.std())
            module.weight.mul_(factor)
            module.bias.mul_(factor)
            # Every prior's background logit (class 0 of each group of ``classes``).
            module.bias.view(-1, classes)[:, 0] += background
    return net


def detector_files(tmp_path: Path, text: str, data: np.ndarray, **calibration):
    """``(prototxt, caffemodel, net)`` with the seeded weights saved and loaded back."""
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(text)
    weights = tmp_path / "weights.caffemodel"
    seeded_detector(prototxt, data, **calibration).save_caffemodel(weights)
    return prototxt, weights, Net(prototxt, weights)


def image_batch(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Mean-subtracted, scaled pixels in [-1, 1], as both nets' preprocessing gives."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (batch, 3, size, size)).astype(np.float32)


def detection_rows(output: np.ndarray) -> np.ndarray:
    """The detections of a ``1 x 1 x D x 7`` output, without OpenCV's zero padding rows (no
    detection has the background label 0)."""
    rows = np.asarray(output, dtype=np.float64).reshape(-1, 7)
    return rows[rows[:, 1] != 0]


def assert_same_detections(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    """The same set of rows: each of ours pairs with a distinct row of theirs of the same
    image and label whose score and box are within rtol 1e-4 (atol 1e-6). Rows are paired
    by nearest values, since two engines may order nearly equal scores either way."""
    ours, theirs = detection_rows(ours), detection_rows(theirs)
    assert ours.shape == theirs.shape, f"{name}: {len(ours)} rows against {len(theirs)}"
    unmatched = list(range(len(theirs)))
    for row in ours:
        candidates = [i for i in unmatched if (theirs[i, :2] == row[:2]).all()]
        assert candidates, f"{name}: no row of image {row[0]:g}, label {row[1]:g} left for {row}"
        best = min(candidates, key=lambda i: np.abs(theirs[i, 2:] - row[2:]).max())
        np.testing.assert_allclose(row[2:], theirs[best, 2:], rtol=1e-4, atol=1e-6,
                                   err_msg=f"{name}: row {row}")
        unmatched.remove(best)


def opencv_detections(prototxt: Path, weights: Path, data: np.ndarray):
    """OpenCV's output, or a skip when its ``cv2.dnn`` has no Caffe importer."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip("this OpenCV has no cv2.dnn.readNetFromCaffe (OpenCV 5 removed it); "
                    "install opencv-python-headless<5")
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    net.setInput(data)
    return net.forward()


def check_detector(prototxt: Path, weights: Path, net: Net, data: np.ndarray,
                   opencv: bool = True) -> np.ndarray:
    """Net, onnxruntime, the generated source (and OpenCV) agree; returns Net's rows."""
    with torch.no_grad():
        ours = net(data=torch.from_numpy(data))["detection_out"].numpy()
    onnx_rows = run_onnx(convert_to_onnx(net), {"data": data}, threads=1)["detection_out"]
    assert_same_detections("onnxruntime", ours, onnx_rows)
    with torch.no_grad():
        source = ConvertedNet(net, "pytorch-source")(data=torch.from_numpy(data))
    assert_same_detections("PyTorch source", ours, source["detection_out"].numpy())
    if opencv:
        assert_same_detections("OpenCV", ours, opencv_detections(prototxt, weights, data))
    return ours[0, 0]


def assert_real_detections(rows: np.ndarray, images: int, labels: int) -> None:
    """Detections in every image and of several labels: not the "no detection" row."""
    assert (rows[:, 1] >= 1).all()
    assert set(rows[:, 0].astype(int)) == set(range(images))
    assert len(set(rows[:, 1].astype(int))) >= labels


# -- the tests ----------------------------------------------------------------------------
def test_mobilenet_ssd_inspect_and_shapes(tmp_path, capsys):
    """Published widths: inspect exits 0; 1917 priors (19x19x3 + 10x10x6 + 5x5x6 + 3x3x6 +
    2x2x6 + 1x1x6), 5.8 M parameters as the published caffemodel."""
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(mobilenet_ssd_prototxt())
    assert cli_main(["inspect", str(prototxt), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"mbox_priorbox"' in out and "DetectionOutput" in out
    net = Net(prototxt, seed=0)
    shapes = net.graph.blob_shapes
    assert shapes["conv11"][2:] == (19, 19) and shapes["conv17_2"][2:] == (1, 1)
    assert shapes["mbox_priorbox"] == (1, 2, 1917 * 4)
    assert shapes["mbox_conf_flatten"] == (1, 1917 * 21)
    assert shapes["detection_out"] == (1, 1, 1, 7)
    parameters = sum(blob.numel() for node in net.graph.nodes for blob in node.module.caffe_blobs()
                     if node.type != "BatchNorm")
    assert 5.5e6 < parameters < 6.0e6


def test_ssd_nets_convert_from_the_command_line(tmp_path):
    """``caffelayers convert`` to ONNX and to PyTorch source (filler weights) exits 0."""
    for name, text in (("mobilenet", mobilenet_ssd_prototxt(width=0.25)),
                       ("face", face_detector_prototxt(width=0.25))):
        prototxt = tmp_path / f"{name}.prototxt"
        prototxt.write_text(text)
        for target, output in (("onnx", f"{name}.onnx"), ("pytorch", f"{name}_source")):
            assert cli_main(["convert", str(prototxt), "--to", target,
                             "-o", str(tmp_path / output)]) == 0


@pytest.mark.parametrize("folded", [False, True], ids=["bn-scale", "folded"])
def test_mobilenet_ssd_end_to_end(folded, tmp_path):
    """MobileNet-SSD at 300 x 300, a quarter of the channels, 2 images: Net, onnxruntime,
    the generated source and OpenCV give the same detections, with top_k and keep_top_k
    cutting."""
    data = image_batch(2, 300)
    prototxt, weights, net = detector_files(
        tmp_path, mobilenet_ssd_prototxt(width=0.25, batch=2, folded=folded), data)
    rows = check_detector(prototxt, weights, net, data)
    assert_real_detections(rows, images=2, labels=5)
    assert np.bincount(rows[:, 0].astype(int)).max() == 100  # keep_top_k cut


def test_mobilenet_ssd_onnx_runs_at_other_batch_sizes(tmp_path):
    """Converted at batch 1, the model runs 3 images (the batch is symbolic) with Net's
    detections for the 3 images."""
    _, _, net = detector_files(tmp_path, mobilenet_ssd_prototxt(width=0.25), image_batch(1, 300))
    model = convert_to_onnx(net)
    data = image_batch(3, 300, seed=5)
    with torch.no_grad():
        ours = net(data=torch.from_numpy(data))["detection_out"].numpy()
    assert_same_detections("onnxruntime at batch 3", ours,
                           run_onnx(model, {"data": data}, threads=1)["detection_out"])
    assert_real_detections(ours[0, 0], images=3, labels=3)


def test_mobilenet_ssd_published_width(tmp_path):
    """The full MobileNet-SSD (5.8 M parameters), one image, against OpenCV."""
    data = image_batch(1, 300, seed=3)
    prototxt, weights, net = detector_files(tmp_path, mobilenet_ssd_prototxt(), data)
    assert_real_detections(check_detector(prototxt, weights, net, data), images=1, labels=3)


def test_face_detector_inspect_and_shapes(tmp_path, capsys):
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(face_detector_prototxt())
    assert cli_main(["inspect", str(prototxt)]) == 0
    assert "Normalize" in capsys.readouterr().out
    shapes = Net(prototxt, seed=0).graph.blob_shapes
    assert shapes["conv4_3_norm"] == (1, 128, 38, 38) and shapes["fc7"] == (1, 256, 19, 19)
    # 38^2 x 4 + 19^2 x 6 + 10^2 x 6 + 5^2 x 6 + 5^2 x 4 + 5^2 x 4 priors
    assert shapes["mbox_priorbox"] == (1, 2, 8892 * 4)


def test_face_detector_end_to_end(tmp_path):
    """The res10 face detector at 300 x 300, half the channels, 2 images (Normalize with
    per-channel scales, dilated convolution, residual sums, clip when the schema has it)."""
    data = image_batch(2, 300, seed=1)
    prototxt, weights, net = detector_files(
        tmp_path, face_detector_prototxt(width=0.5, batch=2), data, conf_scale=2.0,
        background=4.0)
    rows = check_detector(prototxt, weights, net, data)
    assert_real_detections(rows, images=2, labels=1)
    if HAS_DETECTION_CLIP:
        assert rows[:, 3:].min() >= 0 and rows[:, 3:].max() <= 1
