"""InnerProduct: axis, transpose, bias, fillers, shape errors, against numpy and Caffe."""


import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.inner_product import InnerProduct
from caffelayers.proto import caffe_pb2
from caffelayers.verify import verify_case


def build(text: str, shape, fill: bool = True):
    param = text_format.Parse(f"name: 'fc' type: 'InnerProduct' inner_product_param {{ {text} }}",
                              caffe_pb2.LayerParameter())
    layer = InnerProduct.from_caffe(param, [tuple(shape)], BuildContext(fill=fill))
    layer.layer_name = "fc"
    return layer


def randomize(layer):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blob in layer.caffe_blobs():
            blob.copy_(torch.randn(blob.shape, generator=generator))
    return layer


@pytest.mark.parametrize("axis,expected", [(1, (2, 4)), (2, (2, 5, 4)), (-1, (2, 5, 7, 4)),
                                           (0, (4,))])
def test_flattens_from_axis(axis, expected):
    shape = (2, 5, 7, 3)
    layer = randomize(build(f"num_output: 4 axis: {axis}", shape)).double()
    x = torch.randn(shape, dtype=torch.float64)
    start = axis % 4
    assert layer.weight.shape == (4, int(np.prod(shape[start:])))
    assert layer.output_shapes([shape]) == [expected]
    flat = x.numpy().reshape(int(np.prod(shape[:start])), -1)
    reference = flat @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), reference.reshape(expected),
                               rtol=1e-12)


def test_transpose_stores_the_weight_k_by_n():
    shape = (2, 5, 7, 3)
    plain = randomize(build("num_output: 4", shape))
    transposed = build("num_output: 4 transpose: true", shape)
    assert transposed.weight.shape == (105, 4)
    with torch.no_grad():
        transposed.weight.copy_(plain.weight.t())
        transposed.bias.copy_(plain.bias)
    x = torch.randn(shape)
    torch.testing.assert_close(transposed(x), plain(x))


def test_no_bias_and_fillers():
    layer = build("num_output: 3 bias_term: false weight_filler { type: 'constant' value: 2 }",
                  (2, 4))
    assert layer.bias is None and layer.caffe_blobs() == [layer.weight]
    torch.testing.assert_close(layer(torch.ones(2, 4)), torch.full((2, 3), 8.0))
    layer = build("num_output: 3 bias_filler { type: 'constant' value: 0.5 }", (2, 4))
    assert (layer.bias == 0.5).all() and (layer.weight == 0).all()  # Caffe's default filler
    layer = build("num_output: 3 weight_filler { type: 'constant' value: 2 }", (2, 4),
                  fill=False)
    assert (layer.weight == 0).all()


@pytest.mark.parametrize("text", ["num_output: 4", "num_output: 4 transpose: true axis: 2",
                                  "num_output: 4 bias_term: false"])
def test_gradcheck(text):
    shape = (2, 5, 3)
    layer = randomize(build(text, shape)).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_extra_repr():
    assert repr(build("num_output: 4 axis: 2 transpose: true bias_term: false", (2, 3, 5))) == \
        "InnerProduct(in_features=5, num_output=4, bias_term=False, axis=2, transpose=True)"


def test_wrong_feature_count_is_a_shape_error():
    layer = build("num_output: 4", (2, 5, 3))
    with pytest.raises(ShapeError, match="'fc' \\(InnerProduct\\).*hold 12 values.*expects 15"):
        layer.output_shapes([(2, 4, 3)])


def test_axis_out_of_range_is_a_shape_error():
    with pytest.raises(ShapeError, match="'fc'.*axis 3"):
        build("num_output: 4 axis: 3", (2, 5, 3))


def test_num_output_is_required():
    with pytest.raises(UnsupportedParameterError, match="'fc'.*num_output"):
        build("bias_term: false", (2, 5))


@pytest.mark.parametrize("case", ["ip_basic", "ip_axis2", "ip_transpose_nobias"])
def test_fixture(cases_dir, case):
    result = verify_case(cases_dir / case)
    assert result.passed, "; ".join(check.describe() for check in result.failures)
