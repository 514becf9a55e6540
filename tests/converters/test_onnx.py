"""ONNX conversion of whole nets: every inference fixture against Caffe's numbers in
onnxruntime, names, opsets, batch handling, the unknown-layer report and external data."""

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from caffelayers import Net
from caffelayers.converters.onnx import (UNSUPPORTED, check_convertible, convert_to_onnx,
                                         inference_problem, run_onnx, save_onnx,
                                         verify_case_onnx)
from caffelayers.errors import (CaffeLayersError, UnknownLayerError,
                                UnsupportedParameterError)
from caffelayers.graph import build_graph, load_net_param
from caffelayers.layers.base import CaffeLayer
from caffelayers.layers.neuron import ReLU
from caffelayers.proto import io
from caffelayers.registry import EMITTERS, LAYERS

CASES_DIR = Path(__file__).resolve().parent.parent.parent / "fixtures" / "caffe"
CASES = sorted(p for p in CASES_DIR.iterdir() if (p / "reference.npz").is_file())


@functools.lru_cache(maxsize=None)
def problem(case: Path):
    return inference_problem(case)


# -- Caffe's fixtures ----------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_inference_case_matches_caffe_in_onnxruntime(case):
    """Rule: a case is converted when it is not a solver case, every layer of its TEST net
    has an emitter, and (recorded in TRAIN) every layer is set up as in TEST."""
    if problem(case):
        pytest.skip(problem(case))
    result = verify_case_onnx(case, threads=1)
    assert result.passed, "\n".join([c.describe() for c in result.failures] + [result.summary])


def test_only_training_cases_are_left_out():
    left_out = {case.name for case in CASES if problem(case)}
    assert left_out == {"sphereface20_mini_train"}
    assert problem(CASES_DIR / "sphereface20_mini_train").startswith("a solver case")


def test_a_case_whose_layers_follow_the_phase_is_not_an_inference_case(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    (case / "net.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "drop" type: "Dropout" bottom: "x" top: "y" }\n')
    np.savez(case / "reference.npz", meta=json.dumps({"phase": "TRAIN", "inputs": ["x"]}),
             **{"input/x": np.ones((2, 3), np.float32), "iter0/data/y": np.ones((2, 3))})
    assert "'drop' (Dropout)" in inference_problem(case)
    with pytest.raises(UnsupportedParameterError, match="not an inference case"):
        verify_case_onnx(case)


def test_intermediate_blobs_of_a_deploy_net_match_caffe():
    case = CASES_DIR / "classic_mix_deploy"
    result = verify_case_onnx(case, threads=1)
    blobs = {check.key.rsplit("/", 1)[1] for check in result.checks}
    assert {"conv1", "pool1", "norm1", "cat", "pool2", "fc", "prob"} <= blobs
    assert result.passed, result.summary


# -- names ---------------------------------------------------------------------------------
def deploy_net():
    return Net(CASES_DIR / "classic_mix_deploy" / "net.prototxt",
               CASES_DIR / "classic_mix_deploy" / "weights.caffemodel")


def test_value_and_initializer_names_are_caffe_names():
    model = convert_to_onnx(deploy_net(), check=False)
    onnx.checker.check_model(model, full_check=True)  # value_info agrees with ONNX's shapes
    produced = [out for node in model.graph.node for out in node.output]
    # conv1 is rewritten in place by bn1, scale1, relu1: the last value has the blob's name.
    assert [v for v in produced if v.startswith("conv1")] == \
        ["conv1/conv1", "conv1/bn1", "conv1/scale1", "conv1"]
    assert [o.name for o in model.graph.output] == ["prob"]
    assert [i.name for i in model.graph.input] == ["data"]
    names = {init.name for init in model.graph.initializer}
    assert {"conv1/0", "conv1/1", "bn1/0", "bn1/1", "scale1/0", "scale1/1", "fc/0",
            "fc/1"} <= names
    assert "bn1/2" not in names  # the scale factor is folded into the statistics


def test_shared_parameters_are_one_initializer():
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 } } }\n'
            'layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" } '
            'inner_product_param { num_output: 4 bias_term: false weight_filler { '
            'type: "gaussian" } } }\n'
            'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } '
            'inner_product_param { num_output: 4 bias_term: false weight_filler { '
            'type: "gaussian" } } }\n')
    net = Net(io.parse_prototxt(text), seed=0)
    with torch.no_grad():
        net.layer("b").weight.copy_(net.layer("a").weight)  # Caffe shares the blob itself
    model = convert_to_onnx(net)
    assert [init.name for init in model.graph.initializer] == ["w"]


def test_outputs_expose_intermediate_blobs_and_skip_inputs():
    net = deploy_net()
    model = convert_to_onnx(net, outputs=["data", "pool1", "b2"])
    assert [o.name for o in model.graph.output] == ["prob", "pool1", "b2"]
    with pytest.raises(CaffeLayersError, match="no blob"):
        convert_to_onnx(net, outputs=["nope"])


def test_an_input_rewritten_in_place_keeps_its_name():
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }\n')
    model = convert_to_onnx(Net(io.parse_prototxt(text)))
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["x/relu"]
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    np.testing.assert_array_equal(run_onnx(model, {"x": x})["x"], np.maximum(x, 0))


# -- opsets and batch ----------------------------------------------------------------------
MIXED = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 '
         'dim: 9 dim: 7 } } }\n'
         'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
         'convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { '
         'type: "xavier" } } }\n'
         'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { '
         'use_global_stats: false } }\n'
         'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { '
         'pool: AVE kernel_size: 3 stride: 2 pad: 1 } }\n'
         'layer { name: "mvn" type: "MVN" bottom: "pool" top: "mvn" }\n'
         'layer { name: "sum" type: "Reduction" bottom: "mvn" top: "sum" reduction_param { '
         'operation: SUMSQ axis: 2 } }\n'
         'layer { name: "halves" type: "Slice" bottom: "mvn" top: "h1" top: "h2" slice_param { '
         'axis: 3 } }\n'
         'layer { name: "fc" type: "InnerProduct" bottom: "h1" top: "fc" inner_product_param { '
         'num_output: 6 weight_filler { type: "xavier" } } }\n'
         'layer { name: "am" type: "ArgMax" bottom: "fc" top: "am" argmax_param { top_k: 2 '
         'out_max_val: true } }\n'
         'layer { name: "flat" type: "Flatten" bottom: "h2" top: "flat" }\n'
         'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')


def mixed_net():
    return Net(io.parse_prototxt(MIXED), seed=0)


def run_both(net, model, batch, seed=0):
    x = np.random.default_rng(seed).standard_normal((batch, 3, 9, 7)).astype(np.float32)
    got = run_onnx(model, {"data": x}, threads=1)
    with torch.no_grad():
        want = net(data=torch.from_numpy(x))
    return got, {k: v.numpy() for k, v in want.items()}


def assert_all_close(got, want):
    assert set(got) == set(want)
    for blob in want:
        np.testing.assert_allclose(got[blob], want[blob], rtol=1e-4,
                                   atol=1e-6 + 1e-4 * np.abs(want[blob]).max(), err_msg=blob)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_opsets_13_to_18_give_the_same_numbers(opset):
    net = mixed_net()
    model = convert_to_onnx(net, opset=opset)
    assert model.opset_import[0].version == opset
    assert_all_close(*run_both(net, model, 2))


def test_opsets_outside_the_supported_range_are_refused():
    with pytest.raises(CaffeLayersError, match="opset 12"):
        convert_to_onnx(mixed_net(), opset=12)


def test_dynamic_batch_runs_batch_1_and_3_through_one_model():
    net = mixed_net()
    model = convert_to_onnx(net)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 9, 7]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):
        assert_all_close(*run_both(net, model, batch, seed=batch))


def test_static_batch_fixes_every_shape():
    net = mixed_net()
    model = convert_to_onnx(net, static_batch=True)
    for value in list(model.graph.input) + list(model.graph.output):
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert_all_close(*run_both(net, model, 2))
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run_both(net, model, 3)


# -- what cannot be converted ------------------------------------------------------------
def test_every_layer_without_an_emitter_is_listed_at_once(monkeypatch):
    """Types with a module but no emitter, a user's own and one left out on purpose (with
    its reason from UNSUPPORTED), are all reported in one error."""
    monkeypatch.setitem(LAYERS, "Mystery", ReLU)
    monkeypatch.setitem(LAYERS, "Retired", ReLU)
    monkeypatch.setitem(UNSUPPORTED, "Retired", "left out on purpose for this test")
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "odd" type: "Mystery" bottom: "x" top: "odd" }\n'
            'layer { name: "old" type: "Retired" bottom: "odd" top: "old" }\n'
            'layer { name: "odder" type: "Mystery" bottom: "old" top: "odder" }\n')
    net = Net(io.parse_prototxt(text))
    with pytest.raises(UnknownLayerError) as error:
        convert_to_onnx(net)
    assert error.value.layers == [("odd", "Mystery"), ("old", "Retired"), ("odder", "Mystery")]
    message = str(error.value)
    assert "3 layers have no ONNX emitter" in message
    assert "Retired is left out on purpose for this test" in message
    assert "for other types" in message and "register_emitter" in message


def test_layers_without_a_module_are_listed_with_the_others_before_building(monkeypatch):
    monkeypatch.setitem(LAYERS, "Mystery", ReLU)
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "py" type: "Python" bottom: "x" top: "py" }\n'
            'layer { name: "odd" type: "Mystery" bottom: "x" top: "odd" }\n')
    net_param, _ = load_net_param(io.parse_prototxt(text))
    graph = build_graph(net_param, device="meta", strict=False)
    with pytest.raises(UnknownLayerError, match="Python has no module either") as error:
        check_convertible(graph)
    assert error.value.layers == [("py", "Python"), ("odd", "Mystery")]


def test_every_unsupported_setting_is_listed_at_once():
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 '
            'dim: 4 dim: 4 } } }\n'
            'layer { name: "drop" type: "Dropout" bottom: "x" top: "d" }\n'
            'layer { name: "sto" type: "Pooling" bottom: "d" top: "p" pooling_param { '
            'pool: STOCHASTIC kernel_size: 2 } }\n')
    with pytest.raises(UnsupportedParameterError, match="'drop'.*'sto'"):
        convert_to_onnx(Net(io.parse_prototxt(text), phase="TRAIN"))


class SiLU(CaffeLayer):
    """x * sigmoid(x): a user's own layer type (a name no fork uses)."""

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx):
        return cls()

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        return x * torch.sigmoid(x)


def test_a_users_own_emitter(monkeypatch):
    monkeypatch.setitem(LAYERS, "SiLU", SiLU)

    def emit_silu(ctx, node):
        (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
        ctx.op("Mul", [x, ctx.op("Sigmoid", [x])], top)

    monkeypatch.setitem(EMITTERS, "SiLU", emit_silu)
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "sw" type: "SiLU" bottom: "x" top: "x" }\n')
    model = convert_to_onnx(Net(io.parse_prototxt(text)))
    x = np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(run_onnx(model, {"x": x})["x"], x / (1 + np.exp(-x)), rtol=1e-6)


def test_every_layer_type_has_an_emitter_or_a_reason():
    assert set(LAYERS) <= set(EMITTERS) | set(UNSUPPORTED)
    assert not set(UNSUPPORTED) & set(EMITTERS)


# -- files ---------------------------------------------------------------------------------
def test_external_data_past_the_threshold(tmp_path):
    net = deploy_net()
    model = convert_to_onnx(net)
    before = model.SerializeToString()
    path = tmp_path / "net.onnx"
    files = save_onnx(model, path, external_data_threshold=1024)
    assert files == [path, tmp_path / "net.onnx.data"]
    assert model.SerializeToString() == before  # the object keeps its tensors
    size = files[1].stat().st_size
    save_onnx(model, path, external_data_threshold=1024)  # again: replaced, not appended
    assert files[1].stat().st_size == size
    stored = onnx.load(str(path), load_external_data=False)
    locations = {t.name: t.data_location for t in stored.graph.initializer}
    assert locations["conv1/0"] == onnx.TensorProto.EXTERNAL  # tensors under 1 KiB stay inline
    x = np.random.default_rng(0).standard_normal((2, 3, 33, 29)).astype(np.float32)
    from_file = run_onnx(path, {"data": x}, threads=1)["prob"]
    np.testing.assert_array_equal(from_file, run_onnx(model, {"data": x}, threads=1)["prob"])


def test_small_models_are_one_file(tmp_path):
    path = tmp_path / "net.onnx"
    assert save_onnx(convert_to_onnx(deploy_net()), path) == [path]
    assert not (tmp_path / "net.onnx.data").exists()
    onnx.checker.check_model(str(path), full_check=True)


# -- SphereFace ----------------------------------------------------------------------------
def test_sphereface20_deploy_net_matches_the_runtime(tmp_path, sphereface_prototxt):
    # SphereFace-20's topology; quarter widths keep the test fast.
    path = tmp_path / "sphereface20_deploy.prototxt"
    path.write_text(sphereface_prototxt(train=False, widths=(16, 32, 64, 128), fc5=128))
    net = Net(path, seed=0)
    model = convert_to_onnx(net)
    assert len([n for n in model.graph.node if n.op_type == "Conv"]) == 20
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 96)).astype(np.float32)
    got = run_onnx(model, {"data": x})
    with torch.no_grad():
        want = net(data=torch.from_numpy(x))["fc5"].numpy()
    tolerance = 1e-6 + 1e-4 * np.abs(want).max()
    assert np.abs(got["fc5"] - want).max() <= tolerance
