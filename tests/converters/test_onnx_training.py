"""ONNX conversion of TRAIN nets: MarginInnerProduct, the softmax and infogain losses and the
other losses and label-reading layers, against Caffe's recorded forwards (every ``mip_*``,
``infogain_*``, ``softmax_loss_*`` case, and SphereFace-20's TRAIN net) and against
caffelayers' Net (Caffe's loss mode) for the settings and layers the fixtures do not
cover."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from caffelayers import Net
from caffelayers.converters.onnx import UNSUPPORTED, convert_to_onnx, output_blobs
from caffelayers.converters.onnx.training import lambda_feed, lambda_input_name
from caffelayers.errors import UnknownLayerError
from caffelayers.layers.margin_inner_product import margin_inner_product
from caffelayers.losses.simple import EuclideanLoss
from caffelayers.proto import io
from caffelayers.registry import EMITTERS, LAYERS
from caffelayers.verify import compare, load_reference

CASES_DIR = Path(__file__).resolve().parent.parent.parent / "fixtures" / "caffe"
TRAINING_CASES = sorted(p for p in CASES_DIR.iterdir()
                        if p.name.startswith(("mip_", "infogain_", "softmax_loss_"))
                        or p.name == "sphereface20_mini_grad")
HEAD = CASES_DIR / "mip_head_softmax_loss"
TYPES = ("MarginInnerProduct", "SoftmaxWithLoss", "InfogainLoss", "InfogainLossLegacy",
         "EuclideanLoss", "SigmoidCrossEntropyLoss", "MultinomialLogisticLoss", "HingeLoss",
         "ContrastiveLoss", "Accuracy")


def session(model):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3  # ORT warns about initializers that are also inputs
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def run(model, feed):
    """Outputs by name; ``feed`` may hold lambda inputs, which override their defaults."""
    sess = session(model)
    takes = {i.name for i in sess.get_inputs()} | \
        {i.name for i in sess.get_overridable_initializers()}
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, {k: np.asarray(v, np.float32) for k, v in feed.items()
                              if k in takes})
    return dict(zip(names, values))


def case_net(case):
    meta, arrays = load_reference(case)
    weights = case / "weights.caffemodel"
    net = Net(case / "net.prototxt", weights if weights.is_file() else None,
              phase=meta["phase"])
    return meta, arrays, net


def replay(case, opset):
    """Convert the case's net, run every recorded iteration with that forward's lambda and
    compare every recorded computed blob; returns the model and the compared keys."""
    meta, arrays, net = case_net(case)
    computed = sorted({key.split("/")[2] for key in arrays if key.startswith("iter0/data/")}
                      - set(net.graph.inputs))
    model = convert_to_onnx(net, opset=opset, outputs=computed)
    compared = []
    for index in range(meta["iterations"]):
        feed = {name: arrays[f"input/{name}"] for name in meta["inputs"]}
        feed.update(lambda_feed(net, index))
        got = run(model, feed)
        for blob in computed:
            key = f"iter{index}/data/{blob}"
            if key in arrays:
                check = compare(key, got.get(blob), arrays[key])
                assert check.passed, check.describe()
                compared.append(key)
    return model, compared


# -- Caffe's fixtures ----------------------------------------------------------------------
@pytest.mark.parametrize("opset", [13, 17])
def test_sphereface_head_matches_caffe(opset):
    model, compared = replay(HEAD, opset)
    for index in range(3):
        assert {f"iter{index}/data/{b}" for b in ("fc5", "fc6", "lambda", "loss")} \
            <= set(compared)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset


@pytest.mark.parametrize("case", [c for c in TRAINING_CASES if c != HEAD], ids=lambda p: p.name)
def test_training_case_matches_caffe(case):
    """Every iteration of the MarginInnerProduct cases (lambda fed per forward), the loss
    value and probability top of every loss case."""
    _, compared = replay(case, 17)
    blobs = {key.rsplit("/", 1)[1] for key in compared}
    if case.name.startswith("mip_"):
        assert {"fc6", "lambda"} <= blobs
    else:
        assert {"loss"} <= blobs or {"softmax_loss"} <= blobs


def test_loss_cases_at_opset_13():
    for name in ("infogain_spatial_full_ignore", "infogain_source_file", "softmax_loss_valid"):
        replay(CASES_DIR / name, 13)


# -- lambda and label inputs ---------------------------------------------------------------
def test_label_and_lambda_are_graph_inputs():
    _, arrays, net = case_net(HEAD)
    model = convert_to_onnx(net)
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["x", "label", "fc6/lambda"] and lambda_input_name("fc6") == "fc6/lambda"
    assert inputs["label"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    lambda_type = inputs["fc6/lambda"].type.tensor_type
    assert [d.dim_value for d in lambda_type.shape.dim] == [1]
    default = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # Caffe's first forward advances the prototxt's iteration 0 to 1: 1000 / (1 + 0.12)
    np.testing.assert_array_equal(default["fc6/lambda"], arrays["iter0/data/lambda"])
    assert model.ir_version >= 4  # initializers listed as inputs are overridable
    unit = default["fc6/0"]
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-6)


def test_default_lambda_is_the_next_forwards():
    """A net that has run a forward exports iteration 1's lambda and normalized weight: the
    model then gives Caffe's second forward without any lambda fed."""
    meta, arrays, net = case_net(HEAD)
    inputs = {name: torch.from_numpy(arrays[f"input/{name}"]) for name in meta["inputs"]}
    net(**inputs)
    model = convert_to_onnx(net, outputs=["fc6", "lambda"])
    got = run(model, {k: v.numpy() for k, v in inputs.items()})
    for blob in ("fc6", "lambda", "loss"):
        check = compare(blob, got[blob], arrays[f"iter1/data/{blob}"])
        assert check.passed, check.describe()
    assert lambda_feed(net)["fc6/lambda"][0] == arrays["iter1/data/lambda"][0]


def mip_net(margin: str, batch=4, extra="", lambda_top=True, axis=1, **schedule):
    params = " ".join(f"{k}: {v}" for k, v in
                      {"base": 1000, "gamma": 0.12, "power": 1, "lambda_min": 5,
                       **schedule}.items())
    text = f'''name: "t"
layer {{ name: "x" type: "Input" top: "x"
  input_param {{ shape {{ dim: {batch} dim: 3 dim: 2 }} }} }}
layer {{ name: "label" type: "Input" top: "label"
  input_param {{ shape {{ dim: {batch} {"dim: 3" if axis == 2 else ""} }} }} }}
layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "x" bottom: "label" top: "fc6"
  {'top: "lambda"' if lambda_top else ''}
  margin_inner_product_param {{ num_output: 5 type: {margin} axis: {axis} {params}
    weight_filler {{ type: "xavier" }} }} }}
{extra}'''
    return Net(io.parse_prototxt(text), phase="TRAIN", seed=0)


def mip_inputs(batch=4, seed=1, axis=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, 2)).astype(np.float32)
    x[0] = 0  # all-zero rows: zero logits, as our module (Caffe gives NaN)
    label_shape = (batch, 3) if axis == 2 else (batch,)  # one label per row of K
    label = (np.arange(np.prod(label_shape)) % 5).reshape(label_shape).astype(np.float32)
    return {"x": x, "label": label}


def assert_matches_net(net, inputs, model=None):
    """Convert (before the net's forward, which advances lambda), run both, compare."""
    model = model or convert_to_onnx(net)
    got = run(model, inputs)
    with torch.no_grad():
        want = net(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert set(want) <= set(got)
    for blob, value in got.items():  # the net's outputs and any blob asked for
        check = compare(blob, value, net.blobs[blob].detach().numpy())
        assert check.passed, check.describe()
    return got


@pytest.mark.parametrize("margin", ["SINGLE", "DOUBLE", "TRIPLE", "QUADRUPLE"])
def test_margin_types_and_a_zero_row(margin):
    got = assert_matches_net(mip_net(margin, iteration=7), mip_inputs())
    np.testing.assert_array_equal(got["fc6"][0], 0)


def test_without_a_lambda_top():
    """SINGLE without a lambda top reads no lambda; a margin does, top or not."""
    single = convert_to_onnx(mip_net("SINGLE", lambda_top=False))
    assert "fc6/lambda" not in {i.name for i in single.graph.input}
    net = mip_net("TRIPLE", lambda_top=False)
    assert "fc6/lambda" in {i.name for i in convert_to_onnx(net).graph.input}
    assert_matches_net(net, mip_inputs())


def test_fed_lambda_overrides_the_default():
    net = mip_net("QUADRUPLE")
    model = convert_to_onnx(net)
    inputs = mip_inputs()
    got = run(model, {**inputs, "fc6/lambda": np.array([0.5], np.float32)})
    assert got["lambda"][0] == 0.5
    want = margin_inner_product(torch.from_numpy(inputs["x"]).reshape(4, 6),
                                net.layer("fc6").weight.detach(),
                                torch.from_numpy(inputs["label"]), margin=4, lambda_=0.5)
    check = compare("fc6", got["fc6"], want.numpy())
    assert check.passed, check.describe()


@pytest.mark.parametrize("axis", [1, 2])
def test_dynamic_batch(axis):
    """The model converted at batch 4 runs at batch 6 (normalizers counted in the graph);
    with axis 2 the logits are 3-D and the loss reads them on axis 2."""
    loss = ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" '
            f'top: "loss" softmax_param {{ axis: {axis} }} }}')
    small = mip_net("QUADRUPLE", 4, loss, axis=axis)
    large = mip_net("QUADRUPLE", 6, loss, axis=axis)
    large.load_state_dict(small.state_dict())
    model = convert_to_onnx(small, outputs=["fc6"])
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    got = assert_matches_net(large, mip_inputs(6, axis=axis), model)
    assert got["fc6"].shape == ((6, 5) if axis == 1 else (6, 3, 5))


# -- losses and Accuracy against the Net ---------------------------------------------------
def loss_net(layer: str, inputs, **options):
    text = 'name: "t"\n'
    for name, shape in inputs.items():
        dims = " ".join(f"dim: {d}" for d in shape)
        text += (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
                 f'input_param {{ shape {{ {dims} }} }} }}\n')
    return Net(io.parse_prototxt(text + layer), phase="TRAIN", seed=0, **options)


def labels(shape, classes, seed=2):
    return np.random.default_rng(seed).integers(0, classes, shape).astype(np.float32)


def scores(shape, seed=3, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("mode", ["caffe", "exact"])
def test_softmax_loss_modes_on_saturated_logits(mode):
    """Caffe's FLT_MIN floor caps a hopeless position at 87.3365; exact does not."""
    net = loss_net('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
                   'top: "loss" top: "prob" }', {"x": (3, 4), "label": (3,)}, loss_mode=mode)
    x = scores((3, 4), scale=60)
    got = assert_matches_net(net, {"x": x, "label": np.argmin(x, 1).astype(np.float32)})
    assert (got["loss"] > 87.34) == (mode == "exact")


@pytest.mark.parametrize("normalization", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_infogain_from_a_third_bottom_on_axis_2(normalization):
    net = loss_net('layer { name: "loss" type: "InfogainLoss" bottom: "x" bottom: "label" '
                   'bottom: "H" top: "loss" infogain_loss_param { axis: 2 } loss_param { '
                   f'normalization: {normalization} ignore_label: 3 }} }}',
                   {"x": (2, 3, 5, 2), "label": (2, 3, 2), "H": (1, 1, 5, 5)})
    inputs = {"x": scores((2, 3, 5, 2)), "label": labels((2, 3, 2), 5),
              "H": np.abs(scores((1, 1, 5, 5), seed=4))}
    assert_matches_net(net, inputs)


def test_infogain_legacy_on_probabilities(tmp_path):
    H = np.abs(scores((4, 4), seed=5))
    (tmp_path / "H.binaryproto").write_bytes(io.array_to_blob(H).SerializeToString())
    layers = ('layer { name: "prob" type: "Softmax" bottom: "x" top: "p" }\n'
              'layer { name: "loss" type: "InfogainLossLegacy" bottom: "p" bottom: "label" '
              f'top: "loss" infogain_loss_param {{ source: "{tmp_path / "H.binaryproto"}" }} }}')
    net = loss_net(layers, {"x": (3, 4, 1, 1), "label": (3,)})
    x = scores((3, 4, 1, 1), scale=40)  # probabilities under the 1e-20 floor
    model = convert_to_onnx(net)
    assert "loss/H" in {t.name for t in model.graph.initializer}
    assert_matches_net(net, {"x": x, "label": labels((3,), 4)}, model)


def test_euclidean_loss():
    net = loss_net('layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" '
                   'top: "loss" }', {"a": (3, 4, 2), "b": (3, 8)})
    assert_matches_net(net, {"a": scores((3, 4, 2)), "b": scores((3, 8), seed=4)})


@pytest.mark.parametrize("loss_param", ["", "loss_param { normalization: FULL }",
                                        "loss_param { normalization: VALID ignore_label: 0 }",
                                        "loss_param { normalization: NONE ignore_label: 1 }"])
def test_sigmoid_cross_entropy_loss(loss_param):
    net = loss_net('layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" '
                   f'bottom: "t" top: "loss" {loss_param} }}', {"x": (3, 5), "t": (3, 5)})
    target = np.random.default_rng(6).choice([0.0, 0.3, 1.0], (3, 5)).astype(np.float32)
    assert_matches_net(net, {"x": scores((3, 5), scale=5), "t": target})


@pytest.mark.parametrize("accuracy_param", ["", "accuracy_param { top_k: 2 }",
                                            "accuracy_param { top_k: 2 ignore_label: 1 }",
                                            "accuracy_param { ignore_label: 0 }"])
def test_accuracy_with_ties_and_per_class(accuracy_param):
    """Ties rank the higher class first (Caffe 1.0); the per-class top counts each class."""
    net = loss_net('layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" '
                   f'top: "acc" top: "per_class" {accuracy_param} }}',
                   {"x": (2, 4, 3), "label": (2, 3)})
    x = np.round(scores((2, 4, 3), scale=1.5)).astype(np.float32)  # many ties
    assert_matches_net(net, {"x": x, "label": labels((2, 3), 4)})


def edge_labels(batch, classes, seed=2):
    """Labels with the first and the last class (0 and C-1) both present."""
    values = labels((batch,), classes, seed)
    values[:2] = 0, classes - 1
    return values


@pytest.mark.parametrize("shape, label_shape", [((3, 5), (3,)), ((3, 5, 2, 1), (3, 1, 1, 1))])
def test_multinomial_logistic_loss(shape, label_shape):
    """``-sum log max(p_label, 1e-20) / N``, each sample's C H W elements its classes; one
    label's probability lies under the floor."""
    net = loss_net('layer { name: "loss" type: "MultinomialLogisticLoss" bottom: "p" '
                   'bottom: "label" top: "loss" }', {"p": shape, "label": label_shape})
    classes = int(np.prod(shape[1:]))
    label = edge_labels(3, classes)
    p = np.random.default_rng(8).uniform(0.01, 1, (3, classes)).astype(np.float32)
    p[2, int(label[2])] = 1e-30
    got = assert_matches_net(net, {"p": p.reshape(shape), "label": label.reshape(label_shape)})
    assert got["loss"] > 46.05 / 3  # the floored sample adds -log(1e-20)


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("shape, label_shape", [((3, 5), (3,)), ((3, 5, 2, 2), (3, 1))])
def test_hinge_loss(norm, shape, label_shape):
    net = loss_net('layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "label" '
                   f'top: "loss" hinge_loss_param {{ norm: {norm} }} }}',
                   {"x": shape, "label": label_shape})
    label = edge_labels(3, int(np.prod(shape[1:])))
    assert_matches_net(net, {"x": scores(shape, scale=1.5),
                             "label": label.reshape(label_shape)})


def contrastive_inputs(shape, sim_shape):
    """Pairs at distances 0.8 (similar), 0.5 and 3 (dissimilar: inside and outside a
    margin of 1, or of 1 on the squared distance); similarity 0.7 truncates to dissimilar."""
    a = scores((3, 5), seed=9)
    direction = scores((3, 5), seed=10)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    b = a + np.array([[0.8], [0.5], [3.0]], np.float32) * direction
    similar = np.array([1.0, 0.0, 0.7], np.float32)
    return {"a": a.reshape(shape), "b": b.astype(np.float32).reshape(shape),
            "y": similar.reshape(sim_shape)}


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("margin", ["", "margin: 2.5"])
@pytest.mark.parametrize("shape, sim_shape", [((3, 5), (3,)), ((3, 5, 1, 1), (3, 1, 1, 1))])
def test_contrastive_loss(legacy, margin, shape, sim_shape):
    layer = ('layer { name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" '
             f'top: "loss" contrastive_loss_param {{ {margin} '
             f'legacy_version: {str(legacy).lower()} }} }}')
    net = loss_net(layer, {"a": shape, "b": shape, "y": sim_shape})
    got = assert_matches_net(net, contrastive_inputs(shape, sim_shape))
    assert got["loss"] > 0.8 ** 2 / 6  # the similar pair's share alone


def test_simple_losses_at_opset_13():
    """ReduceSum reads its axes from an input from opset 13: the oldest opset emitted."""
    layer = ('layer { name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" '
             'top: "loss" }')
    net = loss_net(layer, {"a": (3, 5), "b": (3, 5), "y": (3,)})
    assert_matches_net(net, contrastive_inputs((3, 5), (3,)), convert_to_onnx(net, opset=13))
    net = loss_net('layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "label" '
                   'top: "loss" }', {"x": (3, 5), "label": (3,)})
    assert_matches_net(net, {"x": scores((3, 5)), "label": edge_labels(3, 5)},
                       convert_to_onnx(net, opset=13))


def test_accuracy_with_every_label_ignored_is_nan():
    net = loss_net('layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" '
                   'top: "acc" accuracy_param { ignore_label: 2 } }', {"x": (3, 4), "label": (3,)})
    got = assert_matches_net(net, {"x": scores((3, 4)), "label": np.full(3, 2, np.float32)})
    assert np.isnan(got["acc"])


DYNAMIC = [
    ('layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" '
     'top: "loss" }', {"x": (None, 4), "t": (None, 4)}),
    ('layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t" top: "loss" }',
     {"x": (None, 4), "t": (None, 2, 2)}),
    ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "t" top: "loss" '
     'loss_param { normalization: BATCH_SIZE } }', {"x": (None, 4, 2), "t": (None, 2)}),
    ('layer { name: "loss" type: "InfogainLossLegacy" bottom: "x" bottom: "t" bottom: "H" '
     'top: "loss" }', {"x": (None, 4), "t": (None,), "H": (4, 4)}),
    ('layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "t" top: "acc" '
     'top: "per_class" }', {"x": (None, 4, 2), "t": (None, 2)}),
    ('layer { name: "loss" type: "MultinomialLogisticLoss" bottom: "x" bottom: "t" '
     'top: "loss" }', {"x": (None, 4), "t": (None,)}),
    ('layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "t" top: "loss" '
     'hinge_loss_param { norm: L2 } }', {"x": (None, 4), "t": (None,)}),
    ('layer { name: "loss" type: "ContrastiveLoss" bottom: "x" bottom: "b" bottom: "t" '
     'top: "loss" }', {"x": (None, 4), "b": (None, 4), "t": (None,)}),
]


@pytest.mark.parametrize("layer, shapes", DYNAMIC, ids=["sigmoid_cross_entropy", "euclidean",
                                                  "softmax_batch_size", "infogain_legacy",
                                                  "accuracy", "multinomial_logistic", "hinge",
                                                  "contrastive"])
def test_loss_divisors_follow_the_batch(layer, shapes):
    """Converted at batch 3, run at batch 5: FULL, BATCH_SIZE and N counts come from the
    graph."""
    def at(batch):
        return {name: tuple(batch if d is None else d for d in shape)
                for name, shape in shapes.items()}
    model = convert_to_onnx(loss_net(layer, at(3)))
    rng = np.random.default_rng(7)
    inputs = {name: rng.uniform(0, 1, shape).astype(np.float32) for name, shape in at(5).items()}
    inputs["t"] = np.floor(inputs["t"] * 2) if "Sigmoid" in layer or "Euclid" in layer \
        else np.floor(inputs["t"] * 4)
    assert_matches_net(loss_net(layer, at(5)), inputs, model)


# -- what stays out ------------------------------------------------------------------------
def test_training_types_have_emitters():
    assert set(TYPES) <= set(EMITTERS) and not set(TYPES) & set(UNSUPPORTED)


def test_a_loss_without_an_emitter_is_still_reported(monkeypatch):
    """A loss type registered without an emitter (a user's own) is named in the report."""
    monkeypatch.setitem(LAYERS, "MysteryLoss", EuclideanLoss)
    net = loss_net('layer { name: "loss" type: "MysteryLoss" bottom: "x" bottom: "label" '
                   'top: "loss" }', {"x": (3, 4), "label": (3, 4)})
    with pytest.raises(UnknownLayerError, match="'loss' \\(MysteryLoss\\)"):
        convert_to_onnx(net)


def test_meta_inputs_are_the_graph_inputs():
    """The label a TRAIN case feeds is a graph input under the blob's name."""
    meta, _, net = case_net(CASES_DIR / "infogain_identity_prob_top")
    model = convert_to_onnx(net)
    assert [i.name for i in model.graph.input] == meta["inputs"]
    assert output_blobs(model) == {"loss": "loss", "prob": "prob"}
    assert model.graph.output[0].type.tensor_type.shape.dim == []  # a 0-d loss
