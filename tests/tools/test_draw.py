"""``caffelayers draw``: DOT, SVG and PNG drawings of a real net (the classic_mix fixture)
and of the toy TRAIN/TEST net: every layer and blob version, shapes, parameter counts,
phase filtering."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from caffelayers.cli import main

DEPLOY = str(Path(__file__).resolve().parents[2] / "fixtures/caffe/classic_mix_deploy/net.prototxt")
SVG = "{http://www.w3.org/2000/svg}"
LAYERS = 16  # classic_mix_deploy: data ... prob
IN_PLACE = 5  # bn1, scale1, relu1, b2relu, drop: each writes a new node of its blob
BLOB_NODES = 11 + IN_PLACE


def texts(root):
    return [t.text for t in root.iter(f"{SVG}text")]


def test_svg_of_a_real_net(tmp_path, capsys):
    out = tmp_path / "net.svg"
    assert main(["draw", DEPLOY, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"Drawing net to {out}"
    root = ET.parse(out).getroot()
    assert len(root.findall(f"{SVG}rect")) == 1 + LAYERS  # the background, then one per layer
    assert len(root.findall(f"{SVG}polygon")) == BLOB_NODES
    # One edge per bottom and per top.
    assert len(root.findall(f"{SVG}path")) == 17 + 16  # Concat has three bottoms
    words = texts(root)
    assert "2x3x33x29" in words and "2x18x1x1" in words and "2x10" in words
    assert "params 608" in words  # conv1: 8 x 3 x 5 x 5 + 8
    assert "kernel 5, stride 2, pad 1, out 8" in words and "(Pooling MAX)" in words
    # Left to right (Caffe's default): every edge runs rightwards.
    for path in root.findall(f"{SVG}path"):
        numbers = [float(n) for n in re.findall(r"-?[\d.]+", path.get("d"))]
        assert numbers[-2] > numbers[0]


def test_rankdir_tb_and_png(tmp_path):
    svg, png = tmp_path / "net.svg", tmp_path / "net.png"
    assert main(["draw", DEPLOY, "-o", str(svg), "--rankdir", "TB"]) == 0
    for path in ET.parse(svg).getroot().findall(f"{SVG}path"):
        numbers = [float(n) for n in re.findall(r"-?[\d.]+", path.get("d"))]
        assert numbers[-1] > numbers[1]  # downwards
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is missing")
    assert main(["draw", DEPLOY, "-o", str(png), "--rankdir", "TB"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dot_and_phases(toy):
    assert main(["draw", "net.prototxt", "-o", "train.dot", "--phase", "TRAIN"]) == 0
    assert main(["draw", "net.prototxt", "-o", "test.dot", "--stage", "top2"]) == 0
    train, test = (toy / "train.dot").read_text(), (toy / "test.dot").read_text()
    assert train.startswith('digraph "toy (TRAIN)" {') and "  rankdir=LR;" in train
    assert "accuracy" not in train and '(Accuracy)' in test and "top2\\n(Accuracy)" in test
    assert '"layer:1" [label="ip1\\n(InnerProduct)\\nout 7\\nparams 217", shape=record' in train
    # ReLU in place: a second node of blob ip1, in Caffe's neuron green.
    assert '"blob:ip1:1" [label="ip1\\n4x7", shape=octagon' in train
    relu = '"layer:2" [label="relu1\\n(ReLU)", shape=record, style=filled, fillcolor="#90EE90"]'
    assert relu in train
    assert '"blob:ip1:0" -> "layer:2";' in train and '"layer:2" -> "blob:ip1:1";' in train
    assert train.count(" -> ") == 11


def test_bad_suffix(tmp_path, capsys):
    assert main(["draw", DEPLOY, "-o", str(tmp_path / "net.jpg")]) == 2
    assert "write .svg, .png or .dot" in capsys.readouterr().err


def test_defaults_shown_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["draw", "--help"])
    assert "(default: LR)" in " ".join(capsys.readouterr().out.split())
