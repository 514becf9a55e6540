"""ONNX inputs whose height and width follow the data: a fully convolutional net converts
with symbolic ``height`` and ``width`` and runs at the prototxt's size and at others with
``Net``'s numbers (Net reshapes itself to each input); one layer that fixes the size keeps
the prototxt's size and is named; ``static_shape`` / ``--static-shape`` keeps it always."""

import numpy as np
import pytest
import torch

from caffelayers import Net
from caffelayers.cli import main
from caffelayers.converters.onnx import (ANY_SIZE, convert_to_onnx, fixed_size_reason,
                                         run_onnx)
from caffelayers.layers.neuron import ReLU
from caffelayers.proto import io
from caffelayers.registry import EMITTERS, LAYERS
from caffelayers.verify import compare

N, C, H, W = 2, 5, 7, 3
# Sizes with odd and even remainders, taller and wider than the prototxt's.
SIZES = [(7, 3), (8, 9), (13, 6), (5, 16)]


def make_net(layers: str, shape=(N, C, H, W)) -> Net:
    dims = " ".join(f"dim: {d}" for d in shape)
    text = (f'layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            + layers)
    return Net(io.parse_prototxt(text), seed=0)


def dims_of(value):
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
            for d in value.type.tensor_type.shape.dim]


def assert_runs_at(net, model, sizes, positive=False):
    """onnxruntime against Net at each ``(height, width)``, every net output."""
    for height, width in sizes:
        x = np.random.default_rng(height * 31 + width).standard_normal(
            (N, C, height, width)).astype(np.float32)
        x = np.abs(x) if positive else x
        with torch.no_grad():
            want = net(x=torch.from_numpy(x))
        got = run_onnx(model, {"x": x}, threads=1)
        for blob, value in want.items():
            check = compare(f"{blob} at {height}x{width}", got[blob], value.numpy())
            assert check.passed, check.describe()


POOLS = [(pool, kernel, stride, pad, mode)
         for pool in ("MAX", "AVE")
         for kernel, stride, pad in [(3, 2, 1), (3, 2, 0), (2, 2, 0), (3, 3, 1), (2, 2, 1),
                                     (1, 2, 0), (2, 4, 0), (3, 1, 1), (3, 2, 2)]
         for mode in ("CEIL", "FLOOR") if pad < kernel] + [
    ("STOCHASTIC", 3, 2, 0, "CEIL"), ("STOCHASTIC", 2, 3, 0, "CEIL"),
    ("STOCHASTIC", 2, 2, 0, "FLOOR")]


@pytest.mark.parametrize("pool, kernel, stride, pad, mode", POOLS)
def test_pooling_follows_any_size(pool, kernel, stride, pad, mode):
    """Caffe's ceil windows, the dropped last window, AVE's clipped divisor and windows past
    the input, all computed from the input's size in the graph (rectangular settings)."""
    kernel_w, pad_w = max(kernel - 1, 1), min(pad, max(kernel - 2, 0))
    net = make_net(f'layer {{ name: "pool" type: "Pooling" bottom: "x" top: "y" '
                   f'pooling_param {{ pool: {pool} kernel_h: {kernel} kernel_w: {kernel_w} '
                   f'stride_h: {stride} stride_w: {stride} pad_h: {pad} pad_w: {pad_w} '
                   f'round_mode: {mode} }} }}')
    model = convert_to_onnx(net)
    assert dims_of(model.graph.input[0]) == ["batch", C, "height", "width"]
    assert_runs_at(net, model, SIZES, positive=pool == "STOCHASTIC")
    for node in model.graph.node:
        if node.op_type in ("MaxPool", "AveragePool"):
            attributes = {a.name: a for a in node.attribute}
            assert "ceil_mode" not in attributes  # no runtime's ceil rule is relied on
            pads = list(attributes["pads"].ints) if "pads" in attributes else [0] * 4
            kernels = 2 * list(attributes["kernel_shape"].ints)
            assert all(p < k for p, k in zip(pads, kernels))


FULLY_CONVOLUTIONAL = '''
layer { name: "conv" type: "Convolution" bottom: "x" top: "conv" convolution_param {
  num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "xavier" }
  bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param {
  use_global_stats: true } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true
  filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv"
  prelu_param { filler { type: "constant" value: 0.2 } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX
  kernel_size: 3 stride: 2 } }
layer { name: "up" type: "Deconvolution" bottom: "pool" top: "up" convolution_param {
  num_output: 4 kernel_size: 2 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "side" type: "Convolution" bottom: "pool" top: "side" convolution_param {
  num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "lrn" type: "LRN" bottom: "side" top: "lrn" lrn_param { local_size: 3
  norm_region: WITHIN_CHANNEL } }
layer { name: "halves" type: "Slice" bottom: "lrn" top: "h1" top: "h2" slice_param {
  axis: 1 slice_point: 1 } }
layer { name: "cat" type: "Concat" bottom: "h2" bottom: "h1" bottom: "side" top: "cat" }
layer { name: "sum" type: "Eltwise" bottom: "cat" bottom: "cat" top: "sum"
  eltwise_param { coeff: 1 coeff: -0.5 } }
layer { name: "avg" type: "Pooling" bottom: "sum" top: "avg" pooling_param { pool: AVE
  kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "prob" type: "Softmax" bottom: "avg" top: "prob" }
layer { name: "global" type: "Pooling" bottom: "avg" top: "global" pooling_param { pool: AVE
  global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "global" top: "fc" inner_product_param {
  num_output: 3 weight_filler { type: "xavier" } } }
'''


def test_a_fully_convolutional_net_runs_at_every_size():
    """Convolution, BatchNorm, Scale, PReLU, ceil pooling, Deconvolution, LRN, Slice on the
    channels, Concat, Eltwise, padded AVE pooling, Softmax; an InnerProduct after global
    pooling sees 1 x 1 at every size, so it fixes nothing."""
    net = make_net(FULLY_CONVOLUTIONAL, shape=(N, C, 9, 11))
    assert fixed_size_reason(net) is None
    model = convert_to_onnx(net)
    assert dims_of(model.graph.input[0]) == ["batch", C, "height", "width"]
    outputs = {o.name: dims_of(o) for o in model.graph.output}
    assert outputs["prob"] == ["batch", C - 1 + 4, None, None]
    assert outputs["fc"] == ["batch", 3]
    assert_runs_at(net, model, [(9, 11), (7, 3), (16, 5), (12, 12)])


@pytest.mark.parametrize("layers, culprit", [
    ('layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { '
     'num_output: 2 } }', "'fc' (InnerProduct)"),
    ('layer { name: "flat" type: "Flatten" bottom: "x" top: "flat" flatten_param { axis: 2 } }',
     "'flat' (Flatten)"),
    ('layer { name: "r" type: "Reshape" bottom: "x" top: "r" reshape_param { shape { dim: 0 '
     'dim: 0 dim: -1 } } }', "'r' (Reshape)"),
    ('layer { name: "cut" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { axis: 3 '
     'slice_point: 1 } }', "'cut' (Slice)"),
    ('layer { name: "pool" type: "Pooling" bottom: "x" top: "y" top: "mask" pooling_param { '
     'pool: MAX kernel_size: 2 stride: 2 } }', "'pool' (Pooling)"),
])
def test_a_layer_that_fixes_the_size_keeps_it_and_is_named(layers, culprit):
    net = make_net(layers)
    assert culprit in fixed_size_reason(net)
    model = convert_to_onnx(net)
    assert dims_of(model.graph.input[0]) == ["batch", C, H, W]
    assert_runs_at(net, model, [(H, W)])


def test_static_shape_keeps_the_prototxt_size():
    net = make_net(FULLY_CONVOLUTIONAL, shape=(N, C, 9, 11))
    model = convert_to_onnx(net, static_shape=True)
    assert dims_of(model.graph.input[0]) == ["batch", C, 9, 11]
    assert "static_shape" in fixed_size_reason(net, static_shape=True)
    assert_runs_at(net, model, [(9, 11)])
    model = convert_to_onnx(net, static_shape=True, static_batch=True)
    assert dims_of(model.graph.input[0]) == [N, C, 9, 11]


def test_a_users_type_follows_the_size_once_declared(monkeypatch):
    """A type without an entry in ANY_SIZE keeps the size; declaring that its emitter
    writes no size lets it follow."""
    monkeypatch.setitem(LAYERS, "MyRelu", ReLU)
    monkeypatch.setitem(EMITTERS, "MyRelu", EMITTERS["ReLU"])
    net = make_net('layer { name: "mine" type: "MyRelu" bottom: "x" top: "y" }')
    assert "'mine' (MyRelu)" in fixed_size_reason(net)
    monkeypatch.setitem(ANY_SIZE, "MyRelu", None)
    assert fixed_size_reason(net) is None
    assert_runs_at(net, convert_to_onnx(net), SIZES)


def test_each_image_input_gets_its_own_symbols():
    text = ('layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 dim: 2 '
            'dim: 5 dim: 4 } } }\n'
            'layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 1 dim: 2 '
            'dim: 5 dim: 4 } } }\n'
            'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }\n')
    model = convert_to_onnx(Net(io.parse_prototxt(text)))
    assert [dims_of(i) for i in model.graph.input] == [
        ["batch", 2, "a_height", "a_width"], ["batch", 2, "b_height", "b_width"]]


def test_convert_command_says_how_the_inputs_are_sized(tmp_path, capsys):
    prototxt = tmp_path / "fcn.prototxt"
    prototxt.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { '
                        f'dim: {N} dim: {C} dim: 9 dim: 11 }} }} }}\n' + FULLY_CONVOLUTIONAL)
    assert main(["convert", str(prototxt), "--to", "onnx", "-o", str(tmp_path / "a.onnx")]) == 0
    assert "height and width are symbolic" in capsys.readouterr().err
    assert main(["convert", str(prototxt), "--to", "onnx", "-o", str(tmp_path / "b.onnx"),
                 "--static-shape"]) == 0
    assert "symbolic" not in capsys.readouterr().err
    x = np.zeros((1, C, 16, 5), np.float32)
    assert run_onnx(tmp_path / "a.onnx", {"x": x})["prob"].shape == (1, 8, 5, 2)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run_onnx(tmp_path / "b.onnx", {"x": x})

    prototxt.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { '
                        f'dim: {N} dim: {C} dim: {H} dim: {W} }} }} }}\n'
                        'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" '
                        'inner_product_param { num_output: 2 } }\n')
    assert main(["convert", str(prototxt), "--to", "onnx", "-o", str(tmp_path / "c.onnx")]) == 0
    err = capsys.readouterr().err
    assert "keep the prototxt's height and width" in err and "'fc' (InnerProduct)" in err


def test_convert_help_states_the_rule(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--static-shape" in text and "fully convolutional" in text
    assert "InnerProduct" in text
