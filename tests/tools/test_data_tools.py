"""convert-imageset and compute-image-mean: the LMDB records are Caffe's Datums byte for byte
(checked against a hand-made protobuf encoding), our Data layer reads them, and the mean is
numpy's."""

from __future__ import annotations

import logging

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="the data extra (OpenCV) is missing")
lmdb = pytest.importorskip("lmdb", reason="the data extra (lmdb) is missing")

from caffelayers.errors import CaffeFormatError, CaffeLayersError
from caffelayers.proto import caffe_pb2, io
from caffelayers.tools.convert_imageset import convert_imageset
from caffelayers.tools.image_mean import compute_image_mean


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: a varint (wire type 0) or bytes (wire type 2)."""
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def hand_datum(channels=None, height=None, width=None, data=b"", label=0, encoded=False):
    """A Datum serialized as Caffe's C++ writes it: set fields in field-number order
    (channels 1, height 2, width 3, data 4, label 5, encoded 7)."""
    out = b""
    if channels is not None:
        out += _field(1, channels) + _field(2, height) + _field(3, width)
    return out + _field(4, data) + _field(5, label) + _field(7, int(encoded))


@pytest.fixture
def images(tmp_path):
    """Four 7 x 3 colour PNGs (distinct values per pixel and channel) and their list."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    arrays = {}
    lines = []
    for i in range(4):
        array = rng.integers(0, 256, size=(7, 3, 3), dtype=np.uint8)  # H x W x BGR
        name = f"img {i}.png"  # a space in the path: the label follows the last space
        cv2.imwrite(str(folder / name), array)
        arrays[name] = array
        lines.append(f"{name} {i + 1}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return folder, tmp_path / "list.txt", arrays


def _records(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        records = [(k, v) for k, v in txn.cursor()]
    env.close()
    return records


def test_raw_records_are_caffe_datums_byte_for_byte(images, tmp_path, caplog):
    folder, list_file, arrays = images
    with caplog.at_level(logging.INFO, logger="caffelayers"):
        count = convert_imageset(str(folder) + "/", list_file, tmp_path / "db")
    assert count == 4
    records = _records(tmp_path / "db")
    assert [k for k, _ in records] == [f"{i:08d}_img {i}.png".encode() for i in range(4)]
    for i, (_, value) in enumerate(records):
        array = arrays[f"img {i}.png"]
        chw = array.transpose(2, 0, 1).tobytes()  # data[(c * H + h) * W + w], BGR
        assert value == hand_datum(3, 7, 3, chw, label=i + 1, encoded=False)
    assert "A total of 4 images." in caplog.text and "Processed 4 files." in caplog.text


def test_data_layer_reads_the_database(images, tmp_path):
    from caffelayers.data.sources import open_source

    folder, list_file, arrays = images
    convert_imageset(str(folder) + "/", list_file, tmp_path / "db")
    param = caffe_pb2.LayerParameter(name="data", type="Data", top=["data", "label"])
    param.data_param.source = str(tmp_path / "db")
    param.data_param.batch_size = 4
    param.data_param.backend = caffe_pb2.DataParameter.LMDB
    batch = open_source(param, "TEST").batch(0)
    expected = np.stack([arrays[f"img {i}.png"].transpose(2, 0, 1) for i in range(4)])
    np.testing.assert_array_equal(batch["data"], expected.astype(np.float32))
    np.testing.assert_array_equal(batch["label"], [1, 2, 3, 4])


def test_gray_resize_and_shuffle(images, tmp_path):
    folder, list_file, _ = images
    convert_imageset(str(folder) + "/", list_file, tmp_path / "db", resize_height=5,
                     resize_width=2, gray=True, shuffle=True, seed=7)
    order = np.random.default_rng(7).permutation(4)
    records = _records(tmp_path / "db")
    keys = sorted(f"{slot:08d}_img {i}.png".encode() for slot, i in enumerate(order))
    assert [k for k, _ in records] == keys
    for key, value in records:
        name = key.decode()[9:]
        gray = cv2.resize(cv2.imread(str(folder / name), cv2.IMREAD_GRAYSCALE), (2, 5),
                          interpolation=cv2.INTER_LINEAR)
        assert value == hand_datum(1, 5, 2, gray.tobytes(), label=int(name[4]) + 1)


def test_encoded_keeps_the_file_or_reencodes(images, tmp_path):
    folder, list_file, arrays = images
    convert_imageset(str(folder) + "/", list_file, tmp_path / "png", encoded=True)
    for i, (_, value) in enumerate(_records(tmp_path / "png")):
        data = (folder / f"img {i}.png").read_bytes()
        assert value == hand_datum(data=data, label=i + 1, encoded=True)
    convert_imageset(str(folder) + "/", list_file, tmp_path / "bmp", encode_type="bmp")
    _, value = _records(tmp_path / "bmp")[0]
    datum = caffe_pb2.Datum.FromString(value)
    assert datum.encoded and datum.data[:2] == b"BM"
    decoded = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, arrays["img 0.png"])


def test_missing_image_is_skipped_and_check_size(images, tmp_path, caplog):
    folder, list_file, _ = images
    list_file.write_text(list_file.read_text() + "absent.png 9\n")
    with caplog.at_level(logging.INFO, logger="caffelayers"):
        assert convert_imageset(str(folder) + "/", list_file, tmp_path / "db") == 4
    assert "Could not open or find file" in caplog.text
    cv2.imwrite(str(folder / "big.png"), np.zeros((8, 3, 3), np.uint8))
    list_file.write_text(list_file.read_text() + "big.png 0\n")
    with pytest.raises(CaffeFormatError, match=r"list.txt:6: .*big.png.* is 3x8x3"):
        convert_imageset(str(folder) + "/", list_file, tmp_path / "db2", check_size=True)


def test_errors(images, tmp_path):
    folder, list_file, _ = images
    with pytest.raises(CaffeLayersError, match="unknown backend 'rocksdb'"):
        convert_imageset(str(folder) + "/", list_file, tmp_path / "db", backend="rocksdb")
    (tmp_path / "bad.txt").write_text("img 0.png 1\nnolabel\n")
    with pytest.raises(CaffeFormatError, match="bad.txt:2: expected 'PATH LABEL'"):
        convert_imageset(str(folder) + "/", tmp_path / "bad.txt", tmp_path / "db")
    convert_imageset(str(folder) + "/", list_file, tmp_path / "db")
    with pytest.raises(CaffeLayersError, match="already exists"):
        convert_imageset(str(folder) + "/", list_file, tmp_path / "db")


def test_mean_matches_numpy_and_logs(images, tmp_path, caplog):
    folder, list_file, arrays = images
    convert_imageset(str(folder) + "/", list_file, tmp_path / "db")
    with caplog.at_level(logging.INFO, logger="caffelayers"):
        mean = compute_image_mean(tmp_path / "db", tmp_path / "mean.binaryproto")
    expected = np.mean([a.transpose(2, 0, 1).astype(np.float64) for a in arrays.values()],
                       axis=0)[None]
    assert mean.shape == (1, 3, 7, 3) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, expected, rtol=1e-6)
    blob = caffe_pb2.BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 7, 3)
    np.testing.assert_array_equal(io.read_binaryproto(tmp_path / "mean.binaryproto"), mean)
    for line in ["Starting iteration", "Processed 4 files.", "Write to ",
                 "Number of channels: 3", "mean_value channel [2]: "]:
        assert line in caplog.text
    channel0 = float(caplog.text.split("mean_value channel [0]: ")[1].split()[0])
    assert channel0 == pytest.approx(expected[0, 0].mean(), rel=1e-5)


def test_mean_of_encoded_records_equals_raw(images, tmp_path):
    folder, list_file, _ = images
    convert_imageset(str(folder) + "/", list_file, tmp_path / "raw")
    convert_imageset(str(folder) + "/", list_file, tmp_path / "png", encoded=True)
    np.testing.assert_array_equal(compute_image_mean(tmp_path / "raw"),
                                  compute_image_mean(tmp_path / "png"))


def test_mean_of_float_datums(tmp_path):
    values = np.random.default_rng(8).normal(size=(3, 2, 5, 3)).astype(np.float32)
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            datum = caffe_pb2.Datum(channels=2, height=5, width=3, label=i)
            datum.float_data.extend(value.reshape(-1).tolist())
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    mean = compute_image_mean(tmp_path / "db")
    # Caffe sums in float32 in key order, then divides
    expected = ((values[0] + values[1]) + values[2]) / np.float32(3)
    np.testing.assert_array_equal(mean, expected[None])


def test_mean_errors(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"a", caffe_pb2.Datum(channels=1, height=2, width=2, data=b"\0" * 4)
                .SerializeToString())
        txn.put(b"b", caffe_pb2.Datum(channels=1, height=1, width=2, data=b"\0" * 2)
                .SerializeToString())
    env.close()
    with pytest.raises(CaffeFormatError, match="entry 'b': Incorrect data field size 2"):
        compute_image_mean(tmp_path / "db")
    lmdb.open(str(tmp_path / "empty"), map_size=1 << 20).close()
    with pytest.raises(CaffeFormatError, match="the database is empty"):
        compute_image_mean(tmp_path / "empty")


def test_commands(images, tmp_path, capsys):
    from caffelayers.cli import main

    folder, list_file, _ = images
    assert main(["convert-imageset", str(folder) + "/", str(list_file), str(tmp_path / "db"),
                 "--shuffle", "--seed", "2", "--resize_height", "4", "--resize_width", "3"]) == 0
    err = capsys.readouterr().err
    assert "] Shuffling data" in err and "] Processed 4 files." in err
    assert "\r" not in err  # no bar when stderr is not a terminal
    out = tmp_path / "mean.binaryproto"
    assert main(["compute-image-mean", str(tmp_path / "db"), str(out)]) == 0
    err = capsys.readouterr().err
    assert f"] Write to {out}" in err and "] Number of channels: 3" in err
    assert io.read_binaryproto(out).shape == (1, 3, 4, 3)
    assert main(["convert-imageset", str(folder) + "/", str(list_file), str(tmp_path / "db"),
                 "--backend", "lmdb"]) == 2
    assert "the database already exists" in capsys.readouterr().err


def test_progress_bars_on_a_terminal(images, tmp_path, monkeypatch):
    """On a terminal both tools draw a bar (count of total, elapsed<remaining) and their
    log lines are written whole above it; elsewhere (test_commands) the lines alone."""
    import io as text_io
    import re
    import sys

    from caffelayers.cli import main

    class Terminal(text_io.StringIO):
        def isatty(self):
            return True

    folder, list_file, _ = images
    for argv in (["convert-imageset", str(folder) + "/", str(list_file), str(tmp_path / "db")],
                 ["compute-image-mean", str(tmp_path / "db")]):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(argv) == 0
        text = terminal.getvalue()
        assert re.search(r"\b[0-4]/4 \[\d\d:\d\d<(\?|\d\d:\d\d)", text), text
        assert re.search(r"(^|[\r\n])I\d{4} [\d:.]+ +\d+ \w+\.py:\d+\] Processed 4 files\.\n",
                         text), text


def _have_plyvel() -> bool:
    try:
        import plyvel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_have_plyvel(), reason="plyvel is installed: LevelDB works")
def test_leveldb_without_plyvel_says_what_to_do(images, tmp_path):
    folder, list_file, _ = images
    with pytest.raises(CaffeLayersError, match=r"LevelDB needs the package 'plyvel' \(pip "
                                               r"install plyvel\); or convert"):
        convert_imageset(str(folder) + "/", list_file, tmp_path / "db", backend="leveldb")


needs_plyvel = pytest.mark.skipif(not _have_plyvel(), reason="plyvel (LevelDB) is not installed")


@needs_plyvel
def test_leveldb_holds_the_same_records_and_is_read(images, tmp_path):
    import plyvel

    from caffelayers.data.sources import open_source

    folder, list_file, arrays = images
    convert_imageset(str(folder) + "/", list_file, tmp_path / "lmdb")
    convert_imageset(str(folder) + "/", list_file, tmp_path / "leveldb", backend="leveldb")
    db = plyvel.DB(str(tmp_path / "leveldb"))
    assert list(db.iterator()) == _records(tmp_path / "lmdb")
    db.close()
    np.testing.assert_array_equal(compute_image_mean(tmp_path / "leveldb", backend="leveldb"),
                                  compute_image_mean(tmp_path / "lmdb"))
    param = caffe_pb2.LayerParameter(name="data", type="Data", top=["data", "label"])
    param.data_param.source = str(tmp_path / "leveldb")
    param.data_param.batch_size = 4  # backend: LEVELDB, Caffe's default
    batch = open_source(param, "TEST").batch(0)
    expected = np.stack([arrays[f"img {i}.png"].transpose(2, 0, 1) for i in range(4)])
    np.testing.assert_array_equal(batch["data"], expected.astype(np.float32))
    param.data_param.source = str(tmp_path / "lmdb")
    with pytest.raises(CaffeLayersError, match="not supported on an LMDB database .* set "
                                               "backend: LMDB"):
        open_source(param, "TEST")
    with pytest.raises(CaffeFormatError, match="it is an LMDB database: set 'backend: LMDB'"):
        compute_image_mean(tmp_path / "lmdb", backend="leveldb")


@needs_plyvel
def test_leveldb_reader_waits_for_the_lock(images, tmp_path):
    import threading

    import plyvel

    from caffelayers.data.databases import LevelDBReader

    folder, list_file, _ = images
    convert_imageset(str(folder) + "/", list_file, tmp_path / "db", backend="leveldb")
    holder = plyvel.DB(str(tmp_path / "db"))  # as a loader worker reading a batch
    threading.Timer(0.3, holder.close).start()
    assert len(LevelDBReader(tmp_path / "db", "test").keys()) == 4


@needs_plyvel
def test_leveldb_through_loader_workers(tmp_path):
    """Two loader workers take turns on the LevelDB lock; batches arrive in order."""
    from caffelayers.data.loader import BatchLoader
    from caffelayers.data.sources import open_source

    for i in range(12):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((5, 4, 3), i, np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(12)))
    convert_imageset(str(tmp_path) + "/", tmp_path / "list.txt", tmp_path / "db",
                     backend="leveldb")
    param = caffe_pb2.LayerParameter(name="data", type="Data", top=["data", "label"])
    param.data_param.source = str(tmp_path / "db")
    param.data_param.batch_size = 4
    loader = BatchLoader(open_source(param, "TEST"), workers=2)
    try:
        labels = [loader()["label"].tolist() for _ in range(6)]
    finally:
        loader.close()
    assert [label for batch in labels for label in batch] == [float(i % 12) for i in range(24)]
