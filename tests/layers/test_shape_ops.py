"""Concat, Slice, Split, Flatten, Reshape, Crop, Tile, Silence: shapes, data, gradients."""

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import ShapeError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.shape_ops import (Concat, Crop, Flatten, Reshape, Silence, Slice, Split,
                                          Tile)
from caffelayers.proto import caffe_pb2
from caffelayers.registry import layer_class
from caffelayers.verify import verify_case

CASES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
SHAPE = (2, 5, 7, 3)


def build(text, bottom_shapes=(SHAPE,)):
    param = text_format.Parse('name: "s" ' + text, caffe_pb2.LayerParameter())
    module = layer_class(param.type).from_caffe(param, list(bottom_shapes), BuildContext())
    module.layer_name = param.name
    return module


def ramp(shape=SHAPE):
    return torch.arange(float(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)


@pytest.mark.parametrize("case", ["concat_axis1", "concat_axis2", "crop", "flatten",
                                  "flatten_axis2", "reshape_infer", "slice_equal",
                                  "slice_points", "tile"])
def test_matches_caffe_reference(case):
    result = verify_case(CASES_DIR / case)
    assert result.passed, "\n".join([c.describe() for c in result.failures] + [result.summary])


# -- Concat ---------------------------------------------------------------------------------
def test_concat_axes_and_legacy_concat_dim():
    a, b = ramp((2, 5, 7, 3)), ramp((2, 5, 7, 4))
    layer = build('type: "Concat" concat_param { axis: -1 }', [a.shape, b.shape])
    assert layer.output_shapes([a.shape, b.shape]) == [(2, 5, 7, 7)]
    torch.testing.assert_close(layer(a, b), torch.cat([a, b], dim=3))
    legacy = build('type: "Concat" concat_param { concat_dim: 3 }', [a.shape, b.shape])
    torch.testing.assert_close(legacy(a, b), torch.cat([a, b], dim=3))
    assert build('type: "Concat"', [SHAPE, SHAPE]).axis == 1


def test_concat_gradient_splits_the_top_diff():
    a = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Concat(1), (a, b))


def test_concat_single_bottom_is_a_new_view():
    x = ramp()
    y = Concat()(x)
    assert y is not x and torch.equal(y, x)


@pytest.mark.parametrize("shapes, match", [
    ([(2, 5, 7), (2, 4, 3)], "equal sizes on every axis but"),
    ([(2, 5, 7), (2, 5)], "same number of axes"),
    ([(2, 5)], r"axis 3 must lie in \[-2, 2\)"),
])
def test_concat_shape_errors(shapes, match):
    layer = Concat(3 if len(shapes) == 1 else 1)
    layer.layer_name = "s"
    with pytest.raises(ShapeError, match="'s'.*" + match):
        layer.output_shapes(shapes)


def test_concat_axis_and_concat_dim_together_are_refused():
    with pytest.raises(UnsupportedParameterError, match="'s'.*either axis or concat_dim"):
        build('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [SHAPE, SHAPE])


# -- Slice ----------------------------------------------------------------------------------
def test_slice_points_cut_consecutive_pieces():
    param = 'type: "Slice" top: "a" top: "b" top: "c" slice_param { axis: 1 slice_point: 1 ' \
            'slice_point: 4 }'
    layer = build(param)
    assert layer.output_shapes([SHAPE]) == [(2, 1, 7, 3), (2, 3, 7, 3), (2, 1, 7, 3)]
    x = ramp()
    pieces = layer(x)
    assert isinstance(pieces, tuple)
    for piece, (start, stop) in zip(pieces, [(0, 1), (1, 4), (4, 5)]):
        torch.testing.assert_close(piece, x[:, start:stop])


def test_slice_equal_split_and_legacy_slice_dim():
    layer = build('type: "Slice" top: "a" top: "b" top: "c" top: "d" top: "e" top: "f" '
                  'top: "g" slice_param { slice_dim: 2 }')
    assert layer.output_shapes([SHAPE]) == [(2, 5, 1, 3)] * 7
    single = build('type: "Slice" top: "a"')
    (whole,) = single(ramp())
    assert torch.equal(whole, ramp())


def test_slice_gradient_reassembles_the_top_diffs():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    layer = Slice(axis=-2, slice_points=(2, 3))
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("layer, match", [
    (Slice(1, (3, 2)), r"slice points \[3, 2\] increasing"),
    (Slice(1, (0, 2)), "increasing, above 0"),
    (Slice(1, (2, 6)), "at most 5"),
    (Slice(1, (), 2), "size 5 on axis 1 divisible by the 2 tops"),
    (Slice(2, (1, 2, 3, 4, 5, 6, 7, 8)), "at least 9 elements on axis 2"),
])
def test_slice_shape_errors(layer, match):
    layer.layer_name = "s"
    with pytest.raises(ShapeError, match="'s'.*" + match):
        layer.output_shapes([SHAPE])


def test_slice_points_must_match_the_tops():
    with pytest.raises(UnsupportedParameterError, match="'s'.*2 slice points make 3 tops.* 2"):
        build('type: "Slice" top: "a" top: "b" slice_param { slice_point: 1 slice_point: 2 }')


# -- Split ----------------------------------------------------------------------------------
def test_split_copies_and_sums_gradients():
    layer = build('type: "Split" top: "a" top: "b" top: "c"')
    x = torch.randn(SHAPE, requires_grad=True)
    tops = layer(x)
    assert layer.output_shapes([SHAPE]) == [SHAPE] * 3
    assert len(tops) == 3 and len({id(t) for t in tops}) == 3
    sum(top * (i + 1) for i, top in enumerate(tops)).sum().backward()
    assert x.grad.eq(6).all()


# -- Flatten --------------------------------------------------------------------------------
@pytest.mark.parametrize("axis, end_axis, expected", [
    (1, -1, (2, 105)),
    (2, -1, (2, 5, 21)),
    (0, 1, (10, 7, 3)),
    (-3, -2, (2, 35, 3)),
    (2, 1, (2, 5, 1, 7, 3)),  # Caffe: end_axis = axis - 1 inserts an axis of size 1
])
def test_flatten_shapes(axis, end_axis, expected):
    layer = Flatten(axis, end_axis)
    assert layer.output_shapes([SHAPE]) == [expected]
    torch.testing.assert_close(layer(ramp()), ramp().reshape(expected))


def test_flatten_errors_and_defaults():
    layer = build('type: "Flatten" flatten_param { axis: 2 end_axis: 0 }')
    with pytest.raises(ShapeError, match="'s'.*end_axis 0"):
        layer.output_shapes([SHAPE])
    assert repr(build('type: "Flatten"')) == "Flatten()"


# -- Reshape --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis, num_axes, expected", [
    ((0, -1, 3), 0, -1, (2, 35, 3)),
    ((-1,), 0, -1, (210,)),
    ((7, 5), 1, 2, (2, 7, 5, 3)),
    ((1, -1), -1, 0, (2, 5, 7, 3, 1, 1)),  # axis -1 is after the last axis
    ((0, 0, 3, -1), 0, -1, (2, 5, 3, 7)),
    ((3, 1), 3, -1, (2, 5, 7, 3, 1)),
    ((0, -1), 1, 1, (2, 5, 1, 7, 3)),  # only axis 1 is replaced; the 0 copies it
])
def test_reshape_rules(shape, axis, num_axes, expected):
    layer = Reshape(shape, axis, num_axes)
    assert layer.output_shapes([SHAPE]) == [expected]
    torch.testing.assert_close(layer(ramp()), ramp().reshape(expected))


@pytest.mark.parametrize("shape, axis, num_axes, match", [
    ((-1, -1), 0, -1, "at most one -1"),
    ((4, -1), 0, -1, "divisible by the product 4"),
    ((-2, 3), 0, -1, "sizes >= 0"),
    ((0, 0, 0, 0, 0), 0, -1, "a bottom axis 4 for the 0"),
    ((1,), 5, -1, r"axis 5 in \[-5, 4\]"),
    ((1,), 2, 3, "at most 4"),
    ((1,), 0, -2, "num_axes -2"),
    ((5, 7), 1, 1, "the bottom's 210 elements"),  # axis 1 (size 5) cannot become 5 x 7
])
def test_reshape_errors(shape, axis, num_axes, match):
    layer = Reshape(shape, axis, num_axes)
    layer.layer_name = "s"
    with pytest.raises(ShapeError, match="'s'.*" + match):
        layer.output_shapes([SHAPE])


def test_reshape_from_caffe_and_gradient():
    layer = build('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } axis: 1 }')
    assert layer.output_shapes([SHAPE]) == [(2, 5, 21)]
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Reshape((-1, 2)), (x,))


# -- Crop -----------------------------------------------------------------------------------
def test_crop_offsets_per_axis():
    layer = build('type: "Crop" crop_param { axis: 1 offset: 0 offset: 2 offset: 1 }',
                  [SHAPE, (2, 4, 4, 2)])
    x = ramp()
    y = layer(x, torch.zeros(2, 4, 4, 2))
    assert layer.output_shapes([SHAPE, (2, 4, 4, 2)]) == [(2, 4, 4, 2)]
    torch.testing.assert_close(y, x[:, 0:4, 2:6, 1:3])


def test_crop_single_and_default_offsets():
    x = ramp()
    one = Crop(2, (1,))
    torch.testing.assert_close(one(x, torch.zeros(9, 9, 5, 2)), x[:, :, 1:6, 1:3])
    torch.testing.assert_close(Crop()(x, torch.zeros(1, 1, 5, 2)), x[:, :, 0:5, 0:2])


def test_crop_gradient_goes_to_the_window_only():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    reference = torch.zeros(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    layer = Crop(2, (1, 1))
    assert torch.autograd.gradcheck(lambda inp: layer(inp, reference), (x,))
    y = layer(x, reference)
    assert y.grad_fn is not None
    y.sum().backward()
    assert reference.grad is None  # the reference only gives a size
    expected = torch.zeros_like(x)
    expected[:, :, 1:3, 1:4] = 1
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("layer, shapes, match", [
    (Crop(2, (1, 2)), [SHAPE, (2, 5, 7, 3)], "a crop of 7 at offset 1 within the data's size 7"),
    (Crop(2, ()), [SHAPE, (2, 5, 8, 3)], "a crop of 8 at offset 0"),
    (Crop(1, (1, 2)), [SHAPE, SHAPE], r"one offset per axis from axis 1 on \(3 axes, 2 offsets"),
    (Crop(2, ()), [SHAPE, (2, 5, 7)], "at least as many axes"),
    (Crop(2, ()), [SHAPE], "two bottoms"),
])
def test_crop_shape_errors(layer, shapes, match):
    layer.layer_name = "s"
    with pytest.raises(ShapeError, match="'s'.*" + match):
        layer.output_shapes(shapes)


# -- Tile -----------------------------------------------------------------------------------
def test_tile_repeats_whole_blocks():
    layer = build('type: "Tile" tile_param { axis: 1 tiles: 3 }')
    x = ramp()
    y = layer(x)
    assert layer.output_shapes([SHAPE]) == [(2, 15, 7, 3)]
    for t in range(3):
        torch.testing.assert_close(y[:, 5 * t:5 * (t + 1)], x)  # abcabc, not aabbcc
    torch.testing.assert_close(Tile(2, axis=-1)(x), torch.cat([x, x], dim=3))


def test_tile_gradient_sums_the_copies():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Tile(3, axis=2), (x,))


def test_tile_needs_tiles():
    with pytest.raises(UnsupportedParameterError, match="'s'.*tiles is required"):
        build('type: "Tile" tile_param { axis: 1 }')
    with pytest.raises(UnsupportedParameterError, match="'s'.*tiles 0"):
        build('type: "Tile" tile_param { tiles: 0 }')
    with pytest.raises(ShapeError, match="'s'.*axis 4"):
        build('type: "Tile" tile_param { axis: 4 tiles: 2 }').output_shapes([SHAPE])


# -- Silence --------------------------------------------------------------------------------
def test_silence_has_no_tops():
    layer = build('type: "Silence"', [SHAPE, (3,)])
    assert layer.output_shapes([SHAPE, (3,)]) == []
    assert layer(ramp(), torch.zeros(3)) == ()


def test_extra_repr():
    assert repr(Concat()) == "Concat()"
    assert repr(Concat(2)) == "Concat(axis=2)"
    assert "slice_points=[1, 4]" in repr(Slice(slice_points=(1, 4)))
    assert repr(Reshape((0, -1))) == "Reshape(shape=[0, -1])"
    assert "offset=[1, 2]" in repr(Crop(2, (1, 2)))
    assert repr(Tile(3)) == "Tile(tiles=3)"
    assert repr(Split(3)) == "Split(num_tops=3)"
    assert repr(Silence()) == "Silence()"
