"""Image sizes read from headers (caffelayers.data.headers) agree with what OpenCV decodes,
and a header cut short or of an unknown format gives None, never an exception."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from caffelayers.data.headers import declared_size

cv2 = pytest.importorskip("cv2", reason="the data extra (OpenCV) is missing")

# width 7, height 5: distinct, so that swapped axes show
IMAGE = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("extension", [".png", ".jpg", ".bmp", ".webp", ".ppm", ".pgm"])
def test_declared_size_is_what_opencv_decodes(tmp_path, extension):
    path = tmp_path / f"image{extension}"
    image = IMAGE[:, :, 0] if extension == ".pgm" else IMAGE
    if not cv2.imwrite(str(path), image):
        pytest.skip(f"this OpenCV writes no {extension}")
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert declared_size(path) == (decoded.shape[1], decoded.shape[0]) == (7, 5)
    assert declared_size(path.read_bytes()) == (7, 5)


def test_a_jpeg_frame_after_other_segments(tmp_path):
    """The size is in the first start-of-frame, after any number of other segments."""
    data = cv2.imencode(".jpg", IMAGE)[1].tobytes()
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 3000) + bytes(3000)
    assert declared_size(data[:2] + comment * 3 + data[2:]) == (7, 5)


def test_gif_and_os2_bitmap_headers():
    assert declared_size(b"GIF89a" + struct.pack("<HH", 30000, 20000) + bytes(22)) == \
        (30000, 20000)
    core = b"BM" + bytes(12) + struct.pack("<IHH", 12, 640, 480) + bytes(10)
    assert declared_size(core) == (640, 480)


@pytest.mark.parametrize("data", [
    b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00\x00",  # cut, or damaged
    b"\xff\xd8\xff\xe0\x00\x01", b"\xff\xd8\xff\xd9", b"BM" + bytes(10), b"P6\n# only a comment",
    b"RIFF\x00\x00\x00\x00WEBPVP8Z" + bytes(20), b"II*\x00" + bytes(40), b"not an image",
])
def test_unknown_or_cut_headers_give_none(data):
    assert declared_size(data) is None


def test_a_missing_file_is_left_to_the_decoder(tmp_path):
    assert declared_size(tmp_path / "absent.png") is None
