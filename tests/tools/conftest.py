"""A tiny classifier on real files for the tools' tests: grayscale PNG images listed in an
ImageData source, its TRAIN/TEST net, a solver and weights written by the Net."""

from pathlib import Path

import numpy as np
import pytest

from caffelayers import Net

ROOT = Path(__file__).resolve().parents[2]

CLASSES = 3
IMAGES = 12
BATCH = 4

NET = '''name: "toy"
layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.01 mean_value: 128 }
  image_data_param { source: "list.txt" batch_size: 4 is_color: false new_height: 6
    new_width: 5 } }
layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.01 mean_value: 128 }
  image_data_param { source: "list.txt" batch_size: 4 is_color: false new_height: 6
    new_width: 5 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 7 weight_filler { type: "xavier" }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "top2" type: "Accuracy" bottom: "ip2" bottom: "label" top: "top2"
  accuracy_param { top_k: 2 } include { phase: TEST stage: "top2" } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
'''

SOLVER = '''net: "net.prototxt"
test_iter: 3 test_interval: 10 base_lr: 0.1 momentum: 0.9 lr_policy: "step" gamma: 0.5
stepsize: 10 display: 5 max_iter: 20 snapshot: 0 snapshot_after_train: false
snapshot_prefix: "snap" random_seed: 1
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The folder (also the working directory) with img/*.png, list.txt, net.prototxt,
    solver.prototxt and weights.caffemodel."""
    cv2 = pytest.importorskip("cv2", reason="the data extra (opencv-python-headless) is "
                                            "missing")
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(IMAGES):
        label = i % CLASSES
        image = rng.normal(60 + 60 * label, 20, (9, 8)).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), image)
        lines.append(f"img/{i}.png {label}\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    Net(str(tmp_path / "net.prototxt"), phase="TEST", seed=3).save_caffemodel(
        tmp_path / "weights.caffemodel")
    monkeypatch.chdir(tmp_path)
    return tmp_path
