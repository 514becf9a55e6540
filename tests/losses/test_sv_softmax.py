"""Support-vector guided softmax: the paper's multiplicative form in numpy against our
additive logits, t = 1 as cross_entropy bit for bit, gradcheck, extremes, errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffelayers.errors import LabelError, ShapeError, UnsupportedParameterError
from caffelayers.losses.sv_softmax import SVSoftmaxLoss, sv_softmax_loss

MARGINS = [("none", 0.0), ("am", 0.35), ("arc", 0.5), ("arc", 1.2), ("sphere", 2),
           ("sphere", 4)]


def cosines(shape, seed=0):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-1, 1, shape)
    labels = rng.integers(0, shape[1], (shape[0],) + tuple(shape[2:]))
    return cos, labels


def f_numpy(margin, m, cos):
    """The label margin from the papers, with acos."""
    theta = np.arccos(np.clip(cos, -1, 1))
    if margin == "none":
        return cos
    if margin == "am":
        return cos - m
    if margin == "arc":
        return np.where(theta + m < np.pi, np.cos(theta + m), cos - m * np.sin(m))
    k = np.floor(m * theta / np.pi)
    return (-1.0) ** k * np.cos(m * theta) - 2 * k


def reference(cos, labels, s, t, margin, m, reduction="mean"):
    """The paper's form: the support vectors' exponentials multiplied by h (numpy)."""
    rows = np.moveaxis(cos, 1, -1).reshape(-1, cos.shape[1])
    flat = labels.reshape(-1)
    losses = []
    for row, y in zip(rows, flat):
        f = f_numpy(margin, m, row[y])
        indicator = (f - row < 0) & (np.arange(len(row)) != y)
        h = np.exp(s * (t - 1) * (row + 1) * indicator)
        others = sum(h[k] * np.exp(s * row[k]) for k in range(len(row)) if k != y)
        losses.append(-math.log(math.exp(s * f) / (math.exp(s * f) + others)))
    losses = np.array(losses)
    if reduction == "none":
        return losses.reshape(labels.shape)
    return losses.sum() if reduction == "sum" else losses.mean()


@pytest.mark.parametrize("margin, m", MARGINS)
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 7, 3), (3, 11)])
def test_matches_the_multiplicative_form(margin, m, shape):
    """Adding s (t - 1)(cos + 1) I_k to a logit is multiplying its exponential by h_k."""
    cos, labels = cosines(shape)
    for reduction in ("mean", "sum", "none"):
        got = sv_softmax_loss(torch.from_numpy(cos), torch.from_numpy(labels), s=3.0, t=1.4,
                              margin=margin, m=m, reduction=reduction)
        want = reference(cos, labels, 3.0, 1.4, margin, m, reduction)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_support_vectors_are_present_in_the_data():
    """The reference test above is not the t = 1 case in disguise."""
    cos, labels = cosines((6, 5))
    x, y = torch.from_numpy(cos), torch.from_numpy(labels)
    for margin, m in MARGINS:
        assert sv_softmax_loss(x, y, 3.0, 1.4, margin, m) > sv_softmax_loss(x, y, 3.0, 1.0,
                                                                              margin, m)


@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 7, 3)])
def test_t_one_is_cross_entropy_bit_for_bit(shape):
    cos, labels = cosines(shape, seed=1)
    x, y = torch.from_numpy(cos).float(), torch.from_numpy(labels)
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(x * 30.0, y, reduction=reduction)
        for margin, m in [("none", 0.0), ("am", 0.0), ("arc", 0.0), ("sphere", 1)]:
            got = sv_softmax_loss(x, y, s=30.0, t=1.0, margin=margin, m=m, reduction=reduction)
            assert torch.equal(got, want), (margin, reduction)


def test_gradient_treats_the_indicator_as_constant():
    """Our backward against autograd through the additive logits with a detached mask."""
    cos, labels = cosines((2, 5, 7, 3), seed=2)
    for margin, m in MARGINS[1:]:
        a = torch.from_numpy(cos).requires_grad_()
        b = torch.from_numpy(cos).requires_grad_()
        y = torch.from_numpy(labels)
        sv_softmax_loss(a, y, 2.0, 1.7, margin, m).backward()
        label_cos = b.gather(1, y.unsqueeze(1))
        theta = torch.acos(label_cos.clamp(-1, 1))
        if margin == "am":
            f = label_cos - m
        elif margin == "arc":
            f = torch.where(theta + m < math.pi, torch.cos(theta + m),
                            label_cos - m * math.sin(m))
        else:
            k = torch.floor(m * theta / math.pi).detach()
            f = (-1) ** k * torch.cos(m * theta) - 2 * k
        mask = (b > f).detach().scatter(1, y.unsqueeze(1), False)
        logits = 2.0 * b + mask * (2.0 * 0.7 * (b + 1))
        logits = logits.scatter(1, y.unsqueeze(1), 2.0 * f)
        F.cross_entropy(logits, y).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("margin, m", MARGINS)
def test_gradcheck(margin, m):
    cos, labels = cosines((2, 5, 3), seed=3)
    x = torch.from_numpy(cos).requires_grad_()
    y = torch.from_numpy(labels)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda c, r=reduction: sv_softmax_loss(c, y, 2.5, 1.3, margin, m, r), (x,))


def test_easy_margin_for_arc():
    cos, labels = cosines((6, 5), seed=4)
    x = torch.from_numpy(cos).requires_grad_()
    y = torch.from_numpy(labels)
    got = sv_softmax_loss(x, y, 2.0, 1.2, "arc", 0.5, easy_margin=True)
    picked = cos[np.arange(6), labels]
    f = np.where(picked > 0, np.cos(np.arccos(picked) + 0.5), picked)
    logits = 2.0 * cos + (cos > f[:, None]) * 2.0 * 0.2 * (cos + 1)
    logits[np.arange(6), labels] = 2.0 * f
    shifted = logits - logits.max(1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    np.testing.assert_allclose(float(got.detach()), -log_prob[np.arange(6), labels].mean(),
                               rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda c: sv_softmax_loss(c, y, 2.0, 1.2, "arc", 0.5, easy_margin=True), (x,))


def test_extreme_logits_stay_finite():
    """s = 1e4 (logits up to 1e4, a support-vector boost of 1e4 more), cosines at +-1."""
    cos, labels = cosines((6, 5), seed=5)
    cos[0] = 1.0
    cos[1] = -1.0
    for dtype in (torch.float32, torch.float64):
        for margin, m in MARGINS:
            x = torch.from_numpy(cos).to(dtype).requires_grad_()
            loss = sv_softmax_loss(x, torch.from_numpy(labels), 1e4, 2.0, margin, m)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), (margin, dtype)


def test_module_and_errors():
    cos, labels = cosines((6, 5))
    x, y = torch.from_numpy(cos), torch.from_numpy(labels)
    module = SVSoftmaxLoss(s=3.0, t=1.4, margin="am", m=0.35, reduction="sum")
    assert torch.equal(module(x, y), sv_softmax_loss(x, y, 3.0, 1.4, "am", 0.35, "sum"))
    assert repr(module) == "SVSoftmaxLoss(s=3.0, t=1.4, margin='am', m=0.35, reduction='sum')"
    with pytest.raises(UnsupportedParameterError, match="margin must be one of"):
        SVSoftmaxLoss(margin="cosface")
    with pytest.raises(UnsupportedParameterError, match="takes m = 0"):
        sv_softmax_loss(x, y, margin="none", m=0.2)
    with pytest.raises(UnsupportedParameterError, match="integer from 1 to 4"):
        sv_softmax_loss(x, y, margin="sphere", m=0.5)
    with pytest.raises(UnsupportedParameterError, match="reduction"):
        sv_softmax_loss(x, y, reduction="batchmean")
    with pytest.raises(LabelError, match=r"\[0, 5\)"):
        sv_softmax_loss(x, torch.full((6,), 5))
    with pytest.raises(ShapeError, match="one label per position"):
        sv_softmax_loss(x, y[:4])
    # labels as Caffe stores them (floats holding integers) are accepted
    assert torch.equal(sv_softmax_loss(x, y.double()), sv_softmax_loss(x, y))
