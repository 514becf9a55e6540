"""Reduction and ArgMax: Caffe's reference cases, shape rules, gradients and tie order."""

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.reduction import ArgMax, Reduction
from caffelayers.proto import caffe_pb2
from caffelayers.registry import layer_class
from caffelayers.verify import verify_case

CASES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
SHAPE = (2, 5, 7, 3)


def build(text, shape=SHAPE):
    param = text_format.Parse('name: "r" ' + text, caffe_pb2.LayerParameter())
    module = layer_class(param.type).from_caffe(param, [shape], BuildContext())
    module.layer_name = param.name
    return module


def randn(shape=SHAPE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("case", ["argmax_topk", "reduction_mean", "reduction_sumsq"])
def test_matches_caffe_reference(case):
    result = verify_case(CASES_DIR / case)
    assert result.passed, "\n".join([c.describe() for c in result.failures] + [result.summary])


# -- Reduction ------------------------------------------------------------------------------
@pytest.mark.parametrize("operation, reference", [
    ("SUM", lambda x: x.sum(dim=(2, 3))),
    ("ASUM", lambda x: x.abs().sum(dim=(2, 3))),
    ("SUMSQ", lambda x: (x * x).sum(dim=(2, 3))),
    ("MEAN", lambda x: x.mean(dim=(2, 3))),
])
def test_reduction_reduces_every_axis_from_axis_on(operation, reference):
    layer = build(f'type: "Reduction" reduction_param {{ operation: {operation} axis: 2 '
                  'coeff: -1.5 }')
    x = randn()
    assert layer.output_shapes([SHAPE]) == [(2, 5)]
    torch.testing.assert_close(layer(x), -1.5 * reference(x))
    small = randn((2, 5, 3)).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (small,))


def test_reduction_defaults_to_sum_over_everything():
    layer = build('type: "Reduction"')
    x = randn()
    y = layer(x)
    assert y.shape == () and layer.output_shapes([SHAPE]) == [()]
    torch.testing.assert_close(y, x.sum())
    assert Reduction(axis=-1).output_shapes([SHAPE]) == [(2, 5, 7)]


def test_reduction_asum_gradient_is_zero_at_zero():
    x = torch.tensor([[-2.0, 0.0, 3.0]], requires_grad=True)
    Reduction("ASUM", axis=1, coeff=2.0)(x).sum().backward()
    assert x.grad.tolist() == [[-2.0, 0.0, 2.0]]


def test_reduction_errors():
    layer = Reduction(axis=4)
    layer.layer_name = "r"
    with pytest.raises(ShapeError, match=r"'r'.*axis 4 must lie in \[-4, 4\)"):
        layer.output_shapes([SHAPE])
    with pytest.raises(UnsupportedParameterError, match="operation 'MAX'"):
        Reduction("MAX")


# -- ArgMax ---------------------------------------------------------------------------------
def test_argmax_per_sample_over_the_flattened_rest():
    x = randn()
    layer = build('type: "ArgMax" argmax_param { top_k: 3 }')
    assert layer.output_shapes([SHAPE]) == [(2, 1, 3, 1)]  # padded to the bottom's 4 axes
    y = layer(x)
    expected = x.reshape(2, -1).topk(3, dim=1).indices
    assert y.shape == (2, 1, 3, 1)
    assert torch.equal(y.reshape(2, 3), expected.to(y.dtype))


def test_argmax_per_sample_with_values():
    x = randn((2, 5, 7))
    layer = ArgMax(top_k=2, out_max_val=True)
    assert layer.output_shapes([(2, 5, 7)]) == [(2, 2, 2)]
    y = layer(x)
    best = x.reshape(2, -1).topk(2, dim=1)
    assert torch.equal(y[:, 0], best.indices.to(y.dtype))
    assert torch.equal(y[:, 1], best.values)
    assert ArgMax().output_shapes([(4, 6)]) == [(4, 1, 1)]
    assert ArgMax(out_max_val=True).output_shapes([(4, 3, 2, 2, 2)]) == [(4, 2, 1, 1, 1)]


@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_along_an_axis(out_max_val):
    x = randn()
    layer = build(f'type: "ArgMax" argmax_param {{ top_k: 2 axis: 2 out_max_val: '
                  f'{str(out_max_val).lower()} }}')
    assert layer.output_shapes([SHAPE]) == [(2, 5, 2, 3)]
    best = x.topk(2, dim=2)
    expected = best.values if out_max_val else best.indices.to(x.dtype)
    assert torch.equal(layer(x), expected)
    torch.testing.assert_close(ArgMax(axis=-1)(x), x.argmax(dim=-1, keepdim=True).to(x.dtype))


def test_argmax_ties_go_to_the_highest_position():
    """Caffe sorts (value, index) pairs with std::greater: equal values, larger index first."""
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0]])
    y = ArgMax(top_k=4, out_max_val=True)(x)
    assert y[0, 0].tolist() == [4.0, 3.0, 1.0, 2.0]
    assert y[0, 1].tolist() == [3.0, 3.0, 3.0, 2.0]
    columns = torch.tensor([[[5.0, 1.0], [5.0, 2.0], [4.0, 2.0]]])  # ties down axis 1
    assert ArgMax(axis=1)(columns).tolist() == [[[1.0, 2.0]]]


def test_argmax_has_no_gradient():
    x = randn().requires_grad_(True)
    assert not ArgMax(out_max_val=True)(x).requires_grad


def test_argmax_errors():
    with pytest.raises(ShapeError, match="'r'.*top_k = 106 elements per sample"):
        build('type: "ArgMax" argmax_param { top_k: 106 }').output_shapes([SHAPE])
    with pytest.raises(ShapeError, match="'r'.*top_k = 8 elements on axis 2"):
        build('type: "ArgMax" argmax_param { top_k: 8 axis: -2 }').output_shapes([SHAPE])
    with pytest.raises(UnsupportedParameterError, match="'r'.*top_k 0"):
        build('type: "ArgMax" argmax_param { top_k: 0 }')


def test_extra_repr():
    assert repr(Reduction()) == "Reduction(operation=SUM)"
    assert repr(Reduction("MEAN", 1, 2.0)) == "Reduction(operation=MEAN, axis=1, coeff=2.0)"
    assert repr(ArgMax()) == "ArgMax()"
    assert repr(ArgMax(2, True, 0)) == "ArgMax(top_k=2, out_max_val=True, axis=0)"
