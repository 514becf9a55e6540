"""Yahoo's open_nsfw as released (ResNet-50 at half width: BatchNorm + Scale pairs, residual
Eltwise sums, a 7x7 average pool, the 2-way ``fc_nsfw`` and its softmax) loads, inspects,
converts, and gives OpenCV 4.x's numbers through every path: ``Net``, onnxruntime, the
generated PyTorch source and TorchScript.

Its caffemodel was written by CaffeOnSpark, whose MemoryData layer stores a string in
LayerParameter field 10001; the reader must keep that field aside, not call the file
corrupt. The photos come from the MTCNN package (there are none in ``nsfw``); open_nsfw's
preprocessing: resized to 256 x 256, the central 224 x 224, BGR, mean 104/117/123.
"""

import numpy as np
import pytest
import torch

from caffelayers import Net
from caffelayers.cli import main
from caffelayers.converters.onnx import convert_to_onnx, fixed_size_reason, run_onnx
from caffelayers.converters.pytorch import ConvertedNet
from caffelayers.proto import io
from caffelayers.verify import compare

PROTOTXT, WEIGHTS = "deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel"
MEAN_BGR = np.array([104, 117, 123], np.float32)
PHOTOS = ("multiple-faces.jpg", "jeep.jpg")
RTOL = 1e-4  # logits and probabilities, against OpenCV's float32 forward
HEADS = ("fc_nsfw", "prob")


def preprocess(cv2, path) -> np.ndarray:
    """open_nsfw's input: 3 x 224 x 224, BGR, 0..255 less the channel means."""
    image = cv2.imread(str(path))
    image = cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    offset = (256 - 224) // 2
    crop = image[offset:offset + 224, offset:offset + 224] - MEAN_BGR
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


@pytest.fixture(scope="module")
def case(open_nsfw, mtcnn, cv2_caffe):
    """The net, a batch of the two shipped photos, and OpenCV's logits and probabilities."""
    cv2 = cv2_caffe
    images = np.stack([preprocess(cv2, mtcnn / photo) for photo in PHOTOS])
    oracle = cv2.dnn.readNetFromCaffe(str(open_nsfw / PROTOTXT), str(open_nsfw / WEIGHTS))
    oracle.setInput(images)
    expected = dict(zip(HEADS, oracle.forward(list(HEADS))))
    net = Net(open_nsfw / PROTOTXT, open_nsfw / WEIGHTS)
    return net, images, expected


def assert_matches(what, got, expected, blobs=HEADS):
    for blob in blobs:
        check = compare(f"{what} {blob}", got[blob], expected[blob], rtol=RTOL)
        assert check.passed, check.describe()


def test_inspect_reads_the_released_caffemodel(open_nsfw, capsys):
    status = main(["inspect", str(open_nsfw / PROTOTXT), str(open_nsfw / WEIGHTS)])
    out = capsys.readouterr().out
    assert status == 0
    assert "total parameters: 5,944,567" in out  # every blob of the caffemodel fits the net
    assert "inputs: data; outputs: prob" in out


def test_net_matches_opencv(case):
    net, images, expected = case
    with torch.no_grad():
        net(data=torch.from_numpy(images))
    assert_matches("Net", {blob: net.blobs[blob] for blob in HEADS}, expected)
    # Both photos are safe for work: the probabilities are not a tie that hides the logits.
    assert np.all(expected["prob"][:, 0] > 0.99)
    assert np.all(np.abs(expected["fc_nsfw"]).max(axis=1) > 1)


def test_onnxruntime_matches_opencv(case):
    net, images, expected = case
    model = convert_to_onnx(net, outputs=["fc_nsfw"])
    assert_matches("onnxruntime", run_onnx(model, {"data": images}, threads=2), expected)
    # The InnerProduct after the 7x7 pool fixes the size; the batch stays symbolic.
    assert "'fc_nsfw' (InnerProduct)" in fixed_size_reason(net)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 224, 224]


def with_logits_output(prototxt):
    """The released net with ``fc_nsfw`` also copied to an output blob ``logits`` (a Split
    before the softmax), since converted modules return only the net's outputs."""
    param = io.read_prototxt(prototxt)
    layers = list(param.layer)
    del param.layer[:]
    for layer in layers:
        if layer.name == "prob":
            split = param.layer.add(name="logits_split", type="Split", bottom=["fc_nsfw"])
            split.top.extend(["fc_nsfw_to_prob", "logits"])
            layer.bottom[:] = ["fc_nsfw_to_prob"]
        param.layer.add().CopyFrom(layer)
    return param


@pytest.mark.parametrize("runtime", ["pytorch-source", "torchscript"])
def test_generated_pytorch_matches_opencv(case, open_nsfw, runtime):
    _, images, expected = case
    net = Net(with_logits_output(open_nsfw / PROTOTXT), open_nsfw / WEIGHTS)
    converted = ConvertedNet(net, runtime)
    with torch.no_grad():
        got = converted(data=torch.from_numpy(images))
    assert sorted(got) == ["logits", "prob"]
    assert_matches(runtime, {"fc_nsfw": got["logits"], "prob": got["prob"]}, expected)
