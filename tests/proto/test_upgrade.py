"""Old formats upgrade on load the way Caffe's upgrade_proto.cpp does."""

from pathlib import Path

import pytest
from google.protobuf import text_format

from caffelayers.errors import CaffeFormatError
from caffelayers.proto import caffe_pb2 as pb
from caffelayers.proto import io
from caffelayers.proto.upgrade import net_needs_upgrade, upgrade_net, upgrade_solver

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"


def parse(text):
    """A NetParameter from text, without the readers' upgrade."""
    return text_format.Parse(text, pb.NetParameter())


def test_inputdim_fixture_equals_modern_twin():
    old = io.read_prototxt(FIXTURES / "sphereface4_deploy_inputdim" / "net.prototxt")
    new = io.read_prototxt(FIXTURES / "sphereface4_deploy" / "net.prototxt")
    assert old == new
    assert old.layer[0].type == "Input" and old.layer[0].name == "data"


def test_inputdim_fixture_weights_equal_modern_twin():
    old = io.read_caffemodel(FIXTURES / "sphereface4_deploy_inputdim" / "weights.caffemodel")
    new = io.read_caffemodel(FIXTURES / "sphereface4_deploy" / "weights.caffemodel")
    old_blobs = {layer.name: list(layer.blobs) for layer in old.layer}
    assert old_blobs == {layer.name: list(layer.blobs) for layer in new.layer}


V1_ALEXNET_MODERN = """
name: "v1_alexnet_mini"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 31 dim: 27 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 5 stride: 2
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 0.001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 6 pad: 1 kernel_size: 3 group: 2
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv2b" type: "Convolution" bottom: "norm1" top: "conv2b"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "cat" type: "Concat" bottom: "conv2" bottom: "conv2b" top: "cat" }
layer { name: "pool2" type: "Pooling" bottom: "cat" top: "pool2"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool2" top: "fc6"
  inner_product_param { num_output: 12
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param { num_output: 5
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }
"""


def test_v1_fixture_equals_modern_twin():
    net = io.read_prototxt(FIXTURES / "v1_alexnet_mini" / "net.prototxt")
    assert net == parse(V1_ALEXNET_MODERN)
    assert not net_needs_upgrade(net)


def test_v1_caffemodel_keeps_blobs_by_layer():
    raw = pb.NetParameter()
    raw.ParseFromString((FIXTURES / "v1_alexnet_mini" / "weights.caffemodel").read_bytes())
    assert len(raw.layers) and not len(raw.layer)
    model = io.read_caffemodel(FIXTURES / "v1_alexnet_mini" / "weights.caffemodel")
    upgraded = {layer.name: list(layer.blobs) for layer in model.layer}
    for old in raw.layers:
        assert upgraded[old.name] == list(old.blobs)
    assert [len(upgraded[n]) for n in ("conv1", "conv2", "conv2b", "fc6", "fc7")] == \
        [2, 2, 2, 2, 2]


def test_upgrade_leaves_the_argument_alone():
    raw = parse((FIXTURES / "v1_alexnet_mini" / "net.prototxt").read_text())
    before = raw.SerializeToString()
    upgraded = upgrade_net(raw)
    assert raw.SerializeToString() == before and upgraded is not raw
    assert upgrade_net(upgraded) is upgraded


def test_v1_param_fields_become_param_specs():
    net = upgrade_net(parse("""
        layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
                 blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
                 param: "shared_w" blob_share_mode: PERMISSIVE
                 loss_weight: 0.5
                 include { phase: TRAIN } }"""))
    layer = net.layer[0]
    assert layer.type == "InnerProduct"
    assert [(p.lr_mult, p.decay_mult) for p in layer.param] == [(1, 1), (2, 0)]
    assert layer.param[0].name == "shared_w"
    assert layer.param[0].share_mode == pb.ParamSpec.PERMISSIVE
    assert not layer.param[1].HasField("name")
    assert list(layer.loss_weight) == [0.5]
    assert layer.include[0].phase == pb.TRAIN


@pytest.mark.parametrize("kind, param", [("DATA", "data_param"),
                                         ("IMAGE_DATA", "image_data_param"),
                                         ("WINDOW_DATA", "window_data_param")])
def test_v1_data_transformation_fields_move(kind, param):
    net = upgrade_net(parse(f"""
        layers {{ name: "d" type: {kind} top: "data"
                  {param} {{ source: "s" scale: 0.5 mean_file: "m.binaryproto"
                             crop_size: 7 mirror: true }} }}"""))
    layer = net.layer[0]
    sub = getattr(layer, param)
    assert sub.source == "s"
    assert not any(sub.HasField(f) for f in ("scale", "mean_file", "crop_size", "mirror"))
    t = layer.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.5, "m.binaryproto", 7, True)


def test_v0_net_with_padding_layer():
    net = upgrade_net(parse("""
        name: "v0" input: "data" input_dim: 1 input_dim: 3 input_dim: 9 input_dim: 9
        layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
        layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2
                         biasterm: false weight_filler { type: "xavier" }
                         blobs_lr: 1 blobs_lr: 2 } bottom: "pad1" top: "conv1" }
        layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 }
                 bottom: "conv1" top: "pool1" }
        layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 }
                 bottom: "pool1" top: "pool1" }
        layers { layer { name: "ip" type: "innerproduct" num_output: 5 }
                 bottom: "pool1" top: "ip" }
        layers { layer { name: "d" type: "data" source: "db" batchsize: 8 scale: 0.25
                         meanfile: "mean" cropsize: 5 mirror: true } top: "x" }"""))
    layers = {layer.name: layer for layer in net.layer}
    assert [layer.name for layer in net.layer] == ["data", "conv1", "pool1", "drop", "ip", "d"]
    conv = layers["conv1"]
    assert conv.type == "Convolution" and list(conv.bottom) == ["data"]
    c = conv.convolution_param
    assert (c.num_output, list(c.kernel_size), list(c.stride), list(c.pad), c.bias_term) == \
        (4, [3], [2], [2], False)
    assert [p.lr_mult for p in conv.param] == [1, 2]
    assert layers["pool1"].pooling_param.pool == pb.PoolingParameter.AVE
    assert layers["drop"].dropout_param.dropout_ratio == pytest.approx(0.3)
    assert layers["ip"].inner_product_param.num_output == 5
    d = layers["d"]
    assert (d.type, d.data_param.source, d.data_param.batch_size) == ("Data", "db", 8)
    t = d.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.25, "mean", 5, True)
    assert list(layers["data"].input_param.shape[0].dim) == [1, 3, 9, 9]


def test_v0_misplaced_field_warns():
    with pytest.warns(UserWarning, match="num_output"):
        net = upgrade_net(parse('input: "x" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1 '
                                'layers { layer { name: "r" type: "relu" '
                                'num_output: 3 } bottom: "x" top: "x" }'))
    assert [layer.type for layer in net.layer] == ["Input", "ReLU"]


def test_v0_unknown_type():
    with pytest.raises(CaffeFormatError, match="unknown type 'convolution'"):
        upgrade_net(parse('layers { layer { name: "c" type: "convolution" } }'))


def test_net_inputs_become_input_layers_in_order():
    net = upgrade_net(parse("""
        input: "a" input_shape { dim: 2 dim: 5 }
        input: "b" input_shape { dim: 2 }
        layer { name: "ip" type: "InnerProduct" bottom: "a" top: "y" }"""))
    assert [(layer.name, layer.type, list(layer.top)) for layer in net.layer] == \
        [("a", "Input", ["a"]), ("b", "Input", ["b"]), ("ip", "InnerProduct", ["y"])]
    assert list(net.layer[1].input_param.shape[0].dim) == [2]
    assert not len(net.input) and not len(net.input_shape) and not len(net.input_dim)


@pytest.mark.parametrize("text, fragment", [
    ('input: "a" input_dim: 1 input_dim: 2', "four values"),
    ('input: "a" input: "b" input_shape { dim: 1 }', "2 'input' names but 1 'input_shape'"),
    ('input: "a"', "no shape"),
    ('input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1', "no 'input'"),
])
def test_bad_net_inputs(text, fragment):
    with pytest.raises(CaffeFormatError, match=fragment):
        upgrade_net(parse(text))


def test_old_batch_norm_params_are_frozen():
    net = upgrade_net(parse("""
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 1 } }
        layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "x" param { lr_mult: 1 } }"""))
    assert [(p.lr_mult, p.decay_mult) for p in net.layer[0].param] == [(0, 0)] * 3
    assert net.layer[1].param[0].lr_mult == 1  # only the three-param form is the old one


def test_solver_type_upgrade():
    solver = text_format.Parse('solver_type: ADAM base_lr: 0.1', pb.SolverParameter())
    upgraded = upgrade_solver(solver)
    assert upgraded.type == "Adam" and not upgraded.HasField("solver_type")
    both = text_format.Parse('solver_type: ADAM type: "SGD"', pb.SolverParameter())
    with pytest.raises(CaffeFormatError, match="solver_type"):
        upgrade_solver(both)


def test_solver_inline_net_upgraded():
    solver = io.parse_solver('net_param { layers { name: "r" type: RELU bottom: "x" '
                             'top: "x" } } test_net_param { input: "x" input_dim: 1 '
                             'input_dim: 1 input_dim: 1 input_dim: 1 }')
    assert solver.net_param.layer[0].type == "ReLU" and not len(solver.net_param.layers)
    assert solver.test_net_param[0].layer[0].type == "Input"
