"""classify: caffe.io's resize_image, oversample and Transformer semantics, checked against
pixel-by-pixel references written here, and the command end to end on a small net."""

from __future__ import annotations

import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="the data extra (OpenCV) is missing")

from caffelayers import Net
from caffelayers.errors import CaffeLayersError
from caffelayers.tools.classify import (
    Classifier,
    Preprocessor,
    load_image,
    oversample,
    resize_image,
    top_classes,
)

NET = """
name: "tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: 5 dim: 4 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.1 }
                              bias_filler { type: "gaussian" std: 0.1 } } }
"""


def reference_resize(image, height, width):
    """scikit-image's order-1 warp of Caffe's time, one pixel at a time: source coordinate
    ``(i + 0.5) * in / out - 0.5``, bilinear between the four neighbours, 0 outside; on the
    image scaled to [0, 1] by its range, then scaled back."""
    low, high = image.min(), image.max()
    unit = (image.astype(np.float64) - low) / (high - low)
    rows, cols = unit.shape[:2]
    out = np.zeros((height, width, unit.shape[2]))

    def pixel(r, c):
        inside = 0 <= r < rows and 0 <= c < cols
        return unit[r, c] if inside else np.zeros(unit.shape[2])

    for i in range(height):
        for j in range(width):
            r = (i + 0.5) * rows / height - 0.5
            c = (j + 0.5) * cols / width - 0.5
            r0, c0 = int(np.floor(r)), int(np.floor(c))
            fr, fc = r - r0, c - c0
            out[i, j] = ((1 - fr) * (1 - fc) * pixel(r0, c0) + (1 - fr) * fc * pixel(r0, c0 + 1)
                         + fr * (1 - fc) * pixel(r0 + 1, c0) + fr * fc * pixel(r0 + 1, c0 + 1))
    return out * (high - low) + low


@pytest.mark.parametrize("size", [(11, 5), (3, 2), (7, 3), (4, 9)])
def test_resize_image_matches_the_pixel_reference(size):
    image = np.random.default_rng(0).random((7, 3, 2)).astype(np.float32) * 3 - 1
    got = resize_image(image, size)
    assert got.dtype == np.float32 and got.shape == size + (2,)
    np.testing.assert_allclose(got, reference_resize(image, *size), rtol=1e-6, atol=1e-6)


def test_resize_image_identity_and_constant():
    image = np.random.default_rng(1).random((7, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(resize_image(image, (7, 3)), image, atol=1e-6)
    flat = np.full((7, 3, 1), 0.25, np.float32)
    np.testing.assert_array_equal(resize_image(flat, (2, 5)), np.full((2, 5, 1), 0.25))


def test_oversample_order_and_mirrors():
    images = np.random.default_rng(2).random((2, 7, 6, 3)).astype(np.float32)
    crops = oversample(images, (4, 3))
    assert crops.shape == (20, 4, 3, 3)
    image = images[1]
    # centre: 7/2 - 2 = 1.5 -> 1 (truncated), 6/2 - 1.5 = 1.5 -> 1
    expected = [image[0:4, 0:3], image[0:4, 3:6], image[3:7, 0:3], image[3:7, 3:6],
                image[1:5, 1:4]]
    expected += [e[:, ::-1] for e in expected]
    np.testing.assert_array_equal(crops[10:], np.stack(expected))


def test_preprocessor_is_caffes_transformer():
    crop = np.random.default_rng(3).random((5, 4, 3)).astype(np.float32)
    mean = np.asarray([10.0, 20.0, 30.0], np.float32)
    pre = Preprocessor((1, 3, 5, 4), mean, raw_scale=255, input_scale=0.5,
                       channel_swap=[2, 1, 0])
    expected = (crop.transpose(2, 0, 1)[::-1] * 255 - mean[:, None, None]) * 0.5
    np.testing.assert_allclose(pre(crop), expected, rtol=1e-6)
    # a 1 x C x H x W mean of another size is resized to the input, not cropped
    big = np.random.default_rng(4).random((1, 3, 9, 8)).astype(np.float32) * 100
    fitted = Preprocessor((1, 3, 5, 4), big).mean
    np.testing.assert_allclose(fitted, reference_resize(big[0].transpose(1, 2, 0), 5, 4)
                               .transpose(2, 0, 1), rtol=1e-5)
    with pytest.raises(CaffeLayersError, match="2 mean values for an input of 3 channels"):
        Preprocessor((1, 3, 5, 4), np.zeros(2))
    with pytest.raises(CaffeLayersError, match="channel_swap"):
        Preprocessor((1, 3, 5, 4), channel_swap=[0, 0, 1])


@pytest.fixture
def model(tmp_path):
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(NET)
    weights = tmp_path / "w.caffemodel"
    Net(str(prototxt), seed=5).save_caffemodel(str(weights))
    rng = np.random.default_rng(6)
    images = []
    for i, shape in enumerate([(9, 7, 3), (6, 8, 3)]):
        path = tmp_path / f"im{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, size=shape, dtype=np.uint8))
        images.append(path)
    return prototxt, weights, images


def _by_hand(prototxt, weights, path, mean, center_only):
    """What Caffe's Classifier computes, spelled out: RGB [0, 1] image, resize to 8 x 6,
    crops of 5 x 4, BGR, x 255, minus the mean; the net averaged over the crops."""
    bgr = cv2.imread(str(path)).astype(np.float32) / 255
    image = reference_resize(bgr[:, :, ::-1], 8, 6)
    boxes = [(1, 1)] if center_only else [(0, 0), (0, 2), (3, 0), (3, 2), (1, 1)]
    crops = [image[top:top + 5, left:left + 4] for top, left in boxes]
    if not center_only:
        crops += [c[:, ::-1] for c in crops]
    batch = np.stack([c.transpose(2, 0, 1)[::-1] * 255 - mean[:, None, None] for c in crops])
    net = Net(str(prototxt), str(weights))
    return net(data=batch.astype(np.float32))["fc"].detach().numpy().mean(axis=0)


@pytest.mark.parametrize("center_only", [False, True])
def test_classifier_matches_the_computation_by_hand(model, center_only):
    prototxt, weights, images = model
    mean = np.asarray([100.0, 110.0, 120.0], np.float32)
    classifier = Classifier(Net(str(prototxt), str(weights)), (8, 6), mean, raw_scale=255,
                            channel_swap=[2, 1, 0])
    got = classifier.predict([load_image(p) for p in images], not center_only)
    assert got.shape == (2, 6)
    for row, path in zip(got, images):
        np.testing.assert_allclose(row, _by_hand(prototxt, weights, path, mean, center_only),
                                   rtol=1e-4, atol=1e-5)


def test_top_classes():
    scores = np.asarray([0.1, 0.5, 0.2, 0.5, 0.0, 0.3, 0.05])
    top = top_classes(scores, ["a", "b", "c"])
    assert [t["index"] for t in top] == [1, 3, 5, 2, 0]
    assert [t["label"] for t in top] == ["b", "3", "5", "c", "a"]


def test_command_prints_top5(model, tmp_path, capsys):
    from caffelayers.cli import main

    prototxt, weights, images = model
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(6)) + "\n")
    args = [str(prototxt), str(weights)] + [str(p) for p in images] + [
        "--images_dim", "8,6", "--mean_value", "100,110,120", "--labels", str(labels)]
    assert main(["classify"] + args + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [str(p) for p in images]
    expected = _by_hand(prototxt, weights, images[0], np.asarray([100.0, 110.0, 120.0]),
                        False)
    first = results[0]["top"]
    assert [t["index"] for t in first] == list(np.argsort(-expected, kind="stable")[:5])
    assert first[0]["label"] == f"class {first[0]['index']}"
    np.testing.assert_allclose([t["score"] for t in first], np.sort(expected)[::-1][:5],
                               rtol=1e-4, atol=1e-5)
    assert main(["classify"] + args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images[0]) and len(lines) == 12
    assert lines[1].split()[1:] == ["class", str(first[0]["index"])]


def test_command_errors(model, capsys):
    from caffelayers.cli import main

    prototxt, weights, images = model
    base = ["classify", str(prototxt), str(weights), str(images[0])]
    assert main(base + ["--images_dim", "4,4"]) == 2
    assert "smaller than the net's input" in capsys.readouterr().err
    assert main(base + ["--mean_value", "1,2"]) == 2
    assert "2 mean values" in capsys.readouterr().err
    assert main(["classify", str(prototxt), str(weights), "missing.png",
                 "--images_dim", "8,6"]) == 2
    assert "missing.png: image not found" in capsys.readouterr().err
