"""Embed: lookup against a float64 reference, index truncation, gradients, blob layout, errors."""

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffelayers.errors import CaffeLayersError, UnsupportedParameterError
from caffelayers.layers.base import BuildContext
from caffelayers.layers.embed import Embed
from caffelayers.proto import caffe_pb2

K, NUM_OUTPUT = 7, 5


def from_text(text, bottom_shapes=((2, 3),), fill=True):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = Embed.from_caffe(param, list(bottom_shapes),
                             BuildContext(fill=fill, generator=torch.Generator().manual_seed(0)))
    layer.layer_name = param.name
    return layer


def random_layer(bias_term=True):
    layer = Embed(K, NUM_OUTPUT, bias_term).double()
    rng = np.random.default_rng(0)
    blobs = [rng.normal(size=(K, NUM_OUTPUT))]
    if bias_term:
        blobs.append(rng.normal(size=NUM_OUTPUT))
    layer.load_caffe_blobs(blobs)
    return layer, blobs


def test_lookup_matches_one_hot_inner_product():
    layer, (weight, bias) = random_layer()
    indices = np.array([[0, 6, 3], [3, 1, 2]], dtype=np.float64)
    y = layer(torch.from_numpy(indices))
    assert y.shape == (2, 3, NUM_OUTPUT)
    one_hot = np.eye(K)[indices.astype(int)]
    np.testing.assert_allclose(y.detach().numpy(), one_hot @ weight + bias, rtol=1e-12)


def test_indices_are_truncated_like_static_cast():
    layer, (weight,) = random_layer(bias_term=False)
    y = layer(torch.tensor([2.9, 0.99, 6.5], dtype=torch.float64))
    np.testing.assert_allclose(y.detach().numpy(), weight[[2, 0, 6]], rtol=1e-12)


def test_weight_gradient_accumulates_repeated_indices():
    layer, _ = random_layer()
    indices = torch.tensor([[1.0, 4.0, 1.0], [1.0, 0.0, 4.0]], dtype=torch.float64)
    dy = torch.randn(2, 3, NUM_OUTPUT, dtype=torch.float64)
    layer(indices).backward(dy)
    expected = np.zeros((K, NUM_OUTPUT))
    np.add.at(expected, indices.numpy().astype(int).reshape(-1), dy.numpy().reshape(-1, NUM_OUTPUT))
    np.testing.assert_allclose(layer.weight.grad.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(layer.bias.grad.numpy(), dy.sum(dim=(0, 1)).numpy(), rtol=1e-12)


def test_gradcheck_parameters():
    layer, _ = random_layer()
    indices = torch.tensor([[3.0, 0.0], [6.0, 3.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (indices,)),
        (layer.weight.detach().clone().requires_grad_(),
         layer.bias.detach().clone().requires_grad_()))


def test_blobs_in_caffe_layout_and_fillers():
    layer = from_text('name: "e" type: "Embed" embed_param { input_dim: 7 num_output: 5 '
                      'weight_filler { type: "constant" value: 2 } '
                      'bias_filler { type: "constant" value: -1 } }')
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == [(K, NUM_OUTPUT), (NUM_OUTPUT,)]
    assert torch.equal(layer.weight, torch.full((K, NUM_OUTPUT), 2.0))
    assert torch.equal(layer.bias, torch.full((NUM_OUTPUT,), -1.0))
    assert layer.output_shapes([(2, 3, 4)]) == [(2, 3, 4, NUM_OUTPUT)]
    plain = from_text('name: "e" type: "Embed" embed_param { input_dim: 7 num_output: 5 '
                      'bias_term: false }')
    assert [tuple(b.shape) for b in plain.caffe_blobs()] == [(K, NUM_OUTPUT)]
    assert torch.equal(plain.weight, torch.zeros(K, NUM_OUTPUT))  # Caffe's default filler
    assert repr(plain) == "Embed(input_dim=7, num_output=5, bias_term=False)"


@pytest.mark.parametrize("fields", ["input_dim: 7", "num_output: 5", "input_dim: 0 num_output: 5"])
def test_missing_sizes_are_rejected(fields):
    with pytest.raises(UnsupportedParameterError, match="'e' \\(Embed\\).*must be positive"):
        from_text(f'name: "e" type: "Embed" embed_param {{ {fields} }}')


@pytest.mark.parametrize("value", [7.0, -1.0])
def test_out_of_range_index_raises(value):
    layer, _ = random_layer()
    layer.layer_name = "words"
    with pytest.raises(CaffeLayersError, match="words.*\\[0, 7\\)"):
        layer(torch.tensor([0.0, value], dtype=torch.float64))
