"""Neuron layers: Caffe's reference cases, true gradients, and each Caffe quirk."""

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.neuron import (BNLL, ELU, AbsVal, Clip, Dropout, Exp, Log, Power,
                                       PReLU, ReLU, Sigmoid, TanH, Threshold)
from caffelayers.proto import caffe_pb2
from caffelayers.registry import layer_class
from caffelayers.verify import verify_case

CASES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
SHAPE = (2, 5, 7, 3)  # N, C, H, W all distinct: a broadcast on the wrong axis fails
SMALL = (2, 5, 3)  # for finite differences, which cost one forward per element


def build(text, bottom_shapes=(SHAPE,), phase="TEST", generator=None):
    """The registered module for one prototxt ``layer { ... }`` body."""
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    ctx = BuildContext(phase=phase, generator=generator)
    module = layer_class(param.type).from_caffe(param, list(bottom_shapes), ctx)
    module.layer_name = param.name
    return module


def away_from_zero(shape=SHAPE, seed=0, margin=0.1):
    """Random float64 values with no element near a kink at 0 (finite differences)."""
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (x + margin * torch.sign(x)).requires_grad_(True)


def grad_of(module, x, upstream=None):
    x = x.detach().requires_grad_(True)
    y = module(x)
    y.backward(torch.ones_like(y) if upstream is None else upstream)
    return x.grad


@pytest.mark.parametrize("case", ["absval", "bnll", "dropout_test", "elu", "exp", "power",
                                  "prelu", "prelu_shared", "relu_leaky", "sigmoid", "tanh",
                                  "threshold"])
def test_matches_caffe_reference(case):
    result = verify_case(CASES_DIR / case)
    assert result.passed, "\n".join([c.describe() for c in result.failures] + [result.summary])


@pytest.mark.parametrize("module", [
    ReLU(0.1), ReLU(), ELU(0.7), Sigmoid(), TanH(), AbsVal(), BNLL(),
    Power(3.0, 0.5, 2.0), Power(2.0, -1.5, 0.5), Power(0.5, 2.0, 10.0), Power(-1.0, 1.0, 10.0),
    Exp(), Exp(2.0, 0.5, 0.1), Log(shift=10.0), Log(10.0, 2.0, 10.0),
], ids=repr)
def test_gradient_is_the_true_one_away_from_kinks(module):
    assert torch.autograd.gradcheck(module, (away_from_zero(SMALL),))


def test_prelu_gradients_for_input_and_slopes():
    prelu = PReLU(5).double()

    def run(x, slopes):
        return torch.func.functional_call(prelu, {"weight": slopes}, (x,))

    slopes = torch.tensor([0.1, -0.2, 0.3, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (away_from_zero(SMALL), slopes))
    # Caffe's slope diff: sum over N, H, W of top_diff * x where x <= 0.
    x = away_from_zero()
    upstream = torch.randn(SHAPE, dtype=torch.float64)
    prelu(x).backward(upstream)
    expected = (upstream * x.detach() * (x.detach() <= 0)).sum(dim=(0, 2, 3))
    torch.testing.assert_close(prelu.weight.grad, expected)


def test_prelu_slope_is_per_channel_on_axis_1():
    prelu = build('name: "p" type: "PReLU"')
    with torch.no_grad():
        prelu.weight.copy_(torch.arange(1.0, 6.0))
    x = -torch.ones(SHAPE)
    y = prelu(x)
    for c in range(SHAPE[1]):
        assert torch.all(y[:, c] == -(c + 1))
    assert prelu.caffe_blobs()[0].shape == (5,)


def test_prelu_defaults_and_shared_blob_shape():
    shared = build('name: "p" type: "PReLU" prelu_param { channel_shared: true }')
    assert shared.weight.shape == ()  # Caffe stores a 0-axis blob
    assert shared.weight.item() == 0.25
    assert torch.equal(build('name: "p" type: "PReLU"').weight, torch.full((5,), 0.25))
    filled = build('name: "p" type: "PReLU" prelu_param { filler { type: "constant" '
                   'value: -0.5 } }')
    assert torch.equal(filled.weight.detach(), torch.full((5,), -0.5))
    assert shared(-torch.ones(2, 5)).eq(-0.25).all()


def test_prelu_shape_errors():
    with pytest.raises(ShapeError, match="2 axes"):
        build('name: "p" type: "PReLU"', [(7,)])
    prelu = build('name: "p" type: "PReLU"')
    with pytest.raises(ShapeError, match="'p'.*5 channels"):
        prelu.output_shapes([(2, 4, 7, 3)])
    assert build('name: "p" type: "PReLU" prelu_param { channel_shared: true }'
                 ).output_shapes([(2, 4, 7, 3)]) == [(2, 4, 7, 3)]


def test_gradient_at_zero_follows_caffe_kinks():
    zero = torch.zeros(3, 4)
    assert grad_of(ReLU(0.1), zero).eq(0.1).all()  # Caffe tests x > 0: slope at 0
    assert grad_of(ReLU(), zero).eq(0).all()
    prelu = PReLU(4)
    assert grad_of(prelu, zero).eq(0.25).all()
    assert grad_of(ELU(0.7), zero).sub(0.7).abs().max() < 1e-7
    assert grad_of(AbsVal(), zero).eq(0).all()  # sign(0) = 0
    assert grad_of(BNLL(), zero).eq(0.5).all()  # e / (e + 1) with e = 1


def test_bnll_is_stable_for_large_inputs():
    x = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0, 1000.0])
    y = BNLL()(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[3:], x[3:])
    assert y[0] == 0.0 or y[0] < 1e-40
    grad = grad_of(BNLL(), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, torch.sigmoid(x))


def test_power_gradient_divides_by_the_base_as_caffe():
    # d/dx (scale x)^3 at x = 0 is 0, but Caffe computes power * y / x = 0 / 0.
    assert torch.isnan(grad_of(Power(3.0), torch.zeros(4))).all()
    # power 2 and power 1 are written without division.
    assert grad_of(Power(2.0, 0.5, 0.0), torch.zeros(4)).eq(0).all()
    assert grad_of(Power(1.0, 3.0, 1.0), torch.zeros(4)).eq(3).all()


def test_power_constant_cases():
    x = torch.randn(2, 5)
    y = Power(2.0, 0.0, 3.0)(x)  # scale 0: the input is ignored
    assert y.eq(9.0).all()
    assert Power(0.0, 2.0, 3.0)(x).eq(1.0).all()
    assert grad_of(Power(2.0, 0.0, 3.0), x).eq(0).all()
    assert torch.isnan(Power(0.5, 0.0, -1.0)(x)).all()  # a negative base, as C's pow


def test_power_exp_log_values():
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(Power(3.0, 0.5, 2.0)(x), (2.0 + 0.5 * x) ** 3)
    torch.testing.assert_close(Exp(2.0, 0.5, 0.1)(x), 2.0 ** (0.1 + 0.5 * x))
    torch.testing.assert_close(Exp()(x), torch.exp(x))
    torch.testing.assert_close(Log(10.0, 2.0, 3.0)(x), torch.log10(3.0 + 2.0 * x))
    torch.testing.assert_close(Log()(x + 2), torch.log(x + 2))


def test_from_caffe_reads_parameters():
    assert build('name: "r" type: "ReLU" relu_param { negative_slope: 0.25 }'
                 ).negative_slope == 0.25
    assert build('name: "e" type: "ELU" elu_param { alpha: 0.5 }').alpha == 0.5
    power = build('name: "p" type: "Power" power_param { power: 2 scale: 3 shift: 4 }')
    assert (power.power, power.scale, power.shift) == (2, 3, 4)
    exp = build('name: "e" type: "Exp" exp_param { base: 3 scale: 2 shift: 1 }')
    assert (exp.base, exp.scale, exp.shift) == (3, 2, 1)
    log = build('name: "l" type: "Log" log_param { base: 2 scale: 3 shift: 4 }')
    assert (log.base, log.scale, log.shift) == (2, 3, 4)
    assert build('name: "t" type: "Threshold" threshold_param { threshold: 0.5 }'
                 ).threshold == 0.5
    for kind in ("Sigmoid", "TanH", "AbsVal", "BNLL"):
        assert build(f'name: "n" type: "{kind}"').output_shapes([SHAPE]) == [SHAPE]


@pytest.mark.parametrize("text, match", [
    ('type: "Exp" exp_param { base: 0 }', "'bad'.*base 0"),
    ('type: "Exp" exp_param { base: -2 }', "'bad'.*base -2"),
    ('type: "Log" log_param { base: 1 }', "'bad'.*base 1"),
    ('type: "Dropout" dropout_param { dropout_ratio: 1 }', "'bad'.*dropout_ratio 1"),
])
def test_bad_parameters_raise(text, match):
    with pytest.raises(UnsupportedParameterError, match=match):
        build('name: "bad" ' + text)


def test_neuron_layers_take_one_bottom():
    with pytest.raises(ShapeError, match="'s'.*exactly one bottom"):
        build('name: "s" type: "Sigmoid"').output_shapes([SHAPE, SHAPE])


def test_threshold_is_strict_and_not_differentiable():
    x = torch.tensor([-1.0, 0.2, 0.20001, 3.0], requires_grad=True)
    y = Threshold(0.2)(x)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert not y.requires_grad  # Caffe has no backward for Threshold


def test_dropout_test_phase_is_identity_in_a_new_tensor():
    dropout = build('name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.3 }')
    assert not dropout.training
    x = torch.randn(SHAPE)
    y = dropout(x)
    assert y is not x and torch.equal(y, x)


def test_dropout_train_phase_scales_kept_units_and_masks_the_gradient():
    dropout = build('name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
                    phase="TRAIN", generator=torch.Generator().manual_seed(5))
    assert dropout.training
    x = torch.rand(20, 5, 7, 3, dtype=torch.float64) + 1.0
    x.requires_grad_(True)
    y = dropout(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    assert 0.6 < kept.double().mean() < 0.8
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.double() / 0.7)


def test_dropout_masks_come_from_the_generator():
    first = Dropout(0.5, torch.Generator().manual_seed(3)).train()
    second = Dropout(0.5, torch.Generator().manual_seed(3)).train()
    x = torch.ones(4, 5, 7)
    assert torch.equal(first(x), second(x))
    other = Dropout(0.5, torch.Generator().manual_seed(4)).train()
    assert not torch.equal(first(x), other(x))
    assert torch.equal(first.eval()(x), x)


def test_extra_repr_shows_non_defaults():
    assert repr(ReLU()) == "ReLU()"
    assert "negative_slope=0.1" in repr(ReLU(0.1))
    assert "channels=5" in repr(PReLU(5))
    assert "channel_shared=True" in repr(PReLU(5, True))
    assert repr(Power(2.0)) == "Power(power=2.0)"
    assert repr(Exp()) == "Exp()"
    assert "base=2.0" in repr(Log(2.0))
    assert "dropout_ratio=0.3" in repr(Dropout(0.3))
    assert "threshold=0.5" in repr(Threshold(0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    x = torch.randn(SHAPE, device="cuda", requires_grad=True)
    for module in [ReLU(0.1), PReLU(5), ELU(), BNLL(), Power(2.0, 0.5, 1.0), Exp(2.0),
                   Threshold(0.1), Dropout(0.5, torch.Generator().manual_seed(0)).train()]:
        module = module.cuda()
        y = module(x)
        assert y.device.type == "cuda"
        if y.requires_grad:
            y.sum().backward()


# -- BVLC Caffe after 1.0: Clip and Swish ------------------------------------------------
def test_clip_values_and_gradient_with_both_bounds_included():
    layer = build('name: "c" type: "Clip" clip_param { min: -0.5 max: 1.5 }')
    x = torch.tensor([-2.0, -0.5, 0.0, 1.5, 3.0], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.tolist() == [-0.5, -0.5, 0.0, 1.5, 1.5]
    y.backward(torch.ones_like(y))
    # Caffe: top_diff * (x >= min && x <= max).
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert torch.autograd.gradcheck(layer, (away_from_zero(SMALL) * 0.4,))


def test_clip_properties_from_bvlc_test():
    """BVLC's TestClip (min -1, max 2): bounded, saturated at the bounds, identity inside."""
    layer = build('name: "c" type: "Clip" clip_param { min: -1, max: 2 }')
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * 2
    y = layer(x)
    assert ((y >= -1) & (y <= 2)).all()
    assert ((x > -1) | (y == -1)).all() and ((x < 2) | (y == 2)).all()
    inside = (x >= -1) & (x <= 2)
    assert torch.equal(y[inside], x[inside])


def test_clip_with_min_above_max_gives_min_as_caffe():
    x = torch.linspace(-3, 3, 7, requires_grad=True)
    y = Clip(1.0, -1.0)(x)
    assert y.tolist() == [1.0] * 7
    y.sum().backward()
    assert x.grad.tolist() == [0.0] * 7


def test_clip_needs_both_bounds():
    with pytest.raises(UnsupportedParameterError, match="'c'.*needs max"):
        build('name: "c" type: "Clip" clip_param { min: 0 }')


@pytest.mark.parametrize("beta", [1.0, 1.5, 0.0])  # BVLC's TestSwish, ...WithBeta, ...AsLinear
def test_swish_values_and_caffes_backward(beta):
    text = 'name: "s" type: "Swish"' + (f" swish_param {{ beta: {beta} }}" if beta != 1 else "")
    layer = build(text)
    assert layer.beta == beta
    x = away_from_zero()
    y = layer(x)
    torch.testing.assert_close(y, x * torch.sigmoid(beta * x))
    upstream = torch.randn(SHAPE, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, upstream)
    # Caffe: top_diff * (beta * y + sigmoid(beta x) * (1 - beta * y)).
    sig = torch.sigmoid(beta * x.detach())
    torch.testing.assert_close(grad, upstream * (beta * y.detach() + sig * (1 - beta * y.detach())))
    assert torch.autograd.gradcheck(layer, (away_from_zero(SMALL),))


def test_dropout_without_scale_train_scales_at_test_time():
    """caffe-fast-rcnn's ``scale_train: false``: TEST multiplies by ``1 - ratio``, TRAIN keeps
    the surviving values as they are (py-faster-rcnn's ZF and VGG16 test nets)."""
    x = torch.linspace(-2.0, 3.0, 2 * 5 * 7 * 3, dtype=torch.float64).reshape(2, 5, 7, 3)
    layer = Dropout(0.3, torch.Generator().manual_seed(0), scale_train=False).eval()
    torch.testing.assert_close(layer(x), x * 0.7, rtol=0, atol=0)
    train = layer.train()(x)
    kept = train != 0
    assert 0 < int(kept.sum()) < x.numel()
    torch.testing.assert_close(train[kept], x[kept], rtol=0, atol=0)
    assert "scale_train=False" in repr(layer)
