"""Reading and writing Caffe's files: every fixture round-trips, blobs keep shape and values."""

from pathlib import Path

import numpy as np
import pytest
from google.protobuf.unknown_fields import UnknownFieldSet

from caffelayers.errors import CaffeFormatError
from caffelayers.proto import caffe_pb2 as pb
from caffelayers.proto import forks, io

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "net.prototxt").exists())


def test_fixtures_found():
    assert len(CASES) > 50


@pytest.mark.parametrize("case", CASES)
def test_fixture_caffemodel_fully_known(case):
    """Every field of every fixture model is in our schema (no fork field left unknown)."""
    model = io.read_caffemodel(FIXTURES / case / "weights.caffemodel")
    stack = [model]
    while stack:
        message = stack.pop()
        assert len(UnknownFieldSet(message)) == 0, (case, type(message).__name__)
        for field, value in message.ListFields():
            if field.message_type is not None:
                stack.extend(value if field.is_repeated else [value])


@pytest.mark.parametrize("case", CASES)
def test_fixture_round_trip(case, tmp_path):
    """parse, write, parse gives the same messages, text and binary."""
    net = io.read_prototxt(FIXTURES / case / "net.prototxt")
    io.write_prototxt(net, tmp_path / "net.prototxt")
    assert io.read_prototxt(tmp_path / "net.prototxt") == net

    model = io.read_caffemodel(FIXTURES / case / "weights.caffemodel")
    io.write_caffemodel(model, tmp_path / "weights.caffemodel")
    assert io.read_caffemodel(tmp_path / "weights.caffemodel") == model
    # Every layer with weights is a layer of the net definition.
    names = {layer.name for layer in net.layer}
    assert {layer.name for layer in model.layer if len(layer.blobs)} <= names


def test_margin_inner_product_fields():
    """SphereFace's field 147 and every one of its sub-fields parse from a real caffemodel."""
    model = io.read_caffemodel(FIXTURES / "mip_quadruple_m4k6n5" / "weights.caffemodel")
    layer = next(layer for layer in model.layer if layer.type == "MarginInnerProduct")
    p = layer.margin_inner_product_param
    assert p.num_output == 5
    assert p.type == pb.MarginInnerProductParameter.QUADRUPLE
    assert p.weight_filler.type == "xavier"
    assert (p.base, p.power, p.iteration, p.lambda_min) == (1000, 1, 0, 5)
    assert p.gamma == pytest.approx(0.12)
    assert p.axis == 1 and not p.HasField("axis")
    # 147 is contested between forks: our schema numbers the field privately, and reads and
    # writes it as SphereFace's 147 (tests/proto/test_forks.py).
    field = pb.LayerParameter.DESCRIPTOR.fields_by_name["margin_inner_product_param"]
    assert forks.canonical_number(field.number) == 147
    # Nothing landed in unknown fields: every number on the wire is in our schema.
    assert len(UnknownFieldSet(layer)) == 0 == len(UnknownFieldSet(p))
    assert io.blob_shape(layer.blobs[0]) == (5, 6)


def test_schema_numbers_spot_checks():
    """A few field numbers real files depend on (all others were taken from BVLC's file)."""
    layer_fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    assert layer_fields["input_param"].number == 143
    assert layer_fields["batch_norm_param"].number == 139
    assert pb.NetParameter.DESCRIPTOR.fields_by_name["layer"].number == 100
    assert pb.NetParameter.DESCRIPTOR.fields_by_name["layers"].number == 2
    pooling = pb.PoolingParameter.DESCRIPTOR.fields_by_name["round_mode"]
    assert pooling.number == 13 and pooling.default_value == pb.PoolingParameter.CEIL
    assert pb.PoolingParameter.FLOOR == 1
    assert pb.V1LayerParameter.DESCRIPTOR.fields_by_name["blobs_lr"].number == 7
    assert pb.V1LayerParameter.CONVOLUTION == 4 and pb.V1LayerParameter.DECONVOLUTION == 39
    assert pb.BlobProto.DESCRIPTOR.fields_by_name["double_data"].number == 8


def test_numeric_enum_values():
    """SphereFace writes ``operation: 1``; it is Caffe-valid text for SUM."""
    net = io.read_prototxt(FIXTURES / "sphereface20_mini_grad" / "net.prototxt")
    eltwise = [layer for layer in net.layer if layer.type == "Eltwise"]
    assert eltwise and all(layer.eltwise_param.operation == pb.EltwiseParameter.SUM
                           for layer in eltwise)


@pytest.mark.parametrize("spelling, expected", [
    ("ceil_mode: true", pb.PoolingParameter.CEIL),
    ("ceil_mode: false", pb.PoolingParameter.FLOOR),
    ("ceil_mode: False", pb.PoolingParameter.FLOOR),
    ("ceil_mode: 0", pb.PoolingParameter.FLOOR),
    ("ceil_mode : true", pb.PoolingParameter.CEIL),
    ("round_mode: FLOOR", pb.PoolingParameter.FLOOR),
    ("", pb.PoolingParameter.CEIL),
])
def test_pooling_ceil_mode_fork_spelling(spelling, expected):
    text = ('layer { name: "p" type: "Pooling"\n  pooling_param { pool: MAX kernel_size: 3 '
            f'{spelling} stride: 2 }}\n}}')
    layer = io.parse_prototxt(text).layer[0]
    assert layer.pooling_param.round_mode == expected
    assert layer.pooling_param.stride == 2


def test_ceil_mode_only_inside_pooling_param():
    """Elsewhere ``ceil_mode`` is still an unknown field, and keeps its line in the error."""
    text = 'layer {\n  name: "c"\n  convolution_param { ceil_mode: true }\n}'
    with pytest.raises(CaffeFormatError, match="ceil_mode") as info:
        io.parse_prototxt(text, "conv.prototxt")
    assert (info.value.line, info.value.path) == (3, "conv.prototxt")


def test_ceil_mode_in_comment_or_string_untouched():
    text = ('# ceil_mode: true\nlayer { name: "ceil_mode: false" type: "Pooling" '
            'pooling_param { kernel_size: 2 } }')
    layer = io.parse_prototxt(text).layer[0]
    assert layer.name == "ceil_mode: false"
    assert not layer.pooling_param.HasField("round_mode")


def test_allow_unknown_fields_warns_with_names():
    text = ('layer {\n  name: "a"\n  type: "ReLU"\n  fork_param { depth: 3 inner { x: 1 } }\n'
            '  extra_flag: true\n}')
    with pytest.raises(CaffeFormatError, match="fork_param"):
        io.parse_prototxt(text)
    with pytest.warns(UserWarning, match=r"'fork_param' in LayerParameter \(line 4\).*"
                                         r"'extra_flag' in LayerParameter \(line 5\)"):
        net = io.parse_prototxt(text, allow_unknown_fields=True)
    assert (net.layer[0].name, net.layer[0].type) == ("a", "ReLU")


def test_python_layer_is_read_as_is():
    text = ('layer { name: "py" type: "Python" top: "x" '
            'python_param { module: "m" layer: "L" param_str: "{}" } }')
    layer = io.parse_prototxt(text).layer[0]
    assert (layer.type, layer.python_param.module) == ("Python", "m")


@pytest.mark.parametrize("shape, dtype", [((5, 7, 3), np.float32), ((2, 3), np.float64),
                                          ((4,), np.int32), ((), np.float32),
                                          ((0, 3), np.float32)])
def test_array_blob_round_trip(shape, dtype, tmp_path):
    array = (np.arange(int(np.prod(shape))) * 0.37 - 1.1).astype(dtype).reshape(shape)
    blob = io.array_to_blob(array)
    assert tuple(blob.shape.dim) == shape
    assert (len(blob.double_data) > 0) == (dtype == np.float64)
    back = io.blob_to_array(blob)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array.astype(back.dtype))
    io.write_binaryproto(array, tmp_path / "a.binaryproto")
    np.testing.assert_array_equal(io.read_binaryproto(tmp_path / "a.binaryproto"), back)


def test_array_to_blob_matches_extend():
    """The packed-bytes shortcut builds the same message as protobuf's own extend()."""
    array = np.linspace(-2, 3, 31, dtype=np.float32).reshape(31, 1)
    slow = pb.BlobProto()
    slow.shape.dim.extend([31, 1])
    slow.data.extend(array.ravel().tolist())
    assert io.array_to_blob(array) == slow
    assert io.array_to_blob(array, double=True).double_data[3] == float(array[3, 0])


def test_legacy_blob_shapes():
    blob = pb.BlobProto(num=1, channels=1, height=3, width=2, data=[1, 2, 3, 4, 5, 6])
    assert io.blob_shape(blob) == (1, 1, 3, 2)
    assert io.blob_to_array(blob).shape == (1, 1, 3, 2)
    # Caffe's ShapeEquals: legacy 1 x 1 x N x K is an N x K weight, 1 x 1 x 1 x N a bias.
    assert io.blob_to_array(blob, expected_shape=(3, 2)).shape == (3, 2)
    with pytest.raises(CaffeFormatError, match="expected 2 x 3"):
        io.blob_to_array(blob, expected_shape=(2, 3))
    modern = io.array_to_blob(np.zeros((1, 6), np.float32))
    with pytest.raises(CaffeFormatError, match="expected 6"):
        io.blob_to_array(modern, expected_shape=(6,))


def test_double_data_is_read_as_float64(tmp_path):
    blob = pb.BlobProto(double_data=[0.1, 0.2, 0.3])
    blob.shape.dim.append(3)
    (tmp_path / "d.binaryproto").write_bytes(blob.SerializeToString())
    array = io.read_binaryproto(tmp_path / "d.binaryproto")
    assert array.dtype == np.float64 and array[0] == 0.1


def test_infogain_matrix_binaryproto():
    H = io.read_binaryproto(FIXTURES / "infogain_source_file" / "H.binaryproto")
    assert H.dtype == np.float32 and H.shape[-2:] == (H.shape[-1],) * 2


def test_v1_weights_match_reference():
    """A V1 caffemodel (4-D legacy blobs) loads by layer name with the values Caffe used."""
    model = io.read_caffemodel(FIXTURES / "v1_alexnet_mini" / "weights.caffemodel")
    reference = np.load(FIXTURES / "v1_alexnet_mini" / "reference.npz")
    layers = {layer.name: layer for layer in model.layer}
    for name in ("conv1", "conv2", "fc6", "fc7"):
        for k, blob in enumerate(layers[name].blobs):
            expected = reference[f"iter0/param/{name}/{k}"]
            np.testing.assert_array_equal(io.blob_to_array(blob, expected.shape), expected)


def test_read_solver():
    solver = io.read_solver(FIXTURES / "sphereface20_mini_train" / "solver.prototxt")
    assert (solver.lr_policy, list(solver.stepvalue), solver.type) == ("multistep", [2, 4], "SGD")
    assert solver.momentum == pytest.approx(0.9)


def test_solver_round_trip(tmp_path):
    solver = io.read_solver(FIXTURES / "sphereface20_mini_train" / "solver.prototxt")
    io.write_solver(solver, tmp_path / "s.prototxt")
    assert io.read_solver(tmp_path / "s.prototxt") == solver


def test_read_net_sniffs_the_source(tmp_path):
    text_path = FIXTURES / "sphereface4_deploy" / "net.prototxt"
    binary_path = FIXTURES / "sphereface4_deploy" / "weights.caffemodel"
    text_net = io.read_prototxt(text_path)
    assert io.read_net(text_path) == text_net
    assert io.read_net(str(text_path)) == text_net
    assert io.read_net(text_path.read_text()) == text_net
    assert io.read_net(binary_path) == io.read_caffemodel(binary_path)
    assert io.read_net(binary_path.read_bytes()) == io.read_caffemodel(binary_path)
    v1 = io.read_net(FIXTURES / "v1_alexnet_mini" / "net.prototxt")
    assert io.read_net(v1) is v1  # already up to date: no copy


def test_caffemodel_over_64_mb(tmp_path):
    """protobuf's C++ 64 MB default limit must not apply; ~70 MB of float32 weights."""
    net = pb.NetParameter(name="big")
    layer = net.layer.add(name="fc", type="InnerProduct")
    weight = np.arange(17_500_000, dtype=np.float32).reshape(3500, 5000)
    layer.blobs.append(io.array_to_blob(weight))
    path = tmp_path / "big.caffemodel"
    io.write_caffemodel(net, path)
    del net, layer
    assert path.stat().st_size > 70_000_000
    model = io.read_caffemodel(path)
    array = io.blob_to_array(model.layer[0].blobs[0])
    assert array.shape == (3500, 5000) and array[-1, -1] == 17_499_999
