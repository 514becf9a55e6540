"""InfogainLoss (softmax inside) and the legacy layer: Caffe's fixtures, a float64 reference
written from Caffe's loops, the 1e-20 floor and Caffe's gradient, the exact mode's gradcheck
(logits and H) and stability, H sources, and bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import (CaffeFormatError, CaffeLayersError, ShapeError,
                                UnsupportedParameterError)
from caffelayers.layers.base import BuildContext
from caffelayers.errors import LabelError
from caffelayers.losses.infogain import (InfogainLossLegacy,
                                         SoftmaxWithInfogainLoss, infogain_loss_legacy,
                                         softmax_infogain_loss)
from caffelayers.proto import caffe_pb2
from caffelayers.proto.io import read_prototxt, write_binaryproto
from caffelayers.registry import LAYERS
from caffelayers.verify import compare

CASES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
N, C, H, W = 2, 5, 7, 3
FLOOR = 1e-20  # Dtype(1e-20): exactly 1e-20 in the float64 tests

# The settings each case's net.prototxt gives its InfogainLoss layer, written out by hand.
FIXTURES = {
    "infogain_axis2": dict(axis=2),
    "infogain_batch_size": dict(normalization="batch_size"),
    "infogain_full": dict(normalization="full"),
    "infogain_identity_prob_top": dict(),
    "infogain_none": dict(normalization="none"),
    "infogain_saturated": dict(),
    "infogain_source_file": dict(loss_weight=2.0, source="H.binaryproto"),
    "infogain_spatial_full_ignore": dict(normalization="full", ignore_label=0),
    "infogain_spatial_ignore": dict(normalization="valid", ignore_label=2),
    "infogain_valid": dict(normalization="valid"),
}


def reference(x, labels, Hm, axis=1, normalization="valid", ignore_label=None, floor=FLOOR):
    """Caffe's Forward_cpu / Backward_cpu loops in float64 (floor None: exact log-softmax)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    y = np.asarray(labels).reshape(-1).astype(int)
    Hm = np.asarray(Hm, np.float64).reshape(shape[-1], shape[-1])
    shifted = x - x.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    p = np.exp(log_p)
    logs = log_p if floor is None else np.log(np.maximum(p, floor))
    kept = np.ones(len(y), bool) if ignore_label is None else y != ignore_label
    loss = -sum((Hm[y[i]] * logs[i]).sum() for i in range(len(y)) if kept[i])
    outer = int(np.prod(shape[:axis]))
    divisor = {"full": len(y), "valid": kept.sum(), "batch_size": outer, "none": 1}[normalization]
    divisor = max(1.0, float(divisor))
    grad = (p * Hm.sum(1)[y][:, None] - Hm[y]) * kept[:, None] / divisor
    return loss / divisor, np.moveaxis(grad.reshape(shape), -1, axis)


def random_case(rng, shape=(N, C, H, W), axis=1, ignore_label=None):
    classes = shape[axis]
    label_shape = shape[:axis] + shape[axis + 1:]
    x = rng.normal(size=shape) * 2
    labels = rng.integers(0, classes, size=label_shape).astype(np.float64)
    if ignore_label is not None:
        labels.reshape(-1)[::3] = ignore_label
    return x, labels, rng.uniform(size=(classes, classes))


def f64(array, grad=False):
    return torch.tensor(array, dtype=torch.float64, requires_grad=grad)


# -- Caffe's fixtures ------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(FIXTURES))
def test_fixture_case_functional(case):
    """The functional form in caffe mode gives Caffe's loss, logits gradient and prob top."""
    settings = dict(FIXTURES[case])
    loss_weight = settings.pop("loss_weight", 1.0)
    source = settings.pop("source", None)
    ref = np.load(CASES / case / "reference.npz")
    x = torch.tensor(ref["input/x"], requires_grad=True)
    Hm = CASES / case / source if source else ref["input/H"]
    loss, prob = softmax_infogain_loss(x, torch.tensor(ref["input/label"]), Hm, mode="caffe",
                                       return_prob=True, **settings)
    (loss * loss_weight).backward()
    checks = [compare("loss", loss, ref["iter0/data/loss"]),
              compare("diff/xs", x.grad, ref["iter0/diff/xs"])]
    if "iter0/data/prob" in ref:
        checks.append(compare("prob", prob, ref["iter0/data/prob"]))
    assert all(c.passed for c in checks), [c.describe() for c in checks if not c.passed]


@pytest.mark.parametrize("case", sorted(FIXTURES))
def test_fixture_case_from_prototxt(case):
    """The layer built from the case's own prototxt (source resolved against its directory)."""
    ref = np.load(CASES / case / "reference.npz")
    net = read_prototxt(CASES / case / "net.prototxt")
    param = next(p for p in net.layer if p.type == "InfogainLoss")
    inputs = [ref["input/x"], ref["input/label"]] + ([ref["input/H"]] if "input/H" in ref else [])
    layer = SoftmaxWithInfogainLoss.from_caffe(param, [a.shape for a in inputs],
                                               BuildContext(phase="TRAIN",
                                                            source_dir=CASES / case))
    assert layer.mode == "caffe" and layer.return_prob == (len(param.top) == 2)
    x = torch.tensor(inputs[0], requires_grad=True)
    out = layer(x, *map(torch.tensor, inputs[1:]))
    loss = out[0] if layer.return_prob else out
    assert layer.output_shapes([a.shape for a in inputs])[0] == ()
    (loss * param.loss_weight[0] if param.loss_weight else loss).backward()
    checks = [compare("loss", loss, ref["iter0/data/loss"]),
              compare("diff/xs", x.grad, ref["iter0/diff/xs"])]
    assert all(c.passed for c in checks), [c.describe() for c in checks if not c.passed]


def test_saturated_fixture_floor_and_gradient():
    """Probabilities under 1e-20 cost log(1e-20) in caffe mode; Caffe's gradient still uses
    the true p (not the zero slope of the floor); the exact mode differs in the loss only."""
    ref = np.load(CASES / "infogain_saturated" / "reference.npz")
    args = [torch.tensor(ref["input/label"]), ref["input/H"]]
    p = torch.softmax(torch.tensor(ref["input/x"], dtype=torch.float64), 1)
    assert (p < 1e-20).sum() > 5
    grads = {}
    for mode in ("caffe", "exact"):
        x = torch.tensor(ref["input/x"], requires_grad=True)
        loss = softmax_infogain_loss(x, *args, mode=mode)
        loss.backward()
        grads[mode] = x.grad
        assert torch.isfinite(loss)
    assert compare("diff", grads["caffe"], ref["iter0/diff/xs"]).passed
    assert compare("diff", grads["exact"], ref["iter0/diff/xs"]).passed
    exact_loss, _ = reference(ref["input/x"], *args, floor=None)
    assert exact_loss > 2 * float(ref["iter0/data/loss"])
    assert softmax_infogain_loss(torch.tensor(ref["input/x"]), *args).item() == \
        pytest.approx(exact_loss, rel=1e-5)


# -- float64 reference -----------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["full", "valid", "batch_size", "none"])
@pytest.mark.parametrize("ignore_label", [None, 3])
@pytest.mark.parametrize("mode", ["caffe", "exact"])
def test_spatial_against_reference(normalization, ignore_label, mode):
    rng = np.random.default_rng(1)
    x, labels, Hm = random_case(rng, ignore_label=ignore_label)
    logits = f64(x, grad=True)
    loss = softmax_infogain_loss(logits, f64(labels), Hm, normalization=normalization,
                                 ignore_label=ignore_label, mode=mode)
    loss.backward()
    want_loss, want_grad = reference(x, labels, Hm, 1, normalization, ignore_label,
                                     FLOOR if mode == "caffe" else None)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(logits.grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape, axis", [((N, H, C), 2), ((N, H, C), -1), ((W, N, C, H), 2),
                                         ((H, C), 1), ((C, N), 0)])
def test_class_axis(shape, axis):
    rng = np.random.default_rng(2)
    canonical = axis % len(shape)
    x, labels, Hm = random_case(rng, shape, canonical)
    logits = f64(x, grad=True)
    loss = softmax_infogain_loss(logits, f64(labels), Hm, axis=axis)
    loss.backward()
    want_loss, want_grad = reference(x, labels, Hm, canonical, floor=None)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(logits.grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


def test_labels_only_need_the_right_count():
    """Caffe checks the label count only: N x 1 x H x W and N x H x W labels are the same."""
    rng = np.random.default_rng(3)
    x, labels, Hm = random_case(rng)
    flat = softmax_infogain_loss(f64(x), f64(labels), Hm)
    shaped = softmax_infogain_loss(f64(x), f64(labels.reshape(N, 1, H, W)), Hm)
    assert flat.item() == shaped.item()


def test_everything_ignored_gives_zero_not_nan():
    """VALID with no valid position divides by max(1, 0) = 1."""
    x = f64(np.ones((N, C)), grad=True)
    loss = softmax_infogain_loss(x, f64([4, 4]), np.ones((C, C)), ignore_label=4)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(x.grad) == 0


def test_identity_H_is_softmax_cross_entropy():
    rng = np.random.default_rng(4)
    x, labels, _ = random_case(rng, (N, C, H))
    loss = softmax_infogain_loss(f64(x), f64(labels), np.eye(C))
    expected = torch.nn.functional.cross_entropy(f64(x), torch.tensor(labels).long())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_no_per_position_cost_matrix():
    """N x C x C would be 2**30 elements here; only label rows (N x C) may be gathered."""
    classes, num = 1024, 1024
    logits = torch.randn(num, classes, requires_grad=True)
    Hm = torch.rand(classes, classes)
    labels = torch.randint(classes, (num,)).float()
    softmax_infogain_loss(logits, labels, Hm).backward()
    rows = Hm[labels.long()]
    expected = torch.softmax(logits.detach(), 1) * rows.sum(1, keepdim=True) - rows
    # float32 throughout, summed in an order that depends on the thread count: compare at
    # float32's relative precision rather than with a fixed absolute bound.
    torch.testing.assert_close(logits.grad, expected / num, rtol=1e-5, atol=1e-9)


# -- exact mode: gradcheck and stability -----------------------------------------------------

@pytest.mark.parametrize("ignore_label, normalization", [(None, "valid"), (1, "valid"),
                                                         (1, "full")])
def test_exact_gradcheck_logits_and_H(ignore_label, normalization):
    rng = np.random.default_rng(5)
    x, labels, Hm = random_case(rng, (N, C, 3, 2), ignore_label=ignore_label)
    labels = f64(labels)

    def loss(logits, cost):
        return softmax_infogain_loss(logits, labels, cost, normalization=normalization,
                                     ignore_label=ignore_label)

    assert torch.autograd.gradcheck(loss, (f64(x, True), f64(Hm, True)))


def test_exact_gradcheck_classification_and_H_of_any_shape():
    rng = np.random.default_rng(6)
    x, labels, Hm = random_case(rng, (W, C), 1)
    labels = f64(labels)
    cost = f64(Hm.reshape(1, 1, C, C), True)  # Caffe's legacy 4-D blob shape
    assert torch.autograd.gradcheck(
        lambda logits, h: softmax_infogain_loss(logits, labels, h), (f64(x, True), cost))


def test_caffe_mode_H_gradient_is_that_of_the_floored_loss():
    rng = np.random.default_rng(7)
    x, labels, Hm = random_case(rng, (H, C), 1)
    x[:, 0] = -80.0  # class 0 saturates: p < 1e-20
    cost = f64(Hm, True)
    softmax_infogain_loss(f64(x), f64(labels), cost, mode="caffe").backward()
    logs = np.log(np.maximum(torch.softmax(f64(x), 1).numpy(), FLOOR))
    expected = np.zeros((C, C))
    for row, label in zip(logs, labels.astype(int)):
        expected[label] -= row / H
    np.testing.assert_allclose(cost.grad.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_mode_is_stable_on_extreme_logits(dtype):
    """Logits of magnitude 1e4: the exact loss is finite and right, gradients are finite."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.rand(N, C, H, W, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4
    x[:, 0] = 1e4
    x[:, 1] = -1e4
    labels = torch.randint(1, C, (N, H, W), generator=gen).double()
    labels[0, 0, 0] = 1
    Hm = torch.rand(C, C, generator=gen, dtype=torch.float64)
    logits = x.to(dtype, copy=True).requires_grad_()
    cost = Hm.to(dtype, copy=True).requires_grad_()
    loss = softmax_infogain_loss(logits, labels, cost)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.isfinite(cost.grad).all()
    want, _ = reference(x.numpy(), labels.numpy(), Hm.numpy(), floor=None)
    assert want > 1e3 and loss.item() == pytest.approx(want, rel=1e-5)
    caffe = softmax_infogain_loss(x.to(dtype), labels, Hm.to(dtype), mode="caffe")
    assert caffe.item() < loss.item()  # Caffe's floor caps every term at 46.05 * H


# -- H sources -------------------------------------------------------------------------------

def test_H_as_tensor_array_and_binaryproto(tmp_path):
    rng = np.random.default_rng(9)
    x, labels, Hm = random_case(rng, (N, C, H))
    path = tmp_path / "H.binaryproto"
    write_binaryproto(Hm.astype(np.float32).reshape(1, 1, C, C), path)
    logits, y = torch.tensor(x, dtype=torch.float32), torch.tensor(labels)
    values = [softmax_infogain_loss(logits, y, h).item()
              for h in (torch.tensor(Hm), Hm.astype(np.float32), path, str(path))]
    assert values == pytest.approx([values[0]] * 4, rel=1e-6)


def test_module_with_learned_H():
    """An nn.Parameter H is registered as a parameter and receives a gradient."""
    layer = SoftmaxWithInfogainLoss(torch.nn.Parameter(torch.eye(C, dtype=torch.float64)))
    assert [name for name, _ in layer.named_parameters()] == ["infogain"]
    layer(f64(np.zeros((N, C))), f64([0, 3])).backward()
    assert layer.infogain.grad is not None and layer.infogain.grad[0].abs().sum() > 0


def test_third_bottom_wins_over_stored_H():
    rng = np.random.default_rng(10)
    x, labels, Hm = random_case(rng, (N, C))
    layer = SoftmaxWithInfogainLoss(np.eye(C))
    assert layer(f64(x), f64(labels), f64(Hm)).item() == \
        pytest.approx(softmax_infogain_loss(f64(x), f64(labels), Hm).item())


def build(text, bottom_shapes, **ctx):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = LAYERS[param.type].from_caffe(param, bottom_shapes, BuildContext(**ctx))
    layer.layer_name = param.name
    return layer


def test_from_caffe_reads_every_field(tmp_path):
    write_binaryproto(np.eye(C, dtype=np.float32), tmp_path / "h.binaryproto")
    layer = build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "y" top: "l" top: "p" '
                  'infogain_loss_param { source: "h.binaryproto" axis: -1 } '
                  'loss_param { normalization: BATCH_SIZE ignore_label: 255 }',
                  [(N, H, C), (N, H)], source_dir=tmp_path, options={"loss_mode": "exact"})
    assert (layer.axis, layer.normalization, layer.ignore_label, layer.mode,
            layer.return_prob) == (-1, "batch_size", 255, "exact", True)
    assert torch.equal(layer.infogain, torch.eye(C))
    assert layer.output_shapes([(N, H, C), (N, H)]) == [(), (N, H, C)]
    assert repr(layer) == ("SoftmaxWithInfogainLoss(H=5x5, axis=-1, "
                           "normalization='batch_size', ignore_label=255, return_prob=True)")
    loss, prob = layer(torch.zeros(N, H, C), torch.full((N, H), 255.0))
    assert loss.item() == 0 and prob.shape == (N, H, C)


def test_from_caffe_defaults_to_caffe_mode_and_valid():
    layer = build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "y" bottom: "H" '
                  'top: "l"', [(N, C), (N,), (C, C)])
    assert (layer.mode, layer.normalization, layer.ignore_label, layer.infogain) == \
        ("caffe", "valid", None, None)
    assert repr(layer) == "SoftmaxWithInfogainLoss(mode='caffe')"


def test_from_caffe_errors(tmp_path):
    with pytest.raises(CaffeFormatError, match="source"):
        build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "y" top: "l"',
              [(N, C), (N,)])
    with pytest.raises(CaffeFormatError, match="missing.binaryproto"):
        build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "y" top: "l" '
              'infogain_loss_param { source: "missing.binaryproto" }', [(N, C), (N,)],
              source_dir=tmp_path)
    with pytest.raises(UnsupportedParameterError, match="normalize"):
        build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "y" bottom: "H" top: "l" '
              'loss_param { normalize: true }', [(N, C), (N,), (C, C)])
    with pytest.raises(UnsupportedParameterError, match="loss mode"):
        build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "y" bottom: "H" top: "l"',
              [(N, C), (N,), (C, C)], options={"loss_mode": "fast"})


# -- bad input -------------------------------------------------------------------------------

def test_H_of_the_wrong_size():
    with pytest.raises(ShapeError, match="C x C = 5 x 5"):
        softmax_infogain_loss(torch.zeros(N, C), torch.zeros(N), torch.eye(4))
    layer = SoftmaxWithInfogainLoss()
    layer.layer_name = "ig"
    with pytest.raises(ShapeError, match="'ig'.*C x C = 5 x 5 elements, got 30"):
        layer.output_shapes([(N, C), (N,), (5, 6)])
    with pytest.raises(ShapeError, match="'ig'.*third bottom"):
        layer.output_shapes([(N, C), (N,)])
    with pytest.raises(ShapeError, match="'ig'.*third bottom"):
        layer(torch.zeros(N, C), torch.zeros(N))


def test_label_count_and_axis():
    with pytest.raises(ShapeError, match="14 labels"):
        softmax_infogain_loss(torch.zeros(N, C, H), torch.zeros(N, H + 1), torch.eye(C))
    with pytest.raises(ShapeError, match="axis 3"):
        softmax_infogain_loss(torch.zeros(N, C, H), torch.zeros(N, H), torch.eye(C), axis=3)
    layer = SoftmaxWithInfogainLoss(torch.eye(C), axis=2)
    with pytest.raises(ShapeError, match="42 labels"):
        layer.output_shapes([(N, H, C, W), (N, H, C)])


@pytest.mark.parametrize("bad", [5.0, -1.0])
def test_label_out_of_range(bad):
    labels = torch.tensor([1.0, bad])
    with pytest.raises(LabelError, match=r"outside \[0, 5\)"):
        softmax_infogain_loss(torch.zeros(N, C), labels, torch.eye(C))
    with pytest.raises(CaffeLayersError):  # a project error, and a ValueError
        softmax_infogain_loss(torch.zeros(N, C), labels, torch.eye(C), ignore_label=3)
    # an out-of-range ignore label is fine (255 is the usual one)
    softmax_infogain_loss(torch.zeros(N, C), labels, torch.eye(C), ignore_label=int(bad))


def test_bad_mode_and_normalization():
    with pytest.raises(UnsupportedParameterError, match="mode"):
        softmax_infogain_loss(torch.zeros(N, C), torch.zeros(N), torch.eye(C), mode="fast")
    with pytest.raises(UnsupportedParameterError, match="normalization"):
        softmax_infogain_loss(torch.zeros(N, C), torch.zeros(N), torch.eye(C),
                              normalization="mean")


# -- the legacy layer (probabilities in) -----------------------------------------------------

def test_legacy_loss_and_caffe_gradient_below_the_floor():
    prob = f64([[0.7, 0.3, 0.0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.0]], grad=True)
    Hm = np.arange(1.0, 26.0).reshape(C, C)
    labels = f64([2, 4])
    loss = infogain_loss_legacy(prob, labels, Hm, mode="caffe")
    loss.backward()
    p = np.maximum(prob.detach().numpy(), FLOOR)
    rows = Hm[[2, 4]]
    assert loss.item() == pytest.approx(-(rows * np.log(p)).sum() / 2, rel=1e-12)
    np.testing.assert_allclose(prob.grad.numpy(), -rows / p / 2, rtol=1e-12)
    exact = prob.detach().requires_grad_()
    infogain_loss_legacy(exact, labels, Hm).backward()
    assert exact.grad[0, 2] == 0  # the floored log is flat below 1e-20
    assert exact.grad[1, 0].item() == pytest.approx(prob.grad[1, 0].item())


def test_legacy_gradcheck_and_layer(tmp_path):
    rng = np.random.default_rng(11)
    prob = f64(rng.dirichlet(np.ones(C), size=H).reshape(H, C, 1, 1), grad=True)
    labels = f64(rng.integers(0, C, size=H))
    cost = f64(rng.uniform(size=(C, C)), grad=True)
    for mode in ("exact", "caffe"):  # above the floor both gradients are the true one
        assert torch.autograd.gradcheck(
            lambda p, h: infogain_loss_legacy(p, labels, h, mode=mode), (prob, cost))
    write_binaryproto(np.eye(C, dtype=np.float32), tmp_path / "h.binaryproto")
    layer = build('name: "old" type: "InfogainLossLegacy" bottom: "p" bottom: "y" top: "l" '
                  'infogain_loss_param { source: "h.binaryproto" }', [(H, C), (H,)],
                  source_dir=tmp_path)
    assert isinstance(layer, InfogainLossLegacy) and layer.mode == "caffe"
    assert layer.output_shapes([(H, C, 1, 1), (H, 1, 1, 1)]) == [()]
    loss = layer(prob.detach().float(), labels.float())
    picked = prob.detach().reshape(H, C)[torch.arange(H), labels.long()]
    assert loss.item() == pytest.approx(-picked.log().mean().item(), rel=1e-5)
    with pytest.raises(ShapeError, match="'old'.*5 x 5 elements, got 16"):
        layer.output_shapes([(H, C), (H,), (4, 4)])
    with pytest.raises(ShapeError, match="'old'.*7 labels"):
        layer.output_shapes([(H, C), (H, 2)])


@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)])
def test_a_second_backward_of_one_forward_gives_the_same_gradient(shape):
    """The first backward writes the gradient over the forward's gathered rows; a second one
    (retain_graph) must gather them again, not read the gradient as rows."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(5, (shape[0],) + shape[2:], generator=generator)
    H = torch.rand(5, 5, generator=generator, dtype=torch.float64)
    loss = softmax_infogain_loss(logits, labels, H, ignore_label=1)
    first, = torch.autograd.grad(loss, logits, retain_graph=True)
    second, = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    fresh, = torch.autograd.grad(softmax_infogain_loss(logits, labels, H, ignore_label=1),
                                 logits)
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)
    # against autograd through the plain formula (class axis 1, VALID normalization)
    log_prob = torch.log_softmax(logits, dim=1).movedim(1, -1)
    kept = labels != 1
    plain = -(H[labels] * log_prob)[kept].sum() / kept.sum()
    reference, = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(first, reference, rtol=1e-12, atol=1e-12)
