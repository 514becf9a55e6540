"""SoftmaxWithLoss: Caffe's fixtures, PyTorch's cross_entropy, the FLT_MIN floor (loss
87.3365), normalizations with ignore_label, the class axis, gradcheck, and bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from caffelayers.errors import CaffeFormatError, ShapeError
from caffelayers.layers.base import BuildContext
from caffelayers.errors import LabelError
from caffelayers.losses.infogain import (SoftmaxWithLoss, softmax_infogain_loss,
                                         softmax_loss)
from caffelayers.proto import caffe_pb2
from caffelayers.proto.io import read_prototxt
from caffelayers.registry import LAYERS
from caffelayers.verify import compare

CASES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
N, C, H, W = 2, 5, 7, 3
FLT_MIN = float(np.finfo(np.float32).tiny)

FIXTURES = {
    "softmax_loss_batch_size": dict(normalization="batch_size", ignore_label=1),
    "softmax_loss_full": dict(normalization="full"),
    "softmax_loss_none": dict(normalization="none"),
    "softmax_loss_valid": dict(normalization="valid", ignore_label=1),
}


def build(text, bottom_shapes, **ctx):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = LAYERS[param.type].from_caffe(param, bottom_shapes, BuildContext(**ctx))
    layer.layer_name = param.name
    return layer


def f64(array, grad=False):
    return torch.tensor(array, dtype=torch.float64, requires_grad=grad)


def random_case(seed, shape=(N, C, H, W), ignore_label=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2
    labels = rng.integers(0, shape[1], size=shape[:1] + shape[2:]).astype(np.float64)
    if ignore_label is not None:
        labels.reshape(-1)[::4] = ignore_label
    return x, labels


# -- Caffe's fixtures ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["caffe", "exact"])
@pytest.mark.parametrize("case", sorted(FIXTURES))
def test_fixture_case(case, mode):
    """Nothing saturates in these cases, so both modes give Caffe's numbers."""
    ref = np.load(CASES / case / "reference.npz")
    x = torch.tensor(ref["input/x"], requires_grad=True)
    loss = softmax_loss(x, torch.tensor(ref["input/label"]), mode=mode, **FIXTURES[case])
    loss.backward()
    checks = [compare("loss", loss, ref["iter0/data/loss"]),
              compare("diff/x", x.grad, ref["iter0/diff/x"])]
    assert all(c.passed for c in checks), [c.describe() for c in checks if not c.passed]


@pytest.mark.parametrize("case", sorted(FIXTURES))
def test_fixture_case_from_prototxt(case):
    ref = np.load(CASES / case / "reference.npz")
    param = next(p for p in read_prototxt(CASES / case / "net.prototxt").layer
                 if p.type == "SoftmaxWithLoss")
    layer = SoftmaxWithLoss.from_caffe(param, [ref["input/x"].shape, ref["input/label"].shape],
                                       BuildContext(phase="TRAIN"))
    assert (layer.normalization, layer.ignore_label) == (
        FIXTURES[case]["normalization"], FIXTURES[case].get("ignore_label"))
    x = torch.tensor(ref["input/x"], requires_grad=True)
    loss = layer(x, torch.tensor(ref["input/label"]))
    loss.backward()
    assert compare("loss", loss, ref["iter0/data/loss"]).passed
    assert compare("diff/x", x.grad, ref["iter0/diff/x"]).passed


# -- semantics -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["caffe", "exact"])
def test_matches_cross_entropy_with_ignore_index(mode):
    """VALID with ignore_label is cross_entropy's mean over the kept positions."""
    x, labels = random_case(0, ignore_label=255)
    ours_x, theirs_x = f64(x, True), f64(x, True)
    ours = softmax_loss(ours_x, f64(labels), ignore_label=255, mode=mode)
    theirs = F.cross_entropy(theirs_x, torch.tensor(labels).long(), ignore_index=255)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    np.testing.assert_allclose(ours_x.grad, theirs_x.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("normalization, divisor", [("full", N * H * W), ("batch_size", N),
                                                    ("none", 1)])
def test_normalizations_count_ignored_positions(normalization, divisor):
    x, labels = random_case(1, ignore_label=3)
    kept = labels != 3
    total = F.cross_entropy(f64(x), torch.tensor(labels).long(), ignore_index=3,
                            reduction="sum")
    loss = softmax_loss(f64(x), f64(labels), normalization=normalization, ignore_label=3)
    assert kept.sum() < N * H * W
    assert loss.item() == pytest.approx(total.item() / divisor, rel=1e-12)


def test_is_infogain_with_identity_H():
    x, labels = random_case(2, ignore_label=0)
    for mode in ("caffe", "exact"):
        a, b = f64(x, True), f64(x, True)
        softmax_loss(a, f64(labels), ignore_label=0, mode=mode,
                     normalization="full").backward()
        softmax_infogain_loss(b, f64(labels), np.eye(C), ignore_label=0, mode=mode,
                              normalization="full").backward()
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_diverged_run_prints_87_3365():
    """Caffe floors the label's probability at FLT_MIN: -ln(FLT_MIN) = 87.3365. The gradient
    is still p - onehot; the exact mode reports the true loss."""
    x = torch.tensor([[0.0, 200.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss = softmax_loss(x, torch.tensor([0.0]), mode="caffe")
    assert loss.item() == pytest.approx(87.3365, abs=1e-4)
    assert loss.item() == pytest.approx(-np.log(FLT_MIN), rel=1e-6)
    loss.backward()
    np.testing.assert_array_equal(x.grad, [[-1.0, 1.0, 0.0, 0.0, 0.0]])
    assert softmax_loss(x, torch.tensor([0.0])).item() == pytest.approx(200.0)


@pytest.mark.parametrize("shape, axis", [((N, H, C), 2), ((N, H, C), -1), ((W, N, C), 2)])
def test_class_axis(shape, axis):
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape)
    labels = rng.integers(0, C, size=shape[:-1]).astype(np.float64)
    ours = softmax_loss(f64(x), f64(labels), axis=axis)
    theirs = F.cross_entropy(f64(np.moveaxis(x, -1, 1)), torch.tensor(labels).long())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)


def test_probability_top():
    """Caffe never backpropagates the prob top; the exact mode gives it its true gradient."""
    x, labels = random_case(4, (N, C))
    for mode, differentiable in (("caffe", False), ("exact", True)):
        _, prob = softmax_loss(f64(x, True), f64(labels), mode=mode, return_prob=True)
        np.testing.assert_allclose(prob.detach(), torch.softmax(f64(x), 1), rtol=1e-12)
        assert prob.requires_grad == differentiable


def test_gradcheck_exact():
    x, labels = random_case(5, (N, C, 3, 2), ignore_label=2)
    labels = f64(labels)
    assert torch.autograd.gradcheck(
        lambda logits: softmax_loss(logits, labels, ignore_label=2, normalization="full"),
        (f64(x, True),))


def test_exact_mode_is_stable_on_extreme_logits():
    x = torch.tensor([[1e4, -1e4, 0, 0, 0], [-1e4, 1e4, 1e4, 0, -3]], requires_grad=True)
    loss = softmax_loss(x, torch.tensor([1.0, 4.0]))
    loss.backward()
    assert loss.item() == pytest.approx((2e4 + 1e4 + 3 + np.log(2)) / 2, rel=1e-6)
    assert torch.isfinite(x.grad).all()


# -- the layer -------------------------------------------------------------------------------

def test_from_caffe_fields_and_legacy_normalize():
    layer = build('name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l" '
                  'top: "p" softmax_param { axis: 2 } loss_param { normalize: false '
                  'ignore_label: -1 }', [(N, H, C), (N, H)], options={"loss_mode": "exact"})
    assert (layer.axis, layer.normalization, layer.ignore_label, layer.mode,
            layer.return_prob) == (2, "batch_size", -1, "exact", True)
    assert layer.output_shapes([(N, H, C), (N, H)]) == [(), (N, H, C)]
    assert repr(layer) == ("SoftmaxWithLoss(axis=2, normalization='batch_size', "
                           "ignore_label=-1, return_prob=True)")
    default = build('name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l"',
                    [(N, C), (N,)])
    assert (default.axis, default.normalization, default.mode, default.return_prob) == \
        (1, "valid", "caffe", False)
    assert default.output_shapes([(N, C), (N,)]) == [()]


def test_bad_input():
    layer = SoftmaxWithLoss()
    layer.layer_name = "loss"
    with pytest.raises(ShapeError, match="'loss'.*42 labels"):
        layer.output_shapes([(N, C, H, W), (N, H, W + 1)])
    with pytest.raises(ShapeError, match="'loss'.*2 bottoms"):
        layer.output_shapes([(N, C), (N,), (C, C)])
    with pytest.raises(ShapeError, match="axis 4 must lie in"):
        SoftmaxWithLoss(axis=4).output_shapes([(N, C, H, W), (N, H, W)])
    with pytest.raises(LabelError, match=r"'loss'.*outside \[0, 5\)"):
        layer(torch.zeros(N, C), torch.tensor([0.0, 7.0]))
    with pytest.raises(CaffeFormatError, match="3 tops"):
        build('name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "a" '
              'top: "b" top: "c"', [(N, C), (N,)])
