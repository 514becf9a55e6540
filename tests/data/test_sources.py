"""The data layers' readers on real files: image lists, LMDB, HDF5 and arrays.

Every file is made here: tiny images written with OpenCV, an LMDB of Datums (raw, float and
encoded), HDF5 files with h5py.
"""

import numpy as np
import pytest

from caffelayers import CaffeFormatError, CaffeLayersError, LabelError, UnsupportedParameterError
from caffelayers.data import (ArraySource, LabelRule, MissingExtraError, open_source,
                              probe_top_shapes)
from caffelayers.proto import caffe_pb2, io

cv2 = pytest.importorskip("cv2", reason="the data extra (opencv-python-headless) is missing")


def layer(text):
    return io.parse_prototxt(f"layer {{ {text} }}").layer[0]


def write_images(folder, count, shape=(6, 5, 3), seed=0):
    """``count`` BGR PNG images; returns them as written (H x W x C)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    images = []
    for i in range(count):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        cv2.imwrite(str(folder / f"{i}.png"), image)
        images.append(image)
    return images


def image_layer(source, extra="", transform="", batch=2):
    return layer(f'''name: "data" type: "ImageData" top: "data" top: "label"
        transform_param {{ {transform} }}
        image_data_param {{ source: "{source}" batch_size: {batch} {extra} }}''')


@pytest.fixture
def listed(tmp_path):
    """Five colour images 6x5 and a list with labels 0..4 (paths relative to the list)."""
    images = write_images(tmp_path / "img", 5)
    (tmp_path / "list.txt").write_text("".join(f"img/{i}.png {i}\n" for i in range(5)))
    return tmp_path, images


# --- ImageData ------------------------------------------------------------------------------

def test_image_data_reads_bgr_in_list_order_and_wraps(listed):
    folder, images = listed
    source = open_source(image_layer(folder / "list.txt"), "TEST")
    assert source.top_shapes() == [(2, 3, 6, 5), (2,)]
    batches = [source.batch(i) for i in range(3)]
    order = [0, 1, 2, 3, 4, 0]
    data = np.concatenate([b["data"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, np.float32(order))
    expected = np.stack([images[i].transpose(2, 0, 1) for i in order]).astype(np.float32)
    np.testing.assert_array_equal(data, expected)  # OpenCV's channel order: B, G, R


def test_image_data_grayscale_and_resize_as_opencv(listed):
    folder, images = listed
    source = open_source(image_layer(folder / "list.txt",
                                     "is_color: false new_height: 4 new_width: 7"), "TEST")
    assert source.top_shapes()[0] == (2, 1, 4, 7)
    gray = cv2.imread(str(folder / "img" / "1.png"), cv2.IMREAD_GRAYSCALE)
    expected = cv2.resize(gray, (7, 4), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(source.batch(0)["data"][1, 0], expected)


def test_image_data_transform_param(listed):
    folder, images = listed
    source = open_source(image_layer(folder / "list.txt", transform="scale: 0.5 mean_value: 10 "
                                     "crop_size: 4"), "TEST")
    first = source.batch(0)["data"][0]
    expected = (images[0].transpose(2, 0, 1)[:, 1:5, 0:4].astype(np.float32) - 10) * 0.5
    np.testing.assert_array_equal(first, expected)


def test_image_data_shuffles_a_new_permutation_every_pass(listed):
    folder, _ = listed
    param = image_layer(folder / "list.txt", "shuffle: true", batch=5)
    source = open_source(param, "TRAIN", seed=3)
    passes = [source.batch(i)["label"] for i in range(4)]
    for labels in passes:
        assert sorted(labels) == [0, 1, 2, 3, 4]
    assert len({tuple(p) for p in passes}) > 1
    again = open_source(param, "TRAIN", seed=3)
    np.testing.assert_array_equal(again.batch(2)["label"], passes[2])


def test_image_data_root_folder_and_relative_names(listed, monkeypatch):
    folder, images = listed
    (folder / "names.txt").write_text("3.png 1\n\n2.png 0\n")  # a blank line is skipped
    monkeypatch.chdir(folder)
    # root_folder + name, joined as strings as Caffe joins them
    param = image_layer("names.txt", 'root_folder: "img/"')
    batch = open_source(param, "TEST").batch(0)
    np.testing.assert_array_equal(batch["label"], [1, 0])
    np.testing.assert_array_equal(batch["data"][0], images[3].transpose(2, 0, 1))
    # the source is also found next to the prototxt
    monkeypatch.chdir(folder / "img")
    assert len(open_source(param, "TEST", source_dir=folder)) == 2


def test_image_data_rand_skip_skips_the_start_of_the_first_pass(listed):
    folder, _ = listed
    source = open_source(image_layer(folder / "list.txt", "rand_skip: 4", batch=5), seed=5)
    labels = source.batch(0)["label"]
    assert source.skip in range(4)
    np.testing.assert_array_equal(labels, [(source.skip + i) % 5 for i in range(5)])


def test_positions_share_the_stream_between_processes(listed):
    folder, _ = listed
    param = image_layer(folder / "list.txt", "shuffle: true", batch=2)
    whole = open_source(param, "TRAIN", seed=9).batch(3)["label"]  # batch 2, one process
    param.image_data_param.batch_size = 1
    half = open_source(param, "TRAIN", seed=9)  # batch 1 on each of two processes
    shares = [half.batch(3, rank, 2)["label"] for rank in range(2)]
    np.testing.assert_array_equal(np.concatenate(shares), whole)


@pytest.mark.parametrize("list_text, line, message", [
    ("img/0.png 0\nimg/9.png 1\n", 2, "image 'img/9.png' not found"),
    ("img/0.png 0\nimg/bad.png 1\n", 2, "cannot be decoded as an image"),
    ("img/0.png 0\nimg/small.png 1\n", 2, "is 3x4x5 .* the layer's images are 3x6x5"),
])
def test_image_errors_name_the_list_line(listed, list_text, line, message):
    folder, _ = listed
    (folder / "img" / "bad.png").write_bytes(b"not a png")
    cv2.imwrite(str(folder / "img" / "small.png"), np.zeros((4, 5, 3), np.uint8))
    (folder / "list.txt").write_text(list_text)
    source = open_source(image_layer(folder / "list.txt"), "TEST")
    with pytest.raises(CaffeFormatError, match=message) as caught:
        source.batch(0)
    assert caught.value.path == str(folder / "list.txt") and caught.value.line == line
    assert f"list.txt:{line}:" in str(caught.value)


@pytest.mark.parametrize("list_text, line, message", [
    ("img/0.png 0\nimg/1.png\n", 2, "expected 'PATH LABEL'"),
    ("img/0.png 0\n\nimg/1.png one\n", 3, "label 'one' of 'img/1.png' is not an integer"),
    ("\n", None, "the image list is empty"),
])
def test_bad_image_lists(listed, list_text, line, message):
    folder, _ = listed
    (folder / "list.txt").write_text(list_text)
    with pytest.raises(CaffeFormatError, match=message) as caught:
        open_source(image_layer(folder / "list.txt"))
    assert caught.value.line == line


def test_labels_outside_the_classes_name_the_line(listed):
    folder, _ = listed
    source = open_source(image_layer(folder / "list.txt"))
    with pytest.raises(LabelError, match=r"list.txt:5: .*image 'img/4.png': label 4 is "
                       r"outside the classes: layer 'fc6' \(MarginInnerProduct\) accepts "
                       r"\[0, 4\)") as caught:
        source.set_label_rules([LabelRule(4, None, "layer 'fc6' (MarginInnerProduct)")])
    assert caught.value.line == 5
    source.set_label_rules([LabelRule(4, 4, "layer 'loss' (SoftmaxWithLoss)")])  # ignored


def test_image_data_settings_checked(listed):
    folder, _ = listed
    with pytest.raises(UnsupportedParameterError, match="set together"):
        open_source(image_layer(folder / "list.txt", "new_height: 4"))
    with pytest.raises(UnsupportedParameterError, match="batch_size must be positive"):
        open_source(image_layer(folder / "list.txt", batch=0))
    with pytest.raises(CaffeLayersError, match="source: file 'absent.txt' not found"):
        open_source(image_layer("absent.txt"))


def test_missing_extra_names_it(listed, monkeypatch):
    folder, _ = listed
    source = open_source(image_layer(folder / "list.txt"))
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)
    with pytest.raises(MissingExtraError, match=r"opencv-python-headless.*"
                       r"pip install 'caffelayers\[data\]'"):
        source.batch(0)


# --- Data (LMDB) ----------------------------------------------------------------------------

def write_lmdb(path, values):
    lmdb = pytest.importorskip("lmdb", reason="the data extra (lmdb) is missing")
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for key, value in values:
            txn.put(key, value)
    env.close()


def datum(array=None, label=0, floats=None, encoded=None):
    d = caffe_pb2.Datum(label=label)
    if encoded is not None:
        d.data, d.encoded = encoded, True
        return d.SerializeToString()
    source = array if array is not None else floats
    d.channels, d.height, d.width = source.shape
    if array is not None:
        d.data = array.tobytes()
    else:
        d.float_data.extend(floats.ravel().tolist())
    return d.SerializeToString()


def data_layer(path, extra="", transform="", batch=2):
    return layer(f'''name: "data" type: "Data" top: "data" top: "label"
        transform_param {{ {transform} }}
        data_param {{ source: "{path}" batch_size: {batch} backend: LMDB {extra} }}''')


def test_lmdb_raw_datums_in_key_order(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (2, 4, 3), dtype=np.uint8) for _ in range(3)]
    write_lmdb(tmp_path / "db", [(f"{i:08d}".encode(), datum(a, label=i))
                                 for i, a in reversed(list(enumerate(arrays)))])
    source = open_source(data_layer(tmp_path / "db", transform="scale: 2"), "TEST")
    assert source.top_shapes() == [(2, 2, 4, 3), (2,)]
    second = source.batch(1)  # items 2, 0: sorted keys, wrapping around
    np.testing.assert_array_equal(second["label"], [2, 0])
    np.testing.assert_array_equal(second["data"][0], arrays[2].astype(np.float32) * 2)


def test_lmdb_float_and_encoded_datums(tmp_path):
    floats = np.arange(12, dtype=np.float32).reshape(1, 3, 4) / 7
    image = np.random.default_rng(1).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    png = cv2.imencode(".png", image)[1].tobytes()
    write_lmdb(tmp_path / "floats", [(b"a", datum(floats=floats, label=1))])
    write_lmdb(tmp_path / "images", [(b"a", datum(encoded=png, label=3))])
    batch = open_source(data_layer(tmp_path / "floats", batch=1), "TEST").batch(0)
    np.testing.assert_array_equal(batch["data"][0], floats)
    decoded = open_source(data_layer(tmp_path / "images", batch=1), "TEST").batch(0)
    np.testing.assert_array_equal(decoded["data"][0], image.transpose(2, 0, 1))
    gray = open_source(data_layer(tmp_path / "images", batch=1, transform="force_gray: true"),
                       "TEST").batch(0)["data"][0, 0]
    np.testing.assert_array_equal(gray, cv2.imdecode(np.frombuffer(png, np.uint8),
                                                     cv2.IMREAD_GRAYSCALE))


def test_lmdb_errors(tmp_path):
    write_lmdb(tmp_path / "db", [(b"k1", datum(np.zeros((1, 2, 2), np.uint8), label=7)),
                                 (b"k2", b"\xff\xff not a datum")])
    with pytest.raises(UnsupportedParameterError, match="backend LEVELDB is not supported"):
        open_source(layer(f'name: "d" type: "Data" top: "data" data_param {{ source: '
                          f'"{tmp_path / "db"}" batch_size: 1 }}'))
    source = open_source(data_layer(tmp_path / "db", batch=1))
    with pytest.raises(CaffeFormatError, match="entry 'k2' is not a Caffe Datum"):
        source.batch(1)
    source.set_label_rules([LabelRule(5, None, "layer 'loss' (SoftmaxWithLoss)")])
    with pytest.raises(LabelError, match=r"db: .*entry 'k1': label 7 is outside"):
        source.batch(0)
    (tmp_path / "empty").mkdir()
    write_lmdb(tmp_path / "empty", [])
    with pytest.raises(CaffeFormatError, match="the database is empty"):
        open_source(data_layer(tmp_path / "empty"))


def test_probe_reads_the_first_item(tmp_path):
    write_lmdb(tmp_path / "db", [(b"a", datum(np.zeros((3, 9, 8), np.uint8)))])
    assert probe_top_shapes(data_layer(tmp_path / "db", transform="crop_size: 5", batch=4)) \
        == [(4, 3, 5, 5), (4,)]
    assert probe_top_shapes(data_layer(tmp_path / "absent")) is None
    assert probe_top_shapes(layer('name: "x" type: "Input" top: "x"')) is None


# --- HDF5Data -------------------------------------------------------------------------------

def write_hdf5(tmp_path, rows=(3, 2)):
    h5py = pytest.importorskip("h5py", reason="the data extra (h5py) is missing")
    names, start = [], 0
    for index, count in enumerate(rows):
        name = f"part{index}.h5"
        with h5py.File(tmp_path / name, "w") as handle:
            handle["data"] = np.arange(start, start + count, dtype=np.float64)[:, None] * \
                np.ones((1, 2))
            handle["label"] = np.arange(start, start + count) % 4
        names.append(name)
        start += count
    (tmp_path / "files.txt").write_text("\n".join(names) + "\n")
    return tmp_path / "files.txt"


def hdf5_layer(source, extra="", batch=2):
    return layer(f'''name: "h5" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param {{ source: "{source}" batch_size: {batch} {extra} }}''')


def test_hdf5_reads_the_files_in_order_and_wraps(tmp_path):
    source = open_source(hdf5_layer(write_hdf5(tmp_path)))
    assert source.top_shapes() == [(2, 2), (2,)]
    rows = np.concatenate([source.batch(i)["data"][:, 0] for i in range(4)])
    np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(source.batch(2)["label"], [4 % 4, 0])


def test_hdf5_shuffle_visits_every_row_once_per_pass(tmp_path):
    source = open_source(hdf5_layer(write_hdf5(tmp_path), "shuffle: true", batch=5), seed=4)
    passes = [source.batch(i)["data"][:, 0] for i in range(3)]
    for rows in passes:
        assert sorted(rows) == [0, 1, 2, 3, 4]
    assert len({tuple(p) for p in passes}) > 1


def test_hdf5_errors(tmp_path):
    files = write_hdf5(tmp_path)
    source = open_source(hdf5_layer(files, batch=5))
    source.set_label_rules([LabelRule(3, None, "layer 'loss' (SoftmaxWithLoss)")], "label")
    with pytest.raises(LabelError, match=r"part1.h5: .*dataset 'label' row 0: label 3"):
        source.batch(0)
    with pytest.raises(UnsupportedParameterError, match="does not transform data"):
        open_source(layer(f'name: "h5" type: "HDF5Data" top: "data" transform_param {{ '
                          f'scale: 2 }} hdf5_data_param {{ source: "{files}" batch_size: 1 }}'))
    with pytest.raises(CaffeFormatError, match=r"no dataset 'labels'"):
        open_source(layer(f'name: "h5" type: "HDF5Data" top: "data" top: "labels" '
                          f'hdf5_data_param {{ source: "{files}" batch_size: 1 }}'))
    files.write_text("part0.h5\nmissing.h5\n")
    with pytest.raises(CaffeFormatError, match=r"files.txt:2: .*'missing.h5' not found"):
        open_source(hdf5_layer(files))


# --- MemoryData and Input -------------------------------------------------------------------

def test_memory_data_cuts_batches_in_order_and_checks_shapes():
    data = np.arange(4 * 1 * 2 * 3, dtype=np.float32).reshape(4, 1, 2, 3)
    labels = np.array([0, 1, 2, 1])
    param = layer('name: "m" type: "MemoryData" top: "data" top: "label" memory_data_param '
                  '{ batch_size: 2 channels: 1 height: 2 width: 3 }')
    source = open_source(param, arrays={"data": data, "label": labels})
    np.testing.assert_array_equal(source.batch(3)["data"], data[2:4])
    np.testing.assert_array_equal(source.batch(0, 1, 2)["label"], [1, 1])  # rows 1, 3
    with pytest.raises(CaffeLayersError, match="3 items is not a multiple of batch_size 2"):
        open_source(param, arrays={"data": data[:3], "label": labels[:3]})
    with pytest.raises(CaffeLayersError, match=r"have shape \(2, 2, 3\), the net expects "
                       r"\(1, 2, 3\)"):
        open_source(param, arrays={"data": np.zeros((4, 2, 2, 3)), "label": labels})
    with pytest.raises(CaffeLayersError, match=r"fed from arrays: give arrays for 'label'"):
        open_source(param, arrays={"data": data})


def test_array_labels_are_checked_at_once():
    source = ArraySource("layer 'x' (Input)", {"x": np.zeros((3, 2)), "y": [0, 5, 1]}, 1)
    with pytest.raises(LabelError, match="array 'y' item 1: label 5"):
        source.set_label_rules([LabelRule(5, None, "layer 'loss' (SoftmaxWithLoss)")], "y")


def test_unsupported_type_says_so():
    with pytest.raises(UnsupportedParameterError, match="'w' \\(DummyData\\).*reads ImageData"):
        open_source(layer('name: "w" type: "DummyData" top: "data"'))


def test_sources_pickle_for_the_workers(tmp_path):
    import pickle

    write_lmdb(tmp_path / "db", [(b"a", datum(np.ones((1, 2, 2), np.uint8)))])
    source = open_source(data_layer(tmp_path / "db", batch=1))
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy.batch(0)["data"], np.ones((1, 1, 2, 2)))
