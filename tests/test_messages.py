"""Messages that state the real numbers and what is expected: Accuracy's label count, the
layers without a module or emitter, what ``verify`` through a converted model compared and
left out, and the ``--input`` shape suggested for an input the prototxt leaves open."""

import caffelayers
import pytest

from caffelayers import Net
from caffelayers.cli import main
from caffelayers.convert import check_convertible
from caffelayers.errors import CaffeLayersError, ShapeError, UnknownLayerError
from caffelayers.graph import build_graph, load_net_param
from caffelayers.layers.neuron import ReLU
from caffelayers.proto import io
from caffelayers.registry import LAYERS


def test_accuracy_states_both_counts_and_what_it_expects():
    text = ('layer { name: "s" type: "Input" top: "s" input_param { shape { dim: 2 dim: 10 } } }\n'
            'layer { name: "l" type: "Input" top: "l" input_param { shape { dim: 100 } } }\n'
            'layer { name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" }\n')
    with pytest.raises(ShapeError) as caught:
        Net(io.parse_prototxt(text))
    message = str(caught.value)
    assert "'acc' (Accuracy)" in message
    assert "the scores hold 2 vectors of 10 classes" in message
    assert "so 2 labels are expected; the labels hold 100" in message


def test_layers_without_a_module_or_emitter_read_plainly(monkeypatch):
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "odd" type: "Mystery" bottom: "x" top: "y" }\n')
    with pytest.raises(UnknownLayerError) as no_module:
        Net(io.parse_prototxt(text))
    assert "1 layer has no module: 'odd' (Mystery)" in str(no_module.value)
    monkeypatch.setitem(LAYERS, "Mystery", ReLU)
    net_param, _ = load_net_param(io.parse_prototxt(text))
    with pytest.raises(UnknownLayerError) as no_emitter:
        check_convertible(build_graph(net_param, device="meta", strict=False), "pytorch")
    assert "1 layer has no PyTorch source emitter: 'odd' (Mystery)" in str(no_emitter.value)
    assert "no a " not in str(no_module.value) + str(no_emitter.value)


@pytest.mark.parametrize("case, runtime, expected", [
    ("classic_mix_deploy", "pytorch-source",
     ["compared iter0/data/prob;", "9 intermediate blobs (iter0/data/conv1",
      "a converted model returns only the net's outputs", "13 parameters"]),
    ("conv_basic", "torchscript",
     ["compared iter0/data/y;", "5 gradients and updates (iter0/top_diff/y",
      "a converted model runs forward only"]),
])
def test_verify_through_a_converted_model_says_what_it_left_out(capsys, cases_dir, case,
                                                                 runtime, expected):
    assert main(["verify", str(cases_dir / case), "--runtime", runtime]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("verify: PASS 1/1 arrays")
    for text in expected:
        assert text in summary
    assert "iter0/data/data" not in summary and "iter0/data/x;" not in summary  # the inputs


HDF5_NET = '''
layer { name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {
  source: "missing_list.txt" batch_size: 4 } }
layer { name: "%s" type: "%s" bottom: "data" top: "scores" %s }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "scores" bottom: "label" top: "loss" }
'''
INNER_PRODUCT = ("ip", "InnerProduct", "inner_product_param { num_output: 3 }")
CONVOLUTION = ("conv", "Convolution", "convolution_param { num_output: 3 kernel_size: 1 }")


@pytest.mark.parametrize("layer, data, label", [
    (INNER_PRODUCT, "4,2,3,3", "4"),        # one class per sample
    (CONVOLUTION, "4,2,5,6", "4,5,6"),      # one class per pixel
])
def test_an_open_label_gets_the_shape_its_loss_takes(tmp_path, capsys, layer, data, label):
    path = tmp_path / "net.prototxt"
    path.write_text(HDF5_NET % layer)
    assert main(["inspect", str(path), "--phase", "TRAIN"]) == 0
    notes = capsys.readouterr().out
    assert "--input data=N,C,H,W " in notes
    assert "--input label=N " in notes  # beside scores of unknown shape: one number per sample
    assert main(["inspect", str(path), "--phase", "TRAIN", "--input", f"data={data}"]) == 0
    assert f"--input label={label} " in capsys.readouterr().out
    with pytest.raises(CaffeLayersError, match=f"--input label={label} with one number per"):
        caffelayers.Net(path, phase="TRAIN", inputs={"data": tuple(map(int, data.split(",")))})
    shape = tuple(map(int, label.split(",")))
    net = caffelayers.Net(path, phase="TRAIN", inputs={"data": tuple(map(int, data.split(","))),
                                                      "label": shape})
    assert net.graph.blob_shapes["loss"] == ()
