"""Issue 7 (speed and size): weights read straight from the caffemodel, ONNX written one
tensor at a time (and exported without a model in memory), PyTorch state without copies.
The numbers themselves are benchmarks/bench_convert.py's; these tests pin the behaviour."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from caffelayers import Net
from caffelayers.converters.onnx import convert_to_onnx, run_onnx, save_onnx
from caffelayers.converters.onnx import core as onnx_core
from caffelayers.converters.pytorch import codegen, generate_pytorch
from caffelayers.errors import CaffeFormatError
from caffelayers.net import read_weights
from caffelayers.proto import caffe_pb2 as pb
from caffelayers.proto import io

CASES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"


def whole_message_arrays(path):
    """The blobs as the whole-message reader gives them."""
    model = io.read_caffemodel(path)
    return {layer.name: [io.blob_to_array(blob) for blob in layer.blobs]
            for layer in model.layer if len(layer.blobs)}


def assert_same_arrays(ours, theirs):
    assert list(ours) == list(theirs)
    for name in ours:
        assert len(ours[name]) == len(theirs[name])
        for a, b in zip(ours[name], theirs[name]):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["v1_alexnet_mini", "sphereface4_deploy", "mip_double_m4k6n5"])
def test_stored_blobs_read_as_the_whole_message(case):
    path = CASES / case / "weights.caffemodel"
    if not path.is_file():
        pytest.skip(f"no {path}")
    assert_same_arrays(read_weights(path), whole_message_arrays(path))


def test_legacy_shapes_double_data_and_v0_blobs(tmp_path):
    v1 = pb.NetParameter(name="v1")
    layer = v1.layers.add(name="ip", type=pb.V1LayerParameter.INNER_PRODUCT, bottom=["data"],
                          top=["ip"])
    layer.blobs.add(num=1, channels=1, height=2, width=3).data.extend(range(6))
    layer.blobs.add(num=1, channels=1, height=1, width=2).double_data.extend([1.5, 2.5])
    v0 = pb.NetParameter(name="v0", input=["data"], input_dim=[1, 1, 1, 2])
    wrapper = v0.layers.add(bottom=["data"], top=["c"])
    wrapper.layer.name, wrapper.layer.type, wrapper.layer.num_output = "c", "conv", 2
    blob = wrapper.layer.blobs.add(num=2, channels=1, height=1, width=2)
    blob.data.extend([1, 2, 3, 4])
    blob.diff.extend([9, 9, 9, 9])  # diffs are not read
    for net in (v1, v0):
        path = tmp_path / f"{net.name}.caffemodel"
        path.write_bytes(net.SerializeToString())
        ours = read_weights(path)
        assert_same_arrays(ours, whole_message_arrays(path))
    assert ours["c"][0].shape == (2, 1, 1, 2)


def test_values_in_several_packed_runs(tmp_path):
    # Protobuf concatenates repeated occurrences of a packed field.
    blob = pb.BlobProto()
    blob.shape.dim.append(5)
    first, second = pb.BlobProto(), pb.BlobProto()
    first.data.extend([1, 2])
    second.data.extend([3, 4, 5])
    layer = pb.LayerParameter(name="p", type="Parameter")
    layer.blobs.add().MergeFromString(blob.SerializeToString() + first.SerializeToString()
                                      + second.SerializeToString())
    net = pb.NetParameter(name="runs")
    net.layer.append(layer)
    path = tmp_path / "runs.caffemodel"
    path.write_bytes(net.SerializeToString())
    np.testing.assert_array_equal(read_weights(path)["p"][0], [1, 2, 3, 4, 5])


def test_damaged_files_fail_as_the_whole_message_reader(tmp_path):
    data = (CASES / "sphereface4_deploy" / "weights.caffemodel").read_bytes()
    rng = np.random.default_rng(0)
    for trial in range(60):
        damaged = bytearray(data[:rng.integers(0, len(data))] if trial % 2 else data)
        for _ in range(3):
            if damaged:
                damaged[rng.integers(0, len(damaged))] = rng.integers(0, 256)
        path = tmp_path / "damaged.caffemodel"
        path.write_bytes(bytes(damaged))
        try:
            theirs = whole_message_arrays(path)
        except CaffeFormatError as error:
            with pytest.raises(CaffeFormatError) as ours:
                read_weights(path)
            assert str(ours.value) == str(error)
        else:
            assert_same_arrays(read_weights(path), theirs)


def test_stored_blob_reads_into_given_memory_only_when_it_fits():
    path = CASES / "sphereface4_deploy" / "weights.caffemodel"
    blob = read_weights(path, lazy=True)["conv1_1"][0]
    out = np.empty(blob.size, np.float32)
    assert blob.read(out=out) is out
    np.testing.assert_array_equal(out.reshape(blob.shape), blob.read())
    with pytest.raises(ValueError):
        blob.read(out=np.empty(blob.size, np.float64))
    with pytest.raises(ValueError):
        blob.read(out=np.empty(blob.size + 1, np.float32))


def test_net_loads_the_file_values():
    case = CASES / "sphereface4_deploy"
    net = Net(case / "net.prototxt", case / "weights.caffemodel")
    expected = whole_message_arrays(case / "weights.caffemodel")
    for name, blobs in net.caffe_params().items():
        for blob, array in zip(blobs, expected[name]):
            np.testing.assert_array_equal(blob.detach().numpy(), array.reshape(blob.shape))


@pytest.fixture
def small_net():
    case = CASES / "sphereface4_deploy"
    return Net(case / "net.prototxt", case / "weights.caffemodel")


def test_saved_file_reads_back_as_the_model(tmp_path, small_net):
    model = convert_to_onnx(small_net)
    save_onnx(model, tmp_path / "m.onnx")
    assert onnx.load(str(tmp_path / "m.onnx")) == model


@pytest.mark.parametrize("threshold", [onnx_core.EXTERNAL_DATA_THRESHOLD, 1024])
def test_export_writes_what_convert_and_save_write(tmp_path, small_net, monkeypatch, threshold):
    monkeypatch.setattr(onnx_core, "CHECK_INLINE_LIMIT", 1024)  # defer the small net's weights
    model = convert_to_onnx(small_net)
    files = onnx_core.export_onnx(small_net, tmp_path / "e.onnx",
                                  external_data_threshold=threshold)
    assert files[0] == tmp_path / "e.onnx"
    assert len(files) == (2 if threshold == 1024 else 1)
    exported = onnx.load(str(files[0]))
    for tensor in exported.graph.initializer:
        tensor.ClearField("data_location")  # set by onnx's loader of external data
    assert exported == model
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 96)).astype(np.float32)
    np.testing.assert_array_equal(run_onnx(files[0], {"data": x}, threads=1)["fc5"],
                                  run_onnx(model, {"data": x}, threads=1)["fc5"])


def test_checker_still_sees_a_wrong_initializer_shape(small_net):
    model = convert_to_onnx(small_net)
    weight = next(t for t in model.graph.initializer if t.name == "fc5/0")
    weight.dims[1] += 1  # values and shape no longer fit the MatMul/Gemm
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx_core.check_model(model)


def test_pytorch_state_shares_the_parameters(small_net, tmp_path):
    generated = generate_pytorch(small_net)
    pointers = {p.data_ptr() for p in small_net.parameters()}
    assert any(t.data_ptr() in pointers for t in generated.state.values())
    out = tmp_path / "pt"
    codegen.convert_to_pytorch(small_net, out)
    state = dict(generated.state)
    key = next(iter(state))
    state[key] = torch.zeros(3)
    with pytest.raises(RuntimeError):
        codegen.check_state(out / codegen.MODEL_FILE, state)
