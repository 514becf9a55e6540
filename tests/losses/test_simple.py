"""The simple loss layers against float64 numpy references written from Caffe's loops,
their Caffe-specific gradients, normalizations, and shape errors."""

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import CaffeLayersError, ShapeError
from caffelayers.layers.base import BuildContext
from caffelayers.losses.simple import (ContrastiveLoss, EuclideanLoss, HingeLoss,
                                       MultinomialLogisticLoss, SigmoidCrossEntropyLoss)
from caffelayers.proto import caffe_pb2
from caffelayers.registry import LAYERS

N, C, H, W = 2, 5, 7, 3


def build(text, bottom_shapes):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = LAYERS[param.type].from_caffe(param, bottom_shapes, BuildContext())
    layer.layer_name = param.name
    return layer


def loss_and_grad(layer, *bottoms):
    """The loss and the gradient of each floating bottom that requires one."""
    loss = layer(*bottoms)
    assert loss.shape == () and type(layer).is_loss
    loss.backward()
    return loss.item(), [b.grad for b in bottoms]


def tensors(*arrays, grad=(0,)):
    return [torch.tensor(a, dtype=torch.float64, requires_grad=i in grad)
            for i, a in enumerate(arrays)]


# -- SigmoidCrossEntropyLoss -------------------------------------------------------------------

def sigmoid_ce_reference(x, t, divisor, ignore_label=None):
    """Caffe's stable loop, element by element, and its backward (sigmoid(x) - t) / divisor."""
    kept = np.ones_like(x, dtype=bool) if ignore_label is None else \
        t.astype(int) != ignore_label  # astype(int) truncates, as static_cast<int>
    positive = (x >= 0).astype(float)
    terms = -(x * (t - positive) - np.log(1 + np.exp(x - 2 * x * positive)))
    grad = np.where(kept, 1 / (1 + np.exp(-x)) - t, 0.0) / divisor
    return terms[kept].sum() / divisor, grad


@pytest.mark.parametrize("loss_param, divisor", [
    ("", N),  # Caffe 1.0's default for this layer is BATCH_SIZE
    ("loss_param { normalization: FULL }", N * C * H),
    ("loss_param { normalization: VALID }", N * C * H),
    ("loss_param { normalization: NONE }", 1),
    ("loss_param { normalize: true }", N * C * H),  # legacy field: true is VALID
    ("loss_param { normalize: false }", N),
])
def test_sigmoid_cross_entropy_normalizations(loss_param, divisor):
    rng = np.random.default_rng(0)
    x, t = rng.normal(scale=4, size=(N, C, H)), rng.uniform(size=(N, C, H))
    layer = build(f'name: "l" type: "SigmoidCrossEntropyLoss" {loss_param}', [x.shape, t.shape])
    loss, (grad, target_grad) = loss_and_grad(layer, *tensors(x, t))
    expected, expected_grad = sigmoid_ce_reference(x, t, divisor)
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-10, atol=1e-15)
    assert target_grad is None


def test_sigmoid_cross_entropy_ignore_truncates_targets():
    """With ignore_label 0, targets 0 and 0.7 (static_cast<int> gives 0) are both left out."""
    rng = np.random.default_rng(1)
    x = rng.normal(scale=3, size=(N, 6))
    t = np.array([[0.0, 0.7, 1.0, 1.0, 0.2, 1.0], [1.0, 1.0, 0.0, 1.0, 1.0, 0.99]])
    layer = build('name: "l" type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: 0 '
                  'normalization: VALID }', [x.shape, t.shape])
    loss, (grad, _) = loss_and_grad(layer, *tensors(x, t))
    valid = 7  # the ones
    expected, expected_grad = sigmoid_ce_reference(x, t, valid, ignore_label=0)
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-10, atol=1e-15)
    assert repr(layer) == "SigmoidCrossEntropyLoss(normalization='VALID', ignore_label=0)"


def test_sigmoid_cross_entropy_every_target_ignored_divides_by_one():
    x, t = tensors(np.ones((N, 3)), np.full((N, 3), 255.0))
    layer = SigmoidCrossEntropyLoss("VALID", ignore_label=255)
    loss, (grad, _) = loss_and_grad(layer, x, t)
    assert loss == 0 and torch.equal(grad, torch.zeros(N, 3, dtype=torch.float64))


def test_sigmoid_cross_entropy_gradient_at_zero_is_sigmoid_minus_target():
    x, t = tensors(np.zeros((1, 2)), np.array([[0.0, 1.0]]))
    _, (grad, _) = loss_and_grad(SigmoidCrossEntropyLoss(), x, t)
    np.testing.assert_allclose(grad.numpy(), [[0.5, -0.5]])


def test_sigmoid_cross_entropy_gradcheck_and_extreme_logits():
    x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    t = torch.rand(N, C, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: SigmoidCrossEntropyLoss("FULL")(v, t), (x,))
    big = torch.tensor([[200.0, -200.0]], dtype=torch.float64)
    loss = SigmoidCrossEntropyLoss()(big, torch.tensor([[0.0, 1.0]]))
    assert loss.item() == pytest.approx(400.0)


def test_sigmoid_cross_entropy_shape_errors():
    layer = build('name: "sce" type: "SigmoidCrossEntropyLoss"', [(N, C), (N, C)])
    assert layer.output_shapes([(N, C), (N, C, 1)]) == [()]
    with pytest.raises(ShapeError, match="sce.*same count"):
        layer.output_shapes([(N, C), (N, C + 1)])
    with pytest.raises(ShapeError, match="sce.*first dimension"):
        layer.output_shapes([(N, C), (N * C,)])


# -- EuclideanLoss -----------------------------------------------------------------------------

def test_euclidean_loss_and_both_gradients():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(N, C, H)), rng.normal(size=(N, C * H))
    loss, (grad_a, grad_b) = loss_and_grad(EuclideanLoss(), *tensors(a, b, grad=(0, 1)))
    difference = a - b.reshape(a.shape)
    assert loss == pytest.approx((difference ** 2).sum() / N / 2, rel=1e-12)
    np.testing.assert_allclose(grad_a.numpy(), difference / N, rtol=1e-12)
    np.testing.assert_allclose(grad_b.numpy(), -difference.reshape(b.shape) / N, rtol=1e-12)


def test_euclidean_gradcheck_and_shape_errors():
    a, b = (torch.randn(N, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(EuclideanLoss(), (a, b))
    layer = build('name: "l2" type: "EuclideanLoss"', [(N, 3), (N, 3)])
    with pytest.raises(ShapeError, match="l2.*elements per sample"):
        layer.output_shapes([(N, 3), (N, 4)])
    with pytest.raises(ShapeError, match="l2.*at most 4 axes"):
        layer.output_shapes([(N, 1, 1, 1, 3), (N, 3)])
    with pytest.raises(ShapeError, match="l2.*2 bottoms"):
        layer.output_shapes([(N, 3)])


# -- MultinomialLogisticLoss -------------------------------------------------------------------

def test_multinomial_logistic_loss_and_caffes_floored_gradient():
    probabilities = np.array([[0.2, 0.5, 0.3, 0.0, 0.0],
                              [0.1, 0.1, 0.1, 0.1, 0.6],
                              [0.0, 1.0, 0.0, 0.0, 0.0]])
    labels = np.array([1.0, 4.0, 3.0])  # the last one hits a zero probability
    p, label = tensors(probabilities, labels)
    loss, (grad, _) = loss_and_grad(MultinomialLogisticLoss(), p, label)
    picked = np.maximum(probabilities[[0, 1, 2], [1, 4, 3]], 1e-20)
    assert loss == pytest.approx(-np.log(picked).sum() / 3, rel=1e-12)
    expected = np.zeros_like(probabilities)
    expected[[0, 1, 2], [1, 4, 3]] = -1 / (3 * picked)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12)
    assert grad[2, 3] == pytest.approx(-1 / 3e-20)  # exact gradient of the floor would be 0


def test_multinomial_logistic_4d_scores_and_gradcheck():
    p = torch.rand(N, C, 2, 1, dtype=torch.float64) + 0.1
    label = torch.tensor([[[[7.0]]], [[[0.0]]]])
    loss = MultinomialLogisticLoss()(p, label)
    flat = p.reshape(N, -1)
    assert loss.item() == pytest.approx(-(flat[0, 7].log() + flat[1, 0].log()).item() / N)
    p.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: MultinomialLogisticLoss()(v, label), (p,))


def test_multinomial_logistic_errors():
    layer = build('name: "mll" type: "MultinomialLogisticLoss"', [(N, C), (N,)])
    with pytest.raises(ShapeError, match="mll.*one label per sample"):
        layer.output_shapes([(N, C), (N, 2)])
    with pytest.raises(CaffeLayersError, match="mll.*\\[0, 5\\)"):
        layer(torch.rand(N, C), torch.tensor([0.0, 5.0]))


# -- HingeLoss ---------------------------------------------------------------------------------

def hinge_reference(x, labels, norm):
    x = x.reshape(len(x), -1)
    signed = x.copy()
    signed[np.arange(len(x)), labels.astype(int)] *= -1
    margins = np.maximum(0, 1 + signed)
    sign = np.ones_like(x)
    sign[np.arange(len(x)), labels.astype(int)] = -1
    if norm == "L1":
        return margins.sum() / len(x), sign * (margins > 0) / len(x)
    return (margins ** 2).sum() / len(x), 2 * sign * margins / len(x)


@pytest.mark.parametrize("norm_text, norm", [("", "L1"), ("hinge_loss_param { norm: L2 }", "L2"),
                                              ("hinge_loss_param { norm: L1 }", "L1")])
def test_hinge_loss(norm_text, norm):
    rng = np.random.default_rng(3)
    x, labels = rng.normal(size=(4, C)), np.array([0.0, 4.0, 2.0, 2.0])
    layer = build(f'name: "h" type: "HingeLoss" {norm_text}', [x.shape, labels.shape])
    assert layer.norm == norm
    loss, (grad, _) = loss_and_grad(layer, *tensors(x, labels))
    expected, expected_grad = hinge_reference(x, labels, norm)
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-12)
    xt = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v, torch.tensor(labels)), (xt,))


def test_hinge_gradient_is_zero_at_the_hinge():
    x, labels = tensors(np.array([[1.0, -1.0, 0.5]]), np.array([0.0]))
    _, (grad, _) = loss_and_grad(HingeLoss(), x, labels)
    np.testing.assert_allclose(grad.numpy(), [[0.0, 0.0, 1.0]])


def test_hinge_errors_and_repr():
    layer = HingeLoss("L2")
    layer.layer_name = "hinge"
    assert repr(layer) == "HingeLoss(norm='L2')"
    with pytest.raises(ShapeError, match="hinge.*one label per sample"):
        layer.output_shapes([(N, C), (N, 2)])
    with pytest.raises(ShapeError, match="hinge.*at most 4 axes"):
        layer.output_shapes([(N, C, 1, 1, 1), (N,)])
    with pytest.raises(CaffeLayersError, match="hinge.*\\[0, 5\\)"):
        layer(torch.randn(N, C), torch.tensor([-1.0, 0.0]))


# -- ContrastiveLoss ---------------------------------------------------------------------------

def contrastive_reference(a, b, similar, margin, legacy):
    """Caffe's forward and backward loops (bottom 0's gradient; bottom 1's is its negative)."""
    num = len(a)
    difference = a - b
    distance_sq = (difference ** 2).sum(axis=1)
    loss, grad = 0.0, np.zeros_like(a)
    for i in range(num):
        if int(similar[i]):
            loss += distance_sq[i]
            grad[i] = difference[i] / num
        elif legacy:
            loss += max(margin - distance_sq[i], 0.0)
            if margin - distance_sq[i] > 0:
                grad[i] = -difference[i] / num
        else:
            distance = np.sqrt(distance_sq[i])
            loss += max(margin - distance, 0.0) ** 2
            if margin - distance > 0:
                grad[i] = -(margin - distance) / (distance + 1e-4) * difference[i] / num
    return loss / num / 2, grad


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss_and_caffes_gradient(legacy):
    rng = np.random.default_rng(4)
    a, b = rng.normal(scale=0.6, size=(6, C)), rng.normal(scale=0.6, size=(6, C))
    similar = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    text = f"contrastive_loss_param {{ margin: 2.5 legacy_version: {str(legacy).lower()} }}"
    layer = build(f'name: "c" type: "ContrastiveLoss" {text}',
                  [a.shape, b.shape, similar.shape])
    at, bt, st = tensors(a, b, similar, grad=(0, 1))
    loss, (grad_a, grad_b, grad_similar) = loss_and_grad(layer, at, bt, st)
    expected, expected_grad = contrastive_reference(a, b, similar, 2.5, legacy)
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad_a.numpy(), expected_grad, rtol=1e-12)
    np.testing.assert_allclose(grad_b.numpy(), -expected_grad, rtol=1e-12)
    assert grad_similar is None
    # Some dissimilar pairs lie inside the margin and some outside, so both branches ran.
    shortfall = 2.5 - (((a - b) ** 2).sum(axis=1) if legacy else
                       np.sqrt(((a - b) ** 2).sum(axis=1)))
    assert (shortfall[similar == 0] > 0).any() and (shortfall[similar == 0] < 0).any()


def test_contrastive_non_legacy_gradient_differs_from_exact_and_is_finite_at_zero():
    a = torch.tensor([[0.1, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, 2, dtype=torch.float64)
    ContrastiveLoss()(a, b, torch.zeros(2)).backward()
    # d = 0.1: Caffe divides by d + 1e-4; the exact gradient -(1 - d) / d * diff / N = -0.45.
    assert a.grad[0, 0].item() == pytest.approx(-(1 - 0.1) / (0.1 + 1e-4) * 0.1 / 2)
    assert a.grad[0, 0].item() != pytest.approx(-0.45, rel=1e-4)
    assert torch.equal(a.grad[1], torch.zeros(2, dtype=torch.float64))


def test_contrastive_gradcheck_legacy_and_shapes():
    a = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    similar = torch.tensor([1.0, 0.0, 1.0, 0.0])
    layer = ContrastiveLoss(margin=3.0, legacy_version=True)
    assert torch.autograd.gradcheck(lambda u, v: layer(u, v, similar), (a, b))
    assert repr(layer) == "ContrastiveLoss(margin=3, legacy_version=True)"
    layer.layer_name = "pairs"
    assert layer.output_shapes([(4, 3), (4, 3), (4, 1, 1, 1)]) == [()]
    with pytest.raises(ShapeError, match="pairs.*same shape"):
        layer.output_shapes([(4, 3, 2), (4, 3, 2), (4,)])
    with pytest.raises(ShapeError, match="pairs.*same shape"):
        layer.output_shapes([(4, 3), (4, 2), (4,)])
    with pytest.raises(ShapeError, match="pairs.*one similarity label"):
        layer.output_shapes([(4, 3), (4, 3), (4, 2)])
    with pytest.raises(ShapeError, match="pairs.*3 bottoms"):
        layer.output_shapes([(4, 3), (4, 3)])
