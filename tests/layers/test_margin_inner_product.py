"""MarginInnerProduct (A-Softmax): Caffe's forward and trick backward, the exact mode, the
lambda schedule and its counter, the quirks and our deliberate differences."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import (CaffeFormatError, LabelError, ShapeError,
                                UnsupportedParameterError)
from caffelayers.layers.base import BuildContext
from caffelayers.layers.inner_product import InnerProduct
from caffelayers.layers.margin_inner_product import (MarginInnerProduct, margin_inner_product,
                                                     margin_terms)
from caffelayers.proto import caffe_pb2, io
from caffelayers.verify import verify_case

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
TYPES = ("SINGLE", "DOUBLE", "TRIPLE", "QUADRUPLE")
MIP_CASES = sorted(p.name for p in FIXTURES.glob("mip_*"))


def make(margin_type="QUADRUPLE", K=7, N=5, backward="caffe", seed=0, **kwargs):
    layer = MarginInnerProduct(K, N, margin_type, backward=backward, **kwargs).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # rows of length 0.5 to 3: the normalization must matter
        weight = torch.randn(N, K, generator=generator, dtype=torch.float64)
        scale = 0.5 + 2.5 * torch.rand(N, 1, generator=generator, dtype=torch.float64)
        layer.weight.copy_(weight / weight.norm(dim=1, keepdim=True) * scale)
    return layer


def inputs(M=6, K=7, N=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=generator, dtype=torch.float64) * 3
    label = torch.randint(0, N, (M,), generator=generator).double()
    return x, label


def reference_forward(x, weight, label, m, lambda_):
    """A-Softmax the textbook way, in numpy: theta from acos, k = floor(m theta / pi)."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    logits = x @ unit.T
    for i, y in enumerate(np.asarray(label).astype(int)):
        norm = np.linalg.norm(x[i])
        theta = math.acos(np.clip(logits[i, y] / norm, -1, 1))
        k = math.floor(m * theta / math.pi)
        psi = (-1) ** k * math.cos(m * theta) - 2 * k
        if m > 1:
            logits[i, y] = (norm * psi + lambda_ * logits[i, y]) / (1 + lambda_)
    return logits


def caffe_backward_loop(x, unit, label, top_diff, m, lambda_):
    """Caffe's Backward_cpu written as its loops: every (row, class) pair on its own."""
    M, K = x.shape
    grad_x = np.zeros_like(x)
    for i in range(M):
        norm = np.linalg.norm(x[i])
        for j in range(unit.shape[0]):
            g = top_diff[i, j]
            if m == 1:
                grad_x[i] += g * unit[j]
                continue
            grad_x[i] += lambda_ / (1 + lambda_) * g * unit[j]
            if j != label[i]:
                grad_x[i] += g / (1 + lambda_) * unit[j]
                continue
            c = x[i] @ unit[j] / norm
            s0 = np.sign(c)
            if m == 2:
                cw, cx = 4 * s0 * c, -(2 * s0 * c * c + 1) / norm
            elif m == 3:
                s1 = np.sign(abs(c) - 0.5)
                s2 = s0 * (1 + s1) - 2
                cw, cx = s1 * (12 * c * c - 3), -(8 * s1 * c ** 3 - s2) / norm
            else:
                s3 = s0 * np.sign(2 * c * c - 1)
                s4 = 2 * s0 + s3 - 3
                cw = s3 * (32 * c ** 3 - 16 * c)
                cx = -(s3 * (24 * c ** 4 - 8 * c * c - 1) - s4) / norm
            length = math.hypot(cw, cx)
            grad_x[i] += g / (1 + lambda_) * (cw / length * unit[j] + cx / length * x[i])
    return grad_x, top_diff.T @ x


# -- Caffe's fixtures ----------------------------------------------------------------------
def test_the_margin_fixtures_are_all_found():
    assert len(MIP_CASES) == 14


@pytest.mark.parametrize("case", MIP_CASES + ["sphereface20_mini_grad"])
def test_exact_mode_reproduces_caffes_forward(case):
    """The exact mode changes only gradients (and leaves the stored weight alone)."""
    result = verify_case(FIXTURES / case, margin_backward="exact")
    forward = [c for c in result.checks if "/data/" in c.key]
    assert forward and all(c.passed for c in forward), [c.describe() for c in forward
                                                        if not c.passed]


@pytest.mark.parametrize("case", ["mip_lambda_zero_quadruple", "mip_lambda_min_floor_triple",
                                  "mip_axis_4d_double"])
def test_caffe_mode_matches_fixtures_built_by_hand(case):
    """from_caffe on the prototxt's layer and the raw (unnormalized) caffemodel weight,
    without Net: logits, lambda, the normalized weight and both gradients, every
    iteration."""
    net = io.read_prototxt(FIXTURES / case / "net.prototxt")
    param = next(layer for layer in net.layer if layer.type == "MarginInnerProduct")
    model = io.read_caffemodel(FIXTURES / case / "weights.caffemodel")
    raw = io.blob_to_array(next(l for l in model.layer if l.name == param.name).blobs[0])
    data = np.load(FIXTURES / case / "reference.npz")
    x, label = torch.from_numpy(data["input/x"]), torch.from_numpy(data["input/label"])
    layer = MarginInnerProduct.from_caffe(param, [tuple(x.shape), tuple(label.shape)],
                                          BuildContext(phase="TRAIN", fill=False))
    layer.load_caffe_blobs([raw])
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 0.1  # the first forward matters
    iterations = sum(key.endswith("/data/lambda") for key in data.files)
    for step in range(iterations):
        x.requires_grad_().grad = None
        layer.weight.grad = None
        logits, lambda_ = layer(x, label)
        logits.backward(torch.from_numpy(data[f"iter{step}/top_diff/fc6"]))
        for ours, key in [(logits, "data/fc6"), (lambda_, "data/lambda"),
                          (layer.weight, "param/fc6/0"), (x.grad, "diff/x"),
                          (layer.weight.grad, "param_diff/fc6/0")]:
            expected = data[f"iter{step}/{key}"]
            bound = 1e-6 + 1e-4 * np.abs(expected).max()
            assert np.abs(ours.detach().numpy() - expected).max() <= bound, (step, key)


# -- forward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("margin_type", TYPES)
@pytest.mark.parametrize("backward", ["caffe", "exact"])
def test_forward_matches_the_acos_formula(margin_type, backward):
    layer = make(margin_type, backward=backward, base=10, gamma=0.5, power=2, lambda_min=0.1)
    x, label = inputs()
    weight = layer.weight.detach().clone()
    for step in range(1, 4):
        logits, lambda_ = layer(x, label)
        expected_lambda = max(10 * (1 + 0.5 * step) ** -2, 0.1)
        assert lambda_.item() == pytest.approx(expected_lambda, rel=1e-12)
        reference = reference_forward(x, weight, label, TYPES.index(margin_type) + 1,
                                      expected_lambda)
        np.testing.assert_allclose(logits.detach().numpy(), reference, rtol=1e-10, atol=1e-12)


def test_single_is_the_product_with_unit_rows_and_ignores_lambda():
    layer = make("SINGLE", base=3.0)
    x, label = inputs()
    unit = layer.weight.detach() / layer.weight.detach().norm(dim=1, keepdim=True)
    logits, lambda_ = layer(x, label)
    assert lambda_.item() == 3.0
    torch.testing.assert_close(logits, x @ unit.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backward", ["caffe", "exact"])
def test_caffe_normalizes_the_stored_weight_in_place_exact_does_not(backward):
    layer = make("DOUBLE", backward=backward)
    before = layer.weight.detach().clone()
    layer(*inputs())
    lengths = layer.weight.detach().norm(dim=1)
    if backward == "caffe":
        torch.testing.assert_close(lengths, torch.ones_like(lengths))
        torch.testing.assert_close(layer.weight.detach(),
                                   before / before.norm(dim=1, keepdim=True))
    else:
        assert torch.equal(layer.weight.detach(), before)


@pytest.mark.parametrize("m,x,psi", [(2, (0, 2, 0, 0), -1.0), (3, (0, 2, 0, 0), -2.0),
                                     (4, (0, 2, 0, 0), -3.0), (3, (1, 1, 1, 1), -1.0),
                                     (3, (-1, 1, 1, 1), -3.0), (2, (-2, 0, 0, 0), -3.0),
                                     (4, (-2, 0, 0, 0), -7.0), (4, (2, 0, 0, 0), 1.0)])
def test_sign_tests_at_the_boundaries(m, x, psi):
    """cos exactly 0, +-0.5 or +-1 against w_y = e_0: sign(0) = 0 lands on psi's value at the
    boundary (psi is continuous), as Caffe's sign tests do."""
    layer = MarginInnerProduct(4, 2, m, base=0.0, backward="exact").double()  # lambda 0
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    logits, lambda_ = layer(torch.tensor([x], dtype=torch.float64), torch.tensor([0.0]))
    assert lambda_.item() == 0.0
    assert logits[0, 0].item() == 2 * psi


def test_margin_terms_slope_and_radial_part():
    cos = torch.linspace(-0.99, 0.99, 41, dtype=torch.float64)
    for m in range(1, 5):
        psi, slope, radial = margin_terms(cos, m)
        theta = torch.acos(cos)
        k = torch.floor(m * theta / math.pi)
        torch.testing.assert_close(psi, (-1) ** k * torch.cos(m * theta) - 2 * k)
        torch.testing.assert_close(radial, psi - cos * slope)
        numeric = (margin_terms(cos + 1e-7, m)[0] - margin_terms(cos - 1e-7, m)[0]) / 2e-7
        torch.testing.assert_close(slope, numeric, rtol=1e-5, atol=1e-5)


# -- backward --------------------------------------------------------------------------------
@pytest.mark.parametrize("margin_type", TYPES)
def test_caffe_backward_matches_caffes_loops(margin_type):
    layer = make(margin_type, base=4.0, gamma=1.0, power=1.0)
    x, label = inputs()
    x.requires_grad_()
    top_diff = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits, lambda_ = layer(x, label)
    logits.backward(top_diff)
    grad_x, grad_w = caffe_backward_loop(x.detach().numpy(), layer.weight.detach().numpy(),
                                         label.numpy().astype(int), top_diff.numpy(),
                                         TYPES.index(margin_type) + 1, lambda_.item())
    np.testing.assert_allclose(x.grad.numpy(), grad_x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), grad_w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_exact_gradient_passes_gradcheck(margin):
    x, label = inputs()
    weight = make(K=7, N=5).weight.detach().clone().requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, w: margin_inner_product(a, w, label, margin, 0.0, "exact"), (x, weight))


@pytest.mark.parametrize("margin_type", TYPES)
def test_exact_module_passes_gradcheck(margin_type):
    layer = make(margin_type, backward="exact", base=2.0, K=4, N=3)  # gamma 0: lambda stays 2
    x, label = inputs(M=5, K=4, N=3)
    x = x.reshape(5, 2, 2).requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()

    def run(a, w):
        return torch.func.functional_call(layer, {"weight": w}, (a, label))[0]

    assert torch.autograd.gradcheck(run, (x, weight))


def test_caffe_and_exact_agree_without_a_margin():
    """m = 1: Caffe's data gradient is the true one; its weight gradient skips the
    normalization, which the exact mode projects out."""
    x, label = inputs()
    grads = {}
    for backward in ("caffe", "exact"):
        layer = make("SINGLE", backward=backward)
        a = x.clone().requires_grad_()
        layer(a, label)[0].sum().backward()
        grads[backward] = (a.grad, layer.weight.grad, layer.weight.detach())
    torch.testing.assert_close(grads["caffe"][0], grads["exact"][0])
    unit = grads["caffe"][2]
    caffe_w = grads["caffe"][1]
    projected = (caffe_w - unit * (caffe_w * unit).sum(1, keepdim=True))
    projected = projected / grads["exact"][2].norm(dim=1, keepdim=True)
    torch.testing.assert_close(grads["exact"][1], projected)


def test_no_temporary_of_the_logits_size(peak_allocation):
    """Forward+backward keep no M x N tensor beyond the plain product's (the logits and
    their gradient): only O(M K + N K) extra."""
    M, K, N = 64, 4, 4000
    x = torch.randn(M, K, requires_grad=True)
    label = torch.randint(0, N, (M,)).float()
    upstream = torch.randn(M, N)
    weight = torch.randn(N, K, requires_grad=True)

    def product():
        (x @ weight.t()).backward(upstream)

    baseline = peak_allocation(product)
    for backward in ("caffe", "exact"):
        layer = MarginInnerProduct(K, N, "QUADRUPLE", backward=backward)
        extra = peak_allocation(lambda: layer(x, label)[0].backward(upstream)) - baseline
        assert extra < M * N * 4 / 2, (backward, extra)  # the autograd A-Softmax: 12 x M N


# -- the lambda schedule and the counter -----------------------------------------------------
def test_first_forward_uses_iteration_plus_one_and_the_floor():
    layer = make("TRIPLE", base=1000, gamma=0.12, power=1, lambda_min=5, iteration=10).float()
    x, label = inputs()
    seen = [layer(x.float(), label)[1].item() for _ in range(3)]
    expected = [np.float32(1000) * (np.float32(1) + np.float32(0.12) * np.float32(t)) **
                np.float32(-1) for t in (11, 12, 13)]
    np.testing.assert_allclose(seen, expected, rtol=1e-7)
    assert int(layer.iteration) == 13
    layer.iteration.fill_(10 ** 6)
    assert layer(x.float(), label)[1].item() == 5.0


def test_iteration_counter_survives_state_dict():
    trained = make("QUADRUPLE", base=1000, gamma=0.12, power=1, lambda_min=5)
    x, label = inputs()
    for _ in range(4):
        trained(x, label)
    resumed = make("QUADRUPLE", base=1000, gamma=0.12, power=1, lambda_min=5, seed=9)
    resumed.load_state_dict(trained.state_dict())
    assert "iteration" in trained.state_dict()
    assert resumed(x, label)[1].item() == trained(x, label)[1].item()
    assert int(resumed.iteration) == 5


def test_margin_false_is_the_plain_cosine_head():
    layer = make("QUADRUPLE", base=7.0, gamma=1.0)
    x, _ = inputs()
    before = layer.weight.detach().clone()
    scores, lambda_ = layer(x, margin=False)
    unit = before / before.norm(dim=1, keepdim=True)
    torch.testing.assert_close(scores, x @ unit.T)
    assert int(layer.iteration) == 0 and lambda_.item() == 7.0
    assert torch.equal(layer.weight.detach(), before)


def test_to_inner_product_exports_the_test_head():
    layer = make("TRIPLE", K=12, N=5, axis=1)
    plain = layer.to_inner_product()
    assert isinstance(plain, InnerProduct) and plain.bias is None
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(plain(x), layer(x, margin=False)[0])
    torch.testing.assert_close(plain.weight.norm(dim=1), torch.ones(5, dtype=torch.float64))


# -- our deliberate differences --------------------------------------------------------------
@pytest.mark.parametrize("margin_type", TYPES[1:])
@pytest.mark.parametrize("backward", ["caffe", "exact"])
def test_zero_row_gives_zero_logits_and_zero_gradient(margin_type, backward):
    layer = make(margin_type, backward=backward)
    x, label = inputs()
    x[2] = 0
    x.requires_grad_()
    logits, _ = layer(x, label)
    logits.backward(torch.ones_like(logits))
    assert torch.isfinite(logits).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()
    assert torch.equal(logits[2], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(x.grad[2], torch.zeros(7, dtype=torch.float64))
    assert x.grad[1].abs().sum() > 0


# -- shapes, building, errors ----------------------------------------------------------------
@pytest.mark.parametrize("axis,rows,expected", [(1, 2, (2, 4)), (2, 10, (2, 5, 4)),
                                                (-1, 70, (2, 5, 7, 4)), (0, 1, (4,))])
def test_flattens_from_axis(axis, rows, expected):
    shape = (2, 5, 7, 3)
    features = int(np.prod(shape[axis % 4:]))
    layer = make("DOUBLE", K=features, N=4, axis=axis)
    x = torch.randn(shape, dtype=torch.float64)
    label = torch.arange(rows).remainder(4).double()
    assert layer.output_shapes([shape, (rows,)]) == [expected, (1,)]
    logits, _ = layer(x, label)
    assert logits.shape == expected
    flat = reference_forward(x.reshape(rows, features), layer.weight.detach(), label, 2,
                             layer.lambda_at(1, torch.float64))
    np.testing.assert_allclose(logits.detach().reshape(rows, 4).numpy(), flat, rtol=1e-10)


def build(text, bottom_shapes, tops=("fc6", "lambda"), **options):
    tops = " ".join(f'top: "{t}"' for t in tops)
    param = text_format.Parse(
        f'name: "fc6" type: "MarginInnerProduct" bottom: "x" bottom: "label" {tops} '
        f'margin_inner_product_param {{ {text} }}', caffe_pb2.LayerParameter())
    ctx = BuildContext(phase="TRAIN", generator=torch.Generator().manual_seed(0),
                       options=options)
    return MarginInnerProduct.from_caffe(param, bottom_shapes, ctx)


def test_from_caffe_reads_every_field():
    layer = build('num_output: 9 type: TRIPLE weight_filler { type: "gaussian" std: 0.5 } '
                  'axis: 2 base: 100 gamma: 0.25 power: 2 iteration: 7 lambda_min: 3',
                  [(2, 3, 4, 5), (6,)], margin_backward="exact")
    assert (layer.in_features, layer.num_output, layer.margin_type) == (20, 9, "TRIPLE")
    assert (layer.axis, layer.base, layer.gamma, layer.power, layer.lambda_min) == \
        (2, 100.0, 0.25, 2.0, 3.0)
    assert int(layer.iteration) == 7 and layer.backward == "exact"
    assert 0.3 < layer.weight.std().item() < 0.7
    assert layer.output_shapes([(2, 3, 4, 5), (6,)]) == [(2, 3, 9), (1,)]
    assert "TRIPLE" in repr(layer) and "gamma=0.25" in repr(layer)
    default = build("num_output: 3", [(4, 6), (4,)])
    assert default.margin_type == "SINGLE" and default.backward == "caffe"


@pytest.mark.parametrize("mode", ["caffe", "exact"])
def test_net_option_picks_the_backward_mode(mode):
    from caffelayers.net import Net
    net = Net(FIXTURES / "mip_double_m4k6n5" / "net.prototxt", phase="TRAIN",
              margin_backward=mode)
    assert net.layer("fc6").backward == mode


def test_the_lambda_top_is_optional():
    layer = build("num_output: 3 type: DOUBLE", [(4, 6), (4,)], tops=("fc6",))
    assert layer.output_shapes([(4, 6), (4,)]) == [(4, 3)]
    with pytest.raises(CaffeFormatError, match="one or two tops"):
        build("num_output: 3", [(4, 6), (4,)], tops=("a", "b", "c"))


def test_bad_input_raises_our_errors():
    layer = make("DOUBLE")
    x, label = inputs()
    with pytest.raises(ShapeError, match="7 elements"):
        layer(torch.zeros(6, 8, dtype=torch.float64), label)
    with pytest.raises(ShapeError, match="one label per row"):
        layer(x, label[:4])
    with pytest.raises(ShapeError, match="label"):
        layer(x)
    with pytest.raises(LabelError, match=r"must lie in \[0, 5\), got \[-1, 5\]"):
        layer(x, torch.tensor([0.0, 5, 1, -1, 2, 3]))
    with pytest.raises(ShapeError, match="axis 3"):
        make("DOUBLE", axis=3)(x, label)
    with pytest.raises(UnsupportedParameterError, match="margin_type"):
        MarginInnerProduct(4, 3, "OCTUPLE")
    with pytest.raises(UnsupportedParameterError, match="backward"):
        MarginInnerProduct(4, 3, backward="fast")
    with pytest.raises(ShapeError, match="axis 4"):
        build("num_output: 3 axis: 4", [(4, 6), (4,)])
