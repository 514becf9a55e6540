"""Distillation losses: Hinton's KD, CWTM and DKPP against numpy (float64), the T^2
gradient scaling, alpha = 0 as cross_entropy bit for bit, the teacher left without
gradients, the seeded permutation, extremes and errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffelayers.errors import LabelError, ShapeError, UnsupportedParameterError
from caffelayers.losses.distillation import (
    CWTMLoss,
    DistillationLoss,
    DKPPLoss,
    cwtm_loss,
    distillation_loss,
    dkpp_loss,
    permute_non_argmax,
)

SHAPES = [(6, 5), (2, 5, 7, 3), (3, 11)]


def logits(shape, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    student = rng.standard_normal(shape) * scale
    teacher = rng.standard_normal(shape) * scale
    labels = rng.integers(0, shape[1], (shape[0],) + tuple(shape[2:]))
    return student, teacher, labels


def rows(values):
    """``(positions, C)``: the class axis 1 moved last and the rest flattened."""
    return np.moveaxis(values, 1, -1).reshape(-1, values.shape[1])


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reduce(losses, shape, reduction):
    if reduction == "none":
        return losses.reshape((shape[0],) + tuple(shape[2:]))
    return losses.sum() if reduction == "sum" else losses.mean()


def kd_reference(student, teacher, labels, T, alpha, reduction, teacher_log_prob=None):
    s_log = log_softmax(rows(student) / T)
    t_log = log_softmax(rows(teacher) / T) if teacher_log_prob is None else teacher_log_prob
    soft = T * T * (np.exp(t_log) * (t_log - s_log)).sum(-1)
    if labels is None:
        return reduce(soft, student.shape, reduction)
    hard = -log_softmax(rows(student))[np.arange(labels.size), labels.reshape(-1)]
    return alpha * reduce(soft, student.shape, reduction) + (1 - alpha) * reduce(
        hard, student.shape, reduction)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distillation_matches_numpy(shape, reduction):
    student, teacher, labels = logits(shape)
    s, t, y = (torch.from_numpy(v) for v in (student, teacher, labels))
    for T, alpha in [(1.0, 0.9), (4.0, 0.5), (0.5, 1.0)]:
        np.testing.assert_allclose(distillation_loss(s, t, T, alpha, y, reduction).numpy(),
                                   kd_reference(student, teacher, labels, T, alpha,
                                                reduction), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(distillation_loss(s, t, T, alpha, None, reduction).numpy(),
                                   kd_reference(student, teacher, None, T, alpha, reduction),
                                   rtol=1e-10, atol=1e-12)


def test_soft_gradient_has_the_t_squared_scaling():
    """d(T^2 KL)/ds = T (softmax(s/T) - softmax(t/T)) / positions: the T^2 undoes the
    1/T^2 that the softened softmax puts on the gradient."""
    student, teacher, _ = logits((4, 6), seed=1)
    for T in (1.0, 3.0, 10.0):
        s = torch.from_numpy(student).requires_grad_()
        distillation_loss(s, torch.from_numpy(teacher), T).backward()
        p_s, p_t = (np.exp(log_softmax(v / T)) for v in (student, teacher))
        np.testing.assert_allclose(s.grad.numpy(), T * (p_s - p_t) / 4, rtol=1e-10,
                                   atol=1e-15)


def test_alpha_zero_is_cross_entropy_bit_for_bit():
    student, teacher, labels = logits((2, 5, 7, 3), seed=2)
    s = torch.from_numpy(student).float()
    y = torch.from_numpy(labels)
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(distillation_loss(s, torch.from_numpy(teacher).float(), 3.0, 0.0,
                                             y, reduction),
                           F.cross_entropy(s, y, reduction=reduction))


def test_gradcheck_and_the_teacher_gets_no_gradient():
    student, teacher, labels = logits((2, 5, 3), seed=3)
    s = torch.from_numpy(student).requires_grad_()
    t = torch.from_numpy(teacher).requires_grad_()
    y = torch.from_numpy(labels)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, r=reduction: distillation_loss(a, t, 2.5, 0.7, y, r), (s,))
        assert torch.autograd.gradcheck(lambda a, r=reduction: cwtm_loss(a, t, y, r), (s,))
        assert torch.autograd.gradcheck(
            lambda a, r=reduction: dkpp_loss(a, t, 2.0, 0.6, y,
                                             torch.Generator().manual_seed(0), r), (s,))
    total = (distillation_loss(s, t, 2.0, 0.5, y) + cwtm_loss(s, t, y)
             + dkpp_loss(s, t, 2.0, 0.5, y, torch.Generator().manual_seed(0)))
    total.backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("shape", SHAPES)
def test_cwtm_matches_numpy(shape):
    student, teacher, labels = logits(shape, seed=4)
    s, t, y = (torch.from_numpy(v) for v in (student, teacher, labels))
    confidence = np.exp(log_softmax(rows(teacher))).max(-1)
    ce = -log_softmax(rows(student))[np.arange(labels.size), labels.reshape(-1)]
    np.testing.assert_allclose(cwtm_loss(s, t, y).numpy(),
                               (confidence / confidence.sum() * ce).sum(), rtol=1e-10)
    np.testing.assert_allclose(cwtm_loss(s, t, y, "sum").numpy(), (confidence * ce).sum(),
                               rtol=1e-10)
    np.testing.assert_allclose(cwtm_loss(s, t, y, "none").numpy(),
                               (confidence * ce).reshape(labels.shape), rtol=1e-10)
    # a confident teacher everywhere: the plain mean cross-entropy
    sure = torch.from_numpy(np.where(rows(teacher) == rows(teacher).max(-1, keepdims=True),
                                     1e4, 0.0))
    sure = sure.reshape(np.moveaxis(teacher, 1, -1).shape).movedim(-1, 1)
    torch.testing.assert_close(cwtm_loss(s, sure, y), F.cross_entropy(s, y))


@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (3, 40)])  # sorted keys; randperm per row
def test_permutation_keeps_the_argmax_and_the_values(shape):
    rng = np.random.default_rng(5)
    values = torch.from_numpy(rng.standard_normal(shape))
    permuted = permute_non_argmax(values, torch.Generator().manual_seed(0))
    assert torch.equal(permuted.argmax(1), values.argmax(1))
    assert torch.equal(permuted.max(1).values, values.max(1).values)
    assert torch.equal(permuted.sort(1).values, values.sort(1).values)
    assert not torch.equal(permuted, values)
    again = permute_non_argmax(values, torch.Generator().manual_seed(0))
    other = permute_non_argmax(values, torch.Generator().manual_seed(1))
    assert torch.equal(permuted, again) and not torch.equal(permuted, other)
    assert torch.equal(permute_non_argmax(values[:, :2]), values[:, :2])  # nothing to permute


def test_permutations_are_uniform():
    """Each non-argmax value lands on each free position about equally often, whichever
    way the permutations are drawn (3000 short rows: sorted keys; 40 long rows: randperm)."""
    values = torch.tensor([[0.0, 5.0, 1.0, 2.0, 3.0]]).expand(3000, 5)
    permuted = permute_non_argmax(values, torch.Generator().manual_seed(2))
    assert (permuted[:, 1] == 5).all()
    counts = torch.stack([(permuted[:, j] == 0).sum() for j in (0, 2, 3, 4)]).double()
    assert (counts / 3000 - 0.25).abs().max() < 0.04
    wide = torch.arange(200.0).flip(0).expand(40, 200)  # argmax at column 0
    landed = (permute_non_argmax(wide, torch.Generator().manual_seed(3)) == 1.0).nonzero()
    assert (landed[:, 0] == torch.arange(40)).all() and (landed[:, 1] > 0).all()
    assert abs(landed[:, 1].double().mean() - 100.0) < 20  # uniform over 1..199: mean 100


@pytest.mark.parametrize("shape", SHAPES)
def test_dkpp_is_distillation_from_the_permuted_teacher(shape):
    student, teacher, labels = logits(shape, seed=6)
    s, t, y = (torch.from_numpy(v) for v in (student, teacher, labels))
    T = 2.0
    permuted = permute_non_argmax(torch.log_softmax(t / T, 1),
                                  torch.Generator().manual_seed(7))
    want = kd_reference(student, teacher, labels, T, 0.6, "mean",
                        teacher_log_prob=rows(permuted.numpy()))
    got = dkpp_loss(s, t, T, 0.6, y, torch.Generator().manual_seed(7))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    assert abs(float(got) - float(distillation_loss(s, t, T, 0.6, y))) > 1e-3


def test_extreme_logits_stay_finite():
    student, teacher, labels = logits((4, 6), seed=8, scale=1e4)
    for dtype in (torch.float32, torch.float64):
        s = torch.from_numpy(student).to(dtype).requires_grad_()
        t = torch.from_numpy(teacher).to(dtype)
        y = torch.from_numpy(labels)
        for T in (1.0, 0.5, 20.0):
            for loss in (distillation_loss(s, t, T, 0.5, y), cwtm_loss(s, t, y),
                         dkpp_loss(s, t, T, 0.5, y, torch.Generator().manual_seed(0))):
                s.grad = None
                loss.backward()
                assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), (dtype, T)


def test_modules_and_errors():
    student, teacher, labels = logits((6, 5))
    s, t, y = (torch.from_numpy(v) for v in (student, teacher, labels))
    assert torch.equal(DistillationLoss(3.0, 0.5)(s, t, y), distillation_loss(s, t, 3.0, 0.5, y))
    assert torch.equal(CWTMLoss("sum")(s, t, y), cwtm_loss(s, t, y, "sum"))
    module = DKPPLoss(2.0, 0.5, seed=3)
    assert torch.equal(module(s, t, y), dkpp_loss(s, t, 2.0, 0.5, y,
                                                 torch.Generator().manual_seed(3)))
    assert repr(DistillationLoss(3.0, 0.5)) == "DistillationLoss(temperature=3.0, alpha=0.5)"
    assert repr(module) == "DKPPLoss(temperature=2.0, alpha=0.5, seed=3)"
    with pytest.raises(ShapeError, match="same shape"):
        distillation_loss(s, t[:, :4], 2.0)
    with pytest.raises(UnsupportedParameterError, match="temperature"):
        distillation_loss(s, t, 0.0)
    with pytest.raises(UnsupportedParameterError, match=r"alpha must lie in \[0, 1\]"):
        distillation_loss(s, t, 2.0, alpha=1.5)
    with pytest.raises(UnsupportedParameterError, match="reduction"):
        cwtm_loss(s, t, y, "batchmean")
    with pytest.raises(LabelError, match=r"\[0, 5\)"):
        cwtm_loss(s, t, torch.full((6,), 7))
    with pytest.raises(ShapeError, match="one label per position"):
        distillation_loss(s, t, 2.0, labels=y[:3])
