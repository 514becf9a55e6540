"""TorchScript export: a file written by ``convert_to_torchscript`` runs after
``torch.jit.load`` and reproduces Caffe and ``Net``."""

from pathlib import Path

import pytest
import torch

from caffelayers import CaffeLayersError, Net, UnsupportedParameterError
from caffelayers.converters.pytorch import (ConvertedNet, convert_to_torchscript,
                                            forward_by_name, load_torchscript)
from caffelayers.verify import compare, load_reference

CASES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"

# PyTorch 2.x deprecates TorchScript; these tests call torch.jit directly on purpose.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated:DeprecationWarning")


def case_net(name: str):
    case = CASES_DIR / name
    meta, arrays = load_reference(case)
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase="TEST")
    inputs = {n: arrays[f"input/{n}"] for n in meta["inputs"]}
    return net, inputs, arrays


def assert_matches_caffe(outputs, arrays) -> None:
    checks = [compare(blob, value, arrays[f"iter0/data/{blob}"])
              for blob, value in outputs.items()]
    assert checks
    failures = [check.describe() for check in checks if not check.passed]
    assert not failures, failures


@pytest.mark.parametrize("name", ["classic_mix_deploy", "v1_alexnet_mini", "slice_points"])
def test_scripted_round_trip_matches_caffe(name, tmp_path):
    net, inputs, arrays = case_net(name)
    path = tmp_path / "model.pt"
    assert convert_to_torchscript(net, path) == "script"
    module, input_names, output_names = load_torchscript(path)
    assert isinstance(module, torch.jit.ScriptModule)
    assert input_names == net.inputs and output_names == net.outputs
    with torch.no_grad():
        assert_matches_caffe(forward_by_name(module, inputs, input_names, output_names), arrays)


def test_plain_torch_jit_load_runs_it(tmp_path):
    net, _, arrays = case_net("sphereface4_deploy")
    convert_to_torchscript(net, tmp_path / "model.pt")
    module = torch.jit.load(str(tmp_path / "model.pt"))
    data = torch.from_numpy(arrays["input/data"])
    with torch.no_grad():
        assert_matches_caffe({"fc5": module(data)}, arrays)
        # Scripted, not traced: another batch size works.
        assert torch.allclose(module(data[:1]), module(data)[:1], rtol=1e-5, atol=1e-6)


def test_sphereface20_deploy_agrees_with_net(sphereface_prototxt, tmp_path):
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(sphereface_prototxt(units=(1, 2, 4, 1), train=False))
    net = Net(prototxt, seed=0)
    path = tmp_path / "model.pt"
    assert convert_to_torchscript(net, path) == "script"
    module, input_names, output_names = load_torchscript(path)
    data = torch.randn((1, 3, 112, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(data=data)["fc5"]
        got = forward_by_name(module, {"data": data}, input_names, output_names)["fc5"]
    check = compare("fc5", got, expected.numpy())
    assert check.passed, check.describe()


def test_caffelayers_modules_are_traced(tmp_path):
    """ArgMax is a caffelayers module written for eager PyTorch: scripting fails, so the
    module is traced on an example input (the net's input shapes)."""
    net, inputs, arrays = case_net("argmax_topk")
    path = tmp_path / "model.pt"
    assert convert_to_torchscript(net, path) == "trace"
    module, input_names, output_names = load_torchscript(path)
    with torch.no_grad():
        assert_matches_caffe(forward_by_name(module, inputs, input_names, output_names), arrays)
    with pytest.raises(CaffeLayersError, match="cannot be scripted"):
        convert_to_torchscript(net, tmp_path / "script.pt", method="script")


def test_trace_on_request(tmp_path):
    net, inputs, arrays = case_net("classic_mix_deploy")
    assert convert_to_torchscript(net, tmp_path / "model.pt", method="trace",
                                  example_inputs=inputs) == "trace"
    module, input_names, output_names = load_torchscript(tmp_path / "model.pt")
    with torch.no_grad():
        assert_matches_caffe(forward_by_name(module, inputs, input_names, output_names), arrays)


def test_bad_requests(tmp_path):
    net, _, _ = case_net("sphereface4_deploy")
    with pytest.raises(CaffeLayersError, match="method must be one of"):
        convert_to_torchscript(net, tmp_path / "model.pt", method="compile")
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), str(tmp_path / "foreign.pt"))
    with pytest.raises(CaffeLayersError, match="not written by caffelayers"):
        load_torchscript(tmp_path / "foreign.pt")


FUNCTIONAL_NET = """name: "functional"
layer { name: "in" type: "Input" top: "x" top: "ref"
  input_param { shape { dim: 2 dim: 3 dim: 7 dim: 6 } shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "pad_over_half" type: "Pooling" bottom: "x" top: "max_pad"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "ave_pad_over_half" type: "Pooling" bottom: "x" top: "ave_pad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "past" type: "Pooling" bottom: "x" top: "past"
  pooling_param { pool: MAX kernel_size: 2 stride: 3 } }
layer { name: "within" type: "LRN" bottom: "x" top: "within"
  lrn_param { local_size: 3 alpha: 0.5 norm_region: WITHIN_CHANNEL } }
layer { name: "crop" type: "Crop" bottom: "within" bottom: "ref" top: "crop"
  crop_param { offset: 1 } }
layer { name: "exp" type: "Exp" bottom: "crop" top: "exp" exp_param { base: 2 scale: 0.5 } }
layer { name: "reshape" type: "Reshape" bottom: "exp" top: "reshape"
  reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "slice" type: "Slice" bottom: "reshape" top: "a" top: "b"
  slice_param { slice_point: 10 } }
layer { name: "scale" type: "Scale" bottom: "a" top: "scale"
  scale_param { bias_term: true filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "sum" type: "Eltwise" bottom: "scale" bottom: "a" top: "sum"
  eltwise_param { coeff: 2 coeff: -1 } }
layer { name: "reduce" type: "Reduction" bottom: "sum" top: "reduce"
  reduction_param { operation: SUMSQ axis: 1 } }
"""


def test_every_functional_form_scripts(tmp_path):
    """Explicit pooling, WITHIN_CHANNEL LRN, Crop, Exp, Reshape, Slice, Scale, Eltwise and
    Reduction compile with torch.jit.script and agree with Net."""
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(FUNCTIONAL_NET)
    net = Net(prototxt, seed=0)
    assert convert_to_torchscript(net, tmp_path / "model.pt", method="script") == "script"
    module, input_names, output_names = load_torchscript(tmp_path / "model.pt")
    generator = torch.Generator().manual_seed(5)
    inputs = {name: torch.randn(net.graph.blob_shapes[name], generator=generator)
              for name in net.inputs}
    with torch.no_grad():
        expected = net(**inputs)
        got = forward_by_name(module, inputs, input_names, output_names)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-6), name


def test_training_head_cannot_be_torchscript(tmp_path):
    """MarginInnerProduct and the losses call custom autograd Functions, which TorchScript
    cannot save: the error names those layers and no file is left behind."""
    case = CASES_DIR / "mip_head_softmax_loss"
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase="TRAIN")
    with pytest.raises(UnsupportedParameterError) as error:
        convert_to_torchscript(net, tmp_path / "model.pt")
    assert "'fc6' (MarginInnerProduct), 'loss' (SoftmaxWithLoss)" in str(error.value)
    assert not (tmp_path / "model.pt").exists()


def test_converted_net_runs_like_net():
    net, inputs, arrays = case_net("classic_mix_deploy")
    converted = ConvertedNet(net, "torchscript")
    assert converted.method == "script"
    with torch.no_grad():
        assert_matches_caffe(converted(**inputs), arrays)
    with pytest.raises(CaffeLayersError, match="runtime must be one of"):
        ConvertedNet(net, "onnx")
