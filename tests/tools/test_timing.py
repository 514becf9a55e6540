"""``caffelayers time``: Caffe's ``caffe time`` report, per-layer backward passes that give
the Net's own gradients, and onnxruntime's profile charged back to Caffe layers."""

import json
import re
from pathlib import Path

import pytest
import torch

from caffelayers import Net
from caffelayers.cli import main
from caffelayers.data import data_sources
from caffelayers.tools.timing import layer_of_node, time_net

DEPLOY = str(Path(__file__).resolve().parents[2] / "fixtures/caffe/classic_mix_deploy/net.prototxt")


def test_report_lines_as_caffe(toy, capsys):
    assert main(["time", "--model", "net.prototxt", "--iterations", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "Performing Forward" and lines[2].startswith("Initial loss: ")
    assert lines[3:6] == ["Performing Backward", "*** Benchmark begins ***",
                          "Testing for 2 iterations."]
    assert lines[7].startswith("Iteration: 2 forward-backward time: ")
    start = lines.index("Average time per layer: ")
    layers = ["data", "ip1", "relu1", "ip2", "loss"]  # the TRAIN phase, Caffe's default
    for k, name in enumerate(layers):
        assert re.fullmatch(rf"{name:>10}\tforward: [\d.e+-]+ ms\.", lines[start + 1 + 2 * k])
        assert re.fullmatch(rf"{name:>10}\tbackward: [\d.e+-]+ ms\.", lines[start + 2 + 2 * k])
    tail = lines[start + 1 + 2 * len(layers):]
    assert [line.split(":")[0] for line in tail] == [
        "Average Forward pass", "Average Backward pass", "Average Forward-Backward",
        "Total Time", "*** Benchmark ends ***"]


def test_layer_by_layer_backward_gives_the_nets_gradients(toy):
    net = Net("net.prototxt", "weights.caffemodel", phase="TRAIN")
    result = time_net(net, iterations=1)
    assert [layer["name"] for layer in result["layers"]] == ["data", "ip1", "relu1", "ip2",
                                                             "loss"]
    assert all(layer["forward_ms"] > 0 for layer in result["layers"])
    timed = {name: [b.grad.clone() for b in blobs] for name, blobs in net.caffe_params().items()}
    reference = Net("net.prototxt", "weights.caffemodel", phase="TRAIN")
    (_, source), = data_sources(reference)
    batch = source.batch(1)  # the timed pass reads batch 1
    reference(**batch)
    reference.backward()
    for name, blobs in reference.caffe_params().items():
        for ours, want in zip(timed[name], blobs):
            torch.testing.assert_close(ours, want.grad, rtol=1e-6, atol=1e-7)


def test_deploy_net_without_loss_and_json(capsys):
    assert main(["time", "--model", DEPLOY, "--iterations", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_name = {layer["name"]: layer for layer in result["layers"]}
    # Backpropagated from zero diffs, as Caffe's time does: the convolutions still work.
    assert by_name["conv1"]["backward_ms"] > 0 and by_name["fc"]["backward_ms"] > 0
    assert result["forward_ms"] >= sum(layer["forward_ms"] for layer in result["layers"]) * 0.5


def test_onnxruntime_profile_mapped_to_layers(capsys):
    assert main(["time", "--model", DEPLOY, "--iterations", "2", "--runtime", "onnxruntime",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_name = {layer["name"]: layer for layer in result["layers"]}
    for name in ("conv1", "pool1", "norm1", "b1", "b2", "b3", "cat", "pool2", "fc", "prob"):
        assert by_name[name]["forward_ms"] > 0, name
    assert all(layer["backward_ms"] == 0 for layer in result["layers"])
    # Only onnxruntime's own layout nodes are left unmatched.
    assert all(name.startswith("Reorder") for name in result["unmatched_nodes"])


def test_node_names_to_layers():
    layers = ["conv1", "conv1_1", "relu1", "fc"]
    assert layer_of_node("conv1", layers) == "conv1"
    assert layer_of_node("conv1/Add", layers) == "conv1"
    assert layer_of_node("conv1_1", layers) == "conv1_1"
    assert layer_of_node("conv1_1/Mul_2", layers) == "conv1_1"
    assert layer_of_node("conv1_nchwc", layers) == "conv1"
    assert layer_of_node("ReorderInput", layers) is None


def test_input_flag_and_bad_net(tmp_path, capsys):
    assert main(["time", "--model", DEPLOY, "--iterations", "1", "--input",
                 "data=1,3,40,35", "--phase", "TEST"]) == 0
    capsys.readouterr()
    net = tmp_path / "open.prototxt"
    net.write_text('layer { name: "data" type: "Input" top: "data" }\n'
                   'layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }\n')
    assert main(["time", "--model", str(net), "--iterations", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "'data' (Input)" in err[0]


def test_defaults_shown_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["time", "--help"])
    assert "(default: 50)" in " ".join(capsys.readouterr().out.split())
