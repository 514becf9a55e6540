"""Pooling: Caffe's window count, AVE divisor, MAX routing, STOCHASTIC, against loops and Caffe."""


import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.pooling import FLT_MAX, Pooling, pooled_size
from caffelayers.proto import caffe_pb2
from caffelayers.verify import verify_case


def layer_param(text: str, tops: int = 1):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = param.name or "pool"
    param.type = "Pooling"
    if not param.top:
        param.top.extend(f"t{i}" for i in range(tops))
    return param


def build(text: str, shape, tops: int = 1, phase: str = "TEST"):
    layer = Pooling.from_caffe(layer_param(text, tops), [tuple(shape)], BuildContext(phase=phase))
    layer.layer_name = "pool"
    return layer


# -- Caffe's loops, written out (pooling_layer.cpp) ------------------------------------------
def caffe_pool(x, kernel, stride, pad, method="MAX", ceil_mode=True):
    """Forward and the backward operator of Caffe's CPU pooling, one plane at a time."""
    num, channels, height, width = x.shape
    out_h = pooled_size(height, kernel[0], stride[0], pad[0], ceil_mode)
    out_w = pooled_size(width, kernel[1], stride[1], pad[1], ceil_mode)
    top = np.zeros((num, channels, out_h, out_w))
    routes = {}  # (ph, pw) -> list of (h, w, weight) per plane
    for n in range(num):
        for c in range(channels):
            for ph in range(out_h):
                for pw in range(out_w):
                    hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
                    if method == "MAX":
                        he, we = min(hs + kernel[0], height), min(ws + kernel[1], width)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best, where = -FLT_MAX, None
                        for h in range(hs, he):
                            for w in range(ws, we):
                                if x[n, c, h, w] > best:
                                    best, where = x[n, c, h, w], (h, w)
                        top[n, c, ph, pw] = best
                        routes[n, c, ph, pw] = [] if where is None else [(*where, 1.0)]
                    else:
                        he = min(hs + kernel[0], height + pad[0])
                        we = min(ws + kernel[1], width + pad[1])
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, height), min(we, width)
                        total = sum(x[n, c, h, w] for h in range(hs, he) for w in range(ws, we))
                        with np.errstate(divide="ignore", invalid="ignore"):
                            top[n, c, ph, pw] = np.float64(total) / size
                        routes[n, c, ph, pw] = [(h, w, 1.0 / size) for h in range(hs, he)
                                                for w in range(ws, we)]
    return top, routes


def caffe_backward(shape, routes, top_diff):
    diff = np.zeros(shape)
    for (n, c, ph, pw), targets in routes.items():
        for h, w, weight in targets:
            diff[n, c, h, w] += top_diff[n, c, ph, pw] * weight
    return diff


def run(layer, x, top_diff=None):
    x = torch.as_tensor(x).clone().requires_grad_()
    y = layer(x)
    if top_diff is None:
        top_diff = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
    y.backward(top_diff)
    return y.detach().numpy(), x.grad.numpy(), top_diff.numpy()


# (H, W, kernel, stride, pad): distinct per axis, windows hitting the padded edge, ceil
# rounding that adds a window, pads PyTorch refuses (pad > kernel / 2), unpadded ceil
# windows that start past the input.
GEOMETRIES = [
    (7, 5, (3, 3), (2, 2), (1, 1)),
    (6, 6, (3, 3), (2, 2), (0, 0)),
    (7, 4, (3, 2), (2, 1), (0, 1)),
    (8, 5, (2, 3), (2, 3), (1, 2)),
    (5, 7, (3, 4), (3, 2), (2, 3)),
    (5, 6, (4, 3), (3, 2), (3, 1)),
    (4, 5, (1, 2), (2, 3), (0, 0)),
    (5, 3, (1, 1), (3, 2), (0, 0)),
    (9, 2, (5, 2), (4, 1), (2, 0)),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("ceil_mode", [True, False], ids=["ceil", "floor"])
@pytest.mark.parametrize("height,width,kernel,stride,pad", GEOMETRIES)
def test_matches_caffe_loops(method, ceil_mode, height, width, kernel, stride, pad):
    layer = Pooling(method, kernel, stride, pad, round_mode="CEIL" if ceil_mode else "FLOOR")
    layer.layer_name = "pool"
    x = torch.randn(2, 3, height, width, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(height * 31 + width))
    expected, routes = caffe_pool(x.numpy(), kernel, stride, pad, method, ceil_mode)
    assert layer.output_shapes([tuple(x.shape)]) == [expected.shape]
    top, diff, top_diff = run(layer, x)
    np.testing.assert_allclose(top, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(diff, caffe_backward(x.shape, routes, top_diff), rtol=1e-12,
                               atol=1e-12)


def test_ceil_is_default_and_differs_from_floor():
    # 6 - 3 = 3 is odd in stride 2: ceil gives 3 windows, floor 2 (W = 7 gives 3 either way).
    assert build("pooling_param { pool: MAX kernel_size: 3 stride: 2 }", (1, 1, 6, 7)) \
        .output_shapes([(1, 1, 6, 7)]) == [(1, 1, 3, 3)]
    floor = build("pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR }",
                  (1, 1, 6, 7))
    assert floor.output_shapes([(1, 1, 6, 7)]) == [(1, 1, 2, 3)]
    assert floor(torch.randn(1, 1, 6, 7)).shape == (1, 1, 2, 3)


def test_last_window_dropped_when_it_starts_in_padding():
    # H = 5, k = 3, s = 3, p = 1: ceil(4 / 3) + 1 = 3 windows, but the third would start at
    # 3 * 2 - 1 = 5 = H, inside the padding: Caffe keeps 2. W = 4 keeps its 2 windows.
    assert pooled_size(5, 3, 3, 1) == 2
    layer = build("pooling_param { pool: AVE kernel_size: 3 stride: 3 pad: 1 }", (1, 1, 5, 4))
    assert layer.output_shapes([(1, 1, 5, 4)]) == [(1, 1, 2, 2)]
    # Without padding the rule does not apply, even where the window starts past the input.
    assert pooled_size(4, 1, 2, 0) == 3


def test_ave_divisor_counts_padding_but_not_past_in_plus_pad():
    # H = 4 (x = 1 everywhere), k = 3, s = 2, p = 1: windows start at -1, 1, 3.
    # First: rows -1..1, padding counted: 2 real / 3. Second: rows 1..3: 3 / 3. Third: rows
    # 3..5 clipped to in + pad = 5, so the divisor covers rows 3, 4: 1 real / 2.
    layer = build("pooling_param { pool: AVE kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 "
                  "pad_h: 1 pad_w: 0 }", (1, 1, 4, 2))
    top = layer(torch.ones(1, 1, 4, 2, dtype=torch.float64))
    np.testing.assert_allclose(top[0, 0, :, 0].numpy(), [2 / 3, 1.0, 1 / 2])


def test_max_padding_never_wins():
    x = -torch.rand(1, 2, 5, 3) - 1.0
    top = build("pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }", x.shape)(x)
    assert (top < -1.0).all()


def test_max_backward_goes_to_first_maximum():
    # All equal: each window's gradient goes to its first (top-left) element; the 3x3 windows
    # with stride 2 overlap, so shared first elements would collect two.
    x = torch.zeros(1, 1, 5, 4, requires_grad=True)
    layer = build("pooling_param { pool: MAX kernel_size: 3 stride: 2 }", x.shape)
    top = layer(x)
    top.backward(torch.ones_like(top))
    expected = torch.zeros(5, 4)
    for ph in range(top.shape[2]):
        for pw in range(top.shape[3]):
            expected[2 * ph, 2 * pw] += 1
    assert torch.equal(x.grad[0, 0], expected)


@pytest.mark.parametrize("pad", [1, 2])  # pad 2 > kernel 3 / 2: the explicit-padding path
def test_mask_top_is_caffe_argmax_index(pad):
    layer = build(f"pooling_param {{ pool: MAX kernel_size: 3 stride: 2 pad: {pad} }}",
                  (2, 3, 7, 5), tops=2)
    x = torch.randn(2, 3, 7, 5)
    top, mask = layer(x)
    assert layer.output_shapes([tuple(x.shape)]) == [tuple(top.shape)] * 2
    assert mask.dtype == x.dtype
    flat = x.flatten(2)
    gathered = flat.gather(2, mask.flatten(2).long()).view_as(top)
    assert torch.equal(gathered, top)
    reference, routes = caffe_pool(x.double().numpy(), (3, 3), (2, 2), (pad, pad))
    expected = np.array([routes[key][0][0] * 5 + routes[key][0][1] for key in sorted(routes)])
    np.testing.assert_array_equal(mask.numpy().ravel(), expected)


def test_empty_unpadded_ceil_window_reports_minus_flt_max_and_mask_minus_one():
    # k = 1, s = 3: H = 2 gets a second row of windows starting at 3, W = 5 a third column
    # starting at 6, both past the input.
    layer = build("pooling_param { pool: MAX kernel_size: 1 stride: 3 }", (1, 1, 2, 5), tops=2)
    x = torch.randn(1, 1, 2, 5)
    top, mask = layer(x)
    assert top.shape == (1, 1, 2, 3)
    empty = torch.tensor([[False, False, True], [True, True, True]])
    assert (top[0, 0][empty] == -FLT_MAX).all() and (mask[0, 0][empty] == -1).all()
    assert torch.equal(top[0, 0][~empty], x[0, 0, 0, :4:3])
    assert torch.equal(mask[0, 0][~empty], torch.tensor([0.0, 3.0]))


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64)
    layer = build(f"pooling_param {{ pool: {method} global_pooling: true }}", x.shape)
    assert layer.output_shapes([tuple(x.shape)]) == [(2, 5, 1, 1)]
    expected = x.amax((2, 3), keepdim=True) if method == "MAX" else x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(layer(x), expected)
    # The kernel follows the bottom, as Caffe's Reshape does.
    assert layer(torch.randn(1, 5, 4, 6)).shape == (1, 5, 1, 1)


def test_global_max_ties_go_to_first():
    x = torch.ones(1, 2, 3, 4, requires_grad=True)
    build("pooling_param { pool: MAX global_pooling: true }", x.shape)(x).sum().backward()
    expected = torch.zeros(1, 2, 3, 4)
    expected[:, :, 0, 0] = 1
    assert torch.equal(x.grad, expected)


def test_stochastic_test_phase_is_probability_weighted_average():
    x = torch.rand(2, 3, 6, 4, dtype=torch.float64)
    x[0, 0, :3, :3] = 0  # an all-zero window gives 0, not NaN (Caffe adds FLT_MIN)
    layer = build("pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }", x.shape)
    top = layer(x)
    assert top.shape == (2, 3, 3, 2)  # ceil: the last windows hang over the input
    assert top[0, 0, 0, 0].item() == 0.0
    # The last window starts at row 4 and column 2 and is clipped to the input.
    window = x[1, 2, 4:, 2:]
    assert top[1, 2, 2, 1].item() == pytest.approx(
        (window ** 2).sum().item() / window.sum().item())
    assert torch.autograd.gradcheck(layer, ((x + 0.1).requires_grad_(),))


def test_stochastic_train_phase_samples_window_elements():
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    layer = build("pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }", x.shape,
                  phase="TRAIN")
    layer.generator = torch.Generator().manual_seed(0)
    top = layer(x)
    assert top.shape == (2, 3, 3, 3)  # ceil: the last column window holds one column
    layer.generator = torch.Generator().manual_seed(0)
    assert torch.equal(layer(x), top)
    top.sum().backward()
    # One element per window wins and gets the gradient; windows do not overlap.
    assert x.grad.sum().item() == top.numel()
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x.detach()[x.grad == 1].sort().values, top.detach().flatten().sort().values)


def test_stochastic_train_draws_in_proportion_to_value():
    x = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64).expand(1, 4000, 1, 2).contiguous()
    layer = build("pooling_param { pool: STOCHASTIC kernel_h: 1 kernel_w: 2 stride: 1 }",
                  x.shape, phase="TRAIN")
    layer.generator = torch.Generator().manual_seed(1)
    share_of_three = (layer(x) == 3.0).double().mean().item()
    assert abs(share_of_three - 0.75) < 0.03


@pytest.mark.parametrize("text", [
    "pool: AVE kernel_size: 3 stride: 2 pad: 1",
    "pool: AVE kernel_h: 4 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 3 pad_w: 2",
    "pool: MAX kernel_size: 3 stride: 2 pad: 1",
    "pool: MAX kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 2",
])
def test_gradcheck(text):
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(build(f"pooling_param {{ {text} }}", x.shape), (x,))


def test_extra_repr_lists_non_defaults():
    text = repr(build("pooling_param { pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR }",
                      (1, 1, 5, 5)))
    assert "pool=AVE" in text and "stride=(2, 2)" in text and "round_mode=FLOOR" in text
    assert "pad" not in text


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,shape", [
    ("pool: MAX kernel_size: 4", (1, 1, 3, 8)),
    ("pool: AVE kernel_h: 2 kernel_w: 6 pad_h: 0 pad_w: 1", (1, 1, 5, 3)),
])
def test_kernel_larger_than_padded_input(text, shape):
    layer = build(f"pooling_param {{ {text} }}", shape)
    with pytest.raises(ShapeError, match="'pool'.*larger than the padded input"):
        layer.output_shapes([shape])
    with pytest.raises(ShapeError, match="'pool'"):
        layer(torch.randn(shape))


def test_bottom_must_be_4d():
    layer = build("pooling_param { pool: MAX kernel_size: 2 }", (1, 1, 4, 4))
    with pytest.raises(ShapeError, match="4 axes"):
        layer.output_shapes([(1, 4, 4)])


@pytest.mark.parametrize("text,tops,message", [
    ("pool: MAX kernel_size: 3 pad: 3", 1, "smaller than the kernel"),
    ("pool: STOCHASTIC kernel_size: 3 pad: 1", 1, "padding is implemented only"),
    ("pool: MAX kernel_size: 3 kernel_h: 3 kernel_w: 3", 1, "kernel_size, or both"),
    ("pool: MAX kernel_h: 3", 1, "kernel_size, or both"),
    ("pool: MAX", 1, "kernel size must be"),
    ("pool: MAX kernel_size: 2 stride: 0", 1, "stride must be"),
    ("pool: MAX global_pooling: true kernel_size: 2", 1, "give no kernel size"),
    ("pool: AVE global_pooling: true stride: 2", 1, "pad 0 and stride 1"),
    ("pool: AVE kernel_size: 2", 2, "argmax mask"),
])
def test_bad_parameters_name_the_layer(text, tops, message):
    with pytest.raises(UnsupportedParameterError, match=f"'pool' \\(Pooling\\).*{message}"):
        build(f"pooling_param {{ {text} }}", (1, 1, 6, 6), tops=tops)


# -- Caffe's own numbers -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["pool_ave_pad", "pool_global_ave", "pool_global_max",
                                  "pool_max_ceil", "pool_max_pad_clip"])
def test_fixture(cases_dir, case):
    result = verify_case(cases_dir / case)
    assert result.passed, "; ".join(check.describe() for check in result.failures)
