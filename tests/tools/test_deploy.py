"""Deploy conversion of a training net: `convert --outputs/--stage` cuts the loss and accuracy
layers, and the data layer's transform_param travels with the model (ONNX metadata, a
preprocess() in model.py) and reproduces what the Data layer feeds the net."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="the data extra (OpenCV) is missing")
pytest.importorskip("lmdb", reason="the data extra (lmdb) is missing")

from caffelayers import convert
from caffelayers.cli import main
from caffelayers.data.sources import open_source
from caffelayers.errors import CaffeFormatError
from caffelayers.proto import io
from caffelayers.tools.convert_imageset import convert_imageset
from caffelayers.tools.image_mean import compute_image_mean

TRAIN_VAL = """
name: "small"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { mirror: true crop_size: 5 MEAN scale: 0.5 }
        data_param { source: "val_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { crop_size: 5 MEAN scale: 0.5 }
        data_param { source: "val_lmdb" batch_size: 3 backend: LMDB } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 2 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 6 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
        include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" include { stage: "deploy" } }
"""


@pytest.fixture
def case(tmp_path):
    """A train_val net over an LMDB of three 7 x 6 colour images, and their mean file."""
    rng = np.random.default_rng(11)
    images = []
    for i in range(3):
        image = rng.integers(0, 256, size=(7, 6, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"{i}.png"), image)
        images.append(image)
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(3)))
    convert_imageset(str(tmp_path) + "/", tmp_path / "list.txt", tmp_path / "val_lmdb")
    compute_image_mean(tmp_path / "val_lmdb", tmp_path / "mean.binaryproto")

    def net(mean='mean_file: "mean.binaryproto"'):
        path = tmp_path / "train_val.prototxt"
        path.write_text(TRAIN_VAL.replace("MEAN", mean))
        return path

    return tmp_path, net, images


def _data_layer_batch(prototxt):
    """What the TEST Data layer feeds the net: Caffe's transform of the LMDB records."""
    param = io.read_prototxt(prototxt)
    layer = next(p for p in param.layer if p.include and p.include[0].phase == 1)
    return open_source(layer, "TEST", prototxt.parent).batch(0)["data"]


def test_cut_at_blobs_drops_loss_and_accuracy(case):
    from caffelayers.graph import load_net_param

    _, net, _ = case
    param, _ = load_net_param(net(), "TEST")
    cut = convert.cut_at_blobs(param, ["ip"])
    assert [layer.name for layer in cut.layer] == ["data", "conv", "relu", "ip"]
    with pytest.raises(CaffeFormatError, match="'prob': the net has no such blob"):
        convert.cut_at_blobs(param, ["prob"])


def test_onnx_deploy_records_the_preprocessing(case, capsys):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    folder, net, images = case
    prototxt = net()
    out = folder / "model.onnx"
    assert main(["convert", str(prototxt), "--to", "onnx", "-o", str(out), "--stage", "deploy",
                 "--outputs", "prob"]) == 0
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "feed 'data'" in line]
    assert note == [("note: feed 'data' as Caffe's data layer 'data' made it: BGR images in "
                     "0-255, centre crop 5x5, minus the mean image of mean.binaryproto, times "
                     "0.5 (the model's metadata 'caffelayers.preprocess' records it)")]
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["data"]
    meta = {p.key: p.value for p in model.metadata_props}
    spec = json.loads(meta[convert.PREPROCESS_METADATA])
    mean = io.read_binaryproto(folder / "mean.binaryproto")[0]
    assert spec["crop_size"] == 5 and spec["scale"] == 0.5 and spec["mirror"] is False
    assert spec["mean_shape"] == [3, 7, 6] and spec["channels"] == "BGR"
    np.testing.assert_array_equal(np.asarray(spec["mean_image"], np.float32).reshape(3, 7, 6),
                                  mean)
    # the recorded preprocessing, applied by hand, is what the Data layer fed the net
    batch = np.stack([((image.transpose(2, 0, 1) - mean) * 0.5)[:, 1:6, 0:5]
                      for image in images]).astype(np.float32)
    np.testing.assert_allclose(batch, _data_layer_batch(prototxt), rtol=1e-6)
    session = ort.InferenceSession(str(out))
    (prob,) = session.run(None, {"data": batch})
    assert prob.shape == (3, 6)
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)


def test_onnx_outputs_are_the_blobs_asked_for(case, capsys):
    import onnx

    folder, net, _ = case
    out = folder / "model.onnx"
    assert main(["convert", str(net()), "--to", "onnx", "-o", str(out),
                 "--outputs", "ip,conv"]) == 0
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["ip", "conv"]
    assert not any(n.op_type == "Softmax" for n in model.graph.node)  # the loss is gone
    assert main(["convert", str(net()), "--to", "onnx", "-o", str(out),
                 "--outputs", "nope"]) == 2
    assert "'nope': the net has no such blob" in capsys.readouterr().err


def test_pytorch_deploy_has_preprocess(case, capsys):
    folder, net, images = case
    prototxt = net()
    out = folder / "torch"
    assert main(["convert", str(prototxt), "--to", "pytorch", "-o", str(out),
                 "--outputs", "ip"]) == 0
    assert "model.py's preprocess() does it" in capsys.readouterr().err
    spec = importlib.util.spec_from_file_location("deployed_model", out / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PREPROCESS["crop_size"] == 5
    got = np.concatenate([module.preprocess(image).numpy() for image in images])
    np.testing.assert_allclose(got, _data_layer_batch(prototxt), rtol=1e-6)
    with pytest.raises(ValueError, match="Caffe needs them equal"):
        module.preprocess(np.zeros((8, 6, 3), np.uint8))


def test_mean_value_and_missing_mean_file(case, capsys):
    folder, net, images = case
    prototxt = net("mean_value: 104 mean_value: 117 mean_value: 123")
    out = folder / "torch"
    assert main(["convert", str(prototxt), "--to", "pytorch", "-o", str(out),
                 "--outputs", "ip"]) == 0
    assert "minus the mean 104,117,123 per channel, times 0.5" in capsys.readouterr().err
    spec = importlib.util.spec_from_file_location("deployed_model_2", out / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    got = np.concatenate([module.preprocess(image).numpy() for image in images])
    np.testing.assert_allclose(got, _data_layer_batch(prototxt), rtol=1e-6)
    param = io.read_prototxt(net('mean_file: "absent.binaryproto"'))
    with pytest.warns(UserWarning, match="holds no mean values"):
        spec = convert.preprocess_spec(param, folder)
    assert spec["mean_file"] == "absent.binaryproto" and "mean_image" not in spec


def test_note_for_each_target():
    spec = {"input": "data", "layer": "data", "channels": "gray", "crop_size": 0,
            "mean_value": [128.0], "scale": 1.0}
    assert convert.preprocess_note(spec, "torchscript") == (
        "feed 'data' as Caffe's data layer 'data' made it: grayscale images in 0-255, minus "
        "the mean 128 per channel (TorchScript keeps no record of it)")
