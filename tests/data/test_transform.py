"""DataTransformer: Caffe's mean / crop / mirror / scale, value for value.

The reference is Caffe's loop written out per element in float32:
``top[c, h, w'] = (pixel[c, h_off + h, w_off + w] - mean[c, h_off + h, w_off + w]) * scale``
with ``w' = W - 1 - w`` when mirrored.
"""

import numpy as np
import pytest

from caffelayers import CaffeLayersError
from caffelayers.data import DataTransformer
from caffelayers.proto import caffe_pb2, io

C, H, W = 3, 7, 5


class Draws:
    """A generator stand-in returning preset values (Caffe's Rand calls, in our order)."""

    def __init__(self, *values):
        self.values = list(values)

    def integers(self, high):
        value = self.values.pop(0)
        assert 0 <= value < high
        return value


def caffe_reference(image, mean, scale, crop, h_off, w_off, mirror):
    out = np.empty((image.shape[0], crop, crop), np.float32)
    for c in range(image.shape[0]):
        for h in range(crop):
            for w in range(crop):
                pixel = np.float32(image[c, h_off + h, w_off + w])
                m = np.float32(0 if mean is None else mean[c, h_off + h, w_off + w])
                target = crop - 1 - w if mirror else w
                out[c, h, target] = (pixel - m) * np.float32(scale)
    return out


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (C, H, W), dtype=np.uint8)


@pytest.fixture
def mean():
    return np.random.default_rng(1).uniform(0, 255, (C, H, W)).astype(np.float32)


def test_mean_file_is_subtracted_at_the_crop_offset_before_mirror(image, mean):
    t = DataTransformer(scale=0.0078125, mirror=True, crop_size=4, mean=mean, phase="TRAIN")
    out = t(image, Draws(2, 1, 1))  # h_off 2, w_off 1, then mirror
    np.testing.assert_array_equal(out, caffe_reference(image, mean, 0.0078125, 4, 2, 1, True))
    assert out.dtype == np.float32 and out.shape == (C, 4, 4)


def test_test_phase_crops_at_the_centre(image, mean):
    t = DataTransformer(scale=0.5, crop_size=4, mean=mean, phase="TEST")
    out = t(image, None)
    # (7 - 4) // 2 = 1 rows, (5 - 4) // 2 = 0 columns
    np.testing.assert_array_equal(out, caffe_reference(image, mean, 0.5, 4, 1, 0, False))


def test_mirror_applies_in_the_test_phase_too(image):
    # Caffe's do_mirror = mirror() && Rand(2) does not look at the phase.
    t = DataTransformer(mirror=True, phase="TEST")
    np.testing.assert_array_equal(t(image, Draws(1)), image[:, :, ::-1].astype(np.float32))
    np.testing.assert_array_equal(t(image, Draws(0)), image.astype(np.float32))


def test_mean_values_one_per_channel_or_one_for_all(image):
    three = DataTransformer(mean_values=[10, 20, 30.5], scale=2)
    expected = (image.astype(np.float32) - np.float32([10, 20, 30.5])[:, None, None]) * 2
    np.testing.assert_array_equal(three(image), expected)
    one = DataTransformer(mean_values=[127.5])
    np.testing.assert_array_equal(one(image), image.astype(np.float32) - np.float32(127.5))


def test_float_data_is_transformed_like_pixels():
    values = np.linspace(-1, 1, C * H * W, dtype=np.float32).reshape(C, H, W)
    t = DataTransformer(scale=3, mean_values=[0.25])
    np.testing.assert_array_equal(t(values), (values - np.float32(0.25)) * np.float32(3))


def test_output_shape_and_randomness():
    assert DataTransformer(crop_size=4).output_shape(3, 9, 8) == (3, 4, 4)
    assert DataTransformer().output_shape(1, 9, 8) == (1, 9, 8)
    assert DataTransformer(crop_size=4, phase="TRAIN").random
    assert not DataTransformer(crop_size=4, phase="TEST").random
    assert DataTransformer(mirror=True, phase="TEST").random


def test_from_caffe_reads_the_mean_file(tmp_path, image, mean):
    io.write_binaryproto(io.array_to_blob(mean[None]), tmp_path / "mean.binaryproto")
    param = caffe_pb2.LayerParameter(name="data", type="ImageData")
    param.transform_param.mean_file = "mean.binaryproto"
    param.transform_param.crop_size = 3
    t = DataTransformer.from_caffe(param, "TEST", tmp_path)  # found next to the prototxt
    np.testing.assert_array_equal(t(image), caffe_reference(image, mean, 1, 3, 2, 1, False))


@pytest.mark.parametrize("settings, image_shape, message", [
    (dict(mean=np.zeros((3, 6, 5), np.float32)), (3, 7, 5), "mean file is 3x6x5"),
    (dict(mean_values=[1, 2]), (3, 7, 5), "2 mean_value entries for a 3-channel image"),
    (dict(crop_size=8, phase="TEST"), (3, 7, 5), "smaller than crop_size 8"),
])
def test_bad_settings_for_the_image(settings, image_shape, message):
    t = DataTransformer(layer="layer 'data' (ImageData)", **settings)
    with pytest.raises(CaffeLayersError, match=message):
        t(np.zeros(image_shape, np.uint8), where="image 'a.png'")


def test_mean_file_and_mean_value_exclude_each_other():
    with pytest.raises(CaffeLayersError, match="both mean_file and mean_value"):
        DataTransformer(mean=np.zeros((1, 2, 2)), mean_values=[1])
