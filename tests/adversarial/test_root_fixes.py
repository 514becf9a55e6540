"""The fixes the corpus and the fuzzing led to, pinned where they live (the corpus runs
check them end to end through the command line)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from adversarial_harness import MEMORY, Expect

import caffelayers
from caffelayers.errors import CaffeFormatError, CaffeLayersError
from caffelayers.graph import build_graph, load_net_param
from caffelayers.layers.base import BuildContext
from caffelayers.proto import io


def _build(text: str, device: str = "meta"):
    net_param, _ = load_net_param(io.parse_prototxt(text, "net.prototxt"))
    return build_graph(net_param, ctx=BuildContext(fill=False), device=device)


def test_the_memory_limit_is_what_the_address_space_cap_leaves(runner, tmp_path):
    """Under RLIMIT_AS (the runner's children have MEMORY), the limit is below the cap, so
    that an allocation the cap would refuse is refused first, with a message."""
    code = ("from caffelayers.limits import memory_limit\n"
            f"assert 0 < memory_limit() < {MEMORY}, memory_limit()\n")
    run = runner.api(code, Expect("ok"), tmp_path)
    assert run.problem() is None, run.describe()


def test_exp_saturates_as_caffe_does():
    """Caffe computes base^shift in float: 2^(2^31 - 1) is inf, and so is every output."""
    graph = _build('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 } } }\n'
                   'layer { name: "e" type: "Exp" bottom: "x" top: "y" '
                   'exp_param { base: 2 shift: 2147483647 } }', device="cpu")
    layer = graph.nodes[1].module
    assert layer.outer_scale == math.inf
    assert torch.isinf(layer(torch.zeros(2))).all()


@pytest.mark.parametrize("fields, why", [
    ("num: 2 channels: 3 height: 4", "one value each"),            # no width
    ("num: 2 num: 2 num: 2 channels: 3 height: 4 width: 5", "one value each"),
    ("shape { dim: 2 } num: 2 channels: 3 height: 4 width: 5", "not both"),
])
def test_dummy_data_legacy_fields_are_checked_as_caffe_does(fields, why):
    with pytest.raises(CaffeFormatError, match=why):
        _build(f'layer {{ name: "d" type: "DummyData" top: "a" top: "b" '
               f'dummy_data_param {{ {fields} }} }}')


@pytest.mark.parametrize("head", [
    ('type: "MarginInnerProduct" bottom: "x" bottom: "l" top: "y" '
     'margin_inner_product_param { num_output: 3 }'),
    'type: "MarginHead" bottom: "x" top: "y" margin_head_param { num_output: 3 }',
])
def test_a_margin_head_on_rows_without_values_is_refused(head):
    with pytest.raises(CaffeLayersError, match=r"'h'.*0 values per row"):
        _build('layer { name: "x" type: "Input" top: "x" top: "l" '
               'input_param { shape { dim: 2 dim: 0 } shape { dim: 2 } } }\n'
               f'layer {{ name: "h" {head} }}')


def test_a_net_without_parameters_saves_a_model_that_reads_back(tmp_path):
    """Every layer is written, as Caffe's Net::ToProto does: a parameter-free net's
    caffemodel is not an empty file that the reader takes for garbage."""
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }\n')
    net = caffelayers.Net(tmp_path / "net.prototxt")
    net.save_caffemodel(tmp_path / "w.caffemodel")
    assert [layer.name for layer in io.read_caffemodel(tmp_path / "w.caffemodel").layer] == \
        ["x", "r"]
    again = caffelayers.Net(tmp_path / "net.prototxt", tmp_path / "w.caffemodel")
    x = np.array([[-1.0, 2.0]], np.float32)
    assert again(x=x)["y"].tolist() == [[0.0, 2.0]]


def test_the_data_of_a_net_read_from_elsewhere_is_found_next_to_it(tmp_path, monkeypatch):
    """Net.source_dir: the loaders look for relative data files next to the prototxt."""
    h5py = pytest.importorskip("h5py", reason="the data extra (h5py) is missing")
    from caffelayers.data import net_inputs

    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "HDF5Data" top: "data" hdf5_data_param { source: "list.txt" '
        'batch_size: 2 } }\nlayer { name: "r" type: "ReLU" bottom: "data" top: "y" }\n')
    (tmp_path / "list.txt").write_text("data.h5\n")
    with h5py.File(tmp_path / "data.h5", "w") as handle:
        handle["data"] = np.ones((3, 4), np.float32)
    monkeypatch.chdir(tmp_path.parent)
    net = caffelayers.Net(tmp_path / "net.prototxt")
    assert net.source_dir == tmp_path.resolve()
    inputs = net_inputs(net, workers=0)
    try:
        assert inputs()["data"].shape == (2, 4)
    finally:
        inputs.close()
