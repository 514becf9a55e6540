"""softmax_diff_loss and the SoftmaxDiffLoss layer: every mode and style against numpy
(float64), the softmax Jacobian written out, gradcheck, target checks, extremes, the layer
in a Net and its ONNX export."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from caffelayers import Net
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.errors import LabelError, ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.losses.distribution import SoftmaxDiffLoss, softmax_diff_loss
from caffelayers.proto import caffe_pb2, io

SETTINGS = [("L1", 1.0, "multiclass"), ("L2", 1.0, "multiclass"), ("MI", 1.0, "multiclass"),
            ("MI", 2.5, "multiclass"), ("MI", 0.5, "multiclass"), ("L1", 1.0, "multilabel"),
            ("L2", 1.0, "multilabel"), ("MI", 1.0, "multilabel"), ("MI", 3.0, "multilabel")]
IDS = [f"{m}-T{t}-{s}" for m, t, s in SETTINGS]
# (x shape, axis, target shape): per position, per sample (broadcast), class axis elsewhere
LAYOUTS = [((6, 5), 1, (6, 5)), ((2, 5, 7, 3), 1, (2, 5, 7, 3)), ((2, 5, 7, 3), 1, (2, 5)),
           ((2, 7, 5), -1, (2, 7, 5)), ((2, 3, 5, 4), 2, (2, 3, 5))]


def target_for(shape, axis, style, seed=1):
    rng = np.random.default_rng(seed)
    values = rng.random(shape)
    if style == "multilabel":
        values[..., 0] = 0.0  # the ends of [0, 1] too
        values.flat[1] = 1.0
        return values
    axis %= len(shape)
    values[(slice(None),) * axis + (0,)] = 0  # zero probabilities (0^(1/T) = 0)
    return values / values.sum(axis=axis, keepdims=True)


def reference(x, target, mode, temperature, style, axis, reduction="sum"):
    """The formulas, in numpy float64, one position at a time."""
    axis %= x.ndim
    x = np.moveaxis(x, axis, -1)
    classes = x.shape[-1]
    target = np.broadcast_to(np.moveaxis(target.reshape(target.shape + (1,) * (
        x.ndim - target.ndim)), axis, -1), x.shape) if target.ndim < x.ndim else \
        np.moveaxis(target, axis, -1)
    rows, targets = x.reshape(-1, classes), target.reshape(-1, classes)
    losses = []
    for row, q in zip(rows, targets):
        z = row / temperature
        if style == "multilabel":
            p = 1 / (1 + np.exp(-z))
            if mode == "MI":
                c = q ** (1 / temperature) / (q ** (1 / temperature) + (1 - q) ** (1 / temperature))
                losses.append(-(c * np.log(p) + (1 - c) * np.log(1 - p)).sum())
            elif mode == "L1":
                losses.append((np.abs(p - q) + np.abs((1 - p) - (1 - q))).sum())
            else:
                losses.append(0.5 * ((p - q) ** 2 + ((1 - p) - (1 - q)) ** 2).sum())
            continue
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        if mode == "MI":
            sharp = q ** (1 / temperature)
            losses.append(-(sharp / sharp.sum() * np.log(p)).sum())
        elif mode == "L1":
            losses.append(np.abs(p - q).sum())
        else:
            losses.append(0.5 * ((p - q) ** 2).sum())
    losses = np.array(losses).reshape(x.shape[:-1])
    if reduction == "none":
        return losses
    if reduction == "mean":
        return losses.mean()
    if reduction == "batchmean":
        return losses.sum() / x.shape[0]
    return losses.sum()


@pytest.mark.parametrize("mode, temperature, style", SETTINGS, ids=IDS)
@pytest.mark.parametrize("shape, axis, target_shape", LAYOUTS)
def test_matches_numpy(mode, temperature, style, shape, axis, target_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3
    target = target_for(target_shape, axis if len(target_shape) == len(shape) else -1, style)
    for reduction in ("sum", "mean", "batchmean", "none"):
        got = softmax_diff_loss(torch.from_numpy(x), torch.from_numpy(target), mode,
                                temperature, style, axis, reduction)
        np.testing.assert_allclose(got.numpy(), reference(x, target, mode, temperature, style,
                                                          axis, reduction),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["L1", "L2"])
def test_gradient_is_the_softmax_jacobian_exactly(mode):
    """J^T g with J = diag(p) - p p^T built in numpy, g = sign(p - q) or p - q."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6))
    q = target_for((4, 6), 1, "multiclass")
    xt = torch.from_numpy(x).requires_grad_()
    softmax_diff_loss(xt, torch.from_numpy(q), mode).backward()
    for row, target, grad in zip(x, q, xt.grad.numpy()):
        p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        g = np.sign(p - target) if mode == "L1" else p - target
        jacobian = np.diag(p) - np.outer(p, p)
        np.testing.assert_allclose(grad, jacobian.T @ g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode, temperature, style", SETTINGS, ids=IDS)
def test_gradcheck(mode, temperature, style):
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((2, 5, 3, 2)) * 2).requires_grad_()
    per_position = torch.from_numpy(target_for((2, 5, 3, 2), 1, style, seed=5))
    per_sample = torch.from_numpy(target_for((2, 5), 1, style, seed=6))
    for target, reduction in ((per_position, "sum"), (per_sample, "none")):
        assert torch.autograd.gradcheck(
            lambda a, q=target, r=reduction: softmax_diff_loss(a, q, mode, temperature, style,
                                                               1, r), (x,))


def test_mi_gradient_is_softmax_minus_target_over_t():
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((3, 4))).requires_grad_()
    q = torch.from_numpy(target_for((3, 4), 1, "multiclass"))
    softmax_diff_loss(x, q, "MI", 2.0).backward()
    sharp = q ** 0.5 / (q ** 0.5).sum(1, keepdim=True)
    torch.testing.assert_close(x.grad, (torch.softmax(x / 2, 1) - sharp) / 2)


def test_one_hot_mi_is_cross_entropy():
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((2, 5, 7, 3)))
    labels = torch.from_numpy(rng.integers(0, 5, (2, 7, 3)))
    one_hot = F.one_hot(labels, 5).movedim(-1, 1).double()
    torch.testing.assert_close(softmax_diff_loss(x, one_hot, "MI"),
                               F.cross_entropy(x, labels, reduction="sum"), rtol=1e-13,
                               atol=0)
    torch.testing.assert_close(softmax_diff_loss(x, one_hot, "MI", reduction="mean"),
                               F.cross_entropy(x, labels), rtol=1e-13, atol=0)


def test_extreme_logits_stay_finite():
    rng = np.random.default_rng(9)
    x = np.where(rng.random((4, 6)) < 0.5, 1e4, -1e4) * rng.random((4, 6))
    x[0] = 1e4
    for dtype in (torch.float32, torch.float64):
        for mode, temperature, style in SETTINGS:
            xt = torch.from_numpy(x).to(dtype).requires_grad_()
            target = torch.from_numpy(target_for((4, 6), 1, style)).to(dtype)
            loss = softmax_diff_loss(xt, target, mode, temperature, style)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(xt.grad).all(), (mode, style)


def test_the_target_gets_no_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    target = torch.softmax(torch.randn(3, 4), 1).requires_grad_()
    softmax_diff_loss(x, target, "L2").backward()
    assert x.grad is not None and target.grad is None


def test_target_checks_and_settings():
    x = torch.randn(3, 4)
    q = torch.softmax(torch.randn(3, 4), 1)
    assert torch.isfinite(softmax_diff_loss(x, q * 1.0009, "MI"))  # within 1e-3
    with pytest.raises(LabelError, match="must sum to 1"):
        softmax_diff_loss(x, q * 1.01, "L1")
    with pytest.raises(LabelError, match="must sum to 1"):
        softmax_diff_loss(x, torch.full((3, 4), float("nan")), "L1")
    with pytest.raises(LabelError, match=r"in \[0, 1\]"):
        softmax_diff_loss(x, q + 1.5, "MI", style="multilabel")
    with pytest.raises(LabelError, match="negative"):
        softmax_diff_loss(x, torch.tensor([[1.5, -0.5, 0, 0]] * 3), "MI", 2.0)
    with pytest.raises(UnsupportedParameterError, match="temperature 1 only"):
        softmax_diff_loss(x, q, "L1", temperature=2.0)
    with pytest.raises(UnsupportedParameterError, match="positive"):
        softmax_diff_loss(x, q, "MI", temperature=0.0)
    with pytest.raises(UnsupportedParameterError, match="mode must be one of"):
        softmax_diff_loss(x, q, "KL")
    with pytest.raises(UnsupportedParameterError, match="style"):
        softmax_diff_loss(x, q, style="binary")
    with pytest.raises(ShapeError, match="one distribution per position"):
        softmax_diff_loss(x, q[:2], "L1")
    assert softmax_diff_loss(x, q, "l2").shape == ()  # names are case-insensitive


# -- as a Caffe layer ----------------------------------------------------------------------
def build(text, bottom_shapes=((2, 5, 7, 3), (2, 5))):
    param = text_format.Parse(f'name: "loss" type: "SoftmaxDiffLoss" bottom: "x" '
                              f'bottom: "t" top: "loss" {text}', caffe_pb2.LayerParameter())
    return SoftmaxDiffLoss.from_caffe(param, list(bottom_shapes), BuildContext())


def test_from_caffe_reads_every_field():
    layer = build("softmax_diff_loss_param { mode: MI temperature: 2 style: MULTILABEL "
                  "axis: 1 } loss_param { normalization: BATCH_SIZE }")
    assert (layer.mode, layer.temperature, layer.style, layer.axis, layer.reduction) == \
        ("MI", 2.0, "multilabel", 1, "batchmean")
    assert layer.is_loss and layer.output_shapes([(2, 5, 7, 3), (2, 5)]) == [()]
    assert repr(layer) == ("SoftmaxDiffLoss(mode='MI', temperature=2.0, style='multilabel', "
                           "reduction='batchmean')")
    default = build("")
    assert (default.mode, default.reduction) == ("L1", "sum")
    assert build("loss_param { normalization: FULL }").reduction == "mean"
    assert build("loss_param { normalize: false }").reduction == "batchmean"
    with pytest.raises(UnsupportedParameterError, match="ignore_label"):
        build("loss_param { ignore_label: 3 }")
    with pytest.raises(UnsupportedParameterError, match="temperature 1 only"):
        build("softmax_diff_loss_param { mode: L2 temperature: 3 }")
    with pytest.raises(ShapeError, match="'loss'.*per sample"):
        build("", [(2, 5, 7, 3), (2, 6)]).output_shapes([(2, 5, 7, 3), (2, 6)])


NET = """name: "distil"
layer { name: "x" type: "Input" top: "x" top: "t"
  input_param { shape { dim: 2 dim: 5 dim: 7 dim: 3 } shape { dim: 2 dim: 5 } } }
layer { name: "loss" type: "SoftmaxDiffLoss" bottom: "x" bottom: "t" top: "loss"
  softmax_diff_loss_param { %s } %s }
"""


@pytest.mark.parametrize("param, norm", [("mode: L1", ""), ("mode: L2", ""),
                                         ("mode: MI temperature: 2",
                                          "loss_param { normalization: FULL }"),
                                         ("mode: MI style: MULTILABEL temperature: 0.5",
                                          "loss_param { normalization: BATCH_SIZE }"),
                                         ("mode: L1 style: MULTILABEL", ""),
                                         ("mode: L2 style: MULTILABEL", "")])
def test_net_and_onnx(param, norm):
    """The Net's loss and diff are the function's; onnxruntime gives the same loss."""
    net = Net(io.parse_prototxt(NET % (param, norm)), phase="TRAIN")
    layer = net.layer("loss")
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    t = target_for((2, 5), 1, layer.style).astype(np.float32)
    loss = net(x=x, t=t)["loss"]
    diffs = net.backward()
    xt = torch.from_numpy(x).requires_grad_()
    want = softmax_diff_loss(xt, torch.from_numpy(t), layer.mode, layer.temperature,
                             layer.style, reduction=layer.reduction)
    want.backward()
    assert torch.equal(loss.detach(), want.detach())
    assert torch.equal(diffs["x"], xt.grad) and not diffs["t"].any()
    got = run_onnx(convert_to_onnx(net), {"x": x, "t": t}, threads=1)["loss"]
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5)


def test_onnx_per_position_losses_with_a_dynamic_batch():
    text = ('layer { name: "x" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 '
            'dim: 5 dim: 3 } shape { dim: 2 dim: 5 dim: 3 } } }\n'
            'layer { name: "loss" type: "SoftmaxDiffLoss" bottom: "x" bottom: "t" top: "loss" '
            'softmax_diff_loss_param { mode: MI } }\n')
    net = Net(io.parse_prototxt(text))
    net.layer("loss").reduction = "none"
    net.graph.nodes[-1].top_shapes = [(2, 3)]
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 5, 3)).astype(np.float32)
    t = target_for((4, 5, 3), 1, "multiclass").astype(np.float32)
    got = run_onnx(convert_to_onnx(net), {"x": x, "t": t}, threads=1)["loss"]
    want = reference(x.astype(np.float64), t.astype(np.float64), "MI", 1.0, "multiclass", 1,
                     "none")
    np.testing.assert_allclose(got, want, rtol=1e-5)
