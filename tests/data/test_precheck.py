"""The data check before the first iteration, on real files: missing images, labels
outside the classes and images of another size in an ImageData list, all reported at once
with their list lines; a 100,000-line list in seconds; LMDB entries; HDF5 files whose
shapes disagree or whose labels are out of range; the trainer stops before iteration 0,
``--skip-data-check`` leaves the reader to find the problem, and OpenCV's own warning
lines stay off stderr."""

import subprocess
import sys
import time

import numpy as np
import pytest

from caffelayers import CaffeFormatError, Net
from caffelayers.data.precheck import DataCheckError, check_net_data
from caffelayers.proto import caffe_pb2

cv2 = pytest.importorskip("cv2", reason="the data extra (opencv-python-headless) is missing")

CLASSES = 3

NET = '''name: "check"
layer {{ name: "data" type: "{kind}" top: "data" top: "label" {param} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: {classes} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
'''

SOLVER = '''net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 3
snapshot_prefix: "snap" random_seed: 0
'''


def image_net(folder, resize=True, classes=CLASSES, batch=2):
    size = "new_height: 4 new_width: 5" if resize else ""
    param = (f'image_data_param {{ source: "list.txt" batch_size: {batch} is_color: false '
             f'{size} }}')
    (folder / "net.prototxt").write_text(NET.format(kind="ImageData", param=param,
                                                    classes=classes))
    return folder / "net.prototxt"


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """Six 6 x 7 grayscale PNGs in img/ and list.txt with labels 0, 1, 2, 0, 1, 2; the
    working directory."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"),
                    rng.integers(0, 256, (6, 7), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"img/{i}.png {i % 3}\n" for i in range(6)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems_of(nets, **options):
    with pytest.raises(DataCheckError) as caught:
        check_net_data(nets, **options)
    return caught.value


def test_every_problem_of_a_list_at_once(folder):
    net = Net(image_net(folder), phase="TRAIN")
    check_net_data([net])  # a good list passes
    (folder / "img" / "2.png").unlink()
    (folder / "img" / "4.png").unlink()
    (folder / "img" / "dir.png").mkdir()
    (folder / "list.txt").write_text("".join(f"img/{i}.png {i % 3}\n" for i in range(6)) +
                                     "img/dir.png 1\nimg/0.png 3\nimg/1.png -1\n")
    error = problems_of([net])
    texts = [text for _, text in error.problems]
    assert texts == [
        f"list.txt:3: image 'img/2.png' not found (read as '{folder}/img/2.png')",
        f"list.txt:5: image 'img/4.png' not found (read as '{folder}/img/4.png')",
        f"list.txt:7: image 'img/dir.png' is not a regular file (read as '{folder}/img/dir.png')",
        "list.txt:8: image 'img/0.png': label 3 is outside the classes: layer 'loss' "
        "(SoftmaxWithLoss) accepts [0, 3)",
        "list.txt:9: image 'img/1.png': label -1 is outside the classes: layer 'loss' "
        "(SoftmaxWithLoss) accepts [0, 3)"]
    message = str(error)
    assert message.startswith("the data check before the first iteration found 5 problems")
    assert f"{folder / 'net.prototxt'}:2: layer 'data' (ImageData) of the TRAIN net:" in message
    assert "--skip-data-check" in message
    capped = str(problems_of([net], limit=2))
    assert "list.txt:5:" in capped and "list.txt:7:" not in capped and "... and 3 more" in capped


def test_a_list_format_error_is_the_readers(folder):
    net = Net(image_net(folder), phase="TRAIN")
    (folder / "list.txt").write_text("img/0.png 0\nimg/1.png one\n")
    (problem,) = problems_of([net]).problems
    assert problem[1] == ("list.txt:2: layer 'data' (ImageData): the label 'one' of "
                          "'img/1.png' is not an integer")


def test_unresized_images_must_declare_the_first_size(folder):
    net = Net(image_net(folder, resize=False), phase="TRAIN")
    check_net_data([net])
    cv2.imwrite(str(folder / "img" / "3.png"), np.zeros((6, 8), np.uint8))
    (problem,) = problems_of([net]).problems
    assert problem[1] == ("list.txt:4: image 'img/3.png' is 8 x 6 (W x H, from its header), "
                          "the first image 'img/0.png' is 7 x 6; set new_height and new_width "
                          "to resize them")
    # the header pass has a time budget; the stat pass has none
    check_net_data([net], seconds=0)


def test_a_hundred_thousand_lines_in_seconds(folder):
    net = Net(image_net(folder), phase="TRAIN")
    lines = [f"img/{i % 6}.png {i % 3}\n" for i in range(100_000)]
    for line in (500, 70_000):
        lines[line - 1] = f"img/gone{line}.png 1\n"
    (folder / "list.txt").write_text("".join(lines))
    started = time.perf_counter()
    error = problems_of([net])
    seconds = time.perf_counter() - started
    assert [text.split(":")[1] for _, text in error.problems] == ["500", "70000"]
    assert seconds < 10, f"{seconds:.1f} s for 100,000 lines (measured beside other work)"


def test_train_stops_before_the_first_iteration(folder):
    from caffelayers.train import train

    image_net(folder)
    (folder / "solver.prototxt").write_text(SOLVER)
    (folder / "img" / "5.png").unlink()
    iterations = []
    with pytest.raises(DataCheckError, match=r"list.txt:6: image 'img/5.png' not found"):
        train("solver.prototxt", workers=0, callbacks=[lambda s: iterations.append(s.iter)])
    assert iterations == []
    # without the check, the reader finds it when it reaches the image (batch 3)
    with pytest.raises(CaffeFormatError, match=r"list.txt:6: .*image 'img/5.png' not found"):
        train("solver.prototxt", workers=0, data_check=False,
              callbacks=[lambda s: iterations.append(s.iter)])
    assert iterations == [0, 1]


def test_opencv_warnings_stay_off_stderr(folder):
    image_net(folder)
    (folder / "solver.prototxt").write_text(SOLVER)
    (folder / "img" / "3.png").unlink()
    run = subprocess.run([sys.executable, "-m", "caffelayers", "train", "solver.prototxt",
                          "--skip-data-check", "--workers", "1"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 2
    assert "image 'img/3.png' not found" in run.stderr
    assert "WARN" not in run.stderr and "can't open/read file" not in run.stderr


# --- LMDB and HDF5 ---------------------------------------------------------------------------

def test_lmdb_entries(folder):
    lmdb = pytest.importorskip("lmdb", reason="the data extra (lmdb) is missing")

    def datum(shape, label):
        return caffe_pb2.Datum(channels=shape[0], height=shape[1], width=shape[2],
                               data=bytes(int(np.prod(shape))), label=label).SerializeToString()

    env = lmdb.open(str(folder / "db"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"a", datum((1, 4, 5), 0))
        txn.put(b"b", datum((1, 4, 5), 5))
        txn.put(b"c", datum((1, 5, 5), 1))
        txn.put(b"d", b"\xff\xff not a datum")
        txn.put(b"e", caffe_pb2.Datum(channels=1, height=4, width=5, data=b"12").SerializeToString())
    env.close()
    param = 'data_param { source: "db" batch_size: 2 backend: LMDB }'
    (folder / "net.prototxt").write_text(NET.format(kind="Data", param=param, classes=CLASSES))
    net = Net(folder / "net.prototxt", phase="TRAIN")
    texts = [text for _, text in problems_of([net]).problems]
    assert texts == [
        "db: entry 'b': label 5 is outside the classes: layer 'loss' (SoftmaxWithLoss) "
        "accepts [0, 3)",
        "db: entry 'c' is 1x5x5, the first (db: entry 'a') is 1x4x5",
        "db: entry 'd' is not a Caffe Datum",
        "db: entry 'e' holds 2 values for its shape 1x4x5"]
    check_net_data([net], seconds=0)  # the Datum pass stops at once when out of time


def test_hdf5_shapes_and_labels(folder):
    h5py = pytest.importorskip("h5py", reason="the data extra (h5py) is missing")
    with h5py.File(folder / "a.h5", "w") as handle:
        handle["data"] = np.zeros((4, 2, 3), np.float32)
        handle["label"] = np.array([0, 1, 2, 7], np.float32)
    with h5py.File(folder / "b.h5", "w") as handle:
        handle["data"] = np.zeros((3, 2, 3), np.float32)
        handle["label"] = np.array([2.5, 0, -1], np.float32)
    (folder / "files.txt").write_text("a.h5\nb.h5\n")
    param = 'hdf5_data_param { source: "files.txt" batch_size: 2 }'
    (folder / "net.prototxt").write_text(NET.format(kind="HDF5Data", param=param,
                                                    classes=CLASSES))
    net = Net(folder / "net.prototxt", phase="TRAIN")
    texts = [text for _, text in problems_of([net]).problems]
    rule = "is outside the classes: layer 'loss' (SoftmaxWithLoss) accepts [0, 3)"
    assert texts == [f"a.h5: dataset 'label' row 3: label 7 {rule}",
                     f"b.h5: dataset 'label' row 0: label 2.5 {rule}",
                     f"b.h5: dataset 'label' row 2: label -1 {rule}"]
    with h5py.File(folder / "b.h5", "w") as handle:
        handle["data"] = np.zeros((3, 3, 3), np.float32)
        handle["label"] = np.zeros(3, np.float32)
    (problem,) = problems_of([net]).problems
    assert problem[1] == ("b.h5: layer 'data' (HDF5Data): item shapes [(3, 3), ()] differ "
                          "from the first file's [(2, 3), ()]")
