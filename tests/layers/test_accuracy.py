"""Accuracy against a Caffe 1.0-style reference (sorted (score, class) pairs), and its quirks."""

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import CaffeLayersError, ShapeError
from caffelayers.layers.accuracy import Accuracy
from caffelayers.layers.base import BuildContext
from caffelayers.proto import caffe_pb2

N, C, H, W = 2, 5, 7, 3


def reference_accuracy(scores, labels, top_k=1, axis=1, ignore_label=None):
    """Caffe 1.0's loop: partial_sort of (score, class) pairs with std::greater."""
    scores = np.moveaxis(scores, axis, -1).reshape(-1, scores.shape[axis])
    labels = labels.reshape(-1).astype(int)
    classes = scores.shape[1]
    hits, counted = 0, 0
    per_hits, per_counts = np.zeros(classes), np.zeros(classes)
    for row, label in zip(scores, labels):
        if ignore_label is not None and label == ignore_label:
            continue
        ranked = sorted(((value, k) for k, value in enumerate(row)), reverse=True)
        hit = label in [k for _, k in ranked[:top_k]]
        hits += hit
        counted += 1
        per_counts[label] += 1
        per_hits[label] += hit
    per_class = np.divide(per_hits, per_counts, out=np.zeros(classes), where=per_counts > 0)
    return hits / counted if counted else math.nan, per_class


def named(layer, name):
    layer.layer_name = name
    return layer


def from_text(text, bottom_shapes, tops=1):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.top.extend(f"t{i}" for i in range(tops))
    layer = Accuracy.from_caffe(param, bottom_shapes, BuildContext())
    layer.layer_name = param.name
    return layer


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_top_k_on_two_axis_scores(top_k):
    rng = np.random.default_rng(top_k)
    scores = rng.normal(size=(40, C))
    labels = rng.integers(0, C, 40).astype(np.float64)
    accuracy = Accuracy(top_k)(torch.from_numpy(scores), torch.from_numpy(labels))
    assert accuracy.shape == ()
    assert accuracy.item() == pytest.approx(reference_accuracy(scores, labels, top_k)[0])


def test_spatial_labels_with_ignore_and_per_class():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(N, C, H, W))
    labels = rng.integers(0, C, (N, H, W)).astype(np.float64)
    labels[0, :2] = 255
    layer = from_text('name: "acc" type: "Accuracy" accuracy_param { top_k: 2 '
                      'ignore_label: 255 }', [scores.shape, labels.shape], tops=2)
    assert layer.output_shapes([scores.shape, labels.shape]) == [(), (C,)]
    accuracy, per_class = layer(torch.from_numpy(scores), torch.from_numpy(labels))
    expected, expected_per_class = reference_accuracy(scores, labels, 2, 1, 255)
    assert accuracy.item() == pytest.approx(expected)
    np.testing.assert_allclose(per_class.numpy(), expected_per_class)
    assert repr(layer) == "Accuracy(top_k=2, ignore_label=255, per_class=True)"


def test_last_axis_and_absent_class_gets_zero():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(3, 4, C))
    labels = rng.integers(0, C - 1, (3, 4)).astype(np.float64)  # class C-1 never appears
    accuracy, per_class = Accuracy(axis=-1, per_class=True)(torch.from_numpy(scores),
                                                             torch.from_numpy(labels))
    expected, expected_per_class = reference_accuracy(scores, labels, axis=2)
    assert accuracy.item() == pytest.approx(expected)
    np.testing.assert_allclose(per_class.numpy(), expected_per_class)
    assert per_class[C - 1] == 0


def test_ties_go_to_the_higher_class_index():
    """Caffe 1.0 sorts (score, class) pairs descending: among equal scores the higher class wins."""
    scores = torch.zeros(2, C)
    labels = torch.tensor([C - 1.0, 0.0])
    assert Accuracy()(scores, labels).item() == 0.5
    assert Accuracy(top_k=2)(scores, torch.tensor([C - 2.0, C - 3.0])).item() == 0.5


def test_every_label_ignored_gives_nan_like_caffe_1_0():
    accuracy, per_class = Accuracy(ignore_label=-1, per_class=True)(
        torch.randn(N, C), torch.full((N,), -1.0))
    assert math.isnan(accuracy.item())
    assert torch.equal(per_class, torch.zeros(C))


def test_no_gradient_flows():
    scores = torch.randn(N, C, requires_grad=True)
    assert not Accuracy()(scores, torch.zeros(N)).requires_grad


def test_shape_errors():
    layer = named(Accuracy(top_k=3), "acc1")
    with pytest.raises(ShapeError, match="acc1.*one label per score vector"):
        layer.output_shapes([(N, C, H), (N, H + 1)])
    with pytest.raises(ShapeError, match="acc1.*top_k 3"):
        layer.output_shapes([(N, 2), (N,)])
    with pytest.raises(ShapeError, match="acc1.*2 bottoms"):
        layer.output_shapes([(N, C)])
    with pytest.raises(ShapeError, match="acc1.*axis 2"):
        named(Accuracy(axis=2), "acc1").output_shapes([(N, C), (N,)])


def test_out_of_range_label_raises():
    layer = named(Accuracy(), "acc2")
    with pytest.raises(CaffeLayersError, match="acc2.*\\[0, 5\\)"):
        layer(torch.randn(N, C), torch.tensor([0.0, 5.0]))
