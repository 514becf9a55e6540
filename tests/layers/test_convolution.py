"""Convolution and Deconvolution: parameters, blob layout, shapes, math against loops and Caffe."""


import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import CaffeLayersError, ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.convolution import Convolution, Deconvolution
from caffelayers.proto import caffe_pb2
from caffelayers.verify import verify_case
from caffelayers.registry import LAYERS


def build(type_: str, text: str, shape, bottoms: int = 1, fill: bool = True):
    param = text_format.Parse(f"name: 'conv' type: '{type_}' convolution_param {{ {text} }}",
                              caffe_pb2.LayerParameter())
    param.bottom.extend(f"b{i}" for i in range(bottoms))
    param.top.extend(f"t{i}" for i in range(bottoms))
    ctx = BuildContext(fill=fill, generator=torch.Generator().manual_seed(0))
    layer = LAYERS[type_].from_caffe(param, [tuple(shape)] * bottoms, ctx)
    layer.layer_name = "conv"
    return layer


def random_blobs(layer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blob in layer.caffe_blobs():
            blob.copy_(torch.randn(blob.shape, generator=generator))


# -- loops written from Caffe's definitions --------------------------------------------------
def conv_loops(x, weight, bias, stride, pad, dilation, group):
    num, channels, height, width = x.shape
    outputs, _, kh, kw = weight.shape
    out_h = (height + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (width + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    cin, cout = channels // group, outputs // group
    padded = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    top = np.zeros((num, outputs, out_h, out_w))
    for o in range(outputs):
        g = o // cout
        for i in range(out_h):
            for j in range(out_w):
                for a in range(kh):
                    for b in range(kw):
                        pixels = padded[:, g * cin:(g + 1) * cin,
                                        i * stride[0] + a * dilation[0],
                                        j * stride[1] + b * dilation[1]]
                        top[:, o, i, j] += pixels @ weight[o, :, a, b]
        if bias is not None:
            top[:, o] += bias[o]
    return top


def deconv_loops(x, weight, bias, stride, pad, dilation, group):
    """Each input pixel scatters its weighted kernel; then the outer ``pad`` is cut off."""
    num, channels, height, width = x.shape
    _, cout, kh, kw = weight.shape
    full_h = stride[0] * (height - 1) + dilation[0] * (kh - 1) + 1
    full_w = stride[1] * (width - 1) + dilation[1] * (kw - 1) + 1
    cin = channels // group
    full = np.zeros((num, cout * group, full_h, full_w))
    for c in range(channels):
        g = c // cin
        for i in range(height):
            for j in range(width):
                for a in range(kh):
                    for b in range(kw):
                        full[:, g * cout:(g + 1) * cout, i * stride[0] + a * dilation[0],
                             j * stride[1] + b * dilation[1]] += \
                            x[:, c, i, j, None] * weight[c, :, a, b][None, :]
    top = full[:, :, pad[0]:full_h - pad[0], pad[1]:full_w - pad[1]]
    return top if bias is None else top + bias[None, :, None, None]


def test_convolution_matches_loops_with_group_dilation_and_rectangles():
    shape = (2, 4, 9, 7)
    layer = build("Convolution", "num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 "
                  "stride_w: 1 pad_h: 1 pad_w: 2 dilation: 2", shape).double()
    random_blobs(layer)
    assert layer.weight.shape == (6, 2, 3, 2)
    x = torch.randn(shape, dtype=torch.float64)
    top = layer(x)
    expected = conv_loops(x.numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy(),
                          (2, 1), (1, 2), (2, 2), 2)
    assert layer.output_shapes([shape]) == [expected.shape] == [(2, 6, 4, 9)]
    np.testing.assert_allclose(top.detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("text,shape,expected_shape", [
    ("num_output: 6 group: 2 kernel_size: 3 stride: 2", (1, 4, 3, 4), (1, 6, 7, 9)),
    ("num_output: 3 kernel_h: 4 kernel_w: 3 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 2 "
     "dilation: 1 dilation: 2", (2, 5, 4, 3), (2, 3, 8, 7)),
])
def test_deconvolution_matches_loops(text, shape, expected_shape):
    layer = build("Deconvolution", text, shape).double()
    random_blobs(layer, seed=1)
    x = torch.randn(shape, dtype=torch.float64)
    p = layer
    expected = deconv_loops(x.numpy(), p.weight.detach().numpy(), p.bias.detach().numpy(),
                            p.stride, p.pad, p.dilation, p.group)
    assert layer.output_shapes([shape]) == [expected.shape] == [expected_shape]
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_deconvolution_weight_is_input_channels_first_with_groups():
    layer = build("Deconvolution", "num_output: 6 kernel_h: 3 kernel_w: 2 group: 3",
                  (1, 9, 4, 5))
    assert layer.weight.shape == (9, 2, 3, 2)
    assert layer.bias.shape == (6,)
    # Group g of the output sees only group g of the input.
    layer = layer.double()
    random_blobs(layer)
    x = torch.zeros(1, 9, 4, 5, dtype=torch.float64)
    x[:, 3:6] = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    top = layer(x) - layer.bias.detach()[None, :, None, None]
    assert top[:, [0, 1, 4, 5]].abs().max() == 0 and top[:, 2:4].abs().max() > 0


def test_deconvolution_output_size_formula():
    # stride * (in - 1) + dilation * (k - 1) + 1 - 2 * pad, per axis.
    layer = build("Deconvolution", "num_output: 2 kernel_h: 4 kernel_w: 3 stride_h: 2 "
                  "stride_w: 3 pad_h: 1 pad_w: 0 dilation: 2", (1, 3, 5, 6))
    assert layer.output_shapes([(1, 3, 5, 6)]) == [(1, 2, 2 * 4 + 2 * 3 + 1 - 2,
                                                   3 * 5 + 2 * 2 + 1)]
    assert layer(torch.randn(1, 3, 5, 6)).shape == (1, 2, 13, 20)


@pytest.mark.parametrize("type_", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("shape,text", [
    ((2, 3, 11), "kernel_size: 3 stride: 2 pad: 1"),
    ((2, 3, 7, 5, 6), "kernel_size: 3 kernel_size: 1 kernel_size: 2 stride: 2 pad: 1 pad: 0 "
                      "pad: 1"),
])
def test_nd_spatial(type_, shape, text):
    layer = build(type_, f"num_output: 4 {text}", shape)
    assert layer.weight.dim() == len(shape)
    top = layer(torch.randn(shape))
    assert layer.output_shapes([shape]) == [tuple(top.shape)]


def test_several_bottoms_share_the_weights():
    layer = build("Convolution", "num_output: 2 kernel_size: 3 pad: 1", (2, 3, 5, 4), bottoms=2)
    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    top_a, top_b = layer(a, b)
    torch.testing.assert_close(top_b, layer(b))
    assert layer.output_shapes([(2, 3, 5, 4)] * 2) == [(2, 2, 5, 4)] * 2
    with pytest.raises(ShapeError, match="same shape"):
        layer.output_shapes([(2, 3, 5, 4), (1, 3, 5, 4)])


def test_fillers_and_no_bias():
    layer = build("Convolution", "num_output: 4 kernel_size: 2 bias_term: false "
                  "weight_filler { type: 'constant' value: 0.25 }", (1, 2, 3, 3))
    assert layer.bias is None and len(layer.caffe_blobs()) == 1
    assert (layer.weight == 0.25).all()
    layer = build("Convolution", "num_output: 4 kernel_size: 2 bias_filler { type: 'constant' "
                  "value: 3 }", (1, 2, 3, 3))
    assert (layer.bias == 3).all() and (layer.weight == 0).all()  # Caffe's default: constant 0


@pytest.mark.parametrize("type_", ["Convolution", "Deconvolution"])
def test_gradcheck(type_):
    shape = (2, 4, 5, 3)
    layer = build(type_, "num_output: 2 group: 2 kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 "
                  "dilation: 1 dilation: 2", shape).double()
    random_blobs(layer)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_extra_repr():
    text = repr(build("Convolution", "num_output: 4 kernel_size: 3 group: 2 stride: 2 "
                      "bias_term: false", (1, 2, 5, 5)))
    assert "stride=(2, 2)" in text and "group=2" in text and "bias_term=False" in text
    assert "pad" not in text and "dilation" not in text


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,shape,message", [
    ("num_output: 5 group: 2 kernel_size: 3", (1, 4, 5, 5), "not a multiple of group"),
    ("num_output: 4 axis: 2 kernel_size: 3", (1, 4, 5, 5), "axis 2"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 4, 5, 5), "not both"),
    ("num_output: 4 kernel_h: 3", (1, 4, 5, 5), "both kernel_h and kernel_w"),
    ("num_output: 4 kernel_h: 3 kernel_w: 3", (1, 4, 5, 5, 5), "only be used for 2-D"),
    ("num_output: 4", (1, 4, 5, 5), "kernel_size .* is required"),
    ("num_output: 4 kernel_size: 3 stride: 0", (1, 4, 5, 5), "stride must be at least 1"),
    ("num_output: 4 kernel_size: 3 stride_h: 2", (1, 4, 5, 5), "stride must be at least 1"),
    ("num_output: 0 kernel_size: 3", (1, 4, 5, 5), "num_output and group"),
])
def test_bad_parameters(text, shape, message):
    with pytest.raises(UnsupportedParameterError, match=f"'conv' \\(Convolution\\).*{message}"):
        build("Convolution", text, shape)


def test_kernel_count_must_match_spatial_axes():
    with pytest.raises(CaffeLayersError, match="'conv'.*kernel_size"):
        build("Convolution", "num_output: 4 kernel_size: 3 kernel_size: 2 kernel_size: 1",
              (1, 4, 5, 5))


def test_negative_axis_naming_the_channels_is_accepted():
    layer = build("Convolution", "num_output: 2 kernel_size: 3 axis: -3", (1, 4, 5, 5))
    assert layer.output_shapes([(1, 4, 5, 5)]) == [(1, 2, 3, 3)]


def test_channels_not_divisible_by_group_is_a_shape_error():
    with pytest.raises(ShapeError, match="'conv' \\(Deconvolution\\).*multiple of group 2"):
        build("Deconvolution", "num_output: 4 group: 2 kernel_size: 3", (1, 3, 5, 5))


def test_kernel_larger_than_padded_input():
    layer = build("Convolution", "num_output: 2 kernel_h: 3 kernel_w: 5 pad: 1", (1, 2, 4, 4))
    with pytest.raises(ShapeError, match="'conv'.*leaves no output"):
        layer.output_shapes([(1, 2, 4, 2)])
    with pytest.raises(ShapeError, match="'conv'.*dilation"):
        build("Convolution", "num_output: 2 kernel_size: 3 dilation: 3", (1, 2, 6, 6)) \
            .output_shapes([(1, 2, 6, 6)])


def test_wrong_channels_or_rank_is_a_shape_error():
    layer = build("Convolution", "num_output: 2 kernel_size: 3", (1, 4, 5, 5))
    with pytest.raises(ShapeError, match="N x 4 x 2 spatial axes"):
        layer.output_shapes([(1, 3, 5, 5)])
    with pytest.raises(ShapeError, match="1 to 3 spatial axes"):
        build("Convolution", "num_output: 2 kernel_size: 1", (4, 5))


def test_init_rejects_group_mismatch():
    with pytest.raises(UnsupportedParameterError, match="group 3"):
        Convolution(4, 6, 3, group=3)
    assert Deconvolution(4, 6, (3, 2), group=2).weight.shape == (4, 3, 3, 2)


# -- Caffe's own numbers -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["conv_basic", "conv_rect", "conv_group_dilation_nobias",
                                  "deconv_group", "deconv_stride2"])
def test_fixture(cases_dir, case):
    result = verify_case(cases_dir / case)
    assert result.passed, "; ".join(check.describe() for check in result.failures)
