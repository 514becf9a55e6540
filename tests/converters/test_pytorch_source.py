"""The PyTorch source converter: ``model.py`` + ``weights.pt`` reproduce Caffe and ``Net``.

Every generated file is used as a user would: imported from its path with importlib, its
weights read with ``torch.load(..., weights_only=True)`` and loaded strictly.
"""

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caffelayers import CaffeLayersError, Net, UnknownLayerError
from caffelayers.converters.pytorch import (SOURCE_EMITTERS, ConvertedNet, convert_to_pytorch,
                                            forward_by_name, register_source_emitter,
                                            write_pytorch)
from caffelayers.layers.base import CaffeLayer
from caffelayers.registry import LAYERS
from caffelayers.verify import compare, load_reference

ROOT = Path(__file__).resolve().parents[2]
CASES_DIR = ROOT / "fixtures" / "caffe"
_module_names = itertools.count()


def case_dirs():
    return sorted(p for p in CASES_DIR.iterdir() if (p / "reference.npz").is_file())


def inference_skip_reason(case: Path, meta: dict):
    """Why a case is no inference check (None when it is one): solver cases, loss layers,
    MarginInnerProduct, and layers whose recorded phase behaves differently from TEST."""
    if meta.get("solver"):
        return "solver case"
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase=meta["phase"])
    for node in net.graph.nodes:
        if node.module.is_loss:
            return f"loss layer {node.name!r}"
        if node.type == "MarginInnerProduct":
            return "MarginInnerProduct (training head)"
        if node.type == "Dropout" and node.module.training:
            return "Dropout in TRAIN"
        if node.type == "BatchNorm" and not node.module.use_global_stats:
            return "BatchNorm with batch statistics"
    return None


def load_generated(out_dir: Path) -> torch.nn.Module:
    """Import ``model.py`` from its path and load ``weights.pt`` as a user would."""
    name = f"generated_model_{next(_module_names)}"
    spec = importlib.util.spec_from_file_location(name, out_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    model = module.CaffeNet()
    model.load_state_dict(torch.load(out_dir / "weights.pt", weights_only=True))
    return model.eval()


def run_generated(model, inputs) -> dict:
    """Outputs by Caffe blob name, inputs fed by name in the model's argument order."""
    arguments = [torch.as_tensor(np.asarray(inputs[name])).float()
                 for name in model.input_names]
    with torch.no_grad():
        result = model(*arguments)
    if isinstance(result, torch.Tensor):
        assert len(model.output_names) == 1
        return {model.output_names[0]: result}
    assert list(result) == list(model.output_names)
    return result


def assert_agrees_with_net(net: Net, model, inputs) -> None:
    with torch.no_grad():
        expected = net(**inputs)
    got = run_generated(model, inputs)
    assert set(got) == set(expected)
    failures = [compare(name, got[name], expected[name].numpy()) for name in expected]
    failures = [check.describe() for check in failures if not check.passed]
    assert not failures, failures


def write_prototxt(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return path


# -- every inference fixture case ---------------------------------------------------------
_converted = {}


def converted_case(case: Path, out_root: Path):
    """``(out_dir, meta, arrays)`` of a case converted in TEST phase, once per session;
    ``(None, reason, None)`` for a case that is no inference check."""
    if case.name not in _converted:
        meta, arrays = load_reference(case)
        reason = inference_skip_reason(case, meta)
        if reason:
            _converted[case.name] = (None, reason, None)
        else:
            net = Net(case / "net.prototxt", case / "weights.caffemodel", phase="TEST")
            out = convert_to_pytorch(net, out_root / case.name)
            _converted[case.name] = (out, meta, arrays)
    return _converted[case.name]


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("pytorch_source")


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_fixture_case_matches_caffe(case, out_root):
    out, meta, arrays = converted_case(case, out_root)
    if out is None:
        pytest.skip(meta)
    model = load_generated(out)
    outputs = run_generated(model, {name: arrays[f"input/{name}"] for name in meta["inputs"]})
    checks = [compare(f"iter0/data/{blob}", value, arrays[f"iter0/data/{blob}"])
              for blob, value in outputs.items() if f"iter0/data/{blob}" in arrays]
    assert checks, f"no output of {case.name} was recorded"
    failures = [check.describe() for check in checks if not check.passed]
    assert not failures, failures


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it is in the test extras)")
def test_generated_source_passes_ruff(out_root, tmp_path):
    files = []
    for case in case_dirs():
        out, _, _ = converted_case(case, out_root)
        if out is not None:
            files.append(out / "model.py")
    for name, text in (("edge", EDGE_NET), ("names", NAMES_NET), ("pooling", POOLING_NET)):
        net = Net(write_prototxt(tmp_path, text), seed=0)
        files.append(convert_to_pytorch(net, tmp_path / name) / "model.py")
    # From the repository root, so that the project's ruff settings apply if it has any.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             *map(str, files)], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- real models --------------------------------------------------------------------------
@pytest.mark.parametrize("units", [(1, 2, 4, 1), (3, 8, 16, 3)], ids=["sphereface20",
                                                                       "sphereface64"])
def test_sphereface_deploy_agrees_with_net(units, sphereface_prototxt, tmp_path):
    net = Net(write_prototxt(tmp_path, sphereface_prototxt(units=units, train=False)), seed=0)
    model = load_generated(convert_to_pytorch(net, tmp_path / "out"))
    data = torch.randn((1, 3, 112, 96), generator=torch.Generator().manual_seed(1))
    assert_agrees_with_net(net, model, {"data": data})


def test_generated_model_takes_another_batch_size(out_root):
    out, _, arrays = converted_case(CASES_DIR / "sphereface4_deploy", out_root)
    model = load_generated(out)
    data = torch.from_numpy(arrays["input/data"])
    with torch.no_grad():
        both, first = model(data), model(data[:1])
    assert torch.allclose(first, both[:1], rtol=1e-5, atol=1e-6)


def test_sphereface4_source_reads_like_pytorch(out_root):
    out, _, _ = converted_case(CASES_DIR / "sphereface4_deploy", out_root)
    source = (out / "model.py").read_text()
    assert "from caffelayers" not in source  # everything here is plain torch.nn
    for line in ("self.conv1_1 = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1)",
                 "self.relu1_1 = nn.PReLU(16)",
                 "conv1_1 = self.relu1_1(conv1_1)",
                 "fc5 = self.fc5(torch.flatten(conv4_1, 1))",
                 "return fc5"):
        assert line in source


# -- layers the fixtures do not reach -----------------------------------------------------
EDGE_NET = """name: "edge"
layer { name: "in" type: "Input" top: "data" top: "F"
  input_param { shape { dim: 2 dim: 4 dim: 7 dim: 6 } shape { dim: 2 dim: 4 } } }
layer { name: "conv1/1" type: "Convolution" bottom: "data" top: "conv1/1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "lambda" type: "PReLU" bottom: "conv1/1" top: "conv1/1"
  prelu_param { channel_shared: true } }
layer { name: "bn" type: "BatchNorm" bottom: "conv1/1" top: "bn" }
layer { name: "sc" type: "Scale" bottom: "bn" top: "sc"
  scale_param { axis: 1 num_axes: 2 bias_term: true filler { type: "gaussian" std: 1 }
    bias_filler { type: "gaussian" std: 1 } } }
layer { name: "sc0" type: "Scale" bottom: "sc" top: "sc"
  scale_param { num_axes: 0 filler { type: "constant" value: 3 } } }
layer { name: "bias" type: "Bias" bottom: "conv1/1" top: "cb"
  bias_param { axis: -2 num_axes: 1 filler { type: "gaussian" std: 1 } } }
layer { name: "sum3" type: "Eltwise" bottom: "sc" bottom: "cb" bottom: "sc" top: "lambda"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 } }
layer { name: "max3" type: "Eltwise" bottom: "sc" bottom: "cb" bottom: "lambda" top: "mx"
  eltwise_param { operation: MAX } }
layer { name: "red" type: "Reduction" bottom: "mx" top: "red"
  reduction_param { operation: ASUM axis: 0 coeff: 0.5 } }
layer { name: "red2" type: "Reduction" bottom: "mx" top: "red2"
  reduction_param { operation: MEAN axis: 2 } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "p4"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 round_mode: FLOOR } }
layer { name: "fl" type: "Flatten" bottom: "p4" top: "fl" flatten_param { axis: 2 end_axis: 1 } }
layer { name: "sl" type: "Slice" bottom: "p4" top: "sa" top: "sb"
  slice_param { axis: -1 slice_point: 1 } }
layer { name: "sp" type: "Split" bottom: "sa" top: "s1" top: "s2" }
layer { name: "tl" type: "Tile" bottom: "s1" top: "tl" tile_param { axis: -1 tiles: 3 } }
layer { name: "cat1" type: "Concat" bottom: "s2" top: "cat1" }
layer { name: "log" type: "Log" bottom: "F" top: "lg" log_param { base: 2 scale: 0.5 shift: 5 } }
layer { name: "exp" type: "Exp" bottom: "lg" top: "ex" exp_param { scale: 0.5 shift: -1 } }
layer { name: "exp2" type: "Exp" bottom: "lg" top: "ex2" exp_param { base: 3 scale: 0.5 } }
layer { name: "pw" type: "Power" bottom: "ex" top: "pw"
  power_param { power: 2 scale: 0 shift: 3 } }
layer { name: "pw2" type: "Power" bottom: "ex2" top: "pw2"
  power_param { power: 1.5 scale: 2 shift: 0.5 } }
layer { name: "th" type: "Threshold" bottom: "ex" top: "th" threshold_param { threshold: 1.1 } }
layer { name: "elu" type: "ELU" bottom: "F" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "bnll" type: "BNLL" bottom: "elu" top: "bnll" }
layer { name: "abs" type: "AbsVal" bottom: "bnll" top: "abs" }
layer { name: "sig" type: "Sigmoid" bottom: "abs" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "sig" top: "tanh" }
layer { name: "mvn2d" type: "MVN" bottom: "tanh" top: "mvn2d" }
layer { name: "mvnx" type: "MVN" bottom: "conv1/1" top: "mvnx"
  mvn_param { across_channels: true } }
layer { name: "unused" type: "TanH" bottom: "F" top: "only_silenced" }
layer { name: "silence" type: "Silence" bottom: "th" bottom: "only_silenced" }
layer { name: "lrn" type: "LRN" bottom: "conv1/1" top: "lrn"
  lrn_param { local_size: 3 alpha: 2 beta: 0.6 k: 2 } }
layer { name: "drop" type: "Dropout" bottom: "lrn" top: "lrn" }
layer { name: "ip" type: "InnerProduct" bottom: "lrn" top: "ip"
  inner_product_param { num_output: 3 axis: -2 transpose: true
    weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "soft" type: "Softmax" bottom: "ip" top: "soft" softmax_param { axis: -1 } }
layer { name: "1x1" type: "Deconvolution" bottom: "conv1/1" top: "dc"
  convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "rs" type: "Reshape" bottom: "dc" top: "rs"
  reshape_param { shape { dim: 0 dim: -1 } axis: 1 num_axes: 2 } }
layer { name: "relu" type: "ReLU" bottom: "rs" top: "rs" relu_param { negative_slope: 0.1 } }
layer { name: "emb" type: "Embed" bottom: "th" top: "emb"
  embed_param { input_dim: 2 num_output: 3 weight_filler { type: "gaussian" std: 1 }
    bias_filler { type: "gaussian" std: 1 } } }
"""


def test_edge_net_agrees_with_net(tmp_path):
    net = Net(write_prototxt(tmp_path, EDGE_NET), seed=0)
    out = convert_to_pytorch(net, tmp_path / "out")
    generator = torch.Generator().manual_seed(2)
    inputs = {name: torch.randn(net.graph.blob_shapes[name], generator=generator)
              for name in net.inputs}
    assert_agrees_with_net(net, load_generated(out), inputs)


def test_names_become_identifiers(tmp_path):
    net = Net(write_prototxt(tmp_path, EDGE_NET), seed=0)
    source = (convert_to_pytorch(net, tmp_path / "out") / "model.py").read_text()
    assert "# Caffe layer 'conv1/1'\n        self.conv1_1 = nn.Conv2d(" in source
    assert "self.layer_1x1 = nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2, groups=2)" in source
    assert "self.lambda_ = nn.PReLU()" in source  # a keyword gets an underscore
    # The blob F would hide torch.nn.functional: the argument is renamed, the name kept.
    assert "def forward(self, data: torch.Tensor, F_: torch.Tensor)" in source
    assert 'input_names = ("data", "F")' in source
    assert "lambda_ = 0.5 * sc - 2.0 * cb + sc" in source
    # Silence: a value nothing else reads is deleted (th is still read by the Embed).
    assert "del only_silenced\n" in source


NAMES_NET = r"""name: "we\"\"\"ird\\"
layer { name: "in" type: "Input" top: "x\"\"\"y"
  input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv\\1" type: "Convolution" bottom: "x\"\"\"y" top: "données"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "relu 1\n2" type: "ReLU" bottom: "données" top: "données" }
layer { name: "in2" type: "Input" top: "9lives"
  input_param { shape { dim: 2 dim: 4 dim: 3 dim: 3 } } }
layer { name: "sum" type: "Eltwise" bottom: "données" bottom: "9lives" top: "out\\put" }
"""


def test_any_caffe_name_gives_valid_source(tmp_path):
    """Quotes, backslashes, newlines, non-ASCII letters and leading digits in Caffe names
    end up in identifiers, comments and docstrings without breaking the file."""
    net = Net(write_prototxt(tmp_path, NAMES_NET), seed=0)
    out = convert_to_pytorch(net, tmp_path / "out")
    source = (out / "model.py").read_text()
    assert "def forward(self, x_y: torch.Tensor, blob_9lives: torch.Tensor)" in source
    assert "# Caffe layer 'relu 1\\n2'" in source
    model = load_generated(out)
    assert model.input_names == ('x"""y', "9lives") and model.output_names == ("out\\put",)
    generator = torch.Generator().manual_seed(4)
    inputs = {name: torch.randn(net.graph.blob_shapes[name], generator=generator)
              for name in net.inputs}
    assert_agrees_with_net(net, model, inputs)


POOLING_NET = """name: "pooling"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 7 dim: 6 } } }
layer { name: "pad_over_half" type: "Pooling" bottom: "x" top: "max_pad"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "ave_pad_over_half" type: "Pooling" bottom: "x" top: "ave_pad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "window_past_input" type: "Pooling" bottom: "x" top: "max_past"
  pooling_param { pool: MAX kernel_size: 2 stride: 3 } }
layer { name: "native" type: "Pooling" bottom: "x" top: "native"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "global" type: "Pooling" bottom: "x" top: "global"
  pooling_param { pool: MAX global_pooling: true } }
layer { name: "mask" type: "Pooling" bottom: "x" top: "masked" top: "argmax"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
"""


def test_pooling_quirks_match_net_exactly(tmp_path):
    """Padding beyond half the kernel (PyTorch refuses it) and an unpadded ceil window
    starting past the input (PyTorch drops it; Caffe reports -FLT_MAX there) are padded
    explicitly; AVE then divides by Caffe's divisor buffer."""
    net = Net(write_prototxt(tmp_path, POOLING_NET))
    out = convert_to_pytorch(net, tmp_path / "out")
    source = (out / "model.py").read_text()
    assert "self.native = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True)" in source
    assert "self.global_ = nn.AdaptiveMaxPool2d(1)" in source
    assert "from caffelayers.layers.pooling import Pooling" in source  # the mask top
    assert 'register_buffer("ave_pad_over_half_divisor"' in source
    assert 'register_buffer("pad_over_half_divisor"' not in source  # MAX needs none
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x=x)
    got = run_generated(load_generated(out), {"x": x})
    assert got["max_past"][..., -1].eq(-3.4028234663852886e38).all()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-6, atol=1e-7), name


def test_batch_norm_batch_statistics_in_train(tmp_path):
    """A net built in TRAIN normalizes with the batch's statistics; so does the generated
    module, in eval() mode too (track_running_stats=False)."""
    case = CASES_DIR / "bn_batch_stats"
    _, arrays = load_reference(case)
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase="TRAIN")
    out = convert_to_pytorch(net, tmp_path / "out")
    assert "track_running_stats=False" in (out / "model.py").read_text()
    got = run_generated(load_generated(out), {"x": arrays["input/x"]})
    check = compare("y", got["y"], arrays["iter0/data/y"])
    assert check.passed, check.describe()


def test_training_head_and_losses_import_caffelayers(tmp_path):
    """MarginInnerProduct and SoftmaxWithLoss have no torch.nn equivalent: the source
    imports them, and the first forward reproduces Caffe's lambda and loss."""
    case = CASES_DIR / "mip_head_softmax_loss"
    meta, arrays = load_reference(case)
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase=meta["phase"])
    out = convert_to_pytorch(net, tmp_path / "out")
    source = (out / "model.py").read_text()
    assert "from caffelayers.layers.margin_inner_product import MarginInnerProduct" in source
    assert "from caffelayers.losses.infogain import SoftmaxWithLoss" in source
    got = run_generated(load_generated(out), {n: arrays[f"input/{n}"] for n in meta["inputs"]})
    for blob in ("lambda", "loss"):
        check = compare(blob, got[blob], arrays[f"iter0/data/{blob}"])
        assert check.passed, check.describe()


def test_converted_module_keeps_the_lambda_schedule():
    """The generated MarginInnerProduct keeps its iteration count between calls: four
    forwards replay Caffe's four iterations (lambda changes each time)."""
    case = CASES_DIR / "mip_quadruple_m4k6n5"
    meta, arrays = load_reference(case)
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase=meta["phase"])
    converted = ConvertedNet(net, "pytorch-source")
    inputs = {n: arrays[f"input/{n}"] for n in meta["inputs"]}
    assert meta["iterations"] == 4
    for index in range(meta["iterations"]):
        with torch.no_grad():
            outputs = converted(**inputs)
        for blob in ("fc6", "lambda"):
            key = f"iter{index}/data/{blob}"
            check = compare(key, outputs[blob], arrays[key])
            assert check.passed, check.describe()


# -- errors and the registry --------------------------------------------------------------
def test_types_without_emitter_are_all_listed(monkeypatch, tmp_path):
    monkeypatch.delitem(SOURCE_EMITTERS, "ReLU")
    monkeypatch.delitem(SOURCE_EMITTERS, "Softmax")
    case = CASES_DIR / "classic_mix_deploy"
    net = Net(case / "net.prototxt", case / "weights.caffemodel")
    with pytest.raises(UnknownLayerError) as error:
        convert_to_pytorch(net, tmp_path / "out")
    assert error.value.layers == [("relu1", "ReLU"), ("b2relu", "ReLU"), ("prob", "Softmax")]
    assert "PyTorch source emitter" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_dummy_data_has_no_emitter(tmp_path):
    text = """layer { name: "d" type: "DummyData" top: "d" dummy_data_param { shape { dim: 2 } } }
layer { name: "t" type: "TanH" bottom: "d" top: "t" }"""
    net = Net(write_prototxt(tmp_path, text))
    with pytest.raises(UnknownLayerError, match="'d' \\(DummyData\\)"):
        convert_to_pytorch(net, tmp_path / "out")


def test_an_emitter_for_a_new_type_needs_no_core_change(monkeypatch, tmp_path):
    class Twice(CaffeLayer):
        caffe_type = "Twice"

        @classmethod
        def from_caffe(cls, param, bottom_shapes, ctx):
            return cls()

        def output_shapes(self, bottom_shapes):
            return [tuple(bottom_shapes[0])]

        def forward(self, x):
            return 2 * x

    def emit_twice(layer):
        layer.assign(f"2.0 * {layer.bottoms[0]}")

    monkeypatch.setitem(LAYERS, "Twice", Twice)
    monkeypatch.setitem(SOURCE_EMITTERS, "Twice", emit_twice)
    text = """layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "doubler" type: "Twice" bottom: "x" top: "y" }"""
    net = Net(write_prototxt(tmp_path, text))
    model = load_generated(convert_to_pytorch(net, tmp_path / "out"))
    assert torch.equal(model(torch.ones(2, 3)), torch.full((2, 3), 2.0))


def test_registering_a_type_twice_fails():
    with pytest.raises(ValueError, match="already has a PyTorch source emitter"):
        register_source_emitter("Convolution")(lambda layer: None)


def test_class_name_must_be_an_identifier(tmp_path):
    case = CASES_DIR / "sphereface4_deploy"
    net = Net(case / "net.prototxt", case / "weights.caffemodel")
    with pytest.raises(CaffeLayersError, match="not a Python identifier"):
        convert_to_pytorch(net, tmp_path / "out", class_name="my net")


HEADS_NET = """name: "heads"
layer { name: "in" type: "Input" top: "x" top: "label" top: "target"
  input_param { shape { dim: 3 dim: 6 } shape { dim: 3 } shape { dim: 3 dim: 5 } } }
layer { name: "arc" type: "MarginHead" bottom: "x" bottom: "label" top: "arc"
  margin_head_param { num_output: 5 kind: ARC margin: 0.3 scale: 8 } }
layer { name: "combined" type: "MarginHead" bottom: "x" bottom: "label" top: "combined"
  margin_head_param { num_output: 5 kind: COMBINED m1: 1.1 m2: 0.2 m3: 0.1 } }
layer { name: "sphere" type: "MarginHead" bottom: "x" bottom: "label" top: "sphere"
  margin_head_param { num_output: 5 kind: SPHERE margin: 2 } }
layer { name: "diff" type: "SoftmaxDiffLoss" bottom: "arc" bottom: "target" top: "diff"
  softmax_diff_loss_param { mode: MI temperature: 2 } }
"""


def test_margin_heads_and_softmax_diff_loss_convert(tmp_path):
    """The caffelayers-only heads and distillation loss are imported by the generated file."""
    path = tmp_path / "heads.prototxt"
    path.write_text(HEADS_NET)
    net = Net(path, phase="TRAIN", seed=3)
    rng = np.random.default_rng(3)
    target = rng.random((3, 5))
    inputs = {"x": rng.standard_normal((3, 6)), "label": np.array([0.0, 4.0, 2.0]),
              "target": target / target.sum(1, keepdims=True)}
    with torch.no_grad():
        expected = net(**inputs)
        got = ConvertedNet(net, "pytorch-source")(**inputs)
    assert set(got) == set(expected) == {"combined", "sphere", "diff"}
    for blob, value in expected.items():
        check = compare(blob, got[blob], value.numpy())
        assert check.passed, check.describe()


def test_parameters_shared_by_name_stay_tied(tmp_path):
    shared = ('param { name: "w" } param { name: "b" } '
              'inner_product_param { num_output: 3 weight_filler { type: "gaussian" } '
              'bias_filler { type: "gaussian" } } }\n')
    path = tmp_path / "siamese.prototxt"
    path.write_text('layer { name: "in" type: "Input" top: "x" top: "y" input_param { '
                    'shape { dim: 2 dim: 4 } shape { dim: 2 dim: 4 } } }\n'
                    'layer { name: "a" type: "InnerProduct" bottom: "x" top: "fa" ' + shared +
                    'layer { name: "b" type: "InnerProduct" bottom: "y" top: "fb" ' + shared)
    net = Net(path, seed=4)
    source, model = write_pytorch(net, tmp_path / "out")
    assert "self.b.weight = self.a.weight" in (tmp_path / "out" / "model.py").read_text()
    assert model.b.weight is model.a.weight and model.b.bias is model.a.bias
    inputs = {"x": np.ones((2, 4), np.float32), "y": np.full((2, 4), 2, np.float32)}
    with torch.no_grad():
        expected = net(**inputs)
        got = forward_by_name(model, inputs)
    for blob in ("fa", "fb"):
        torch.testing.assert_close(got[blob], expected[blob])
