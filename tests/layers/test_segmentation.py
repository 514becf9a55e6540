"""SegNet's Upsample and BN, PSPNet/DeepLab's Interp and BN: the forks' unit-test facts,
Caffe's loops written out as references, true (or the fork's own) gradients, and errors."""

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers import Net
from caffelayers.errors import LabelError, ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.pooling import Pooling
from caffelayers.layers.segmentation import BN, Interp, PSPNetBN, SegNetBN, Upsample, bn_variant
from caffelayers.proto import caffe_pb2
from caffelayers.registry import layer_class

SHAPE = (2, 5, 7, 3)  # N, C, H, W all distinct


def build(text, bottom_shapes=(SHAPE,), phase="TEST"):
    """The registered module for one prototxt ``layer { ... }`` body."""
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    module = layer_class(param.type).from_caffe(param, list(bottom_shapes),
                                                BuildContext(phase=phase))
    module.layer_name = param.name
    return module


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# -- Upsample -----------------------------------------------------------------------------
def test_upsample_forward_square_from_segnet_test():
    """caffe-segnet's TestForwardSquare: 4 x 3 planes [1 2; 9 4] with mask [2 5; 12 14]."""
    x = torch.tensor([[1.0, 2.0], [9.0, 4.0]]).expand(4, 3, 2, 2)
    mask = torch.tensor([[2.0, 5.0], [12.0, 14.0]]).expand(4, 3, 2, 2)
    layer = build('name: "up" type: "Upsample" upsample_param { scale: 2 }',
                  [(4, 3, 2, 2)] * 2)
    assert layer.output_shapes([(4, 3, 2, 2)] * 2) == [(4, 3, 4, 4)]
    expected = torch.tensor([[0.0, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [9, 0, 4, 0]])
    assert torch.equal(layer(x, mask), expected.expand(4, 3, 4, 4))


def test_upsample_setup_scale_h_and_w_from_segnet_test():
    layer = build('name: "up" type: "Upsample" upsample_param { scale_h: 2 scale_w: 3 }',
                  [(2, 3, 2, 2)] * 2)
    assert layer.output_shapes([(2, 3, 2, 2)] * 2) == [(2, 3, 4, 6)]


@pytest.mark.parametrize("size, pooled", [((4, 4), (2, 2)), ((5, 4), (3, 2)), ((7, 3), (4, 2))])
def test_upsample_undoes_max_pooling(size, pooled):
    """caffe-segnet's TestForwardFromPool and ...OddShape (4x4 and 5x4), and our 7x3: every
    nonzero of the top is the pooled input at that place, everything else is 0."""
    x = randn(2, 3, *size, dtype=torch.float32)
    top, mask = Pooling("MAX", 2, 2, mask_top=True)(x)
    assert top.shape[2:] == pooled
    layer = build(f'name: "up" type: "Upsample" upsample_param {{ upsample_h: {size[0]} '
                  f'upsample_w: {size[1]} }}', [tuple(top.shape)] * 2)
    y = layer(top, mask)
    kept = y != 0
    assert torch.equal(y[kept], x[kept])
    assert int((~kept).sum()) == (size[0] * size[1] - pooled[0] * pooled[1]) * 2 * 3


def test_upsample_pad_out_takes_one_row_off():
    layer = build('name: "up" type: "Upsample" upsample_param { scale: 2 pad_out_h: true }',
                  [(2, 5, 4, 2)] * 2)
    assert layer.output_shapes([(2, 5, 4, 2)] * 2) == [(2, 5, 7, 4)]
    x = randn(*SHAPE)
    top, mask = Pooling("MAX", 2, 2, mask_top=True)(x)  # 7x3 -> 4x2 (ceil)
    up = Upsample(2, pad_out=(True, True))
    assert torch.equal(up(top, mask), _unpool_loops(top, mask, 7, 3))


def _unpool_loops(x, mask, height, width):
    """SegNet's CPU loop: a zero top, then top[mask[i]] = x[i] in order."""
    num, channels = x.shape[:2]
    top = torch.zeros(num, channels, height * width, dtype=x.dtype)
    for n in range(num):
        for c in range(channels):
            for i, index in enumerate(mask[n, c].reshape(-1).tolist()):
                top[n, c, int(index)] = x[n, c].reshape(-1)[i]
    return top.view(num, channels, height, width)


@pytest.mark.parametrize("scale_h, scale_w", [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_upsample_gradient_as_in_segnet_test(scale_h, scale_w):
    """caffe-segnet's TestGradient: the mask maps each input to the top-left of its cell."""
    x = randn(2, 5, 3, 2).requires_grad_(True)
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(2), indexing="ij")
    mask = (rows * scale_h * 2 * scale_w + cols * scale_w).double().expand(2, 5, 3, 2)
    layer = Upsample((scale_h, scale_w))
    assert torch.autograd.gradcheck(lambda v: layer(v, mask), (x,))


def test_upsample_shared_target_keeps_the_later_value_and_gathers_every_gradient():
    """Overlapping pooling windows can name one position twice: Caffe's CPU loop keeps the
    later write, and its backward reads dy[mask[i]] for every input."""
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    mask = torch.tensor([[[[5.0, 5.0], [5.0, 0.0]]]])
    y = Upsample(2)(x, mask)
    assert y.view(-1).tolist() == [4.0, 0, 0, 0, 0, 3.0] + [0.0] * 10
    y.backward(torch.arange(16.0).view(1, 1, 4, 4))
    assert x.grad.view(-1).tolist() == [5.0, 5.0, 5.0, 0.0]


def test_upsample_overlapping_pool_matches_caffe_loops():
    x = randn(*SHAPE, dtype=torch.float32)
    top, mask = Pooling("MAX", 3, 2, 1, mask_top=True)(x)
    assert torch.equal(Upsample(size=(7, 3))(top, mask), _unpool_loops(top, mask, 7, 3))


def test_upsample_without_its_mask_names_the_layer_file_and_line(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "data" type: "Input" top: "data"\n'
                    '  input_param { shape { dim: 2 dim: 5 dim: 4 dim: 2 } } }\n'
                    'layer {\n  name: "up4"\n  type: "Upsample"\n  bottom: "data"\n'
                    '  top: "up4"\n  upsample_param { scale: 2 }\n}\n')
    with pytest.raises(ShapeError, match=rf"{path}:4: layer 'up4' \(Upsample\).*mask"):
        Net(path)


def test_upsample_mask_outside_the_output_is_an_error():
    layer = Upsample(2)
    layer.layer_name = "up"
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(LabelError, match="'up'.*16 lies outside the 4x4"):
        layer(x, torch.tensor([[[[0.0, 1.0], [2.0, 16.0]]]]))
    with pytest.raises(LabelError, match="-1 lies outside"):
        layer(x, torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]]))


@pytest.mark.parametrize("body, match", [
    ("scale: 1", "greater than 1"),
    ("scale: 3 pad_out_h: true", "pad_out needs a scale of 2"),
    ("scale: 2 scale_h: 2 scale_w: 2", "give upsample_h and upsample_w"),
    ("upsample_h: 1 upsample_w: 4", "greater than 1"),
])
def test_upsample_bad_parameters_name_the_layer(body, match):
    with pytest.raises(UnsupportedParameterError, match=f"'up'.*{match}"):
        build(f'name: "up" type: "Upsample" upsample_param {{ {body} }}', [(2, 5, 4, 2)] * 2)


def test_upsample_mask_shape_must_match():
    with pytest.raises(ShapeError, match="mask of the same shape"):
        Upsample(2).output_shapes([(2, 5, 4, 2), (2, 5, 4, 3)])


# -- Interp -------------------------------------------------------------------------------
def caffe_interp_loops(x: np.ndarray, pad_beg: int, pad_end: int, height: int, width: int):
    """DeepLab's caffe_cpu_interp2 (non-packed) on each plane, positions in float32."""
    num, channels, in_h, in_w = x.shape
    eff_h, eff_w = in_h + pad_beg + pad_end, in_w + pad_beg + pad_end
    data = x[:, :, -pad_beg:, -pad_beg:]
    if (eff_h, eff_w) == (height, width):
        return data[:, :, :height, :width].copy()
    top = np.empty((num, channels, height, width), dtype=x.dtype)
    rheight = np.float32((eff_h - 1) / (height - 1)) if height > 1 else np.float32(0)
    rwidth = np.float32((eff_w - 1) / (width - 1)) if width > 1 else np.float32(0)
    for h2 in range(height):
        h1r = np.float32(rheight * np.float32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < eff_h - 1 else 0
        h1l = h1r - h1
        for w2 in range(width):
            w1r = np.float32(rwidth * np.float32(w2))
            w1 = int(w1r)
            w1p = 1 if w1 < eff_w - 1 else 0
            w1l = w1r - w1
            top[:, :, h2, w2] = (
                (1 - h1l) * ((1 - w1l) * data[:, :, h1, w1] + w1l * data[:, :, h1, w1 + w1p])
                + h1l * ((1 - w1l) * data[:, :, h1 + h1p, w1]
                         + w1l * data[:, :, h1 + h1p, w1 + w1p]))
    return top


def test_interp_setup_from_pspnet_test():
    """PSPNet's TestSetup: a 2x3x6x5 bottom with height 11 and width 9."""
    layer = build('name: "i" type: "Interp" interp_param { height: 11 width: 9 }',
                  [(2, 3, 6, 5)])
    assert layer.output_shapes([(2, 3, 6, 5)]) == [(2, 3, 11, 9)]


@pytest.mark.parametrize("body, size", [
    ("zoom_factor: 8", (473, 473)),                   # PSPNet's conv6_interp: 60 -> 473
    ("shrink_factor: 8", (8, 8)),                     # (60 - 1) / 8 + 1
    ("height: 30 width: 20", (30, 20)),
    ("shrink_factor: 2 zoom_factor: 3", (88, 88)),    # shrink to 30, then zoom
    ("height: 5 width: 6 zoom_factor: 2", (119, 119)),  # zoom alone beats height/width
    ("height: 5 width: 6 zoom_factor: 2 shrink_factor: 2", (5, 6)),  # ... but not both
    ("zoom_factor: 2 pad_beg: -1 pad_end: -2", (113, 113)),  # 57 + 56
])
def test_interp_output_size_in_caffe_order(body, size):
    layer = build(f'name: "i" type: "Interp" interp_param {{ {body} }}', [(1, 2, 60, 60)])
    assert layer.output_shapes([(1, 2, 60, 60)]) == [(1, 2) + size]


@pytest.mark.parametrize("kwargs", [
    dict(height=11, width=9), dict(zoom_factor=3), dict(shrink_factor=2),
    dict(zoom_factor=2, pad_beg=-1, pad_end=-1), dict(height=1, width=4),
    dict(height=7, width=3), dict(height=7, width=8), dict(height=5, width=2, pad_beg=-1),
])
def test_interp_matches_caffe_loops(kwargs):
    x = randn(*SHAPE, seed=3, dtype=torch.float32)
    layer = Interp(**kwargs)
    expected = caffe_interp_loops(x.numpy(), layer.pad_beg, layer.pad_end,
                                  *layer.output_shapes([SHAPE])[0][2:])
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_interp_gradient_as_in_pspnet_test():
    """PSPNet's TestGradient (height 11, width 9 from 6x5), and a cropped zoom."""
    x = randn(2, 3, 6, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(Interp(height=11, width=9), (x,))
    assert torch.autograd.gradcheck(Interp(zoom_factor=2, pad_beg=-1, pad_end=-1), (x,))


@pytest.mark.parametrize("body, match", [
    ("zoom_factor: 2 pad_beg: 1", "must be 0 or negative"),
    ("zoom_factor: 0", "at least 1"),
    ("height: 4", "give zoom_factor, shrink_factor, or both height and width"),
])
def test_interp_bad_parameters_name_the_layer(body, match):
    with pytest.raises(UnsupportedParameterError, match=f"'i' \\(Interp\\).*{match}"):
        build(f'name: "i" type: "Interp" interp_param {{ {body} }}')


def test_interp_crop_of_everything_is_a_shape_error():
    with pytest.raises(ShapeError, match="crop away"):
        Interp(zoom_factor=2, pad_beg=-2, pad_end=-1).output_shapes([(1, 1, 3, 8)])


# -- BN: which fork -----------------------------------------------------------------------
SEGNET_INFERENCE = ('name: "bn" type: "BN" bn_param { bn_mode: INFERENCE '
                    'scale_filler { type: "constant" value: 1 } '
                    'shift_filler { type: "constant" value: 0.001 } }')
PSPNET_FROZEN = ('name: "bn" type: "BN" bn_param { slope_filler { type: "constant" value: 1 } '
                 'bias_filler { type: "constant" value: 0 } frozen: true momentum: 0.95 }')


@pytest.mark.parametrize("body, variant", [
    ("bn_mode: INFERENCE", "SegNet"), ("scale_filler { value: 1 }", "SegNet"),
    ("shift_filler { value: 0 }", "SegNet"), ("frozen: true", "PSPNet"),
    ("momentum: 0.95", "PSPNet"), ("eps: 1e-4", "PSPNet"), ("", "PSPNet"),
])
def test_bn_variant_rule(body, variant):
    param = text_format.Parse(f"bn_param {{ {body} }}", caffe_pb2.LayerParameter())
    assert bn_variant(param.bn_param) == variant


def test_bn_mixing_both_forks_fields_is_an_error():
    with pytest.raises(UnsupportedParameterError, match="'bn'.*bn_mode.*frozen"):
        build('name: "bn" type: "BN" bn_param { bn_mode: INFERENCE frozen: true }')


def test_bn_builds_each_forks_layer_with_its_blobs():
    segnet = build(SEGNET_INFERENCE)
    assert type(segnet) is SegNetBN and segnet.caffe_type == "BN"
    assert [tuple(b.shape) for b in segnet.caffe_blobs()] == [(1, 5, 1, 1)] * 2
    assert segnet.weight.flatten().tolist() == [1.0] * 5
    assert torch.allclose(segnet.bias, torch.full((1, 5, 1, 1), 0.001))
    pspnet = build(PSPNET_FROZEN)
    assert type(pspnet) is PSPNetBN and isinstance(pspnet, BN)
    assert [tuple(b.shape) for b in pspnet.caffe_blobs()] == [(1, 5, 1, 1)] * 4
    assert pspnet.frozen and abs(pspnet.momentum - 0.95) < 1e-7 and abs(pspnet.eps - 1e-5) < 1e-9
    # Caffe starts a frozen layer's variance at 1, a learning one's at 0.
    assert pspnet.running_var.flatten().tolist() == [1.0] * 5
    assert PSPNetBN(5).running_var.flatten().tolist() == [0.0] * 5


# -- BN: SegNet ---------------------------------------------------------------------------
def _randomize(layer, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blob in layer.caffe_blobs():
            blob.copy_(torch.rand(blob.shape, generator=generator, dtype=blob.dtype) + 0.5)
    return layer


def test_segnet_inference_is_scale_and_shift():
    layer = _randomize(SegNetBN(5, "INFERENCE")).double()
    x = randn(*SHAPE)
    torch.testing.assert_close(layer(x), x * layer.weight + layer.bias)


def test_segnet_learn_uses_the_batch_statistics_with_caffes_formula():
    layer = _randomize(SegNetBN(5, "LEARN", batch_tops=2)).double()
    x = randn(*SHAPE) * 3 + 1
    top, mean, variance = layer(x)
    data = x.numpy()
    ex = data.mean(axis=(0, 2, 3), keepdims=True)
    var = (data ** 2).mean(axis=(0, 2, 3), keepdims=True) - ex ** 2
    expected = (data - ex) / np.sqrt(var + 1e-9) * layer.weight.detach().numpy() + \
        layer.bias.detach().numpy()
    np.testing.assert_allclose(top.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(mean.numpy(), ex, rtol=1e-12)
    np.testing.assert_allclose(variance.numpy(), var, rtol=1e-12)


def test_segnet_gradients_are_the_true_ones():
    x = randn(2, 5, 3, 4).requires_grad_(True)
    for mode in ("LEARN", "INFERENCE"):
        layer = _randomize(SegNetBN(5, mode)).double()

        def run(v, weight, bias, layer=layer):
            return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (v,))

        assert torch.autograd.gradcheck(run, (x, layer.weight.detach().requires_grad_(True),
                                              layer.bias.detach().requires_grad_(True)))


def test_segnet_tops_and_legacy_shape():
    layer = build('name: "bn" type: "BN" top: "y" top: "m" top: "v" '
                  'bn_param { bn_mode: LEARN }', [(2, 5)])
    assert layer.output_shapes([(2, 5)]) == [(2, 5, 1, 1), (1, 5, 1, 1), (1, 5, 1, 1)]
    with pytest.raises(UnsupportedParameterError, match="'bn'.*INFERENCE 1"):
        build('name: "bn" type: "BN" top: "y" top: "m" bn_param { bn_mode: INFERENCE }')


# -- BN: PSPNet ---------------------------------------------------------------------------
def _pspnet(frozen=False, phase="TEST", eps=1e-5, momentum=0.9):
    layer = _randomize(PSPNetBN(5, eps, momentum, frozen, phase)).double()
    return layer


def test_pspnet_stored_statistics_in_test_and_when_frozen():
    x = randn(*SHAPE)
    for layer in (_pspnet(phase="TEST"), _pspnet(frozen=True, phase="TRAIN")):
        expected = (x - layer.running_mean) / torch.sqrt(layer.running_var + 1e-5) * \
            layer.weight + layer.bias
        torch.testing.assert_close(layer(x), expected)


def test_pspnet_train_normalizes_with_the_batch_and_updates_the_running_statistics():
    layer = _pspnet(phase="TRAIN", momentum=0.95)
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x = randn(*SHAPE) * 2 + 3
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * layer.weight + layer.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_mean, 0.95 * before_mean + 0.05 * mean)
    torch.testing.assert_close(layer.running_var, 0.95 * before_var + 0.05 * var)


def _caffe_pspnet_backward(layer, x, dy):
    """PSPNet's non-frozen Backward_cpu with the statistics the forward normalized with."""
    mean = layer.running_mean if layer.phase == "TEST" else x.mean((0, 2, 3), keepdim=True)
    var = layer.running_var if layer.phase == "TEST" else \
        x.var((0, 2, 3), unbiased=False, keepdim=True)
    inv_std = (var + layer.eps) ** -0.5
    x_hat = (x - mean) * inv_std
    g = dy * layer.weight
    dx = (g - g.mean((0, 2, 3), keepdim=True)
          - x_hat * (g * x_hat).mean((0, 2, 3), keepdim=True)) * inv_std
    return dx, (dy * x_hat).sum((0, 2, 3), keepdim=True), dy.sum((0, 2, 3), keepdim=True)


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_pspnet_backward_is_caffes_batch_rule(phase):
    layer = _pspnet(phase=phase)
    x = randn(*SHAPE).requires_grad_(True)
    dy = randn(*SHAPE, seed=5)
    expected = _caffe_pspnet_backward(_pspnet(phase=phase), x.detach(), dy)
    layer(x).backward(dy)
    for got, want in zip((x.grad, layer.weight.grad, layer.bias.grad), expected):
        torch.testing.assert_close(got, want)


def test_pspnet_train_gradient_is_the_true_one():
    layer = _pspnet(phase="TRAIN", momentum=1.0)  # momentum 1: the running stats stay put
    x = randn(2, 5, 3, 4).requires_grad_(True)

    def run(v, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (v,))

    assert torch.autograd.gradcheck(run, (x, layer.weight.detach().requires_grad_(True),
                                          layer.bias.detach().requires_grad_(True)))


def test_pspnet_frozen_learns_nothing_and_scales_the_gradient():
    layer = _pspnet(frozen=True, phase="TRAIN")
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    x = randn(*SHAPE).requires_grad_(True)
    dy = randn(*SHAPE, seed=5)
    layer(x).backward(dy)
    torch.testing.assert_close(x.grad, dy * layer.weight / torch.sqrt(layer.running_var + 1e-5))
    assert layer.weight.grad is None


def test_bn_rejects_wrong_channels():
    with pytest.raises(ShapeError, match="N x 5"):
        SegNetBN(5).output_shapes([(2, 4, 7, 3)])
    with pytest.raises(ShapeError, match="one bottom"):
        PSPNetBN(5).output_shapes([SHAPE, SHAPE])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    x = torch.randn(SHAPE, device="cuda", requires_grad=True)
    top, mask = Pooling("MAX", 3, 2, 1, mask_top=True).cuda()(x)
    up = Upsample(size=(7, 3)).cuda()(top, mask)
    cpu = Upsample(size=(7, 3))(top.detach().cpu(), mask.cpu())
    assert torch.equal(up.detach().cpu(), cpu)  # the later write, on the GPU too
    for y in (up, Interp(zoom_factor=2, pad_beg=-1).cuda()(x),
              PSPNetBN(5, phase="TRAIN").cuda()(x), SegNetBN(5).cuda()(x)):
        assert y.device.type == "cuda"
        y.sum().backward()
