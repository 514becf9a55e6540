"""Softmax: Caffe's fixtures, the default axis 1, negative axes, gradients, shape errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.softmax import Softmax
from caffelayers.proto import caffe_pb2
from caffelayers.verify import compare

CASES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
N, C, H, W = 2, 5, 7, 3


def from_text(text, bottom_shapes):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return Softmax.from_caffe(param, bottom_shapes, BuildContext())


def numpy_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("case", ["softmax_2d", "softmax_axis1"])
def test_fixture_case(case):
    """The cases' layers have no softmax_param: the default axis must be 1."""
    ref = np.load(CASES / case / "reference.npz")
    net = text_format.Parse((CASES / case / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    param = next(p for p in net.layer if p.name == "layer")
    x = torch.tensor(ref["input/x"], requires_grad=True)
    layer = Softmax.from_caffe(param, [tuple(x.shape)], BuildContext())
    y = layer(x)
    y.backward(torch.tensor(ref["iter0/top_diff/y"]))
    checks = [compare("data/y", y, ref["iter0/data/y"]),
              compare("diff/x", x.grad, ref["iter0/diff/x"])]
    assert [c.describe() for c in checks if not c.passed] == []


@pytest.mark.parametrize("text, axis", [("", 1), ("softmax_param { axis: -1 }", 3),
                                        ("softmax_param { axis: 2 }", 2),
                                        ("softmax_param { axis: 0 }", 0)])
def test_forward_along_axis(text, axis):
    layer = from_text(f'name: "sm" type: "Softmax" {text}', [(N, C, H, W)])
    x = np.random.default_rng(0).normal(scale=3.0, size=(N, C, H, W))
    y = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, numpy_softmax(x, axis), rtol=1e-12)
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-12)


def test_large_logits_stay_finite():
    x = torch.tensor([[1000.0, 0.0, -1000.0]])
    torch.testing.assert_close(Softmax()(x), torch.tensor([[1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("axis", [1, -2])
def test_gradcheck(axis):
    x = torch.randn(N, C, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Softmax(axis), (x,))


def test_shape_rule_and_errors():
    layer = Softmax(axis=-1)
    assert layer.output_shapes([(N, C, H)]) == [(N, C, H)]
    assert repr(layer) == "Softmax(axis=-1)" and repr(Softmax()) == "Softmax()"
    layer = Softmax(axis=2)
    layer.layer_name = "prob"
    with pytest.raises(ShapeError, match="prob.*axis 2"):
        layer.output_shapes([(N, C)])
    with pytest.raises(ShapeError, match="prob"):
        layer(torch.zeros(N, C))
