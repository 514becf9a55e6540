"""Scale and Bias: broadcasting rules, fillers, gradients, shape errors."""


import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.scale_bias import Bias, Scale
from caffelayers.proto import caffe_pb2
from caffelayers.registry import LAYERS

N, C, H, W = 2, 5, 7, 3


def layer_param(text):
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def build(text, bottom_shapes, fill=True):
    param = layer_param(text)
    ctx = BuildContext(fill=fill, generator=torch.Generator().manual_seed(0))
    layer = LAYERS[param.type].from_caffe(param, bottom_shapes, ctx)
    layer.layer_name = param.name
    return layer


@pytest.mark.parametrize("text, shape", [
    ("", (C,)),
    ("axis: 2", (H,)),
    ("axis: -2 num_axes: 2", (H, W)),
    ("axis: 1 num_axes: -1", (C, H, W)),
    ("axis: 0 num_axes: 2", (N, C)),
    ("axis: 3 num_axes: 0", ()),
])
def test_learned_shapes_and_broadcasting(text, shape):
    scale = build(f'name: "s" type: "Scale" scale_param {{ {text} bias_term: true }}',
                  [(N, C, H, W)])
    bias = build(f'name: "b" type: "Bias" bias_param {{ {text} }}', [(N, C, H, W)])
    assert [tuple(b.shape) for b in scale.caffe_blobs()] == [shape, shape]
    assert [tuple(b.shape) for b in bias.caffe_blobs()] == [shape]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, C, H, W))
    s, b = rng.normal(size=shape), rng.normal(size=shape)
    scale.double().load_caffe_blobs([s, b])
    bias.double().load_caffe_blobs([b])
    # numpy reference: the operand sits at `axis` (any axis for a scalar), 1s elsewhere.
    axis = 0 if not shape else {(C,): 1, (H,): 2, (H, W): 2, (C, H, W): 1, (N, C): 0}[shape]
    view = (1,) * axis + shape + (1,) * (4 - axis - len(shape))
    y = scale(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, x * s.reshape(view) + b.reshape(view), rtol=1e-12)
    np.testing.assert_allclose(bias(torch.from_numpy(x)).detach().numpy(), x + b.reshape(view),
                               rtol=1e-12)


def test_default_fillers_identity_and_given_fillers():
    scale = build('name: "s" type: "Scale" scale_param { bias_term: true }', [(N, C, H, W)])
    assert torch.equal(scale.weight, torch.ones(C)) and torch.equal(scale.bias, torch.zeros(C))
    filled = build('name: "s" type: "Scale" scale_param { filler { type: "constant" value: 3 } '
                   'bias_term: true bias_filler { type: "constant" value: -2 } }', [(N, C, H)])
    assert torch.equal(filled.weight, torch.full((C,), 3.0))
    assert torch.equal(filled.bias, torch.full((C,), -2.0))
    bias = build('name: "b" type: "Bias" bias_param { filler { type: "constant" value: 4 } }',
                 [(N, C)])
    assert torch.equal(bias.bias, torch.full((C,), 4.0))


def test_scale_from_bottom_with_bias_has_only_the_bias_blob():
    layer = build('name: "s" type: "Scale" scale_param { axis: 1 bias_term: true }',
                  [(N, C, H, W), (C, H)])
    assert layer.weight is None
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == [(C, H)]
    assert layer.output_shapes([(N, C, H, W), (C, H)]) == [(N, C, H, W)]
    x, s = torch.randn(N, C, H, W), torch.randn(C, H)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(C, H))
    torch.testing.assert_close(layer(x, s), x * s[..., None] + layer.bias[..., None])
    assert "scale from bottom 1" in repr(layer) and "bias_term=True" in repr(layer)


def test_scalar_second_bottom_ignores_axis():
    scale = build('name: "s" type: "Scale" scale_param { axis: 2 }', [(N, C, H), ()])
    bias = build('name: "b" type: "Bias" bias_param { axis: 2 }', [(N, C, H), ()])
    x = torch.randn(N, C, H)
    torch.testing.assert_close(scale(x, torch.tensor(3.0)), 3 * x)
    torch.testing.assert_close(bias(x, torch.tensor(3.0)), x + 3)
    assert scale.caffe_blobs() == [] and bias.caffe_blobs() == []


def test_gradcheck_learned_and_bottom_operands():
    x = torch.randn(N, C, 4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(C, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Scale(axis=1).double(), (x, s))
    assert torch.autograd.gradcheck(Bias(axis=-3).double(), (x, s))
    learned = Scale((4, 3), axis=2, bias_term=True).double()
    with torch.no_grad():
        learned.weight.normal_()
        learned.bias.normal_()
    assert torch.autograd.gradcheck(lambda t, w, b: torch.func.functional_call(
        learned, {"weight": w, "bias": b}, (t,)), (x, learned.weight, learned.bias))


def test_parameter_gradients_sum_over_broadcast_axes():
    layer = Scale((C,), bias_term=True).double()
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    dy = torch.randn(N, C, H, W, dtype=torch.float64)
    layer(x).backward(dy)
    torch.testing.assert_close(layer.weight.grad, (x * dy).sum(dim=(0, 2, 3)))
    torch.testing.assert_close(layer.bias.grad, dy.sum(dim=(0, 2, 3)))


@pytest.mark.parametrize("text, bottoms, message", [
    ('name: "s1" type: "Scale" scale_param { axis: 2 num_axes: 3 }', [(N, C, H, W)],
     "runs past"),
    ('name: "s1" type: "Scale" scale_param { axis: 4 }', [(N, C, H, W)], "axis 4"),
    ('name: "s1" type: "Scale" scale_param { num_axes: -2 }', [(N, C, H, W)], "num_axes -2"),
    ('name: "b1" type: "Bias" bias_param { axis: -5 }', [(N, C, H, W)], "axis -5"),
])
def test_bad_parameters_raise_shape_errors(text, bottoms, message):
    with pytest.raises(ShapeError, match=message):
        build(text, bottoms)


def test_mismatched_operands_raise_shape_errors():
    scale = build('name: "s2" type: "Scale"', [(N, C, H, W), (C,)])
    with pytest.raises(ShapeError, match="s2.*must match bottom"):
        scale.output_shapes([(N, C, H, W), (H,)])
    with pytest.raises(ShapeError, match="s2.*must match bottom"):
        scale(torch.zeros(N, C, H, W), torch.zeros(C + 1))
    with pytest.raises(ShapeError, match="2 bottom"):
        scale.output_shapes([(N, C, H, W)])
    learned = build('name: "s3" type: "Scale" scale_param { bias_term: true }', [(N, C, H)])
    with pytest.raises(ShapeError, match="s3.*1 bottom"):
        learned.output_shapes([(N, C, H), (C,)])
    with pytest.raises(ShapeError, match="s3"):
        learned(torch.zeros(N, C + 1, H))
    bias = build('name: "b2" type: "Bias" bias_param { axis: 2 num_axes: 2 }', [(N, C, H, W)])
    with pytest.raises(ShapeError, match="b2"):
        bias.output_shapes([(N, C, W, H)])
    assert repr(bias) == "Bias(shape=(7, 3), axis=2)"
