"""Real nets of the smaller forks, end to end: ``inspect`` exits 0, the net converts to ONNX
and to PyTorch source, and ``Net``, onnxruntime, the generated source and OpenCV 4.x's Caffe
importer agree (rtol 1e-4) on weights written by ``Net.save_caffemodel`` and read back.

The prototxts have the shape of the published ones, smaller for speed:

* SegNet basic inference (alexgkendall/SegNet-Tutorial ``Models/segnet_basic_inference``):
  LRN, four conv/BN/ReLU/pool-with-mask stages, four Upsample/conv/BN decoder stages with
  the ``pad_out`` of odd sizes, a classifier and Softmax. An Input layer stands for the
  DenseImageData reader. OpenCV has no ``Upsample`` and no ``BN``: no OpenCV comparison.
* ShuffleNet v2 deploy (farmingyard/ShuffleNet ``shufflenet_v2_1x_deploy``): conv/BatchNorm/
  Scale/ReLU, max pool, a down-sampling unit (two branches with ``ConvolutionDepthwise``),
  Concat, ShuffleChannel, then basic units (Slice, one branch, Concat, ShuffleChannel), conv5,
  global pooling and the 1x1 classifier. OpenCV runs all of it.
* A MobileNet v2 fragment (inverted residual blocks with ReLU6 and ``DepthwiseConvolution``).
  OpenCV has no ``DepthwiseConvolution``: it runs the same prototxt with those layers typed
  ``Convolution`` (same blobs, same ``group``), an independent check of the math.
* A PSPNet fragment (``pspnet50_ADE20K_473``'s pyramid pooling: PSPNet's frozen ``BN``,
  average pools of four sizes, 1x1 convs, ``Interp`` to the feature size, Concat, and the
  final ``Interp`` with ``zoom_factor: 8``). OpenCV has no ``BN``: no OpenCV comparison;
  its Interp is compared alone (it ignores ``pad_beg``/``pad_end`` and fails on
  ``shrink_factor``, so those are compared without it).
* SENet's Axpy, BVLC's Clip and Swish and NVCaffe's BatchNorm ``scale_bias`` in one small
  net. OpenCV cannot read ``scale_bias``, has no ``Clip``, ignores Swish's ``beta`` and
  runs Axpy only at batch 1 and with X and Y swapped; it is compared on an SE block without
  those, with the swap spelled out.
"""

import numpy as np
import pytest
import torch

from caffelayers import Net
from caffelayers.cli import main as cli_main
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.converters.pytorch import ConvertedNet
from caffelayers.layers.mobile import Axpy
from caffelayers.verify import compare

cv2 = pytest.importorskip("cv2")
OPENCV_REASON = "OpenCV 4.x with cv2.dnn.readNetFromCaffe is needed (OpenCV 5 removed it)"
HAS_OPENCV_CAFFE = hasattr(getattr(cv2, "dnn", None), "readNetFromCaffe")
RTOL = 1e-4


# -- prototxt writers ----------------------------------------------------------------------
def _input(shape) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ {dims} }} }} }}\n')


def _conv(name, bottom, num, kernel, stride=1, pad=0, bias=True, type_="Convolution",
          group=None):
    extra = f" group: {group}" if group else ""
    return (f'layer {{ name: "{name}" type: "{type_}" bottom: "{bottom}" top: "{name}"\n'
            f'  convolution_param {{ num_output: {num} kernel_size: {kernel} stride: {stride} '
            f'pad: {pad} bias_term: {"true" if bias else "false"}{extra}\n'
            '    weight_filler { type: "msra" } bias_filler { type: "constant" value: 0.1 } }'
            ' }\n')


def _layer(name, type_, bottoms, tops=None, body=""):
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    tops = [name] if tops is None else ([tops] if isinstance(tops, str) else tops)
    text = f'layer {{ name: "{name}" type: "{type_}"'
    text += "".join(f' bottom: "{b}"' for b in bottoms)
    text += "".join(f' top: "{t}"' for t in tops)
    return text + (f" {body}" if body else "") + " }\n"


def segnet_basic(width=8, classes=11, size=(23, 30)) -> str:
    """SegNet basic's inference net; 23 x 30 so that the decoder needs pad_out on both axes
    (pool sizes 12x15, 6x8, 3x4, 2x2)."""
    bn = ('bn_param { bn_mode: INFERENCE scale_filler { type: "constant" value: 1 } '
          'shift_filler { type: "constant" value: 0.001 } }')
    text = 'name: "segnet"\n' + _input((2, 3) + size)
    text += _layer("norm", "LRN", "data", body="lrn_param { local_size: 5 alpha: 0.0001 "
                   "beta: 0.75 }")
    bottom = "norm"
    for i in range(1, 5):
        text += _conv(f"conv{i}", bottom, width, 7, pad=3)
        text += _layer(f"conv{i}_bn", "BN", f"conv{i}", f"conv{i}", bn)
        text += _layer(f"relu{i}", "ReLU", f"conv{i}", f"conv{i}")
        text += _layer(f"pool{i}", "Pooling", f"conv{i}", [f"pool{i}", f"pool{i}_mask"],
                       "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        bottom = f"pool{i}"
    pads = {4: "pad_out_h: true", 3: "", 2: "pad_out_w: true", 1: "pad_out_h: true"}
    for i in range(4, 0, -1):
        text += _layer(f"upsample{i}", "Upsample", [bottom, f"pool{i}_mask"],
                       body=f"upsample_param {{ scale: 2 {pads[i]} }}")
        text += _conv(f"conv_decode{i}", f"upsample{i}", width, 7, pad=3)
        text += _layer(f"conv_decode{i}_bn", "BN", f"conv_decode{i}", f"conv_decode{i}", bn)
        bottom = f"conv_decode{i}"
    text += _conv("conv_classifier", bottom, classes, 1)
    return text + _layer("prob", "Softmax", "conv_classifier",
                         body="softmax_param { engine: CAFFE }")


def _bn_scale(name, relu=True) -> str:
    text = _layer(f"{name}_bn", "BatchNorm", name, name)
    text += _layer(f"{name}_scale", "Scale", name, name,
                   "scale_param { filler { value: 1 } bias_term: true bias_filler { value: 0 } }")
    return text + (_layer(f"{name}_relu", "ReLU", name, name) if relu else "")


def shufflenet_v2(width=8, units=2, classes=10, size=(33, 31)) -> str:
    """ShuffleNet v2's first stage: a down-sampling unit and ``units - 1`` basic units."""
    text = 'name: "shufflenet_v2"\n' + _input((2, 3) + size)
    text += _conv("conv1", "data", 12, 3, 2, 1, bias=False) + _bn_scale("conv1")
    text += _layer("pool1", "Pooling", "conv1", body="pooling_param { pool: MAX kernel_size: 3 "
                   "stride: 2 }")
    text += _conv("branch1_1_conv1", "pool1", 12, 3, 2, 1, False, "ConvolutionDepthwise")
    text += _bn_scale("branch1_1_conv1", relu=False)
    text += _conv("branch1_1_conv2", "branch1_1_conv1", width, 1, bias=False)
    text += _bn_scale("branch1_1_conv2")
    text += _conv("branch1_2_conv1", "pool1", width, 1, bias=False) + _bn_scale("branch1_2_conv1")
    text += _conv("branch1_2_conv2", "branch1_2_conv1", width, 3, 2, 1, False,
                  "ConvolutionDepthwise") + _bn_scale("branch1_2_conv2", relu=False)
    text += _conv("branch1_2_conv3", "branch1_2_conv2", width, 1, bias=False)
    text += _bn_scale("branch1_2_conv3")
    text += _layer("concat1", "Concat", ["branch1_1_conv2", "branch1_2_conv3"])
    text += _layer("shuffle1", "ShuffleChannel", "concat1",
                   body="shuffle_channel_param { group: 2 }")
    bottom = "shuffle1"
    for u in range(2, units + 1):
        first, second = f"branch{u}_1", f"branch{u}_2"
        text += _layer(f"slice{u}", "Slice", bottom, [first, second],
                       f"slice_param {{ slice_point: {width} axis: 1 }}")
        text += _conv(f"{second}_conv1", second, width, 1, bias=False)
        text += _bn_scale(f"{second}_conv1")
        text += _conv(f"{second}_conv2", f"{second}_conv1", width, 3, 1, 1, False,
                      "ConvolutionDepthwise") + _bn_scale(f"{second}_conv2", relu=False)
        text += _conv(f"{second}_conv3", f"{second}_conv2", width, 1, bias=False)
        text += _bn_scale(f"{second}_conv3")
        text += _layer(f"concat{u}", "Concat", [first, f"{second}_conv3"])
        text += _layer(f"shuffle{u}", "ShuffleChannel", f"concat{u}",
                       body="shuffle_channel_param { group: 2 }")
        bottom = f"shuffle{u}"
    text += _conv("conv5", bottom, 4 * width, 1, bias=False) + _bn_scale("conv5")
    text += _layer("pool_ave", "Pooling", "conv5",
                   body="pooling_param { global_pooling: true pool: AVE }")
    return text + _conv("fc1000", "pool_ave", classes, 1)


def mobilenet_v2(depthwise_type="DepthwiseConvolution", width=8, size=(19, 17)) -> str:
    """Two inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1, the second with
    the shortcut), ReLU6 after the stem, the expansions and the depthwise convolutions."""
    text = 'name: "mobilenet_v2"\n' + _input((2, 3) + size)
    text += _conv("conv1", "data", width, 3, 2, 1, bias=False) + _bn_scale("conv1", relu=False)
    text += _layer("relu1", "ReLU6", "conv1", "conv1")
    bottom, channels = "conv1", width
    for b, (expand, stride) in enumerate(((6, 2), (6, 1)), start=2):
        hidden = channels * expand
        name = f"conv{b}"
        text += _conv(f"{name}/expand", bottom, hidden, 1, bias=False)
        text += _bn_scale(f"{name}/expand", relu=False)
        text += _layer(f"relu{b}_1", "ReLU6", f"{name}/expand", f"{name}/expand")
        text += _conv(f"{name}/dwise", f"{name}/expand", hidden, 3, stride, 1, False,
                      depthwise_type, group=hidden)
        text += _bn_scale(f"{name}/dwise", relu=False)
        text += _layer(f"relu{b}_2", "ReLU6", f"{name}/dwise", f"{name}/dwise")
        text += _conv(f"{name}/linear", f"{name}/dwise", channels, 1, bias=False)
        text += _bn_scale(f"{name}/linear", relu=False)
        top = f"{name}/linear"
        if stride == 1:
            text += _layer(f"block_{b}", "Eltwise", [bottom, top])
            top = f"block_{b}"
        bottom = top
    return text + _layer("pool", "Pooling", bottom,
                         body="pooling_param { global_pooling: true pool: AVE }")


def pspnet_pyramid(width=8, classes=6, size=(12, 12), zoom=8) -> str:
    """PSPNet's pyramid pooling module on a 12 x 12 feature map (bins 1, 2, 3, 6)."""
    bn = ('bn_param { slope_filler { type: "constant" value: 1 } bias_filler { type: '
          '"constant" value: 0 } frozen: true momentum: 0.95 }')
    text = 'name: "pspnet"\n' + _input((2, 3) + size)
    text += _conv("conv5_3", "data", width, 3, 1, 1, bias=False)
    text += _layer("conv5_3/bn", "BN", "conv5_3", "conv5_3", bn)
    text += _layer("conv5_3/relu", "ReLU", "conv5_3", "conv5_3")
    branches = []
    for bins in (1, 2, 3, 6):
        kernel = size[0] // bins
        pool = f"conv5_3_pool{bins}"
        text += _layer(pool, "Pooling", "conv5_3", body=f"pooling_param {{ pool: AVE "
                       f"kernel_size: {kernel} stride: {kernel} }}")
        text += _conv(f"{pool}_conv", pool, width // 2, 1, bias=False)
        text += _layer(f"{pool}_conv/bn", "BN", f"{pool}_conv", f"{pool}_conv", bn)
        text += _layer(f"{pool}_conv/relu", "ReLU", f"{pool}_conv", f"{pool}_conv")
        text += _layer(f"{pool}_interp", "Interp", f"{pool}_conv",
                       body=f"interp_param {{ height: {size[0]} width: {size[1]} }}")
        branches.append(f"{pool}_interp")
    text += _layer("conv5_3_concat", "Concat", ["conv5_3"] + branches[::-1])
    text += _conv("conv5_4", "conv5_3_concat", width, 3, 1, 1, bias=False)
    text += _layer("conv5_4/bn", "BN", "conv5_4", "conv5_4", bn)
    text += _layer("conv5_4/relu", "ReLU", "conv5_4", "conv5_4")
    text += _conv("conv6", "conv5_4", classes, 1)
    return text + _layer("conv6_interp", "Interp", "conv6",
                         body=f"interp_param {{ zoom_factor: {zoom} }}")


def interp_cases(size=(7, 10)) -> str:
    """Interp's other rules side by side: shrink then zoom, a crop, a size of 1."""
    text = 'name: "interp"\n' + _input((2, 3) + size)
    bodies = {"shrink_zoom": "shrink_factor: 2 zoom_factor: 3",
              "cropped": "zoom_factor: 2 pad_beg: -1 pad_end: -2",
              "one_row": "height: 1 width: 5", "copy": "height: 7 width: 10"}
    for name, body in bodies.items():
        text += _layer(name, "Interp", "data", body=f"interp_param {{ {body} }}")
    return text


def misc_forks(width=6, size=(9, 7), opencv=False) -> str:
    """An SE block with SENet's Axpy, NVCaffe's BatchNorm with scale_bias, Clip and Swish;
    with ``opencv``, without the two that OpenCV cannot read (scale_bias, Clip), Swish's beta
    at 1 and a batch of 1 (OpenCV 4.14's Axpy fails on larger batches)."""
    text = 'name: "forks"\n' + _input((1 if opencv else 2, 3) + size)
    text += _conv("conv1", "data", width, 3, 1, 1)
    if not opencv:
        text += _layer("conv1/bn", "BatchNorm", "conv1", "conv1",
                       'batch_norm_param { scale_bias: true scale_filler { type: "constant" '
                       'value: 1 } bias_filler { type: "constant" value: 0 } }')
    # OpenCV's Swish ignores beta (silently: x * sigmoid(x) whatever beta says).
    text += _layer("conv1/swish", "Swish", "conv1", "conv1",
                   "" if opencv else "swish_param { beta: 1.5 }")
    text += _conv("conv2", "conv1", width, 3, 1, 1)
    text += _layer("pool", "Pooling", "conv2",
                   body="pooling_param { pool: AVE global_pooling: true }")
    text += _conv("fc1", "pool", width // 2, 1)
    text += _layer("fc1/relu", "ReLU", "fc1", "fc1")
    text += _conv("fc2", "fc1", width, 1)
    text += _layer("fc2/sigmoid", "Sigmoid", "fc2", "fc2")
    text += _layer("axpy", "Axpy", ["fc2", "conv2", "conv1"])
    text += _layer("silu", "Swish", "axpy")
    if opencv:
        return text
    return text + _layer("clip", "Clip", "silu", body="clip_param { min: -0.2 max: 0.9 }")


# -- the checks ----------------------------------------------------------------------------
def _statistics_worth_testing(net: Net, seed: int) -> None:
    """Blobs the fillers leave constant (BN and BatchNorm statistics, scales, shifts) get
    random values, so that each one's place in the computation shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for node in net.graph.nodes:
            if node.type not in ("BN", "BatchNorm", "Scale"):
                continue
            for index, blob in enumerate(node.module.caffe_blobs()):
                if node.type == "BatchNorm" and index == 2:
                    blob.fill_(1.0 if node.module.scale_bias else 2.0)
                    continue
                values = torch.rand(blob.shape, generator=generator, dtype=blob.dtype)
                blob.copy_(values + 0.5)


def written(tmp_path, text, name="net", seed=0):
    """The prototxt and a caffemodel of random weights written by Net; returns the paths
    and the Net read back from them."""
    prototxt = tmp_path / f"{name}.prototxt"
    prototxt.write_text(text)
    net = Net(prototxt, seed=seed)
    if not any(node.module.caffe_blobs() for node in net.graph.nodes):
        return prototxt, None, net  # Caffe writes no caffemodel without blobs
    _statistics_worth_testing(net, seed)
    caffemodel = tmp_path / f"{name}.caffemodel"
    net.save_caffemodel(caffemodel)
    return prototxt, caffemodel, Net(prototxt, caffemodel)


def assert_passes(checks):
    failed = [check.describe() for check in checks if not check.passed]
    assert not failed, "\n".join(failed)


def random_data(net: Net, seed=1, scale=1.0) -> torch.Tensor:
    shape = net.graph.blob_shapes["data"]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def check_net(net: Net, data: torch.Tensor, outputs=None):
    """Net against onnxruntime (every named blob, and the outputs at another batch size)
    and the generated source (the outputs); returns every blob of Net at ``data``."""
    with torch.no_grad():
        expected = net(data=data)
    blobs = {name: value.clone() for name, value in net.blobs.items() if name != "data"}
    outputs = outputs or list(expected)
    model = convert_to_onnx(net, outputs=list(blobs))
    from_onnx = run_onnx(model, {"data": data.numpy()}, threads=1)
    assert_passes(compare(f"onnx {name}", from_onnx[name], blobs[name].numpy(), rtol=RTOL)
                  for name in blobs)
    with torch.no_grad():
        from_source = ConvertedNet(net, "pytorch-source")(data=data)
    assert_passes(compare(f"source {name}", from_source[name], expected[name].numpy(),
                          rtol=RTOL) for name in outputs)
    result = {name: value.numpy() for name, value in blobs.items()}
    # The batch stays dynamic: another batch size through the same ONNX model.
    more = torch.cat([data, data[:1] * 0.5])
    with torch.no_grad():
        expected_more = net(data=more)
    from_onnx = run_onnx(model, {"data": more.numpy()}, threads=1)
    assert_passes(compare(f"onnx batch {len(more)} {name}", from_onnx[name],
                          expected_more[name].numpy(), rtol=RTOL) for name in outputs)
    return result


def opencv_forward(prototxt, caffemodel, data: torch.Tensor, blobs):
    if not HAS_OPENCV_CAFFE:
        pytest.skip(OPENCV_REASON)
    net = cv2.dnn.readNetFromCaffe(str(prototxt), *([str(caffemodel)] if caffemodel else []))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setInput(data.numpy())
    return dict(zip(blobs, net.forward(list(blobs))))


def assert_inspect_ok(prototxt, caffemodel, capsys):
    assert cli_main(["inspect", str(prototxt), str(caffemodel)]) == 0
    assert "error" not in capsys.readouterr().err


# -- the nets ------------------------------------------------------------------------------
def test_segnet_basic_inference(tmp_path, capsys):
    prototxt, caffemodel, net = written(tmp_path, segnet_basic())
    assert_inspect_ok(prototxt, caffemodel, capsys)
    assert net.graph.blob_shapes["upsample4"] == (2, 8, 3, 4)
    assert net.graph.blob_shapes["upsample2"] == (2, 8, 12, 15)
    assert net.graph.blob_shapes["prob"] == (2, 11, 23, 30)
    data = random_data(net, scale=50.0)
    outputs = check_net(net, data, outputs=["prob"])
    logits = outputs["conv_classifier"]
    assert logits.std(axis=1).mean() > 0.1  # an informative softmax, not a uniform one
    # Every decoder plane is mostly zeros where the mask put nothing: the unpooling shows.
    assert (outputs["upsample1"] == 0).mean() > 0.7
    assert outputs["prob"].shape == (2, 11, 23, 30)


def test_shufflenet_v2_deploy(tmp_path, capsys):
    prototxt, caffemodel, net = written(tmp_path, shufflenet_v2(units=3))
    assert_inspect_ok(prototxt, caffemodel, capsys)
    assert net.graph.blob_shapes["shuffle3"] == (2, 16, 4, 4)
    data = random_data(net)
    outputs = check_net(net, data)
    got = opencv_forward(prototxt, caffemodel, data, ["fc1000", "shuffle2"])
    assert_passes([compare("opencv fc1000", got["fc1000"], outputs["fc1000"], rtol=RTOL),
                   compare("opencv shuffle2", got["shuffle2"], outputs["shuffle2"],
                           rtol=RTOL)])


def test_mobilenet_v2_fragment(tmp_path, capsys):
    prototxt, caffemodel, net = written(tmp_path, mobilenet_v2())
    assert_inspect_ok(prototxt, caffemodel, capsys)
    data = random_data(net, scale=3.0)
    outputs = check_net(net, data)
    relu6 = outputs["conv2/expand"]
    assert relu6.max() == 6.0 and relu6.min() == 0.0  # the cap is reached: ReLU6 shows
    # OpenCV knows no DepthwiseConvolution; the same blobs typed Convolution (with group).
    plain = tmp_path / "plain.prototxt"
    plain.write_text(mobilenet_v2("Convolution"))
    got = opencv_forward(plain, caffemodel, data, ["pool", "block_3"])
    assert_passes([compare("opencv pool", got["pool"], outputs["pool"], rtol=RTOL),
                   compare("opencv block_3", got["block_3"], outputs["block_3"],
                           rtol=RTOL)])


def test_pspnet_pyramid_pooling(tmp_path, capsys):
    prototxt, caffemodel, net = written(tmp_path, pspnet_pyramid())
    assert_inspect_ok(prototxt, caffemodel, capsys)
    assert net.graph.blob_shapes["conv6_interp"] == (2, 6, 89, 89)  # 12 + 11 * 7
    check_net(net, random_data(net))


def test_interp_against_opencv(tmp_path):
    """OpenCV cannot run PSPNet's BN; the Interp layers alone, zoom and height/width."""
    text = 'name: "interp"\n' + _input((2, 3, 5, 7))
    text += _layer("zoom", "Interp", "data", body="interp_param { zoom_factor: 3 }")
    text += _layer("sized", "Interp", "data", body="interp_param { height: 6 width: 11 }")
    prototxt = tmp_path / "interp.prototxt"
    prototxt.write_text(text)
    net = Net(prototxt)
    data = random_data(net)
    with torch.no_grad():
        expected = net(data=data)
    got = opencv_forward(prototxt, None, data, ["zoom", "sized"])
    assert_passes(compare(f"opencv {name}", got[name], expected[name].numpy(), rtol=RTOL)
                  for name in ("zoom", "sized"))


def test_interp_rules_convert(tmp_path):
    _, _, net = written(tmp_path, interp_cases())
    assert net.graph.blob_shapes["shrink_zoom"] == (2, 3, 10, 13)
    assert net.graph.blob_shapes["cropped"] == (2, 3, 7, 13)
    check_net(net, random_data(net))


def test_axpy_clip_swish_and_nvcaffe_batch_norm(tmp_path, capsys):
    prototxt, caffemodel, net = written(tmp_path, misc_forks())
    assert_inspect_ok(prototxt, caffemodel, capsys)
    assert len(net.layer("conv1/bn").caffe_blobs()) == 5
    outputs = check_net(net, random_data(net))
    clipped = outputs["clip"]
    assert clipped.max() == np.float32(0.9) and clipped.min() == np.float32(-0.2)
    # OpenCV cannot read NVCaffe's scale_bias field and has no Clip: the same SE block
    # without them, on weights of its own.
    prototxt, caffemodel, net = written(tmp_path, misc_forks(opencv=True), "se_block")
    data = random_data(net)
    blobs = check_net(net, data)
    got = opencv_forward(prototxt, caffemodel, data, ["conv2", "axpy"])
    assert_passes([compare("opencv conv2", got["conv2"], blobs["conv2"], rtol=RTOL)])
    # OpenCV 4.14 imports Axpy as a * bottom[2] + bottom[1]; SENet's layer (axpy_layer.hpp:
    # F = a * X + Y, X = bottom[1]) is a * bottom[1] + bottom[2]. Our Axpy with the two
    # swapped must give OpenCV's numbers; with the fork's order it does not.
    scale, x, y = (torch.from_numpy(blobs[name]) for name in ("fc2", "conv2", "conv1"))
    swapped = Axpy()(scale, y, x).numpy()
    assert_passes([compare("opencv axpy (its bottom order)", got["axpy"], swapped, rtol=RTOL)])
    assert not compare("fork's order", got["axpy"], blobs["axpy"]).passed


def _source_of(net: Net, tmp_path) -> str:
    from caffelayers.converters.pytorch import write_pytorch

    write_pytorch(net, tmp_path / "source")
    return (tmp_path / "source" / "model.py").read_text()


def test_segnet_source_unpools_with_pytorch(tmp_path):
    _, _, net = written(tmp_path, segnet_basic())
    source = _source_of(net, tmp_path)
    assert "F.max_unpool2d(pool4, pool4_mask.long(), 2, output_size=(3, 4))" in source
    assert "import Upsample" not in source


def test_upsample_after_overlapping_pooling(tmp_path):
    """3x3 windows at stride 2 share maxima: a mask can name one position twice, where
    Caffe keeps the later write (onnxruntime writes in order too; the generated source
    imports Upsample)."""
    text = 'name: "overlap"\n' + _input((2, 5, 7, 3))
    text += _layer("pool", "Pooling", "data", ["pool", "mask"],
                   "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }")
    text += _layer("up", "Upsample", ["pool", "mask"],
                   body="upsample_param { upsample_h: 7 upsample_w: 3 }")
    _, _, net = written(tmp_path, text)
    data = random_data(net)
    with torch.no_grad():
        net(data=data)
    mask = net.blobs["mask"].reshape(2, 5, -1)
    assert any(len(set(row.tolist())) < row.numel() for row in mask.reshape(-1, mask.shape[-1]))
    check_net(net, data)
    assert "from caffelayers.layers.segmentation import Upsample" in _source_of(net, tmp_path)


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
def test_bn_variants_convert(tmp_path, phase):
    """SegNet's LEARN mode with its statistics tops and PSPNet's learning BN (stored
    statistics at TEST, the batch's at TRAIN)."""
    text = 'name: "bn"\n' + _input((2, 5, 7, 3))
    text += _layer("segnet", "BN", "data", ["segnet", "segnet_mean", "segnet_var"],
                   "bn_param { bn_mode: LEARN scale_filler { type: \"gaussian\" } "
                   "shift_filler { type: \"gaussian\" } }")
    text += _layer("pspnet", "BN", "segnet", body="bn_param { momentum: 0.9 eps: 1e-4 }")
    prototxt = tmp_path / "bn.prototxt"
    prototxt.write_text(text)
    net = Net(prototxt, phase=phase, seed=0)
    _statistics_worth_testing(net, seed=2)
    data = random_data(net, scale=2.0) + 1.0
    check_net(net, data, outputs=["pspnet", "segnet_mean", "segnet_var"])


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
def test_small_layers_edge_settings_convert(tmp_path, phase):
    """ReLU6 with a slope, Clip with min above max (Caffe gives min), Swish's beta,
    ShuffleChannel and Axpy on 2-D blobs, NVCaffe's BatchNorm in both phases."""
    text = 'name: "edges"\n' + _input((2, 6, 5, 3))
    text += _layer("relu6", "ReLU6", "data", body="relu_param { negative_slope: 0.1 }")
    text += _layer("clip", "Clip", "relu6", body="clip_param { min: 0.5 max: -0.5 }")
    text += _layer("swish", "Swish", "data", body="swish_param { beta: 0.7 }")
    text += _layer("fc", "InnerProduct", "swish",
                   body='inner_product_param { num_output: 6 weight_filler { type: "xavier" } }')
    text += _layer("shuffle", "ShuffleChannel", "fc", body="shuffle_channel_param { group: 3 }")
    text += _layer("axpy", "Axpy", ["fc", "shuffle", "fc"])
    text += _layer("nvbn", "BatchNorm", "data", body="batch_norm_param { scale_bias: true }")
    prototxt = tmp_path / "edges.prototxt"
    prototxt.write_text(text)
    net = Net(prototxt, phase=phase, seed=0)
    _statistics_worth_testing(net, seed=3)
    blobs = check_net(net, random_data(net, scale=5.0))
    assert (blobs["clip"] == 0.5).all()


@pytest.mark.parametrize("opset", [13, 21])
def test_oldest_and_newest_opsets(tmp_path, opset):
    """Resize (align_corners), ScatterElements, Clip and the rest at the oldest opset the
    converter writes and a recent one."""
    text = segnet_basic(width=4)
    _, _, net = written(tmp_path, text)
    data = random_data(net, scale=20.0)
    with torch.no_grad():
        expected = net(data=data)["prob"].numpy()
    got = run_onnx(convert_to_onnx(net, opset=opset), {"data": data.numpy()}, threads=1)
    assert_passes([compare(f"opset {opset} prob", got["prob"], expected, rtol=RTOL)])
    for name, text in (("interp", interp_cases()), ("forks", misc_forks())):
        _, _, net = written(tmp_path, text, name)
        data = random_data(net)
        with torch.no_grad():
            expected = net(data=data)
        got = run_onnx(convert_to_onnx(net, opset=opset), {"data": data.numpy()}, threads=1)
        assert_passes(compare(f"opset {opset} {blob}", got[blob], value.numpy(), rtol=RTOL)
                      for blob, value in expected.items())
