"""Net follows its inputs' shapes as Caffe's ``net.blobs[...].reshape(); net.reshape()`` does:
every layer's shape rule runs again on the built layers, the weights stay as they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffelayers import Net, ShapeError
from caffelayers.errors import CaffeLayersError

FULLY_CONVOLUTIONAL = '''name: "pnet"
input: "data" input_dim: 1 input_dim: 3 input_dim: 12 input_dim: 12
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "conv2" top: "prob" }
'''

WITH_INNER_PRODUCT = FULLY_CONVOLUTIONAL.replace(
    'layer { name: "prob"',
    'layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc" '
    'inner_product_param { num_output: 4 } }\nlayer { name: "prob"').replace(
    'bottom: "conv2" top: "prob"', 'bottom: "fc" top: "prob"')


@pytest.fixture
def pnet(tmp_path):
    path = tmp_path / "pnet.prototxt"
    path.write_text(FULLY_CONVOLUTIONAL)
    return path


@pytest.mark.parametrize("height,width", [(17, 23), (97, 129), (12, 12)])
def test_forward_on_other_sizes_equals_a_net_built_for_them(pnet, height, width):
    net = Net(pnet, seed=3)
    image = np.random.default_rng(0).standard_normal((2, 3, height, width)).astype(np.float32)
    out = net(data=image)["prob"]
    # ceil-mode pooling: (h - 2) / 2 rounded up, + 1, then the 3x3 convolution.
    pooled = (-(-(height - 2 - 2) // 2) + 1, -(-(width - 2 - 2) // 2) + 1)
    assert tuple(out.shape) == (2, 2, pooled[0] - 2, pooled[1] - 2)
    assert net.graph.blob_shapes["prob"] == tuple(out.shape)
    direct = Net(pnet, inputs={"data": (2, 3, height, width)}, seed=3)
    assert direct.graph.blob_shapes == net.graph.blob_shapes
    torch.testing.assert_close(direct(data=image)["prob"], out, rtol=0, atol=0)


def test_reshape_keeps_the_weights(pnet):
    net = Net(pnet, seed=1)
    before = {name: [b.detach().clone() for b in blobs]
              for name, blobs in net.caffe_params().items()}
    weight = net.layer("conv1").caffe_blobs()[0]
    net.reshape(data=(1, 3, 40, 31))
    assert net.layer("conv1").caffe_blobs()[0] is weight
    for name, blobs in net.caffe_params().items():
        for old, new in zip(before[name], blobs):
            assert torch.equal(old, new)
    assert net.graph.blob_shapes["conv1"] == (1, 5, 38, 29)


def test_a_size_fixed_by_weights_is_refused_with_the_layer_named(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(WITH_INNER_PRODUCT)
    net = Net(path, seed=0)
    shapes = dict(net.graph.blob_shapes)
    with pytest.raises(ShapeError, match="'fc'") as error:
        net.reshape(data=(1, 3, 20, 20))
    assert str(path) in str(error.value)
    assert net.graph.blob_shapes == shapes, "a refused reshape must leave the graph as it was"
    # The batch is free: only the features from the InnerProduct's axis on are fixed.
    assert tuple(net(data=np.zeros((5, 3, 12, 12), np.float32))["prob"].shape) == (5, 4)


def test_reshape_names_only_inputs(pnet):
    with pytest.raises(CaffeLayersError, match="inputs are data"):
        Net(pnet).reshape(conv1=(1, 5, 3, 3))
