"""ShuffleNet's ShuffleChannel, the MobileNet forks' depthwise convolutions and ReLU6, SENet's
Axpy: the forks' loops written out, gradients, and errors."""

import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.mobile import (
    Axpy,
    ConvolutionDepthwise,
    DepthwiseConvolution,
    ReLU6,
    ShuffleChannel,
)
from caffelayers.proto import caffe_pb2
from caffelayers.registry import layer_class

SHAPE = (2, 6, 7, 3)  # N, C, H, W distinct (C = 6 so that groups 2 and 3 divide it)


def build(text, bottom_shapes=(SHAPE,)):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    module = layer_class(param.type).from_caffe(param, list(bottom_shapes), BuildContext())
    module.layer_name = param.name
    return module


def randn(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# -- ShuffleChannel -----------------------------------------------------------------------
def caffe_shuffle(x, group):
    """farmingyard's Resize_cpu: input channel i * K + j goes to output j * group + i."""
    columns = x.shape[1] // group
    top = torch.empty_like(x)
    for i in range(group):
        for j in range(columns):
            top[:, j * group + i] = x[:, i * columns + j]
    return top


@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_shuffle_channel_is_caffes_permutation(group):
    layer = build(f'name: "s" type: "ShuffleChannel" shuffle_channel_param {{ group: {group} }}')
    x = randn(*SHAPE)
    assert torch.equal(layer(x), caffe_shuffle(x, group))
    flat = randn(2, 6)  # any rank from 2 on: the rest is one block per channel
    assert torch.equal(layer(flat), caffe_shuffle(flat, group))


def test_shuffle_channel_default_group_is_the_identity():
    x = randn(*SHAPE)
    assert torch.equal(build('name: "s" type: "ShuffleChannel"')(x), x)


def test_shuffle_channel_backward_is_the_inverse_permutation():
    x = randn(*SHAPE).requires_grad_(True)
    assert torch.autograd.gradcheck(ShuffleChannel(3), (x,))
    dy = randn(*SHAPE, seed=1)
    ShuffleChannel(2)(x).backward(dy)
    # Caffe's backward runs Resize_cpu with rows and columns swapped: a shuffle with C / g
    # groups, the inverse.
    assert torch.equal(x.grad, caffe_shuffle(dy, 3))
    assert torch.equal(caffe_shuffle(x.grad, 2), dy)


def test_shuffle_channel_errors():
    with pytest.raises(ShapeError, match="divisible by group 4"):
        ShuffleChannel(4).output_shapes([SHAPE])
    with pytest.raises(UnsupportedParameterError, match="'s'.*at least 1"):
        build('name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 0 }')


# -- Depthwise convolutions ---------------------------------------------------------------
DW_PARAM = ("convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 "
            "weight_filler { type: \"gaussian\" std: 1 } bias_filler { type: \"gaussian\" } }")


@pytest.mark.parametrize("text", [
    f'name: "dw" type: "DepthwiseConvolution" {DW_PARAM}',
    f'name: "dw" type: "DepthwiseConvolution" {DW_PARAM[:-1]} group: 6 }}',
    f'name: "dw" type: "ConvolutionDepthwise" {DW_PARAM}',
    # farmingyard's layer reads neither num_output nor group.
    ('name: "dw" type: "ConvolutionDepthwise" convolution_param { num_output: 99 group: 4 '
     'kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "gaussian" std: 1 } '
     'bias_filler { type: "gaussian" } }'),
])
def test_depthwise_is_one_filter_per_channel(text):
    layer = build(text).double()
    assert isinstance(layer, (DepthwiseConvolution, ConvolutionDepthwise))
    assert tuple(layer.weight.shape) == (6, 1, 3, 3) and tuple(layer.bias.shape) == (6,)
    assert layer.output_shapes([SHAPE]) == [(2, 6, 4, 2)]
    x = randn(*SHAPE)
    expected = torch.cat([F.conv2d(x[:, c:c + 1], layer.weight[c:c + 1], layer.bias[c:c + 1],
                                   stride=2, padding=1) for c in range(6)], dim=1)
    torch.testing.assert_close(layer(x), expected)


def test_depthwise_gradient():
    layer = DepthwiseConvolution(6, (3, 2), stride=(1, 2), pad=(1, 0)).double()
    with torch.no_grad():
        layer.weight.copy_(randn(6, 1, 3, 2, seed=2))
    assert torch.autograd.gradcheck(layer, (randn(2, 6, 4, 5).requires_grad_(True),))


@pytest.mark.parametrize("body, match", [
    ("num_output: 12 kernel_size: 3", "num_output 12 and group 6"),
    ("num_output: 6 group: 2 kernel_size: 3", "num_output 6 and group 2"),
    ("num_output: 6 group: 1 kernel_size: 3", "group 1 must both equal"),
])
def test_depthwise_convolution_refuses_what_its_gpu_kernel_cannot_run(body, match):
    with pytest.raises(UnsupportedParameterError, match=f"'dw'.*{match}"):
        build(f'name: "dw" type: "DepthwiseConvolution" convolution_param {{ {body} }}')


def test_convolution_depthwise_is_2d_only():
    with pytest.raises(ShapeError, match="2-D only"):
        build('name: "dw" type: "ConvolutionDepthwise" convolution_param { kernel_size: 3 }',
              [(2, 6, 9)])


# -- ReLU6 --------------------------------------------------------------------------------
def test_relu6_values_and_caffes_gradient_at_the_kinks():
    x = torch.tensor([-2.0, 0.0, 3.0, 6.0, 7.0], dtype=torch.float64, requires_grad=True)
    for slope in (0.0, 0.1):
        y = ReLU6(slope)(x)
        expected = [-0.2 * (slope / 0.1), 0.0, 3.0, 6.0, 6.0]
        torch.testing.assert_close(y.detach(), torch.tensor(expected, dtype=torch.float64))
        (grad,) = torch.autograd.grad(y.sum(), x)
        # (x > 0) + slope (x <= 0), times (x < 6): the slope at 0, nothing at 6.
        assert grad.tolist() == [slope, slope, 1.0, 0.0, 0.0]


def test_relu6_gradient_away_from_kinks():
    x = torch.tensor([-2.0, -0.5, 0.5, 3.0, 5.5, 8.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReLU6(0.2), (x,))


def test_relu6_reads_either_forks_slope_field():
    assert build('name: "r" type: "ReLU6"').negative_slope == 0.0
    assert abs(build('name: "r" type: "ReLU6" relu_param { negative_slope: 0.1 }')
               .negative_slope - 0.1) < 1e-7
    assert abs(build('name: "r" type: "ReLU6" relu6_param { negative_slope: 0.2 }')
               .negative_slope - 0.2) < 1e-7


# -- Axpy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_shape", [(2, 6), (2, 6, 1, 1)])
def test_axpy_values(scale_shape):
    scale, x, z = randn(*scale_shape), randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    layer = build('name: "a" type: "Axpy"', [scale_shape, SHAPE, SHAPE])
    assert layer.output_shapes([scale_shape, SHAPE, SHAPE]) == [SHAPE]
    expected = torch.empty(SHAPE, dtype=torch.float64)
    flat = scale.reshape(2, 6)
    for n in range(2):
        for c in range(6):
            expected[n, c] = flat[n, c] * x[n, c] + z[n, c]
    torch.testing.assert_close(layer(scale, x, z), expected)


def test_axpy_gradients():
    inputs = tuple(randn(*shape, seed=seed).requires_grad_(True)
                   for seed, shape in enumerate([(2, 6, 1, 1), (2, 6, 3, 2), (2, 6, 3, 2)]))
    assert torch.autograd.gradcheck(Axpy(), inputs)


@pytest.mark.parametrize("shapes", [
    [(2, 6), SHAPE],
    [(2, 5), SHAPE, SHAPE],
    [(2, 6, 2, 1), SHAPE, SHAPE],
    [(2, 6), SHAPE, (2, 6, 7, 4)],
])
def test_axpy_shape_errors(shapes):
    with pytest.raises(ShapeError, match="three bottoms"):
        Axpy().output_shapes(shapes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    x = torch.randn(SHAPE, device="cuda", requires_grad=True)
    scale = torch.randn(2, 6, device="cuda")
    for y in (ShuffleChannel(3).cuda()(x), ReLU6(0.1).cuda()(x),
              DepthwiseConvolution(6, 3, pad=1).cuda()(x), Axpy().cuda()(scale, x, x)):
        assert y.device.type == "cuda"
        y.sum().backward()
