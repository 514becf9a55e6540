"""Net's blob semantics: in-place chains, splits, loss weights, propagate_down, weights I/O."""

import numpy as np
import pytest
import torch

import caffelayers
from caffelayers import Net

HEAD = 'name: "t"\nlayer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 5 } } }\n'


def write(tmp_path, body, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(HEAD + body)
    return path


def ip(name, bottom, top, n, bias=True):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" '
            f'inner_product_param {{ num_output: {n} bias_term: {str(bias).lower()} '
            f'weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "uniform" }} }} }}\n')


def test_in_place_blob_keeps_last_data_and_first_producer_gradient(tmp_path):
    path = write(tmp_path, ip("fc", "x", "h", 3) +
                 'layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }\n'
                 'layer { name: "pw" type: "Power" bottom: "h" top: "h" power_param { scale: 3 } }\n')
    net = Net(path, seed=1, dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64)
    net(x=x)
    w, b = net.layer("fc").caffe_blobs()
    pre = x @ w.detach().T + b.detach()
    assert torch.allclose(net.blobs["h"], 3 * pre.clamp(min=0))
    top = torch.randn(2, 3, dtype=torch.float64)
    net.backward({"h": top})
    # The diff of h is the gradient at fc's output: through both in-place layers.
    assert torch.allclose(net.diffs["h"], 3 * top * (pre > 0))
    assert torch.allclose(net.diffs["x"], (3 * top * (pre > 0)) @ w.detach())


def test_blob_read_twice_sums_gradients(tmp_path):
    path = write(tmp_path, ip("a", "x", "ya", 4) + ip("b", "x", "yb", 4) +
                 'layer { name: "sum" type: "Eltwise" bottom: "ya" bottom: "yb" top: "s" }\n')
    net = Net(path, seed=2, dtype=torch.float64)
    net(x=np.random.rand(2, 5))
    top = torch.randn(2, 4, dtype=torch.float64)
    net.backward({"s": top})
    wa = net.layer("a").caffe_blobs()[0].detach()
    wb = net.layer("b").caffe_blobs()[0].detach()
    assert torch.allclose(net.diffs["x"], top @ wa + top @ wb)


def test_loss_weight_scales_gradient_and_propagate_down_stops_it(tmp_path):
    body = (ip("fc", "x", "y", 5) +
            'layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 2 dim: 5 } } }\n'
            'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "x" top: "loss" '
            'loss_weight: 3 propagate_down: true propagate_down: false }\n')
    net = Net(write(tmp_path, body), seed=3, dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64)
    net(x=x, t=torch.zeros(2, 5))
    net.backward()
    y = net.blobs["y"].detach()
    # EuclideanLoss: sum (y - x)^2 / (2N); the gradient reaches x only through fc.
    w = net.layer("fc").caffe_blobs()[0].detach()
    expected = 3 * ((y - x) / 2) @ w
    assert torch.allclose(net.diffs["x"], expected)
    assert net.losses()[0][1] == 3


def test_outputs_inputs_and_input_errors(tmp_path):
    path = write(tmp_path, ip("fc", "x", "y", 3) + 'layer { name: "r" type: "ReLU" bottom: "y" top: "y" }\n')
    net = Net(path)
    assert net.inputs == ["x"] and net.outputs == ["y"]
    with pytest.raises(caffelayers.CaffeLayersError, match="missing inputs x"):
        net()
    with pytest.raises(caffelayers.CaffeLayersError, match="shape"):
        net(x=np.zeros((2, 4), np.float32))


def test_phase_include_and_exclude(tmp_path):
    body = (ip("fc", "x", "y", 3) +
            'layer { name: "drop" type: "Dropout" bottom: "y" top: "y" include { phase: TRAIN } }\n'
            'layer { name: "r" type: "ReLU" bottom: "y" top: "z" exclude { phase: TRAIN } }\n')
    path = write(tmp_path, body)
    assert [n.name for n in Net(path, phase="TEST").graph.nodes] == ["x", "fc", "r"]
    assert [n.name for n in Net(path, phase="TRAIN").graph.nodes] == ["x", "fc", "drop"]


def test_save_caffemodel_round_trip(tmp_path):
    path = write(tmp_path, ip("fc", "x", "y", 3))
    net = Net(path, seed=4)
    net.save_caffemodel(tmp_path / "w.caffemodel")
    again = Net(path, tmp_path / "w.caffemodel")
    for a, b in zip(net.layer("fc").caffe_blobs(), again.layer("fc").caffe_blobs()):
        assert torch.equal(a, b)


def test_weights_with_wrong_shapes_name_the_layer(tmp_path):
    Net(write(tmp_path, ip("fc", "x", "y", 3)), seed=0).save_caffemodel(tmp_path / "w.caffemodel")
    other = write(tmp_path, ip("fc", "x", "y", 4), name="other.prototxt")
    with pytest.raises(caffelayers.CaffeFormatError, match=r"layer 'fc'.*blob 0"):
        Net(other, tmp_path / "w.caffemodel")


def test_bottom_that_nothing_produces(tmp_path):
    with pytest.raises(caffelayers.CaffeFormatError, match="reads bottom 'nothing'"):
        Net(write(tmp_path, ip("fc", "nothing", "y", 3)))


def test_float64_net_passes_gradcheck(tmp_path):
    path = write(tmp_path, ip("fc", "x", "h", 4) +
                 'layer { name: "t" type: "TanH" bottom: "h" top: "h" }\n' + ip("fc2", "h", "y", 2))
    net = Net(path, seed=5, dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: net(x=v)["y"], (x,))


def test_sphereface20_full_size_train_net_builds_to_fc5(tmp_path, sphereface_prototxt):
    path = tmp_path / "sphereface_model.prototxt"
    path.write_text(sphereface_prototxt(train=True, batch=2))
    from caffelayers.graph import build_graph, load_net_param
    from caffelayers.layers.base import BuildContext

    net_param, _ = load_net_param(path, "TRAIN")
    graph = build_graph(net_param, {"data": (2, 3, 112, 96)}, BuildContext(phase="TRAIN"))
    shapes = graph.blob_shapes
    assert shapes["conv1_1"] == (2, 64, 56, 48)
    assert shapes["res2_5"] == (2, 128, 28, 24)
    assert shapes["res3_9"] == (2, 256, 14, 12)
    assert shapes["res4_3"] == (2, 512, 7, 6)
    assert shapes["fc5"] == (2, 512)
    assert shapes["fc6"] == (2, 10572)
    assert shapes["softmax_loss"] == ()


def test_parameters_shared_by_name_are_one_tensor(tmp_path):
    shared = ('param { name: "w" } param { name: "b" } '
              'inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }\n')
    body = ('layer { name: "x2" type: "Input" top: "x2" input_param { shape { dim: 2 dim: 5 } } }\n'
            'layer { name: "a" type: "InnerProduct" bottom: "x" top: "ya" ' + shared +
            'layer { name: "b" type: "InnerProduct" bottom: "x2" top: "yb" ' + shared)
    net = Net(write(tmp_path, body), seed=6, dtype=torch.float64)
    assert net.layer("a").caffe_blobs()[0] is net.layer("b").caffe_blobs()[0]
    x, x2 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    out = net(x=x, x2=x2)
    top = torch.ones(2, 3, dtype=torch.float64)
    net.backward({"ya": top, "yb": top})
    # Both uses of the shared weight add their gradients, as Caffe's shared diff does.
    assert torch.allclose(net.param_diffs()["a"][0], top.T @ x + top.T @ x2)
    assert len(list(net.parameters())) == 2 and set(out) == {"ya", "yb"}


def test_layer_names_that_are_module_attributes(tmp_path):
    body = ip("train", "x", "a", 3) + ip("double", "a", "b", 2) + ip("train.", "b", "c", 2)
    net = Net(write(tmp_path, body), seed=7)
    assert set(net(x=np.ones((2, 5), np.float32))) == {"c"}
    assert net.layer("train").caffe_blobs()[0].shape == (3, 5)
    assert net.layer("train.").caffe_blobs()[0].shape == (2, 2)


def test_users_register_their_own_layer_types(tmp_path):
    from caffelayers import register_layer
    from caffelayers.layers import CaffeLayer
    from caffelayers.registry import LAYERS

    @register_layer("TimesTwoForTest")
    class TimesTwo(CaffeLayer):
        """y = 2 x."""

        @classmethod
        def from_caffe(cls, param, bottom_shapes, ctx):
            return cls()

        def output_shapes(self, bottom_shapes):
            return [bottom_shapes[0]]

        def forward(self, x):
            return 2 * x

    try:
        net = Net(write(tmp_path, 'layer { name: "double" type: "TimesTwoForTest" '
                                  'bottom: "x" top: "y" }\n'))
        assert torch.equal(net(x=torch.ones(2, 5))["y"], torch.full((2, 5), 2.0))
        with pytest.raises(ValueError, match="already has a layer"):
            register_layer("TimesTwoForTest")(TimesTwo)
    finally:
        del LAYERS["TimesTwoForTest"]
