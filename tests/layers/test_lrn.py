"""LRN: both norm regions against Caffe's definitions written as loops, and against Caffe."""


import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.lrn import LRN
from caffelayers.proto import caffe_pb2
from caffelayers.verify import verify_case


def build(text: str, shape=(2, 5, 7, 3)):
    param = text_format.Parse(f"name: 'norm' type: 'LRN' lrn_param {{ {text} }}",
                              caffe_pb2.LayerParameter())
    layer = LRN.from_caffe(param, [tuple(shape)], BuildContext())
    layer.layer_name = "norm"
    return layer


def across_loops(x, size, alpha, beta, k):
    channels = x.shape[1]
    half = (size - 1) // 2
    scale = np.full(x.shape, k, dtype=np.float64)
    for c in range(channels):
        for other in range(max(0, c - half), min(channels, c + half + 1)):
            scale[:, c] += alpha / size * x[:, other] ** 2
    return x * scale ** -beta


def within_loops(x, size, alpha, beta):
    half = (size - 1) // 2
    height, width = x.shape[2:]
    squares = np.pad(x ** 2, ((0, 0), (0, 0), (half, half), (half, half)))
    total = np.zeros(x.shape)
    for h in range(height):
        for w in range(width):
            total[:, :, h, w] = squares[:, :, h:h + size, w:w + size].sum(axis=(2, 3))
    return x * (1 + alpha * total / (size * size)) ** -beta


@pytest.mark.parametrize("size,channels", [(1, 5), (3, 5), (5, 5), (5, 2), (7, 4)])
def test_across_channels_matches_loops(size, channels):
    # C < n and edge channels: the missing neighbours count as zero, the divisor stays n.
    x = torch.randn(2, channels, 7, 3, dtype=torch.float64)
    # alpha and beta exact in float32, the proto's type.
    layer = build(f"local_size: {size} alpha: 0.25 beta: 0.625 k: 2", x.shape)
    np.testing.assert_allclose(layer(x).numpy(), across_loops(x.numpy(), size, 0.25, 0.625, 2.0),
                               rtol=1e-12)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_within_channel_matches_loops(size):
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64)
    layer = build(f"local_size: {size} alpha: 0.375 beta: 0.875 norm_region: WITHIN_CHANNEL",
                  x.shape)
    np.testing.assert_allclose(layer(x).numpy(), within_loops(x.numpy(), size, 0.375, 0.875),
                               rtol=1e-12)


def test_alpha_is_divided_by_local_size_and_k_is_added():
    # One nonzero channel of value 2 in a window of 3: scale = k + alpha / 3 * 4.
    x = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    x[0, 1] = 2.0
    top = build("local_size: 3 alpha: 0.75 beta: 0.5 k: 3")(x)
    assert top[0, 1].item() == pytest.approx(2.0 / (3 + 0.75 / 3 * 4) ** 0.5)


def test_within_channel_ignores_k_and_divides_by_the_padded_window():
    x = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    x[0, 0, 0, 0] = 3.0  # a corner: its 3x3 window holds 4 real pixels, the divisor is still 9
    one = build("local_size: 3 alpha: 0.9 beta: 0.75 norm_region: WITHIN_CHANNEL k: 1")(x)
    other = build("local_size: 3 alpha: 0.9 beta: 0.75 norm_region: WITHIN_CHANNEL k: 7")(x)
    assert torch.equal(one, other)
    assert one[0, 0, 0, 0].item() == pytest.approx(3.0 / (1 + 0.9 * 9 / 9) ** 0.75)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_gradcheck(region):
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    layer = build(f"local_size: 3 alpha: 0.5 beta: 0.75 k: 1.5 norm_region: {region}")
    assert torch.autograd.gradcheck(layer, (x,))


def test_extra_repr():
    assert repr(build("local_size: 3 alpha: 0.5 k: 2")) == \
        "LRN(local_size=3, alpha=0.5, beta=0.75, k=2)"
    assert "norm_region=WITHIN_CHANNEL" in repr(build("norm_region: WITHIN_CHANNEL"))


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_even_local_size_is_rejected(region):
    with pytest.raises(UnsupportedParameterError, match="'norm' \\(LRN\\).*odd"):
        build(f"local_size: 4 norm_region: {region}")


def test_bottom_must_be_4d():
    layer = build("local_size: 3")
    with pytest.raises(ShapeError, match="'norm' \\(LRN\\).*4 axes"):
        layer.output_shapes([(2, 5, 7)])
    with pytest.raises(ShapeError, match="'norm'"):
        layer(torch.randn(2, 5, 7))


@pytest.mark.parametrize("case", ["lrn_across", "lrn_within"])
def test_fixture(cases_dir, case):
    result = verify_case(cases_dir / case)
    assert result.passed, "; ".join(check.describe() for check in result.failures)
