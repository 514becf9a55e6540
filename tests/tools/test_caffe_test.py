"""``caffelayers test``: Caffe's ``caffe test`` on a real image list, checked against the
same images decoded and transformed here and fed to the Net by hand."""

import json
import re

import numpy as np
import pytest
import torch

from caffelayers import Net
from caffelayers.cli import main

BATCH, IMAGES = 4, 12  # the toy fixture's (conftest.py) batch size and list length


def expected_outputs(folder, iterations, stages=()):
    """Each pass's outputs, the images read with OpenCV and transformed as the prototxt says
    (resize to 6x5, minus 128, times 0.01), the list wrapping around as Caffe's does."""
    import cv2

    entries = [line.split() for line in (folder / "list.txt").read_text().splitlines()]
    net = Net(str(folder / "net.prototxt"), str(folder / "weights.caffemodel"), phase="TEST",
              stages=list(stages))
    passes = []
    for i in range(iterations):
        rows = [entries[(i * BATCH + k) % IMAGES] for k in range(BATCH)]
        images = [cv2.resize(cv2.imread(str(folder / path), cv2.IMREAD_GRAYSCALE), (5, 6))
                  for path, _ in rows]
        data = (np.stack(images)[:, None].astype(np.float32) - 128) * 0.01
        label = np.array([float(lab) for _, lab in rows], np.float32)
        with torch.no_grad():
            outputs = net(data=data, label=label)
        passes.append({name: float(value) for name, value in outputs.items()})
    return passes


def test_prints_caffe_lines_and_means(toy, capsys):
    iterations = 4  # 16 items from a list of 12: the last pass wraps around
    assert main(["test", "--model", "net.prototxt", "--weights", "weights.caffemodel",
                 "--iterations", str(iterations)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Running for 4 iterations."
    batch_lines = [line for line in lines if line.startswith("Batch ")]
    assert len(batch_lines) == iterations * 2  # accuracy and loss each pass
    expected = expected_outputs(toy, iterations)
    for line in batch_lines:
        i, name, value = re.fullmatch(r"Batch (\d+), (\w+) = (\S+)", line).groups()
        assert float(value) == pytest.approx(expected[int(i)][name], rel=1e-5, abs=1e-6)
    mean_loss = np.mean([p["loss"] for p in expected])
    mean_accuracy = np.mean([p["accuracy"] for p in expected])
    assert lines[-3] == f"Loss: {mean_loss:.6g}"
    assert lines[-2] == f"accuracy = {mean_accuracy:.6g}"
    assert lines[-1] == f"loss = {mean_loss:.6g} (* 1 = {mean_loss:.6g} loss)"


def test_stage_and_json(toy, capsys):
    assert main(["test", "--model", "net.prototxt", "--weights", "weights.caffemodel",
                 "--iterations", "3", "--stage", "top2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = expected_outputs(toy, 3, stages=["top2"])
    assert [[entry["output"] for entry in row] for row in result["batches"]] == \
        [["accuracy", "top2", "loss"]] * 3
    for row, want in zip(result["batches"], expected):
        for entry in row:
            assert entry["value"] == pytest.approx(want[entry["output"]], rel=1e-5, abs=1e-6)
    scores = {s["output"]: s for s in result["scores"]}
    assert scores["top2"]["mean"] >= scores["accuracy"]["mean"]
    assert scores["loss"]["loss_weight"] == 1 and scores["accuracy"]["loss_weight"] == 0
    assert result["loss"] == pytest.approx(scores["loss"]["mean"])


def test_defaults_shown_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 50)" in text and "--weights" in text


def test_bad_input_is_one_error_line(toy, capsys):
    assert main(["test", "--model", "net.prototxt", "--weights", "missing.caffemodel",
                 "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing.caffemodel" in err[0]
    (toy / "deploy.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" '
        'input_param { shape { dim: 1 dim: 1 dim: 6 dim: 5 } } }\n'
        'layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" '
        'inner_product_param { num_output: 7 } }\n')
    assert main(["test", "--model", "deploy.prototxt", "--weights", "weights.caffemodel"]) == 2
    assert "take arrays" in capsys.readouterr().err
