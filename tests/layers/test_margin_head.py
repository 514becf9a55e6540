"""MarginHead (A-Softmax on normalized features, AM-Softmax/CosFace, ArcFace, combined):
forward against the textbook formulas in numpy, gradcheck, the zero margins, extreme
inputs, the Caffe layer in a Net and its ONNX export."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

import caffelayers.layers.margin_head  # noqa: F401  registers MarginHead
from caffelayers import Net
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.errors import LabelError, ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.margin_head import MarginHead, label_margin, margin_head
from caffelayers.layers.margin_inner_product import MarginInnerProduct
from caffelayers.proto import caffe_pb2, io

M, K, N = 6, 7, 5
SETTINGS = [  # (kind, s, m, easy_margin)
    ("sphere", None, 4, False), ("sphere", 8.0, 3, False), ("sphere", 3.0, 2, False),
    ("cos", 10.0, 0.35, False), ("arc", 10.0, 0.5, False), ("arc", 4.0, 1.2, False),
    ("arc", 6.0, 0.5, True), ("combined", 5.0, (0.9, 0.4, 0.15), False),
    ("combined", 5.0, (1.0, 0.3, 0.2), False), ("combined", 3.0, (2.0, 0.0, 0.1), False),
]
IDS = [f"{k}-{s}-{m}{'-easy' if e else ''}" for k, s, m, e in SETTINGS]


def data(shape=(M, K), classes=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2
    weight = rng.standard_normal((classes, math.prod(shape[1:]) if len(shape) > 1 else 1))
    weight *= rng.uniform(0.5, 3, (classes, 1))  # rows of several lengths
    label = rng.integers(0, classes, shape[0])
    return x, weight, label


def head_of(kind, s, m, easy=False, weight=None, **kwargs):
    head = MarginHead(weight.shape[1], weight.shape[0], kind, s=s, m=m, easy_margin=easy,
                      **kwargs).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
    return head


def textbook_f(kind, m, easy, cos):
    """The margin functions written from their papers, with acos (numpy float64)."""
    theta = np.arccos(np.clip(cos, -1, 1))
    if kind == "sphere":
        k = np.floor(m * theta / np.pi)
        return (-1.0) ** k * np.cos(m * theta) - 2 * k
    if kind == "cos":
        return cos - m
    if kind == "arc":
        if easy:
            return np.where(cos > 0, np.cos(theta + m), cos)
        return np.where(theta + m < np.pi, np.cos(theta + m), cos - m * np.sin(m))
    m1, m2, m3 = m
    return np.cos(m1 * theta + m2) - m3


def reference_logits(x, weight, label, kind, s, m, easy=False, lambda_=0.0):
    rows = x.reshape(len(label), -1)
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    norm = np.linalg.norm(rows, axis=1)
    cos = rows @ unit.T / norm[:, None]
    scale = norm if s is None else np.full(len(label), s)
    logits = scale[:, None] * cos
    picked = cos[np.arange(len(label)), label]
    f = textbook_f(kind, m, easy, picked)
    logits[np.arange(len(label)), label] = scale * (f + lambda_ * picked) / (1 + lambda_)
    return logits


# -- forward -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, s, m, easy", SETTINGS, ids=IDS)
def test_forward_matches_the_textbook_formulas(kind, s, m, easy):
    x, weight, label = data()
    head = head_of(kind, s, m, easy, weight)
    got = head(torch.from_numpy(x), torch.from_numpy(label).double())
    np.testing.assert_allclose(got.detach().numpy(), reference_logits(x, weight, label, kind,
                                                                       s, m, easy),
                               rtol=1e-10, atol=1e-10)


def test_both_branches_of_arcface_are_exercised():
    """m = 1.2 puts some label angles past pi - m (the fallback), m = 0.5 with easy_margin
    some cosines below 0: the test above covers both sides of each switch."""
    x, weight, label = data()
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = (x @ unit.T / np.linalg.norm(x, axis=1)[:, None])[np.arange(M), label]
    assert 0 < (cos <= math.cos(math.pi - 1.2)).sum() < M
    assert 0 < (cos <= 0).sum() < M


@pytest.mark.parametrize("shape, axis", [((2, 3, 4, 3), 1), ((2, 3, 4, 3), 2),
                                         ((2, 3, 4, 3), -1)])
def test_flattens_from_axis(shape, axis):
    x, _, _ = data(shape)
    rows = math.prod(shape[:axis % 4])
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((N, math.prod(shape[axis % 4:])))
    label = rng.integers(0, N, rows)
    head = head_of("arc", 16.0, 0.5, weight=weight, axis=axis)
    got = head(torch.from_numpy(x), torch.from_numpy(label).double())
    assert tuple(got.shape) == shape[:axis % 4] + (N,)
    want = reference_logits(x, weight, label, "arc", 16.0, 0.5)
    np.testing.assert_allclose(got.detach().numpy().reshape(rows, N), want, rtol=1e-10,
                               atol=1e-10)


def test_raw_sphere_head_is_margin_inner_products_exact_mode():
    """kind='sphere' without s is MarginInnerProduct's exact mode with a fixed lambda:
    the same kernel, bit for bit, forward and backward."""
    x, weight, label = data()
    head = head_of("sphere", None, 3, weight=weight, lambda_=2.5)
    mip = MarginInnerProduct(K, N, "TRIPLE", base=2.5, gamma=0.0, backward="exact").double()
    with torch.no_grad():
        mip.weight.copy_(torch.from_numpy(weight))
    a, b = torch.from_numpy(x).requires_grad_(), torch.from_numpy(x).requires_grad_()
    label_t = torch.from_numpy(label).double()
    ours, theirs = head(a, label_t), mip(b, label_t)[0]
    assert torch.equal(ours, theirs)
    upstream = torch.randn(M, N, dtype=torch.float64)
    ours.backward(upstream)
    theirs.backward(upstream)
    assert torch.equal(a.grad, b.grad) and torch.equal(head.weight.grad, mip.weight.grad)
    np.testing.assert_allclose(ours.detach().numpy(),
                               reference_logits(x, weight, label, "sphere", None, 3,
                                                lambda_=2.5), rtol=1e-10, atol=1e-10)


def test_only_the_label_column_changes():
    x, weight, label = data()
    for kind, s, m, easy in SETTINGS:
        head = head_of(kind, s, m, easy, weight)
        plain = head(torch.from_numpy(x), margin=False).detach()
        with_margin = head(torch.from_numpy(x), torch.from_numpy(label)).detach()
        changed = (plain != with_margin).nonzero().tolist()
        labelled = [[i, int(y)] for i, y in enumerate(label)]
        # easy_margin leaves non-positive cosines alone
        assert all(c in labelled for c in changed) and len(changed) >= M // 2, kind


# -- zero margins: the plain (scaled) cosine softmax, bit for bit ----------------------------
def test_zero_margins_are_the_plain_scaled_cosine_exactly():
    x, weight, label = data()
    xt, yt = torch.from_numpy(x), torch.from_numpy(label)
    plain = head_of("cos", 30.0, 0.0, weight=weight)(xt, margin=False)
    for kind, m in [("cos", 0.0), ("arc", 0.0), ("combined", (1.0, 0.0, 0.0)), ("sphere", 1)]:
        logits = head_of(kind, 30.0, m, weight=weight)(xt, yt)
        assert torch.equal(logits, plain), kind
        assert torch.equal(F.cross_entropy(logits, yt), F.cross_entropy(plain, yt))
    # and the plain head is the product of the normalized operands
    unit_x = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    unit_w = torch.from_numpy(weight / np.linalg.norm(weight, axis=1, keepdims=True))
    torch.testing.assert_close(plain, 30.0 * unit_x @ unit_w.T, rtol=1e-12, atol=1e-12)


def test_label_margin_returns_cos_itself_at_zero():
    cos = torch.linspace(-1, 1, 11, dtype=torch.float64)
    for kind, m in [("cos", 0.0), ("arc", 0.0), ("combined", (1.0, 0.0, 0.0))]:
        value, slope, radial = label_margin(kind, m)(cos)
        assert torch.equal(value, cos) and torch.equal(slope, torch.ones_like(cos))
        assert torch.equal(radial, torch.zeros_like(cos))


# -- gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, s, m, easy", SETTINGS, ids=IDS)
def test_gradcheck(kind, s, m, easy):
    x, weight, label = data()
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(weight).requires_grad_()
    yt = torch.from_numpy(label)
    assert torch.autograd.gradcheck(
        lambda a, b: margin_head(a, b, yt, kind, s, m, easy), (xt, wt))


def test_gradcheck_with_lambda_and_through_the_module():
    x, weight, label = data((2, 3, 4, 3))
    head = head_of("sphere", 12.0, 4, weight=weight, lambda_=0.7)
    xt = torch.from_numpy(x).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: head(a, torch.from_numpy(label)), (xt,
                                    head.weight))


def test_margin_slope_matches_a_finite_difference():
    """f'(cos) of every kind, at cosines away from the switches, against central
    differences of f (the kernel's gradient rests on it)."""
    cos = torch.tensor([-0.95, -0.6, -0.2, 0.1, 0.45, 0.8, 0.97], dtype=torch.float64)
    step = 1e-6
    for kind, _, m, easy in SETTINGS:
        function = label_margin(kind, m, easy)
        value, slope, radial = function(cos)
        numeric = (function(cos + step)[0] - function(cos - step)[0]) / (2 * step)
        torch.testing.assert_close(slope, numeric, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(radial, value - cos * slope)


# -- extremes ------------------------------------------------------------------------------
def test_extreme_inputs_stay_finite():
    """Features of size 1e4, a feature parallel to its class weight (cos = 1, where an
    additive angular margin's slope is infinite: the floored sin keeps it finite), and a
    zero row (zero logits and zero gradient)."""
    x, weight, label = data()
    x = x * 1e4
    x[1] = weight[label[1]] * 3e3
    x[2] = 0.0
    for kind, s, m, easy in SETTINGS:
        for dtype in (torch.float32, torch.float64):
            head = head_of(kind, s, m, easy, weight).to(dtype)
            xt = torch.from_numpy(x).to(dtype).requires_grad_()
            logits = head(xt, torch.from_numpy(label))
            F.cross_entropy(logits, torch.from_numpy(label)).backward()
            assert torch.isfinite(logits).all(), (kind, dtype)
            assert torch.isfinite(xt.grad).all() and torch.isfinite(head.weight.grad).all()
            assert not logits[2].any() and not xt.grad[2].any()


def test_no_temporary_of_the_logits_size(peak_allocation):
    rows, features, classes = 64, 4, 4000
    x = torch.randn(rows, features, requires_grad=True)
    label = torch.randint(0, classes, (rows,))
    upstream = torch.randn(rows, classes)
    weight = torch.randn(classes, features, requires_grad=True)
    baseline = peak_allocation(lambda: (x @ weight.t()).backward(upstream))
    for kind in ("sphere", "cos", "arc", "combined"):
        head = MarginHead(features, classes, kind, s=30.0)
        extra = peak_allocation(lambda h=head: h(x, label).backward(upstream)) - baseline
        assert extra < rows * classes * 4 / 2, (kind, extra)


# -- errors and settings -------------------------------------------------------------------
def test_defaults_and_repr():
    head = MarginHead(8, 3)
    assert (head.kind, head.s, head.m, head.easy_margin) == ("arc", 64.0, 0.5, False)
    assert MarginHead(8, 3, "sphere").s is None and MarginHead(8, 3, "sphere").m == 4
    assert MarginHead(8, 3, "cos").m == 0.35
    assert MarginHead(8, 3, "combined").m == (1.0, 0.3, 0.2)
    assert repr(MarginHead(8, 3, "arc", s=30, m=0.4, easy_margin=True, axis=2)) == (
        "MarginHead(in_features=8, num_classes=3, kind='arc', s=30.0, m=0.4, "
        "easy_margin=True, axis=2)")


def test_bad_input_raises_our_errors():
    head = MarginHead(K, N, "cos", s=10.0)
    x = torch.randn(M, K)
    with pytest.raises(LabelError, match=r"must lie in \[0, 5\)"):
        head(x, torch.tensor([0.0, 5, 1, 1, 2, 3]))
    with pytest.raises(ShapeError, match="one label per row"):
        head(x, torch.zeros(4))
    with pytest.raises(ShapeError, match=r"must hold 7 elements \(K\)"):
        head(torch.randn(M, K + 1), torch.zeros(M))
    for kwargs, message in [({"kind": "hyper"}, "kind must be one of"),
                            ({"kind": "sphere", "m": 2.5}, "integer from 1 to 4"),
                            ({"kind": "combined", "m": 0.5}, "three finite numbers"),
                            ({"kind": "arc", "m": (0.1, 0.2)}, "one finite number"),
                            ({"kind": "arc", "s": -1.0}, "positive"),
                            ({"kind": "cos", "easy_margin": True}, "easy_margin"),
                            ({"kind": "arc", "lambda_": 1.0}, "lambda_")]:
        with pytest.raises(UnsupportedParameterError, match=message):
            MarginHead(K, N, **kwargs)


# -- as a Caffe layer ----------------------------------------------------------------------
def build(text, bottom_shapes=((4, 6), (4,))):
    param = text_format.Parse(
        f'name: "fc6" type: "MarginHead" bottom: "x" bottom: "label" top: "fc6" '
        f'margin_head_param {{ {text} }}', caffe_pb2.LayerParameter())
    ctx = BuildContext(phase="TRAIN", generator=torch.Generator().manual_seed(0))
    return MarginHead.from_caffe(param, list(bottom_shapes), ctx)


def test_from_caffe_reads_every_field():
    layer = build('num_output: 9 kind: COMBINED m1: 0.9 m2: 0.4 m3: 0.1 scale: 30 axis: 2 '
                  'weight_filler { type: "gaussian" std: 0.5 }', [(2, 3, 4, 5), (6,)])
    assert (layer.in_features, layer.num_classes, layer.kind, layer.axis) == (20, 9,
                                                                             "combined", 2)
    assert layer.s == 30.0 and layer.m == pytest.approx((0.9, 0.4, 0.1))
    assert 0.3 < layer.weight.std().item() < 0.7
    assert layer.output_shapes([(2, 3, 4, 5), (6,)]) == [(2, 3, 9)]
    arc = build("num_output: 3 easy_margin: true")
    assert (arc.kind, arc.s, arc.m, arc.easy_margin) == ("arc", 64.0, 0.5, True)
    assert arc.weight.abs().min() > 0  # xavier, not Caffe's constant 0: rows have directions
    sphere = build("num_output: 3 kind: SPHERE margin: 2 sphere_lambda: 5")
    assert (sphere.s, sphere.m, sphere.lambda_) == (None, 2, 5.0)
    assert pb_number("margin_head_param") >= 10000 and pb_number("softmax_diff_loss_param") \
        >= 10000


def pb_number(field):
    return caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name[field].number


TRAIN_NET = """name: "heads"
layer { name: "x" type: "Input" top: "x" top: "label"
  input_param { shape { dim: 6 dim: 3 dim: 2 dim: 2 } shape { dim: 6 } } }
layer { name: "fc5" type: "InnerProduct" bottom: "x" top: "fc5"
  inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "fc6" type: "MarginHead" bottom: "fc5" bottom: "label" top: "fc6"
  margin_head_param { num_output: 5 kind: %s scale: 16 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "loss" }
"""


@pytest.mark.parametrize("kind", ["SPHERE", "COS", "ARC", "COMBINED"])
def test_net_trains_the_head(kind):
    """A TRAIN net with the head before SoftmaxWithLoss: forward equals the functional form,
    backward reaches both weights, and a few SGD steps lower the loss."""
    net = Net(io.parse_prototxt(TRAIN_NET % kind), phase="TRAIN", seed=0, loss_mode="exact")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 2, 2, generator=generator)
    label = torch.tensor([0.0, 1, 2, 3, 4, 1])
    head = net.layer("fc6")
    losses = []
    for _ in range(6):
        net(x=x, label=label)
        if not losses:
            features = net.blobs["fc5"].detach()
            torch.testing.assert_close(
                net.blobs["fc6"], margin_head(features, head.weight, label, head.kind,
                                              head.s, head.m))
        losses.append(float(net.loss().detach()))
        net.clear_param_diffs()
        net.backward()
        for parameter in net.parameters():
            assert torch.isfinite(parameter.grad).all()
            with torch.no_grad():
                parameter -= 0.2 * parameter.grad
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("param", ["kind: SPHERE margin: 4", "kind: SPHERE margin: 3 scale: 8",
                                   "kind: SPHERE margin: 2 sphere_lambda: 3",
                                   "kind: COS scale: 10 margin: 0.3", "kind: ARC scale: 10",
                                   "kind: ARC scale: 10 margin: 1.2",
                                   "kind: ARC scale: 10 easy_margin: true",
                                   "kind: COMBINED m1: 0.9 m2: 0.4 m3: 0.1 scale: 5",
                                   "kind: COMBINED m1: 1 m2: 0.3 m3: 0.2 scale: 5"])
def test_onnx_export_matches_the_net(param):
    text = ('layer { name: "x" type: "Input" top: "x" top: "y" input_param { shape { dim: 6 '
            'dim: 3 dim: 4 dim: 3 } shape { dim: 6 } } }\n'
            f'layer {{ name: "h" type: "MarginHead" bottom: "x" bottom: "y" top: "h" '
            f'margin_head_param {{ num_output: 5 axis: 1 {param} }} }}\n')
    net = Net(io.parse_prototxt(text), seed=0)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3, 4, 3)).astype(np.float32)
    x[5] = 0  # a zero row: zero logits in both
    y = np.array([1, 4, 0, 2, 3, 1], np.float32)
    got = run_onnx(convert_to_onnx(net), {"x": x, "y": y}, threads=1)["h"]
    with torch.no_grad():
        want = net(x=torch.from_numpy(x), y=torch.from_numpy(y))["h"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_onnx_export_of_the_deploy_head_with_a_dynamic_batch():
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 6 } } }\n'
            'layer { name: "h" type: "MarginHead" bottom: "x" top: "h" '
            'margin_head_param { num_output: 5 kind: COS scale: 30 } }\n')
    net = Net(io.parse_prototxt(text), seed=0)
    x = np.random.default_rng(3).standard_normal((7, 6)).astype(np.float32)
    got = run_onnx(convert_to_onnx(net), {"x": x}, threads=1)["h"]
    with torch.no_grad():
        want = net(x=torch.from_numpy(x))["h"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
