"""WindowData on real files: PNG images written with OpenCV and an R-CNN window file.

The reference is Caffe's ``WindowDataLayer::load_batch`` written out again here: the
context-padded box in float32 arrays (both axes at once), ``cv2.resize`` of the clipped
region, and Caffe's per-element copy loop with its mean offset, its pad offsets and the
mirrored padding.
"""

import pickle

import numpy as np
import pytest

from caffelayers import CaffeFormatError, CaffeLayersError, LabelError
from caffelayers.data import LabelRule, open_source, probe_top_shapes
from caffelayers.errors import UnsupportedParameterError
from caffelayers.proto import io

cv2 = pytest.importorskip("cv2", reason="the data extra (opencv-python-headless) is missing")

#: rows x cols of the images: distinct, so a swapped axis shows.
SIZES = [(23, 31), (40, 17), (19, 26)]

#: per image: (class, overlap, x1, y1, x2, y2); fg_threshold 0.5, bg_threshold 0.3.
WINDOWS = [
    [(1, 0.8, 2, 3, 20, 15),    # inside, wide
     (2, 0.6, 0, 0, 30, 22),    # the whole image: the context lies outside on every side
     (0, 0.1, 5, 5, 12, 9),     # background
     (3, 0.45, 1, 1, 4, 4)],    # between the thresholds: dropped
    [(3, 0.9, 1, 20, 9, 39),    # tall, at the bottom edge
     (1, 0.2, 10, 0, 16, 6)],   # background despite its class: label 0
    [(2, 0.5, 24, 1, 25, 17),   # a thin strip at the right edge (overlap == fg_threshold)
     (0, 0.0, 0, 10, 3, 18),    # background at the left edge
     (1, 0.7, 0, 0, 2, 3),      # with context_pad 2 the rounding makes the warped region
     (3, 0.7, 0, 0, 0, 2)],     # one column (then one row) too wide: Caffe shortens it
]
FOREGROUND = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 2), (2, 3)]  # (image, window) in file order
BACKGROUND = [(0, 2), (1, 1), (2, 1)]


def window_file_text(windows=WINDOWS, names=None, sizes=SIZES):
    blocks = []
    for index, boxes in enumerate(windows):
        rows, cols = sizes[index]
        name = names[index] if names else f"img/{index}.png"
        lines = [f"# {index}", name, "3", str(rows), str(cols), str(len(boxes))]
        lines += [" ".join(map(str, box)) for box in boxes]
        blocks.append("\n".join(lines) + "\n")
    return "".join(blocks)


@pytest.fixture
def windows(tmp_path):
    """The images (H x W x 3 BGR, as written) and windows.txt next to their folder."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    images = []
    for index, shape in enumerate(SIZES):
        image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "img" / f"{index}.png"), image)
        images.append(image)
    (tmp_path / "windows.txt").write_text(window_file_text())
    return tmp_path, images


def window_layer(source, extra="", transform="crop_size: 9", batch=8):
    return io.parse_prototxt(f'''layer {{ name: "data" type: "WindowData" top: "data"
        top: "label" transform_param {{ {transform} }}
        window_data_param {{ source: "{source}" batch_size: {batch} bg_threshold: 0.3
                             {extra} }} }}''').layer[0]


def c_round(values):
    """C's round of float32 values: halves away from zero."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(values >= 0, np.floor(values + 0.5), np.ceil(values - 0.5)).astype(int)


def caffe_window(image, box, crop, context_pad=0, square=False, mirror=False, mean=None,
                 mean_values=None, scale=1.0):
    """Caffe's load_batch for one window, as ``3 x crop x crop`` float32."""
    f32 = np.float32
    x1, y1, x2, y2 = box
    rows, cols = image.shape[:2]
    size, pad_w, pad_h = (crop, crop), 0, 0  # (width, height) of the warped region
    if context_pad or square:
        half = np.array([x2 - x1 + 1, y2 - y1 + 1], f32) / f32(2)
        centre = np.array([x1, y1], f32) + half
        if square:
            half[:] = half.max()
        grow = f32(crop) / f32(crop - 2 * context_pad)
        low, high = c_round(centre - half * grow), c_round(centre + half * grow)
        unclipped = high - low + 1
        before = np.maximum(0, -low)
        after = np.maximum(0, high - np.array([cols, rows]) + 1)
        low, high = low + before, high - after
        factor = f32(crop) / unclipped.astype(f32)
        size = c_round((high - low + 1).astype(f32) * factor)
        before, after = c_round(before.astype(f32) * factor), c_round(after.astype(f32) * factor)
        pad_w, pad_h = (after[0] if mirror else before[0]), before[1]
        size = np.minimum(size, [crop - pad_w, crop - pad_h])
        (x1, y1), (x2, y2) = low, high
    warped = cv2.resize(image[y1:y2 + 1, x1:x2 + 1], (int(size[0]), int(size[1])),
                        interpolation=cv2.INTER_LINEAR)
    if mirror:
        warped = cv2.flip(warped, 1)
    out = np.zeros((3, crop, crop), f32)
    offset = 0 if mean is None else (mean.shape[2] - crop) // 2
    for h in range(warped.shape[0]):
        for w in range(warped.shape[1]):
            for c in range(3):
                pixel = f32(warped[h, w, c])
                if mean is not None:
                    value = (pixel - mean[c, h + offset + pad_h, w + offset + pad_w]) * f32(scale)
                elif mean_values is not None:
                    value = (pixel - f32(mean_values[c])) * f32(scale)
                else:
                    value = pixel * f32(scale)
                out[c, h + pad_h, w + pad_w] = value
    return out


def box(image_index, window_index):
    return WINDOWS[image_index][window_index][2:]


@pytest.mark.parametrize("extra", ["", "context_pad: 2", 'crop_mode: "square"',
                                   'context_pad: 3 crop_mode: "square"'])
def test_windows_are_warped_as_caffe(windows, extra):
    folder, images = windows
    source = open_source(window_layer(folder / "windows.txt", extra))
    context_pad = int(extra.split("context_pad: ")[1][0]) if "context_pad" in extra else 0
    square = "square" in extra
    for foreground, listed in ((True, FOREGROUND), (False, BACKGROUND)):
        for choice, (image, window) in enumerate(listed):
            for mirror in (False, True):
                got = source.window(foreground, choice, mirror)
                expected = caffe_window(images[image], box(image, window), 9, context_pad,
                                        square, mirror)
                np.testing.assert_array_equal(got, expected, err_msg=f"{image}, {window}")


def test_context_outside_the_image_stays_zero(windows):
    folder, _ = windows
    source = open_source(window_layer(folder / "windows.txt", "context_pad: 2"))
    whole = source.window(True, 1)  # the whole image grown by 9/5: a frame beyond it
    assert not whole[:, 0].any() and not whole[:, -1].any()
    assert whole[:, 4, 4].all()


def test_mean_values_and_scale(windows):
    folder, images = windows
    # Caffe scales by window_data_param.scale and ignores transform_param's
    with pytest.warns(UserWarning, match=r"ignores transform_param.scale"):
        source = open_source(window_layer(folder / "windows.txt", "context_pad: 2 scale: 0.25",
                                          "crop_size: 9 mean_value: 100 mean_value: 90 "
                                          "mean_value: 80 scale: 7"))
    got = source.window(True, 2)
    expected = caffe_window(images[1], box(1, 0), 9, 2, mean_values=[100, 90, 80], scale=0.25)
    np.testing.assert_array_equal(got, expected)


def test_mean_file_at_caffes_offset(windows):
    folder, images = windows
    # 13 rows x 12 columns: Caffe offsets both axes by (width - crop) / 2 = 1
    mean = np.random.default_rng(2).uniform(0, 255, (3, 13, 12)).astype(np.float32)
    io.write_binaryproto(io.array_to_blob(mean[None]), folder / "mean.binaryproto")
    param = window_layer(folder / "windows.txt", "context_pad: 2",
                         f'crop_size: 9 mean_file: "{folder / "mean.binaryproto"}"')
    source = open_source(param)
    for choice, (image, window) in enumerate(FOREGROUND):
        np.testing.assert_array_equal(
            source.window(True, choice, mirror=choice % 2 == 1),
            caffe_window(images[image], box(image, window), 9, 2, mirror=choice % 2 == 1,
                         mean=mean))
    small = np.zeros((3, 8, 8), np.float32)
    io.write_binaryproto(io.array_to_blob(small[None]), folder / "mean.binaryproto")
    with pytest.raises(CaffeLayersError, match="the mean file is 3x8x8"):
        open_source(param)


@pytest.mark.parametrize("batch, fraction, foreground", [(8, 0.25, 2), (7, 0.29, 2),
                                                          (10, 0.3, 3), (4, 1.0, 4)])
def test_batches_hold_background_then_foreground(windows, batch, fraction, foreground):
    folder, _ = windows
    source = open_source(window_layer(folder / "windows.txt", f"fg_fraction: {fraction}",
                                      batch=batch), seed=4)
    assert source.num_foreground == int(np.float32(batch) * np.float32(fraction))
    assert source.num_foreground == foreground
    assert source.top_shapes() == [(batch, 3, 9, 9), (batch,)]
    labels = np.stack([source.batch(i)["label"] for i in range(40)])
    background = batch - foreground
    assert not labels[:, :background].any()
    # every foreground window is drawn, with its class; dropped and background classes never
    assert set(labels[:, background:].ravel()) == {1.0, 2.0, 3.0}
    assert source.batch(5)["data"].shape == (batch, 3, 9, 9)


def test_sampling_is_uniform_and_a_function_of_seed_and_position(windows):
    folder, images = windows
    param = window_layer(folder / "windows.txt", "fg_fraction: 0.5", "crop_size: 9 mirror: true",
                         batch=4)
    source = open_source(param, seed=7)
    batches = [source.batch(i) for i in range(300)]
    foreground = np.concatenate([b["label"][2:] for b in batches])
    # six foreground windows drawn uniformly, two of each class
    counts = np.array([np.sum(foreground == k) for k in (1, 2, 3)]) / foreground.size
    np.testing.assert_allclose(counts, [1 / 3, 1 / 3, 1 / 3], atol=0.06)
    again = pickle.loads(pickle.dumps(open_source(param, seed=7)))
    np.testing.assert_array_equal(again.batch(17)["data"], batches[17]["data"])
    other = open_source(param, seed=8)
    assert not np.array_equal(other.batch(17)["data"], batches[17]["data"])
    # each item is one of its set's windows, mirrored or not
    item = batches[3]["data"][3]
    candidates = [caffe_window(images[i], box(i, w), 9, mirror=m)
                  for i, w in FOREGROUND for m in (False, True)]
    assert any(np.array_equal(item, c) for c in candidates)


def test_cache_images_reads_the_same(windows):
    folder, _ = windows
    plain = open_source(window_layer(folder / "windows.txt", "context_pad: 1"), seed=3)
    cached = open_source(window_layer(folder / "windows.txt", "context_pad: 1 "
                                      "cache_images: true"), seed=3)
    np.testing.assert_array_equal(cached.batch(2)["data"], plain.batch(2)["data"])
    assert cached._cache and pickle.loads(pickle.dumps(cached))._cache == {}


def test_root_folder_and_relative_names(windows, monkeypatch):
    folder, images = windows
    names = [f"{i}.png" for i in range(3)]
    (folder / "names.txt").write_text(window_file_text(names=names))
    monkeypatch.chdir(folder)
    source = open_source(window_layer("names.txt", 'root_folder: "img/" fg_fraction: 1'))
    np.testing.assert_array_equal(source.window(True, 0),
                                  caffe_window(images[0], box(0, 0), 9))
    assert probe_top_shapes(window_layer("names.txt")) == [(8, 3, 9, 9), (8,)]


NET = '''name: "windows"
layer { name: "data" type: "WindowData" top: "data" top: "label"
  transform_param { crop_size: 9 mean_value: 128 mirror: true }
  window_data_param { source: "windows.txt" batch_size: 6 fg_fraction: 0.5 context_pad: 2
    scale: 0.01 bg_threshold: 0.3 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: CLASSES weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
'''

SOLVER = '''net: "net.prototxt" base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" max_iter: 3
display: 1 random_seed: 5 snapshot_after_train: false
'''


def test_train_reads_window_data(windows, monkeypatch):
    from caffelayers.train import train

    folder, _ = windows
    monkeypatch.chdir(folder)
    (folder / "net.prototxt").write_text(NET.replace("CLASSES", "4"))
    (folder / "solver.prototxt").write_text(SOLVER)
    result = train("solver.prototxt", workers=0)
    solver = result.solver
    assert solver.iter == 3
    # 3 iterations and Caffe's final forward for the display: batches 0..3 of the stream
    assert solver.inputs.batches == 4
    expected = open_source(solver.net.graph.nodes[0].param, seed=5).batch(3)
    for top in ("data", "label"):
        np.testing.assert_array_equal(solver.inputs.last_batch[top].numpy(), expected[top])
    assert all(np.isfinite(p.detach().numpy()).all() for p in solver.net.parameters())
    # the same reader through net_inputs, with the net's label rules: class 3 of 3 classes
    (folder / "net.prototxt").write_text(NET.replace("CLASSES", "3"))
    with pytest.raises(LabelError, match=r"windows.txt:17: .*window of image 'img/1.png': "
                       r"label 3 is outside the classes"):
        train("solver.prototxt", workers=0)


# --- bad input ------------------------------------------------------------------------------

def replace_line(number, text):
    lines = window_file_text().splitlines()
    lines[number - 1] = text
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, line, message", [
    (replace_line(8, "2 0.6 0 zero 30 22"), 8, r"window 1: Y1 must be an integer, got 'zero'"),
    (replace_line(8, "2 nan 0 0 30 22"), 8, r"OVERLAP must be a finite number, got 'nan'"),
    (replace_line(7, "0 0.8 2 3 20 15"), 7, r"foreground window .* needs CLASS_INDEX > 0"),
    (replace_line(7, "1 0.8 20 3 2 15"), 7, r"X2 < X1"),
    (replace_line(1, "#0"), 1, r"expected '#' to start image 0, got '#0'"),
    (replace_line(11, "# 2"), 11, r"expected image index 1 .*got 2"),
    (window_file_text().rsplit("0 0.0", 1)[0], 25,
     r"image 2 \('img/2.png'\): the file ends after 1 of its 4 windows"),
    (replace_line(21, "1"), 20, r"the last image declares 1 channels"),
    ("\n\n", None, "the window file is empty"),
])
def test_bad_window_files_name_the_line(windows, text, line, message):
    folder, _ = windows
    (folder / "windows.txt").write_text(text)
    with pytest.raises(CaffeFormatError, match=message) as caught:
        open_source(window_layer(folder / "windows.txt"))
    assert caught.value.path == str(folder / "windows.txt") and caught.value.line == line


def test_missing_image_and_window_outside_name_the_line(windows):
    folder, _ = windows
    names = ["img/0.png", "img/9.png", "img/2.png"]
    (folder / "windows.txt").write_text(window_file_text(names=names))
    source = open_source(window_layer(folder / "windows.txt"))
    with pytest.raises(CaffeFormatError, match=r"windows.txt:12: .*image 'img/9.png' not found"):
        source.window(True, 2)
    outside = [[(1, 0.9, 2, 3, 31, 15), (0, 0.1, 0, 0, 3, 3)]]  # x2 = 31 in a 31-wide image
    (folder / "windows.txt").write_text(window_file_text(outside))
    source = open_source(window_layer(folder / "windows.txt"))
    with pytest.raises(CaffeFormatError, match=r"windows.txt:7: .*window 2 3 31 15 .*not inside "
                       r"the image \(31 x 23\)"):
        source.batch(0)
    # with context the region is clipped to the image instead
    clipped = open_source(window_layer(folder / "windows.txt", "context_pad: 1"))
    assert clipped.batch(0)["data"].shape == (8, 3, 9, 9)


def test_settings_checked(windows):
    folder, _ = windows
    path = folder / "windows.txt"
    for extra, transform, message in [
            ("", "", "needs transform_param { crop_size }"),
            ("context_pad: 5", "crop_size: 9", "context_pad 5 leaves no window"),
            ('crop_mode: "stretch"', "crop_size: 9", "crop_mode 'stretch'"),
            ("fg_fraction: 1.5", "crop_size: 9", "fg_fraction 1.5 is not between 0 and 1")]:
        with pytest.raises(UnsupportedParameterError, match=message):
            open_source(window_layer(path, extra, transform))
    (folder / "windows.txt").write_text(window_file_text([[(0, 0.1, 0, 0, 3, 3)]]))
    with pytest.raises(CaffeFormatError, match=r"no foreground windows \(overlap >= "
                       r"fg_threshold 0.5\), and each batch takes 2"):
        open_source(window_layer(path))
    assert len(open_source(window_layer(path, "fg_fraction: 0"))) == 1
    with pytest.warns(UserWarning, match=r"ignores window_data_param.mirror"):
        open_source(window_layer(path, "fg_fraction: 0 mirror: true"))


def test_label_rules_check_foreground_classes_once(windows):
    folder, _ = windows
    source = open_source(window_layer(folder / "windows.txt"))
    with pytest.raises(LabelError, match=r"windows.txt:7: .*label 1 is outside"):
        source.set_label_rules([LabelRule(1, None, "layer 'loss' (SoftmaxWithLoss)")])
    source.set_label_rules([LabelRule(4, None, "layer 'loss' (SoftmaxWithLoss)")])
