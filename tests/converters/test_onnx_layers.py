"""ONNX emitters, one Caffe quirk at a time: each converted net runs in onnxruntime and must
give the numbers of caffelayers' Net (which the Caffe fixtures pin), with distinct sizes per
axis. Pooling is also checked against Caffe's loops written out here."""

import numpy as np
import onnx
import pytest
import torch

from caffelayers import Net
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.errors import UnsupportedParameterError
from caffelayers.proto import io
from caffelayers.verify import compare

N, C, H, W = 2, 5, 7, 3


def make_net(layers: str, inputs=None, phase: str = "TEST") -> Net:
    """A net with Input layers for ``inputs`` (name -> shape) followed by ``layers``."""
    inputs = inputs or {"x": (N, C, H, W)}
    text = 'name: "t"\n'
    for name, shape in inputs.items():
        dims = " ".join(f"dim: {d}" for d in shape)
        text += (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
                 f'input_param {{ shape {{ {dims} }} }} }}\n')
    return Net(io.parse_prototxt(text + layers), phase=phase, seed=0)


def random_inputs(net: Net, batch=None, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {name: net.graph.blob_shapes[name] for name in net.inputs}
    return {name: rng.standard_normal(((batch or shape[0]),) + tuple(shape[1:]))
            .astype(np.float32) for name, shape in shapes.items()}


def assert_close(blob, ours, theirs):
    """The fixtures' tolerance rule; NaN and infinities must sit at the same places."""
    check = compare(blob, ours, theirs)
    assert check.passed, check.describe()


def assert_matches_net(net: Net, inputs=None, **convert_options):
    """Convert, run in onnxruntime, compare every net output; returns the model."""
    inputs = inputs if inputs is not None else random_inputs(net)
    model = convert_to_onnx(net, **convert_options)
    got = run_onnx(model, inputs, threads=1)
    with torch.no_grad():
        want = net(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    assert set(got) == set(want)
    for blob, value in want.items():
        assert_close(blob, got[blob], value.numpy())
    return model


def nodes(model, op_type):
    return [node for node in model.graph.node if node.op_type == op_type]


def attribute(node, name):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return None


# -- Pooling -----------------------------------------------------------------------------
def caffe_pool_loops(x, kernel, stride, pad, method):
    """Caffe's CPU pooling loops (MAX and AVE) with its ceil rounding and window clip."""
    num, channels, height, width = x.shape

    def count(size, k, s, p):
        n = -(-(size + 2 * p - k) // s) + 1
        return n - 1 if p and (n - 1) * s >= size + p else n

    out_h, out_w = (count(*a) for a in zip((height, width), kernel, stride, pad))
    top = np.empty((num, channels, out_h, out_w))
    for ph in range(out_h):
        for pw in range(out_w):
            hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
            he = min(hs + kernel[0], height + pad[0])
            we = min(ws + kernel[1], width + pad[1])
            size = (he - hs) * (we - ws)
            window = x[:, :, max(hs, 0):min(he, height), max(ws, 0):min(we, width)]
            if method == "MAX":
                top[:, :, ph, pw] = window.max(axis=(2, 3))
            else:
                top[:, :, ph, pw] = window.sum(axis=(2, 3)) / size
    return top


POOLS = [
    # (pool, kernel, stride, pad, H, W): ceil with a trailing window clipped to in + pad,
    # windows over the padded edge, uneven trailing pads, rectangular settings.
    ("MAX", (3, 3), (2, 2), (1, 1), 6, 5),
    ("MAX", (3, 2), (2, 1), (1, 1), 7, 4),
    ("MAX", (3, 3), (3, 3), (1, 1), 5, 8),
    ("MAX", (3, 3), (2, 2), (0, 0), 6, 9),
    ("AVE", (3, 3), (2, 2), (1, 1), 6, 5),
    ("AVE", (3, 2), (2, 1), (1, 1), 7, 4),
    ("AVE", (3, 3), (3, 3), (1, 1), 5, 8),
    ("AVE", (2, 3), (2, 2), (0, 1), 7, 6),
    ("AVE", (3, 3), (2, 2), (0, 0), 6, 9),
]


@pytest.mark.parametrize("pool, kernel, stride, pad, height, width", POOLS)
def test_pooling_matches_caffe_loops(pool, kernel, stride, pad, height, width):
    net = make_net(f'layer {{ name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param {{ '
                   f'pool: {pool} kernel_h: {kernel[0]} kernel_w: {kernel[1]} '
                   f'stride_h: {stride[0]} stride_w: {stride[1]} pad_h: {pad[0]} '
                   f'pad_w: {pad[1]} }} }}', {"x": (N, 3, height, width)})
    x = random_inputs(net)["x"]
    model = assert_matches_net(net, {"x": x})
    got = run_onnx(model, {"x": x}, threads=1)["y"]
    assert_close("y", got, caffe_pool_loops(x.astype(np.float64), kernel, stride, pad, pool))
    for node in nodes(model, "AveragePool"):  # tools reject uneven AveragePool pads
        pads = attribute(node, "pads") or [0, 0, 0, 0]
        assert pads[:2] == pads[2:]
    for node in nodes(model, "MaxPool") + nodes(model, "AveragePool"):
        pads = attribute(node, "pads") or [0, 0, 0, 0]
        assert all(p < k for p, k in zip(pads, 2 * list(attribute(node, "kernel_shape"))))
        assert not attribute(node, "ceil_mode")


def test_average_pooling_divisor_at_the_padded_edge():
    # H = 6, k = 3, s = 2, p = 1: the last row window starts at 5 and is clipped to 7 =
    # H + pad, so it averages x[5] and one padded zero over a divisor of 2 (not 3, not 1).
    net = make_net('layer { name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param { '
                   'pool: AVE kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 '
                   'pad_w: 0 } }', {"x": (1, 1, 6, 1)})
    x = np.arange(1, 7, dtype=np.float32).reshape(1, 1, 6, 1)
    model = assert_matches_net(net, {"x": x})
    y = run_onnx(model, {"x": x}, threads=1)["y"].ravel()
    np.testing.assert_allclose(y, [(0 + 1 + 2) / 3, (2 + 3 + 4) / 3, (4 + 5 + 6) / 3, 6 / 2],
                               rtol=1e-6)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_unpadded_ceil_windows_past_the_input(pool):
    # H = 8, k = 2, s = 4: windows start at 0, 4 and 8, the last entirely past the input:
    # Caffe's MAX reports -FLT_MAX there, its AVE divides 0 by a zero divisor (NaN).
    net = make_net(f'layer {{ name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param {{ '
                   f'pool: {pool} kernel_size: 2 stride: 4 }} }}', {"x": (N, 3, 8, 5)})
    model = assert_matches_net(net)
    y = run_onnx(model, random_inputs(net), threads=1)["y"]
    assert y.shape == (N, 3, 3, 2)
    if pool == "MAX":
        assert np.all(y[:, :, 2] == -np.finfo(np.float32).max)
    else:
        assert np.all(np.isnan(y[:, :, 2]))


@pytest.mark.parametrize("settings, shape", [
    ("kernel_size: 3 stride: 2 pad: 1", (N, 3, 7, 6)),
    ("kernel_size: 2 stride: 4", (N, 3, 8, 5)),  # the padded path, windows past the input
])
def test_max_pooling_mask_top(settings, shape):
    net = make_net(f'layer {{ name: "pool" type: "Pooling" bottom: "x" top: "y" top: "mask" '
                   f'pooling_param {{ pool: MAX {settings} }} }}', {"x": shape})
    assert_matches_net(net)


def test_floor_rounding_global_and_stochastic_test_pooling():
    net = make_net(
        'layer { name: "floor" type: "Pooling" bottom: "x" top: "a" pooling_param { pool: AVE '
        'kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR } }\n'
        'layer { name: "gmax" type: "Pooling" bottom: "x" top: "b" pooling_param { pool: MAX '
        'global_pooling: true } }\n'
        'layer { name: "gave" type: "Pooling" bottom: "x" top: "c" pooling_param { pool: AVE '
        'global_pooling: true } }\n'
        'layer { name: "abs" type: "AbsVal" bottom: "x" top: "ax" }\n'
        'layer { name: "sto" type: "Pooling" bottom: "ax" top: "d" pooling_param { '
        'pool: STOCHASTIC kernel_size: 2 stride: 2 } }\n', {"x": (N, C, 6, 7)})
    assert_matches_net(net)


def test_stochastic_pooling_in_a_train_net_is_refused():
    net = make_net('layer { name: "sto" type: "Pooling" bottom: "x" top: "y" pooling_param { '
                   'pool: STOCHASTIC kernel_size: 2 stride: 2 } }', phase="TRAIN")
    with pytest.raises(UnsupportedParameterError, match="'sto'.*STOCHASTIC"):
        convert_to_onnx(net)


# -- LRN -----------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    "local_size: 3 alpha: 0.5 beta: 0.75 k: 2",
    "local_size: 5 alpha: 2 beta: 0.6 k: 0.5",
    "local_size: 3 alpha: 0.5 beta: 0.75 k: 2 norm_region: WITHIN_CHANNEL",
    "local_size: 5 alpha: 3 beta: 1.5 norm_region: WITHIN_CHANNEL",
])
def test_lrn_across_with_k_and_within_channel(settings):
    # N != C, so a channel window cannot pass for a batch window.
    net = make_net(f'layer {{ name: "lrn" type: "LRN" bottom: "x" top: "y" '
                   f'lrn_param {{ {settings} }} }}')
    x = 2 * random_inputs(net)["x"]
    assert_matches_net(net, {"x": x})


# -- Scale and Bias -----------------------------------------------------------------------
FILLERS = 'filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'


@pytest.mark.parametrize("settings", [
    "axis: 1 num_axes: 2 bias_term: true",
    "axis: -2 num_axes: 1 bias_term: true",
    "axis: 2 num_axes: -1",
    "axis: 1 num_axes: 0 bias_term: true",
    "axis: 0 num_axes: 1",
])
def test_scale_axis_and_num_axes(settings):
    net = make_net(f'layer {{ name: "s" type: "Scale" bottom: "x" top: "y" '
                   f'scale_param {{ {settings} {FILLERS} }} }}')
    model = assert_matches_net(net, static_batch="axis: 0" in settings)
    assert {init.name for init in model.graph.initializer} >= {"s/0"}


@pytest.mark.parametrize("settings", ["axis: 2 num_axes: 1", "axis: 1 num_axes: -1",
                                      "axis: -1 num_axes: 1"])
def test_bias_axis_and_num_axes(settings):
    net = make_net(f'layer {{ name: "b" type: "Bias" bottom: "x" top: "y" '
                   f'bias_param {{ {settings} filler {{ type: "gaussian" std: 1 }} }} }}')
    assert_matches_net(net)


def test_scale_and_bias_from_a_second_bottom_with_a_dynamic_batch():
    # The operand covers axes 0 and 1 (the batch too): its reshape keeps the batch open.
    net = make_net('layer { name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y" '
                   'scale_param { axis: 0 } }\n'
                   'layer { name: "b" type: "Bias" bottom: "y" bottom: "b" top: "z" '
                   'bias_param { axis: 2 } }',
                   {"x": (N, C, H, W), "s": (N, C), "b": (H, W)})
    assert_matches_net(net)
    # At batch 3, b (7 x 3, not a batch) keeps its shape.
    inputs = random_inputs(net)
    inputs.update(x=np.ones((3, C, H, W), np.float32), s=np.ones((3, C), np.float32))
    assert_matches_net(net, inputs)


# -- ArgMax --------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, shape", [
    ("top_k: 3", (N, 4, 3)),
    ("top_k: 3 out_max_val: true", (N, C, 2, 3)),
    ("top_k: 2 axis: 1", (N, C, 3)),
    ("top_k: 2 axis: -1 out_max_val: true", (N, 3, 6)),
])
def test_argmax_top_k_out_max_val_and_ties(settings, shape):
    net = make_net(f'layer {{ name: "am" type: "ArgMax" bottom: "x" top: "y" '
                   f'argmax_param {{ {settings} }} }}', {"x": shape})
    # Few distinct values: many ties, which Caffe breaks toward the higher position.
    x = np.random.default_rng(1).integers(0, 3, size=shape).astype(np.float32)
    assert_matches_net(net, {"x": x})


def test_argmax_ties_go_to_the_higher_position():
    net = make_net('layer { name: "am" type: "ArgMax" bottom: "x" top: "y" '
                   'argmax_param { top_k: 2 } }', {"x": (1, 4)})
    y = run_onnx(convert_to_onnx(net), {"x": np.array([[5, 1, 5, 0]], np.float32)})["y"]
    assert y.ravel().tolist() == [2, 0]


# -- Convolution, Deconvolution, InnerProduct, Embed ------------------------------------
WEIGHTS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 1 }'


@pytest.mark.parametrize("settings", [
    "num_output: 9 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 group: 3",
    "num_output: 6 kernel_size: 3 stride: 2 pad: 1 dilation: 2 group: 2 bias_term: false",
])
def test_deconvolution_groups_and_pads(settings):
    net = make_net(f'layer {{ name: "d" type: "Deconvolution" bottom: "x" top: "y" '
                   f'convolution_param {{ {settings} {WEIGHTS} }} }}', {"x": (N, 6, 5, 4)})
    assert_matches_net(net)


def test_convolution_1d_3d_and_shared_filters():
    net = make_net(
        'layer { name: "c1" type: "Convolution" bottom: "a" top: "ya" convolution_param { '
        f'num_output: 4 kernel_size: 3 pad: 1 stride: 2 {WEIGHTS} }} }}\n'
        'layer { name: "c3" type: "Convolution" bottom: "v" top: "yv" convolution_param { '
        f'num_output: 6 kernel_size: 2 kernel_size: 3 kernel_size: 1 group: 3 {WEIGHTS} }} }}\n'
        'layer { name: "c2" type: "Convolution" bottom: "x" bottom: "x2" top: "y1" top: "y2" '
        f'convolution_param {{ num_output: 3 kernel_size: 3 {WEIGHTS} }} }}\n',
        {"a": (N, 3, 9), "v": (N, 3, 4, 5, 6), "x": (N, C, H, W), "x2": (N, C, H, W)})
    assert_matches_net(net)


@pytest.mark.parametrize("settings, static", [
    ("num_output: 4 axis: 2", False),
    ("num_output: 4 axis: -1 transpose: true", False),
    ("num_output: 3 transpose: true bias_term: false", False),
    ("num_output: 3 axis: 0", True),  # the batch is part of K: only a static batch fits
])
def test_inner_product_axis_and_transpose(settings, static):
    net = make_net(f'layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                   f'inner_product_param {{ {settings} {WEIGHTS} }} }}')
    assert_matches_net(net, static_batch=static)
    if static:
        with pytest.raises(UnsupportedParameterError, match="static"):
            convert_to_onnx(net)


def test_embed_truncates_indices():
    net = make_net('layer { name: "e" type: "Embed" bottom: "x" top: "y" embed_param { '
                   f'input_dim: 6 num_output: 4 {WEIGHTS} }} }}', {"x": (N, 3)})
    assert_matches_net(net, {"x": np.array([[0, 5.9, 2.2], [1.5, 4, 3]], np.float32)})


# -- Softmax, shapes -----------------------------------------------------------------------
def test_softmax_on_an_inner_axis_and_shape_layers():
    net = make_net(
        'layer { name: "sm" type: "Softmax" bottom: "x" top: "sm" softmax_param { axis: 2 } }\n'
        'layer { name: "sl" type: "Slice" bottom: "sm" top: "s1" top: "s2" top: "s3" '
        'slice_param { axis: 2 slice_point: 2 slice_point: 3 } }\n'
        'layer { name: "se" type: "Slice" bottom: "x" top: "e1" top: "e2" '
        'slice_param { axis: -1 slice_point: 1 } }\n'
        'layer { name: "cr" type: "Crop" bottom: "x" bottom: "ref" top: "cr" '
        'crop_param { axis: 1 offset: 1 } }\n'
        'layer { name: "rs" type: "Reshape" bottom: "x" top: "rs" reshape_param { '
        'shape { dim: 0 dim: -1 } axis: 1 } }\n'
        'layer { name: "rs2" type: "Reshape" bottom: "x" top: "rs2" reshape_param { '
        'shape { dim: 1 dim: -1 } axis: -1 num_axes: 0 } }\n'
        'layer { name: "fl" type: "Flatten" bottom: "x" top: "fl" flatten_param { axis: 1 '
        'end_axis: 2 } }\n'
        'layer { name: "f0" type: "Flatten" bottom: "x" top: "f0" flatten_param { axis: 0 } }\n'
        'layer { name: "tl" type: "Tile" bottom: "x" top: "tl" tile_param { axis: -2 tiles: 2 } }\n'
        'layer { name: "ct" type: "Concat" bottom: "x" top: "ct" }\n'
        'layer { name: "sp" type: "Split" bottom: "x" top: "p1" top: "p2" }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "p1" bottom: "p2" top: "sum" }\n'
        'layer { name: "si" type: "Silence" bottom: "e2" }\n',
        {"x": (N, C, H, W), "ref": (N, 3, 4, 2)})
    model = assert_matches_net(net, static_batch=True)
    assert "e2" not in {o.name for o in model.graph.output}  # silenced
    assert_matches_net(net, {**random_inputs(net)})


def test_slice_along_the_batch_in_equal_parts_keeps_it_dynamic():
    net = make_net('layer { name: "sl" type: "Slice" bottom: "x" top: "a" top: "b" '
                   'slice_param { axis: 0 } }', {"x": (4, 3)})
    for opset in (13, 18):
        assert_matches_net(net, opset=opset)
        assert_matches_net(net, {"x": np.ones((6, 3), np.float32)}, opset=opset)


# -- Neurons and Eltwise -------------------------------------------------------------------
def test_neurons():
    net = make_net(
        'layer { name: "relu" type: "ReLU" bottom: "x" top: "relu" }\n'
        'layer { name: "leaky" type: "ReLU" bottom: "x" top: "leaky" relu_param { '
        'negative_slope: 0.3 } }\n'
        'layer { name: "elu" type: "ELU" bottom: "x" top: "elu" elu_param { alpha: 0.4 } }\n'
        'layer { name: "sig" type: "Sigmoid" bottom: "x" top: "sig" }\n'
        'layer { name: "tanh" type: "TanH" bottom: "x" top: "tanh" }\n'
        'layer { name: "abs" type: "AbsVal" bottom: "x" top: "abs" }\n'
        'layer { name: "bnll" type: "BNLL" bottom: "x" top: "bnll" }\n'
        'layer { name: "pow" type: "Power" bottom: "abs" top: "pow" power_param { '
        'power: 1.5 scale: 2 shift: 0.5 } }\n'
        'layer { name: "pow1" type: "Power" bottom: "x" top: "pow1" }\n'
        'layer { name: "const" type: "Power" bottom: "x" top: "const" power_param { '
        'power: 3 scale: 0 shift: 2 } }\n'
        'layer { name: "one" type: "Power" bottom: "x" top: "one" power_param { power: 0 } }\n'
        'layer { name: "exp" type: "Exp" bottom: "x" top: "exp" }\n'
        'layer { name: "exp3" type: "Exp" bottom: "x" top: "exp3" exp_param { base: 3 '
        'scale: 0.5 shift: -1 } }\n'
        'layer { name: "log" type: "Log" bottom: "abs" top: "log" }\n'
        'layer { name: "log10" type: "Log" bottom: "abs" top: "log10" log_param { base: 10 '
        'scale: 2 shift: 1 } }\n'
        'layer { name: "th" type: "Threshold" bottom: "x" top: "th" threshold_param { '
        'threshold: 0.25 } }\n'
        'layer { name: "drop" type: "Dropout" bottom: "x" top: "drop" }\n')
    x = random_inputs(net)["x"]
    x[0, 0, 0, :] = [100.0, -100.0, 0.0]  # BNLL's overflow-safe branches, the kink at 0
    assert_matches_net(net, {"x": x})


@pytest.mark.parametrize("shared, shape", [(False, (N, C, H, W)), (True, (N, C, H, W)),
                                           (False, (N, C))])
def test_prelu_per_channel_and_shared(shared, shape):
    net = make_net(f'layer {{ name: "p" type: "PReLU" bottom: "x" top: "y" prelu_param {{ '
                   f'channel_shared: {str(shared).lower()} filler {{ type: "uniform" '
                   f'min: -1 max: 1 }} }} }}', {"x": shape})
    assert_matches_net(net)


def test_eltwise_coefficients_product_and_max():
    net = make_net(
        'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "sum" '
        'eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 } }\n'
        'layer { name: "prod" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "prod" '
        'eltwise_param { operation: PROD } }\n'
        'layer { name: "max" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "max" '
        'eltwise_param { operation: MAX } }\n',
        {"a": (N, C, H), "b": (N, C, H), "c": (N, C, H)})
    assert_matches_net(net)


# -- Normalization and reductions --------------------------------------------------------
def test_batch_norm_scale_factor_folded_and_batch_statistics():
    net = make_net('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                   'batch_norm_param { eps: 0.01 } }\n'
                   'layer { name: "bn0" type: "BatchNorm" bottom: "x" top: "z" }\n'
                   'layer { name: "bnb" type: "BatchNorm" bottom: "x" top: "w" '
                   'batch_norm_param { use_global_stats: false } }\n')
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn = net.layer("bn")
        bn.mean_sum.copy_(torch.randn(C, generator=generator) * 4)
        bn.variance_sum.copy_(torch.rand(C, generator=generator) * 8)
        bn.scale_factor.fill_(4.0)  # statistics are the sums divided by 4
        # bn0 keeps a zero scale factor: statistics of 0, y = x / sqrt(eps).
    for opset in (13, 18):  # ReduceMean takes its axes as an input from opset 18
        model = assert_matches_net(net, opset=opset)
    means = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(means["bn/0"], bn.mean_sum.numpy() / 4, rtol=1e-6)


def test_batch_norm_on_a_2d_blob():
    net = make_net('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }\n'
                   'layer { name: "bnb" type: "BatchNorm" bottom: "x" top: "z" '
                   'batch_norm_param { use_global_stats: false } }', {"x": (4, C)})
    with torch.no_grad():
        net.layer("bn").variance_sum.fill_(3.0)
        net.layer("bn").scale_factor.fill_(1.5)
    assert_matches_net(net)


@pytest.mark.parametrize("settings, shape", [
    ("", (N, C, H, W)),
    ("across_channels: true", (N, C, H, W)),
    ("normalize_variance: false", (N, C, H)),
    ("eps: 0.1", (N, C)),
])
def test_mvn(settings, shape):
    net = make_net(f'layer {{ name: "m" type: "MVN" bottom: "x" top: "y" '
                   f'mvn_param {{ {settings} }} }}', {"x": shape})
    for opset in (13, 18):
        assert_matches_net(net, opset=opset)


@pytest.mark.parametrize("settings", ["operation: SUM axis: 1", "operation: ASUM axis: -1",
                                      "operation: SUMSQ axis: 2 coeff: -0.5",
                                      "operation: MEAN axis: 1 coeff: 3",
                                      "operation: MEAN axis: 0 coeff: 3"])
def test_reduction(settings):
    net = make_net(f'layer {{ name: "r" type: "Reduction" bottom: "x" top: "y" '
                   f'reduction_param {{ {settings} }} }}')
    assert_matches_net(net)
    # Axis 0 reduces the batch too: a MEAN over another batch size divides by its count.
    assert_matches_net(net, random_inputs(net, batch=3))


def test_argmax_along_the_batch_needs_a_static_batch():
    net = make_net('layer { name: "am" type: "ArgMax" bottom: "x" top: "y" '
                   'argmax_param { axis: 0 } }', {"x": (3, 4)})
    assert_matches_net(net, static_batch=True)
    with pytest.raises(UnsupportedParameterError, match="'am'.*static"):
        convert_to_onnx(net)


# -- Data layers ---------------------------------------------------------------------------
def test_dummy_data_constant_filler_and_unread_input():
    text = ('name: "t"\n'
            'layer { name: "d" type: "DummyData" top: "d" dummy_data_param { shape { dim: 2 '
            'dim: 3 } data_filler { type: "constant" value: 1.5 } } }\n'
            'layer { name: "x" type: "Input" top: "x" top: "label" input_param { '
            'shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "s" type: "Eltwise" bottom: "x" bottom: "d" top: "y" }\n')
    net = Net(io.parse_prototxt(text), seed=0)
    model = convert_to_onnx(net, static_batch=True)  # the constant cannot follow a batch
    assert [i.name for i in model.graph.input] == ["x"]  # nobody reads the label
    y = run_onnx(model, {"x": np.zeros((2, 3), np.float32)})["y"]
    np.testing.assert_array_equal(y, np.full((2, 3), 1.5, np.float32))


def test_dummy_data_random_filler_is_refused():
    text = ('name: "t"\nlayer { name: "d" type: "DummyData" top: "d" dummy_data_param { '
            'shape { dim: 2 } data_filler { type: "gaussian" } } }\n')
    with pytest.raises(UnsupportedParameterError, match="'d' .*gaussian"):
        convert_to_onnx(Net(io.parse_prototxt(text), seed=0))
