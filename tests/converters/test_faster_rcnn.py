"""Two-stage detectors end to end: ROIPooling, PSROIPooling and Proposal through onnxruntime
and the generated PyTorch source, then a Faster R-CNN net in the shape of py-faster-rcnn's
``models/pascal_voc/ZF/faster_rcnn_end2end/test.prototxt`` (its Python proposal layer
included) and a small R-FCN net (py-R-FCN's head: PSROIPooling, AVE pooling, Softmax,
Reshape), each through ``caffelayers inspect``/``convert``, onnxruntime, the generated source
and OpenCV 4.x.

OpenCV's importer does not translate the Python layer: its Faster R-CNN samples edit the
prototxt to its ``Proposal`` type, so OpenCV gets that edit (same weights, same settings:
py-faster-rcnn's TEST config is OpenCV's default). OpenCV's proposals skip py-faster-rcnn's
minimum box size, so the comparison runs at an ``im_info`` scale that drops no box (a
``Proposal`` test of its own checks the filter); OpenCV returns ``post_nms_topn`` rows with
zeros after its proposals. ROIs are compared as sets of rows, the detections row by row
through their ROI (rtol 1e-4).
"""

import numpy as np
import pytest
import torch

from caffelayers import Net
from caffelayers.cli import main as cli_main
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.converters.pytorch import ConvertedNet, forward_by_name, load_pytorch
from caffelayers.errors import UnsupportedParameterError
from caffelayers.proto import io
from caffelayers.verify import compare

cv2 = pytest.importorskip("cv2")
HAS_OPENCV_CAFFE = hasattr(getattr(cv2, "dnn", None), "readNetFromCaffe")
OPENCV_REASON = "OpenCV 4.x with cv2.dnn.readNetFromCaffe is needed (OpenCV 5 removed it)"
RTOL = 1e-4
F32 = np.float32


def assert_close(name, ours, theirs, rtol=RTOL):
    check = compare(name, ours, theirs, rtol=rtol)
    assert check.passed, check.describe()


def inputs_net(layers: str, **shapes) -> Net:
    text = "".join(f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape '
                   f'{{ {" ".join(f"dim: {d}" for d in shape)} }} }} }}\n'
                   for name, shape in shapes.items())
    return Net(io.parse_prototxt(text + layers), seed=0)


def run_all(net: Net, inputs, outputs=None):
    """Net, onnxruntime and the generated source on the same inputs."""
    with torch.no_grad():
        want = net(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    blobs = {name: net.blobs[name].numpy() for name in (outputs or want)}
    model = convert_to_onnx(net, outputs=outputs)
    from_onnx = run_onnx(model, inputs, threads=1)
    with torch.no_grad():
        from_source = ConvertedNet(net, "pytorch-source")(**inputs)
    return blobs, from_onnx, {k: v.numpy() for k, v in from_source.items()}


# -- ROIPooling ----------------------------------------------------------------------------
def roi_pooling_layer(scale, pooled=(3, 2)):
    return ('layer { name: "pool" type: "ROIPooling" bottom: "x" bottom: "rois" top: "pool" '
            f'roi_pooling_param {{ pooled_h: {pooled[0]} pooled_w: {pooled[1]} '
            f'spatial_scale: {scale} }} }}\n')


def random_rois(rng, count, batch, height, width, scale):
    """Corners anywhere around the map, every fourth on a half after scaling, one malformed."""
    corners = rng.uniform(-6, max(height, width) * 1.3, (count, 4)) / scale
    corners[::4] = np.round(corners[::4] * scale * 2) / 2 / scale
    corners[1, 2] = corners[1, 0] - 3
    return np.hstack([rng.integers(0, batch, (count, 1)), corners]).astype(F32)


@pytest.mark.parametrize("scale, pooled", [(0.0625, (6, 6)), (0.5, (3, 2)), (1.0, (7, 1)),
                                           (0.3, (2, 5))])
def test_roi_pooling_converts_exactly(scale, pooled):
    """onnxruntime's MaxRoiPool computes Caffe's bins; the outputs are identical."""
    rng = np.random.default_rng(0)
    size = (14, 6) if scale >= 0.3 else (38, 23)
    net = inputs_net(roi_pooling_layer(scale, pooled), x=(2, 5) + size, rois=(12, 5))
    model = convert_to_onnx(net)
    for trial in range(3):
        x = rng.standard_normal((2, 5) + size).astype(F32)
        if trial == 1:
            x = -np.abs(x)  # all-negative bins
        rois = random_rois(rng, 12, 2, *size, scale)
        got = run_onnx(model, {"x": x, "rois": rois}, threads=1)["pool"]
        with torch.no_grad():
            want = net(x=torch.from_numpy(x), rois=torch.from_numpy(rois))["pool"].numpy()
        np.testing.assert_array_equal(got, want)


def test_roi_pooling_special_values_convert():
    """A ROI of 57 rows in 7 bins (float rounding stretches the last bin past it), NaN that
    must not win a bin, a bin of NaN and -inf (-FLT_MAX), a bin outside the map (0)."""
    net = inputs_net(roi_pooling_layer(1.0, (7, 1)), x=(1, 2, 60, 3), rois=(4, 5))
    x = np.arange(360, dtype=F32).reshape(1, 2, 60, 3)
    x[0, 0, 0, 0] = x[0, 1, 57, :] = np.nan
    x[0, 1, 58:, :] = -np.inf
    rois = np.array([[0, 0, 0, 2, 56], [0, 0, 57, 2, 59], [0, 5, 5, 9, 9], [0, 0, 0, 0, 6]], F32)
    blobs, from_onnx, from_source = run_all(net, {"x": x, "rois": rois})
    np.testing.assert_array_equal(from_onnx["pool"], blobs["pool"])
    np.testing.assert_array_equal(from_source["pool"], blobs["pool"])
    assert blobs["pool"][0, 0, -1, 0] == x[0, 0, 57, 2]  # the stretched bin's row 57
    assert blobs["pool"][1, 1].min() == -3.4028234663852886e38
    assert not np.isnan(blobs["pool"]).any() and blobs["pool"][2].max() == 0


# -- PSROIPooling --------------------------------------------------------------------------
@pytest.mark.parametrize("scale, groups", [(1.0, 2), (0.0625, 3), (0.3, 1)])
def test_psroi_pooling_converts(scale, groups):
    rng = np.random.default_rng(1)
    size = (9, 5) if scale > 0.1 else (38, 23)
    layer = ('layer { name: "ps" type: "PSROIPooling" bottom: "x" bottom: "rois" top: "ps" '
             f'psroi_pooling_param {{ spatial_scale: {scale} output_dim: 3 group_size: {groups} '
             '} }\n')
    net = inputs_net(layer, x=(2, 3 * groups * groups) + size, rois=(10, 5))
    x = (rng.standard_normal((2, 3 * groups * groups) + size) * 10).astype(F32)
    rois = random_rois(rng, 10, 2, *size, scale)
    blobs, from_onnx, from_source = run_all(net, {"x": x, "rois": rois})
    assert_close("onnx ps", from_onnx["ps"], blobs["ps"], rtol=1e-6)
    np.testing.assert_array_equal(from_source["ps"], blobs["ps"])


# -- Proposal ------------------------------------------------------------------------------
def proposal_inputs(seed, images=1, height=6, width=11, tie=False):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((images, 2, 9 * height, width)).astype(F32) * 2
    prob = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).reshape(
        images, 18, height, width).astype(F32)
    if tie:  # neighbouring anchors with the same score: their order must not change
        prob[:, 9:, :, 1:] = prob[:, 9:, :, :1]
    deltas = (rng.standard_normal((images, 36, height, width)) * 0.3).astype(F32)
    info = np.array([[90, 170, 1.0], [70, 150, 0.5]][:images], F32)
    return {"prob": prob, "deltas": deltas, "im_info": info}


@pytest.mark.parametrize("settings, images, tie", [
    ("feat_stride: 16", 1, False),
    ("feat_stride: 16 pre_nms_topn: 50 post_nms_topn: 20 min_size: 24", 2, False),
    ("feat_stride: 16 nms_thresh: 0.5", 2, True),
])
def test_proposal_converts(settings, images, tie):
    layer = ('layer { name: "proposal" type: "Proposal" bottom: "prob" bottom: "deltas" '
             f'bottom: "im_info" top: "rois" top: "scores" proposal_param {{ {settings} }} }}\n')
    inputs = proposal_inputs(2, images, tie=tie)
    net = inputs_net(layer, prob=(1, 18, 6, 11), deltas=(1, 36, 6, 11), im_info=(1, 3))
    blobs, from_onnx, from_source = run_all(net, inputs)
    assert len(blobs["rois"]) > 10
    # The same rows in the same order, to the bit (ties broken alike).
    for name in ("rois", "scores"):
        np.testing.assert_array_equal(from_onnx[name], blobs[name])
        np.testing.assert_array_equal(from_source[name], blobs[name])


def test_proposal_from_python_layer_converts():
    layer = ("layer { name: 'proposal' type: 'Python' bottom: 'prob' bottom: 'deltas' "
             "bottom: 'im_info' top: 'rois' python_param { module: 'rpn.proposal_layer' "
             "layer: 'ProposalLayer' param_str: \"'feat_stride': 16\" } }\n")
    net = inputs_net(layer, prob=(1, 18, 6, 11), deltas=(1, 36, 6, 11), im_info=(1, 3))
    blobs, from_onnx, from_source = run_all(net, proposal_inputs(3))
    np.testing.assert_array_equal(from_onnx["rois"], blobs["rois"])
    np.testing.assert_array_equal(from_source["rois"], blobs["rois"])


@pytest.mark.parametrize("layer", ["roi", "psroi", "proposal"])
def test_torchscript_refuses_to_trace_data_dependent_layers(layer, tmp_path):
    """Scripting cannot compile these modules and a trace would freeze the example's ROI
    sizes or NMS survivors: the conversion is refused, never silently wrong."""
    from caffelayers.converters.pytorch import convert_to_torchscript

    if layer == "proposal":
        text = ('layer { name: "p" type: "Proposal" bottom: "prob" bottom: "deltas" '
                'bottom: "im_info" top: "rois" proposal_param { feat_stride: 16 } }\n')
        net = inputs_net(text, prob=(1, 18, 6, 11), deltas=(1, 36, 6, 11), im_info=(1, 3))
    elif layer == "roi":
        net = inputs_net(roi_pooling_layer(0.5), x=(2, 5, 14, 6), rois=(4, 5))
    else:
        net = inputs_net('layer { name: "ps" type: "PSROIPooling" bottom: "x" bottom: "rois" '
                         'top: "ps" psroi_pooling_param { spatial_scale: 0.5 output_dim: 3 '
                         'group_size: 2 } }\n', x=(2, 12, 14, 6), rois=(4, 5))
    with pytest.raises(UnsupportedParameterError, match="TorchScript trace would fix"):
        convert_to_torchscript(net, tmp_path / "net.pt")
    assert not (tmp_path / "net.pt").exists()


# -- real nets -----------------------------------------------------------------------------
HIDDEN = 'weight_filler { type: "msra" } bias_filler { type: "gaussian" std: 0.1 }'


def _gaussian(std):
    return (f'weight_filler {{ type: "gaussian" std: {std} }} '
            'bias_filler { type: "constant" value: 0 }')


def _conv(name, bottom, top, num, kernel, stride=1, pad=0, fillers=HIDDEN):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" '
            f'convolution_param {{ num_output: {num} kernel_size: {kernel} pad: {pad} '
            f'stride: {stride} {fillers} }} }}\n')


def _relu(name, blob):
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'


def _lrn(name, bottom):
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}" lrn_param '
            '{ local_size: 3 alpha: 0.00005 beta: 0.75 norm_region: WITHIN_CHANNEL '
            'engine: CAFFE } }\n')


def _max_pool(name, bottom):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
            'pooling_param { kernel_size: 3 stride: 2 pad: 1 pool: MAX } }\n')


def _fc(name, bottom, num, fillers=HIDDEN):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
            f'inner_product_param {{ num_output: {num} {fillers} }} }}\n')


def _dropout(name, blob, scale_train=True):
    setting = "" if scale_train else " scale_train: false"
    return (f'layer {{ name: "{name}" type: "Dropout" bottom: "{blob}" top: "{blob}" '
            f'dropout_param {{ dropout_ratio: 0.5{setting} }} }}\n')


PYTHON_PROPOSAL = (
    "layer { name: 'proposal' type: 'Python' bottom: 'rpn_cls_prob_reshape' "
    "bottom: 'rpn_bbox_pred' bottom: 'im_info' top: 'rois' python_param { "
    "module: 'rpn.proposal_layer' layer: 'ProposalLayer' param_str: \"'feat_stride': 16\" } }\n")
#: The same layer as OpenCV's Faster R-CNN samples write it.
OPENCV_PROPOSAL = (
    "layer { name: 'proposal' type: 'Proposal' bottom: 'rpn_cls_prob_reshape' "
    "bottom: 'rpn_bbox_pred' bottom: 'im_info' top: 'rois' proposal_param { feat_stride: 16 "
    "base_size: 16 min_size: 16 ratio: 0.5 ratio: 1 ratio: 2 scale: 8 scale: 16 scale: 32 } }\n")


def _header(name, height, width):
    return (f'name: "{name}"\ninput: "data"\ninput_shape {{ dim: 1 dim: 3 dim: {height} '
            f'dim: {width} }}\ninput: "im_info"\ninput_shape {{ dim: 1 dim: 3 }}\n')


def _rpn(bottom):
    """py-faster-rcnn's RPN head; the score and delta fillers keep the objectness spread over
    (0, 1) and the deltas near 0.2, as a trained RPN's."""
    return (_conv("rpn_conv/3x3", bottom, "rpn/output", 32, 3, 1, 1) +
            _relu("rpn_relu/3x3", "rpn/output") +
            _conv("rpn_cls_score", "rpn/output", "rpn_cls_score", 18, 1, fillers=_gaussian(0.004)) +
            _conv("rpn_bbox_pred", "rpn/output", "rpn_bbox_pred", 36, 1,
                  fillers=_gaussian(0.0007)) +
            'layer { bottom: "rpn_cls_score" top: "rpn_cls_score_reshape" '
            'name: "rpn_cls_score_reshape" type: "Reshape" '
            'reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } } }\n'
            'layer { name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" '
            'top: "rpn_cls_prob" }\n'
            "layer { name: 'rpn_cls_prob_reshape' type: 'Reshape' bottom: 'rpn_cls_prob' "
            "top: 'rpn_cls_prob_reshape' reshape_param { shape { dim: 0 dim: 18 dim: -1 "
            "dim: 0 } } }\n")


def faster_rcnn_zf(height, width, proposal=PYTHON_PROPOSAL, scale_train=True):
    """py-faster-rcnn's ZF end2end test net: its layers, names, settings and Python proposal
    layer, at 1/6 to 1/64 of its channels (fc6/fc7 4096 -> 64). Its Dropout layers say
    ``scale_train: false`` (caffe-fast-rcnn's field: at TEST the output is scaled by
    ``1 - ratio``); with ``scale_train`` True the field is left out (BVLC's Dropout)."""
    return (_header("ZF", height, width) +
            _conv("conv1", "data", "conv1", 16, 7, 2, 3) + _relu("relu1", "conv1") +
            _lrn("norm1", "conv1") + _max_pool("pool1", "norm1") +
            _conv("conv2", "pool1", "conv2", 32, 5, 2, 2) + _relu("relu2", "conv2") +
            _lrn("norm2", "conv2") + _max_pool("pool2", "norm2") +
            _conv("conv3", "pool2", "conv3", 32, 3, 1, 1) + _relu("relu3", "conv3") +
            _conv("conv4", "conv3", "conv4", 32, 3, 1, 1) + _relu("relu4", "conv4") +
            _conv("conv5", "conv4", "conv5", 32, 3, 1, 1) + _relu("relu5", "conv5") +
            _rpn("conv5") + proposal +
            'layer { name: "roi_pool_conv5" type: "ROIPooling" bottom: "conv5" bottom: "rois" '
            'top: "roi_pool_conv5" roi_pooling_param { pooled_w: 6 pooled_h: 6 '
            'spatial_scale: 0.0625 } }\n' +
            _fc("fc6", "roi_pool_conv5", 64) + _relu("relu6", "fc6") +
            _dropout("drop6", "fc6", scale_train) +
            _fc("fc7", "fc6", 64) + _relu("relu7", "fc7") + _dropout("drop7", "fc7", scale_train) +
            _fc("cls_score", "fc7", 21, _gaussian(0.003)) +
            _fc("bbox_pred", "fc7", 84, _gaussian(0.01)) +
            'layer { name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" '
            'loss_param { ignore_label: -1 normalize: true } }\n')


def rfcn(height, width, groups=3, classes=21, proposal=PYTHON_PROPOSAL):
    """py-R-FCN's class-agnostic test head (``rfcn_cls``/``rfcn_bbox``, PSROIPooling, AVE
    pooling over the group, Softmax, Reshape) on a small stride-16 trunk."""
    return (_header("RFCN", height, width) +
            _conv("conv1", "data", "conv1", 16, 7, 2, 3) + _relu("relu1", "conv1") +
            _max_pool("pool1", "conv1") +
            _conv("conv2", "pool1", "conv2", 32, 3, 2, 1) + _relu("relu2", "conv2") +
            _conv("conv3", "conv2", "conv3", 32, 3, 2, 1) + _relu("relu3", "conv3") +
            _rpn("conv3") + proposal +
            _conv("conv_new_1", "conv3", "conv_new_1", 32, 1) +
            _relu("conv_new_1_relu", "conv_new_1") +
            _conv("rfcn_cls", "conv_new_1", "rfcn_cls", classes * groups ** 2, 1,
                  fillers=_gaussian(0.003)) +
            _conv("rfcn_bbox", "conv_new_1", "rfcn_bbox", 8 * groups ** 2, 1,
                  fillers=_gaussian(0.003)) +
            f'layer {{ bottom: "rfcn_cls" bottom: "rois" top: "psroipooled_cls_rois" '
            f'name: "psroipooled_cls_rois" type: "PSROIPooling" psroi_pooling_param {{ '
            f'spatial_scale: 0.0625 output_dim: {classes} group_size: {groups} }} }}\n'
            f'layer {{ bottom: "psroipooled_cls_rois" top: "cls_score" name: "ave_cls_score_rois" '
            f'type: "Pooling" pooling_param {{ pool: AVE kernel_size: {groups} '
            f'stride: {groups} }} }}\n'
            f'layer {{ bottom: "rfcn_bbox" bottom: "rois" top: "psroipooled_loc_rois" '
            f'name: "psroipooled_loc_rois" type: "PSROIPooling" psroi_pooling_param {{ '
            f'spatial_scale: 0.0625 output_dim: 8 group_size: {groups} }} }}\n'
            f'layer {{ bottom: "psroipooled_loc_rois" top: "bbox_pred_pre" '
            f'name: "ave_bbox_pred_rois" type: "Pooling" pooling_param {{ pool: AVE '
            f'kernel_size: {groups} stride: {groups} }} }}\n'
            'layer { name: "cls_prob_pre" type: "Softmax" bottom: "cls_score" '
            'top: "cls_prob_pre" }\n'
            f'layer {{ name: "cls_prob_reshape" type: "Reshape" bottom: "cls_prob_pre" '
            f'top: "cls_prob" reshape_param {{ shape {{ dim: -1 dim: {classes} }} }} }}\n'
            'layer { name: "bbox_pred_reshape" type: "Reshape" bottom: "bbox_pred_pre" '
            'top: "bbox_pred" reshape_param { shape { dim: -1 dim: 8 } } }\n')


def match_rows(ours, theirs, tolerance):
    """The permutation ``j`` with ``theirs[j[i]]`` within ``tolerance`` of ``ours[i]`` (each
    row of ``theirs`` used once)."""
    distance = np.abs(ours[:, None, :] - theirs[None, :, :]).max(axis=2)
    order = distance.argmin(axis=1)
    assert distance[np.arange(len(ours)), order].max() <= tolerance
    assert len(set(order.tolist())) == len(ours), "two ROIs matched the same row"
    return order


def end_to_end(tmp_path, capsys, text, opencv_text, size, outputs, opencv_outputs):
    """Write the net and weights; inspect and convert with the CLI; run Net, the ONNX file,
    the generated source and OpenCV; compare. Returns Net's blobs."""
    prototxt, caffemodel = tmp_path / "test.prototxt", tmp_path / "test.caffemodel"
    prototxt.write_text(text)
    Net(prototxt, seed=0).save_caffemodel(caffemodel)
    assert cli_main(["inspect", str(prototxt), str(caffemodel)]) == 0
    assert "Proposal" in capsys.readouterr().out
    onnx_file, source_dir = tmp_path / "net.onnx", tmp_path / "source"
    assert cli_main(["convert", str(prototxt), str(caffemodel), "--to", "onnx",
                     "-o", str(onnx_file)]) == 0
    assert cli_main(["convert", str(prototxt), str(caffemodel), "--to", "pytorch",
                     "-o", str(source_dir)]) == 0

    rng = np.random.default_rng(1)
    data = (rng.standard_normal((1, 3) + size) * 60).astype(F32)
    # py-faster-rcnn passes the image's resize factor; at 0.05 its 16-pixel minimum box
    # side is under one pixel, so no box is dropped (OpenCV has no such filter).
    im_info = np.array([[size[0], size[1], 0.05]], F32)
    inputs = {"data": data, "im_info": im_info}
    net = Net(prototxt, caffemodel)
    with torch.no_grad():
        expected = net(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    blobs = {name: value.numpy() for name, value in net.blobs.items()}
    rois = blobs["rois"]
    foreground = blobs["rpn_cls_prob_reshape"][:, 9:].ravel()
    # Objectness spread over (0, 1), none saturated to a tie at 0 or 1.
    assert foreground.std() > 0.1 and 0 < foreground.min() and foreground.max() < 1
    assert 100 < len(rois) < 300  # NMS at work: fewer than post_nms_topn survive

    from_file = run_onnx(onnx_file, inputs, threads=1)
    model = load_pytorch(source_dir)
    with torch.no_grad():
        from_source = forward_by_name(model, inputs)
    for name in outputs:  # the same deterministic row order in all three
        assert_close(f"onnx {name}", from_file[name], expected[name].numpy())
        assert_close(f"source {name}", from_source[name].numpy(), expected[name].numpy())
    with_rois = run_onnx(convert_to_onnx(net, outputs=["rois"]), inputs, threads=1)["rois"]
    match_rows(rois, with_rois, RTOL * np.abs(rois).max())

    if not HAS_OPENCV_CAFFE:
        pytest.skip(OPENCV_REASON)
    opencv_prototxt = tmp_path / "opencv.prototxt"
    opencv_prototxt.write_text(opencv_text)
    # Our Net reads OpenCV's edit of the prototxt to the same proposals.
    with torch.no_grad():
        Net(opencv_prototxt, caffemodel)(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    cv_net = cv2.dnn.readNetFromCaffe(str(opencv_prototxt), str(caffemodel))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, value in inputs.items():
        cv_net.setInput(value, name)
    layers = list(opencv_outputs)
    got = dict(zip(layers, cv_net.forward(layers)))
    cv_rois = got["proposal"]
    assert cv_rois.shape == (300, 5) and not cv_rois[len(rois):].any()
    order = match_rows(rois, cv_rois[:len(rois)], RTOL * np.abs(rois).max())
    for layer, blob in opencv_outputs.items():
        if blob != "rois":
            theirs = got[layer].reshape((len(cv_rois),) + blobs[blob].shape[1:])[order]
            assert_close(f"opencv {blob}", blobs[blob], theirs)
    return blobs


def test_faster_rcnn_zf_end_to_end(tmp_path, capsys):
    size = (224, 288)
    blobs = end_to_end(tmp_path, capsys, faster_rcnn_zf(*size),
                       faster_rcnn_zf(*size, OPENCV_PROPOSAL), size,
                       outputs=("cls_prob", "bbox_pred"),
                       opencv_outputs={"proposal": "rois", "roi_pool_conv5": "roi_pool_conv5",
                                       "cls_prob": "cls_prob", "bbox_pred": "bbox_pred"})
    assert blobs["roi_pool_conv5"].shape[1:] == (32, 6, 6)
    # Class scores that differ over the classes, and no one-hot softmax.
    assert blobs["cls_score"].std(axis=1).min() > 0.1 and blobs["cls_prob"].max() < 0.99


def test_rfcn_end_to_end(tmp_path, capsys):
    size = (224, 224)
    blobs = end_to_end(tmp_path, capsys, rfcn(*size), rfcn(*size, proposal=OPENCV_PROPOSAL),
                       size, outputs=("cls_prob", "bbox_pred"),
                       opencv_outputs={"proposal": "rois",
                                       "psroipooled_cls_rois": "psroipooled_cls_rois",
                                       "psroipooled_loc_rois": "psroipooled_loc_rois",
                                       "cls_prob_reshape": "cls_prob",
                                       "bbox_pred_reshape": "bbox_pred"})
    assert blobs["psroipooled_cls_rois"].shape[1:] == (21, 3, 3)
    assert blobs["cls_prob"].std(axis=1).min() > 1e-3


def test_faster_rcnn_zf_dropout_scale_train(tmp_path, capsys):
    size = (224, 288)
    end_to_end(tmp_path, capsys, faster_rcnn_zf(*size, scale_train=False),
               faster_rcnn_zf(*size, OPENCV_PROPOSAL, scale_train=False), size,
               outputs=("cls_prob", "bbox_pred"),
               opencv_outputs={"proposal": "rois", "cls_prob": "cls_prob",
                               "bbox_pred": "bbox_pred"})
