"""Eltwise: Caffe's reference cases, coefficients, MAX's tie rule and PROD's gradients."""

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.eltwise import Eltwise
from caffelayers.proto import caffe_pb2
from caffelayers.verify import verify_case

CASES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
SHAPE = (2, 5, 7, 3)
SMALL = (2, 5, 3)


def build(text, bottoms=2, shape=SHAPE):
    param = text_format.Parse('name: "e" type: "Eltwise" ' + text, caffe_pb2.LayerParameter())
    module = Eltwise.from_caffe(param, [shape] * bottoms, BuildContext())
    module.layer_name = param.name
    return module


def bottoms(count, shape=SMALL, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, dtype=torch.float64, generator=generator).requires_grad_(True)
            for _ in range(count)]


@pytest.mark.parametrize("case", ["eltwise_max", "eltwise_prod", "eltwise_sum_coeff"])
def test_matches_caffe_reference(case):
    result = verify_case(CASES_DIR / case)
    assert result.passed, "\n".join([c.describe() for c in result.failures] + [result.summary])


def test_sum_uses_one_coefficient_per_bottom():
    layer = build("eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }", 3)
    a, b, c = bottoms(3)
    torch.testing.assert_close(layer(a, b, c), a - 0.5 * b + 2 * c)
    assert torch.autograd.gradcheck(layer, (a, b, c))
    layer(a, b, c).backward(torch.ones(SMALL, dtype=torch.float64))
    assert b.grad.eq(-0.5).all() and c.grad.eq(2).all()


def test_sum_is_the_default_with_unit_coefficients():
    layer = build("")
    a, b = bottoms(2)
    assert layer.operation == "SUM"
    torch.testing.assert_close(layer(a, b), a + b)


def test_prod_stable_gradient_is_the_true_one():
    layer = build("eltwise_param { operation: PROD }", 3)
    a, b, c = bottoms(3)
    torch.testing.assert_close(layer(a, b, c), a * b * c)
    assert torch.autograd.gradcheck(layer, (a, b, c))
    zero = torch.zeros(SMALL, dtype=torch.float64, requires_grad=True)
    layer(zero, b, c).sum().backward()
    torch.testing.assert_close(zero.grad, (b * c).detach())


def test_prod_unstable_gradient_divides_the_product_as_caffe():
    layer = build("eltwise_param { operation: PROD stable_prod_grad: false }", 3)
    a, b, c = bottoms(3)
    assert torch.autograd.gradcheck(layer, (a, b, c))  # no zero bottom: the true gradient
    a = torch.tensor([0.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0, 0.0], requires_grad=True)
    layer(a, b, torch.tensor([5.0, 7.0])).sum().backward()
    # top / a = 0 / 0 where a is 0: Caffe's NaN, not the true 15.
    assert torch.isnan(a.grad[0]) and torch.isnan(b.grad[1])
    assert a.grad[1] == 0 and b.grad[0] == 0


def test_max_gradient_goes_to_the_winner():
    layer = build("eltwise_param { operation: MAX }", 3)
    a, b, c = bottoms(3)
    top = layer(a, b, c)
    torch.testing.assert_close(top, torch.maximum(torch.maximum(a, b), c))
    assert torch.autograd.gradcheck(layer, (a, b, c))
    upstream = torch.randn(SMALL, dtype=torch.float64)
    top.backward(upstream)
    winner = torch.stack([a, b, c]).argmax(dim=0)
    for index, bottom in enumerate((a, b, c)):
        torch.testing.assert_close(bottom.grad, upstream * (winner == index))


def test_max_ties_follow_caffes_comparisons():
    """Bottom 0 beats bottom 1 only when strictly greater; later bottoms likewise."""
    layer = build("eltwise_param { operation: MAX }", 3)
    a = torch.tensor([1.0, 1.0, 2.0, 0.0], requires_grad=True)
    b = torch.tensor([1.0, 1.0, 1.0, 3.0], requires_grad=True)
    c = torch.tensor([0.0, 1.0, 2.0, 3.0], requires_grad=True)
    layer(a, b, c).backward(torch.ones(4))
    assert a.grad.tolist() == [0.0, 0.0, 1.0, 0.0]  # a tie of 0 and 1 goes to 1
    assert b.grad.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert c.grad.tolist() == [0.0, 0.0, 0.0, 0.0]  # a later tie keeps the earlier winner


def test_coefficients_are_ignored_by_max():
    layer = build("eltwise_param { operation: MAX coeff: 2 coeff: 3 }")
    a, b = bottoms(2)
    torch.testing.assert_close(layer(a, b), torch.maximum(a, b))


@pytest.mark.parametrize("shapes, match", [
    ([SHAPE], "two or more bottoms"),
    ([SHAPE, (2, 5, 3, 7)], "one shape"),
    ([SHAPE, SHAPE, SHAPE], "one bottom per coeff"),
])
def test_shape_errors(shapes, match):
    layer = build("eltwise_param { coeff: 1 coeff: 2 }" if len(shapes) == 3 else "")
    with pytest.raises(ShapeError, match="'e'.*" + match):
        layer.output_shapes(shapes)


def test_coefficients_with_prod_are_refused():
    with pytest.raises(UnsupportedParameterError, match="'e'.*only for SUM"):
        build("eltwise_param { operation: PROD coeff: 1 coeff: 2 }")
    with pytest.raises(UnsupportedParameterError, match="operation 'DIV'"):
        Eltwise("DIV")


def test_extra_repr():
    assert repr(Eltwise()) == "Eltwise(operation=SUM)"
    assert "coeff=[1.0, -0.5]" in repr(Eltwise("SUM", [1, -0.5]))
    assert "stable_prod_grad=False" in repr(Eltwise("PROD", stable_prod_grad=False))
