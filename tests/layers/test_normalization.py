"""BatchNorm and MVN: float64 references, running statistics, Caffe's quirks."""


import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.normalization import MVN, BatchNorm
from caffelayers.proto import caffe_pb2

N, C, H, W = 2, 5, 7, 3


def layer_param(text):
    return text_format.Parse(text, caffe_pb2.LayerParameter())


# -- BatchNorm ---------------------------------------------------------------------------------

def numpy_batch_norm(x, mean, var, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


def test_batch_stats_forward_and_running_update():
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.0, (N, C, H, W))
    layer = BatchNorm(C, eps=1e-3, moving_average_fraction=0.9).double()
    start_mean, start_var = rng.normal(size=C), rng.uniform(1, 2, C)
    with torch.no_grad():
        layer.mean_sum.copy_(torch.from_numpy(start_mean))
        layer.variance_sum.copy_(torch.from_numpy(start_var))
        layer.scale_factor.fill_(2.0)
    y = layer(torch.from_numpy(x))
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))  # biased, for normalizing
    np.testing.assert_allclose(y.numpy(), numpy_batch_norm(x, mean, var, 1e-3), rtol=1e-12)
    m = N * H * W
    np.testing.assert_allclose(layer.scale_factor.numpy(), [2.0 * 0.9 + 1])
    np.testing.assert_allclose(layer.mean_sum.numpy(), start_mean * 0.9 + mean, rtol=1e-12)
    np.testing.assert_allclose(layer.variance_sum.numpy(),
                               start_var * 0.9 + var * m / (m - 1), rtol=1e-12)
    np.testing.assert_allclose(layer.running_mean.numpy(), layer.mean_sum.numpy() / 2.8)


def test_global_stats_divide_by_scale_factor():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, C, H, W))
    mean_sum, var_sum = rng.normal(size=C), rng.uniform(1, 3, C)
    layer = BatchNorm(C, use_global_stats=True).double()
    layer.load_caffe_blobs([mean_sum, var_sum, np.array([0.5])])
    y = layer(torch.from_numpy(x))
    np.testing.assert_allclose(y.numpy(), numpy_batch_norm(x, mean_sum / 0.5, var_sum / 0.5, 1e-5),
                               rtol=1e-12)
    # Global statistics never change the stored blobs.
    np.testing.assert_allclose(layer.mean_sum.numpy(), mean_sum)


def test_zero_scale_factor_means_zero_statistics():
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    layer = BatchNorm(C, use_global_stats=True).double()
    layer.load_caffe_blobs([np.ones(C), np.ones(C), np.zeros(1)])
    torch.testing.assert_close(layer(x), x / np.sqrt(1e-5))


def test_two_axis_bottom_and_single_sample_has_no_bias_correction():
    x = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    layer = BatchNorm(3).double()
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(x))  # one sample per channel: x - mean = 0
    torch.testing.assert_close(layer.variance_sum, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(layer.mean_sum, x[0])


@pytest.mark.parametrize("global_stats", [False, True])
def test_gradcheck(global_stats):
    layer = BatchNorm(C, eps=0.1, use_global_stats=global_stats).double()
    layer.load_caffe_blobs([np.linspace(-1, 1, C), np.linspace(1, 2, C), np.array([1.5])])
    x = torch.randn(N, C, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_use_global_stats_follows_phase_unless_set():
    shapes = [(N, C, H, W)]
    plain = layer_param('name: "bn" type: "BatchNorm"')
    assert BatchNorm.from_caffe(plain, shapes, BuildContext(phase="TEST")).use_global_stats
    assert not BatchNorm.from_caffe(plain, shapes, BuildContext(phase="TRAIN")).use_global_stats
    forced = layer_param('name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: false '
                         'eps: 0.01 moving_average_fraction: 0.5 }')
    layer = BatchNorm.from_caffe(forced, shapes, BuildContext(phase="TEST"))
    assert not layer.use_global_stats
    assert layer.eps == pytest.approx(0.01) and layer.moving_average_fraction == 0.5
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == [(C,), (C,), (1,)]
    assert "eps=0.01" in repr(layer) and "moving_average_fraction=0.5" in repr(layer)


def test_default_eps_is_not_repeated_in_repr():
    layer = BatchNorm.from_caffe(layer_param('name: "bn" type: "BatchNorm"'), [(N, C)],
                                 BuildContext(phase="TEST"))
    assert repr(layer) == "BatchNorm(5, use_global_stats=True)"


@pytest.mark.parametrize("shape", [(C,), (N, C + 1, H)])
def test_batch_norm_shape_errors(shape):
    layer = BatchNorm(C)
    layer.layer_name = "bn1"
    with pytest.raises(ShapeError, match="bn1"):
        layer.output_shapes([shape])
    with pytest.raises(ShapeError, match="bn1"):
        layer(torch.zeros(shape))


# -- MVN ---------------------------------------------------------------------------------------

def numpy_mvn(x, normalize_variance=True, across_channels=False, eps=1e-9):
    axes = (1, 2, 3) if across_channels else (2, 3)
    centred = x - x.mean(axis=axes, keepdims=True)
    if not normalize_variance:
        return centred
    return centred / (np.sqrt((centred ** 2).mean(axis=axes, keepdims=True)) + eps)


@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("across_channels", [True, False])
def test_mvn_forward(normalize_variance, across_channels):
    x = np.random.default_rng(2).normal(3.0, 2.0, (N, C, H, W))
    layer = MVN(normalize_variance, across_channels, eps=0.5)
    y = layer(torch.from_numpy(x))
    np.testing.assert_allclose(y.numpy(), numpy_mvn(x, normalize_variance, across_channels, 0.5),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("across_channels", [True, False])
def test_mvn_backward_is_caffes(across_channels):
    """Caffe's gradient (dy - mean(dy) - y mean(dy y)) / (std + eps), not the exact one."""
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(N, C, H, W)), rng.normal(size=(N, C, H, W))
    eps = 0.5  # large, so that Caffe's gradient differs visibly from the exact one
    xt = torch.from_numpy(x).requires_grad_()
    y = MVN(across_channels=across_channels, eps=eps)(xt)
    y.backward(torch.from_numpy(dy))
    axes = (1, 2, 3) if across_channels else (2, 3)
    yn = numpy_mvn(x, True, across_channels, eps)
    denominator = np.sqrt(((x - x.mean(axis=axes, keepdims=True)) ** 2)
                          .mean(axis=axes, keepdims=True)) + eps
    expected = (dy - dy.mean(axis=axes, keepdims=True)
                - yn * (dy * yn).mean(axis=axes, keepdims=True)) / denominator
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-10, atol=1e-12)

    def exact_mvn(t):
        centred = t - t.mean(dim=axes, keepdim=True)
        return centred / (centred.square().mean(dim=axes, keepdim=True).sqrt() + eps)

    exact = torch.autograd.functional.vjp(exact_mvn, torch.from_numpy(x), torch.from_numpy(dy))[1]
    assert not np.allclose(exact.numpy(), expected, rtol=1e-3)


@pytest.mark.parametrize("across_channels", [True, False])
def test_mvn_gradcheck_mean_only(across_channels):
    x = torch.randn(N, C, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(MVN(False, across_channels), (x,))


def test_mvn_pads_to_four_axes():
    """Caffe reshapes the top through num/channels/height/width: N x C becomes N x C x 1 x 1."""
    layer = MVN(across_channels=True)
    assert layer.output_shapes([(N, C)]) == [(N, C, 1, 1)]
    x = torch.randn(N, C, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (N, C, 1, 1)
    torch.testing.assert_close(y.reshape(N, C), torch.from_numpy(
        numpy_mvn(x.numpy().reshape(N, C, 1, 1), True, True)).reshape(N, C))
    # Per channel, each plane of a 2-D bottom holds one value and normalizes to 0.
    assert torch.equal(MVN()(x), torch.zeros(N, C, 1, 1, dtype=torch.float64))


def test_mvn_rejects_five_axes_and_reads_params():
    layer = MVN.from_caffe(layer_param('name: "m" type: "MVN" mvn_param { normalize_variance: '
                                       'false across_channels: true eps: 0.001 }'), [(N, C, H, W)],
                           BuildContext())
    assert (layer.normalize_variance, layer.across_channels) == (False, True)
    assert layer.eps == pytest.approx(1e-3)
    assert repr(layer) == "MVN(normalize_variance=False, across_channels=True, eps=0.001)"
    assert repr(MVN.from_caffe(layer_param('name: "m" type: "MVN"'), [(N, C)], BuildContext())) \
        == "MVN()"
    layer.layer_name = "mvn5"
    with pytest.raises(ShapeError, match="mvn5.*at most 4 axes"):
        layer.output_shapes([(N, C, H, W, 2)])


# -- NVCaffe's scale_bias ----------------------------------------------------------------------

def test_nvcaffe_scale_bias_blobs_in_nvcaffes_order():
    param = layer_param('name: "bn" type: "BatchNorm" batch_norm_param { scale_bias: true }')
    layer = BatchNorm.from_caffe(param, [(N, C, H, W)], BuildContext(phase="TEST"))
    assert layer.scale_bias and layer.use_global_stats
    # mean, variance, NVCaffe's variance correction (1), scale (1), shift (0).
    blobs = layer.caffe_blobs()
    assert [tuple(b.shape) for b in blobs] == [(C,), (C,), (1,), (C,), (C,)]
    assert blobs[2].tolist() == [1.0]
    assert blobs[3].tolist() == [1.0] * C and blobs[4].tolist() == [0.0] * C


def test_nvcaffe_a_filler_alone_turns_scale_bias_on_and_eps_has_a_floor():
    param = layer_param('name: "bn" type: "BatchNorm" batch_norm_param { eps: 1e-7 '
                        'use_global_stats: false scale_filler { type: "constant" value: 2 } }')
    layer = BatchNorm.from_caffe(param, [(N, C, H, W)], BuildContext(phase="TEST"))
    assert layer.scale_bias and layer.weight.tolist() == [2.0] * C
    assert layer.eps == 1e-5  # NVCaffe: max(eps, 1e-5)
    assert layer.use_global_stats  # NVCaffe: the phase decides, the field is not read


def test_nvcaffe_test_phase_reads_the_blobs_as_they_are():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, C, H, W))
    layer = BatchNorm(C, use_global_stats=True, scale_bias=True).double()
    mean, var = rng.normal(size=C), rng.uniform(0.5, 2, C)
    scale, shift = rng.normal(size=C), rng.normal(size=C)
    with torch.no_grad():
        for blob, value in zip(layer.caffe_blobs(), (mean, var, [7.0], scale, shift)):
            blob.copy_(torch.as_tensor(value))
    # Blob 2 (7 here) is NVCaffe's "variance correction", which its forward never reads.
    expected = numpy_batch_norm(x, mean, var, 1e-5) * scale.reshape(1, C, 1, 1) + \
        shift.reshape(1, C, 1, 1)
    np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), expected,
                               rtol=1e-12)


def test_nvcaffe_train_accumulates_its_moving_average():
    rng = np.random.default_rng(2)
    layer = BatchNorm(C, moving_average_fraction=0.9, scale_bias=True).double()
    batches = [rng.normal(i, 1 + i, (N, C, H, W)) for i in range(4)]
    stored_mean, stored_var = None, None
    for index, x in enumerate(batches):
        y = layer(torch.from_numpy(x))
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))  # biased, also stored
        np.testing.assert_allclose(y.detach().numpy(), numpy_batch_norm(x, mean, var, 1e-5),
                                   rtol=1e-12)
        # NVCaffe's CPU rule: the first two forwards copy, then blob = 0.9 blob + 0.1 batch.
        if index < 2:
            stored_mean, stored_var = mean, var
        else:
            stored_mean = 0.9 * stored_mean + 0.1 * mean
            stored_var = 0.9 * stored_var + 0.1 * var
        np.testing.assert_allclose(layer.mean_sum.numpy(), stored_mean, rtol=1e-12)
        np.testing.assert_allclose(layer.variance_sum.numpy(), stored_var, rtol=1e-12)


@pytest.mark.parametrize("global_stats", [False, True])
def test_nvcaffe_scale_bias_gradcheck(global_stats):
    layer = BatchNorm(C, use_global_stats=global_stats, scale_bias=True).double()
    with torch.no_grad():
        layer.variance_sum.fill_(1.5)
    x = torch.randn(N, C, 3, 2, dtype=torch.float64, requires_grad=True)

    def run(value, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (value,))

    weight = torch.linspace(0.5, 2, C, dtype=torch.float64, requires_grad=True)
    bias = torch.linspace(-1, 1, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x, weight, bias))
    assert "scale_bias=True" in repr(layer)
