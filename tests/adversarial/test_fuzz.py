"""Fuzzing the readers and the shape rules: whatever the input, a ``CaffeLayersError`` (a
``CaffeFormatError`` from the file readers) or a correct result, never another exception.

* the prototxt reader, on real prototxts (``fixtures/caffe/*/net.prototxt``) with tokens
  inserted, cut, duplicated and numbers replaced by extreme ones; those that still parse go
  on through the phase filter and shape inference (``build_graph(..., device="meta")``);
* the caffemodel reader, on real caffemodels with bytes overwritten, inserted or cut; a file
  that still loads into its net must load the values it stores (never silently wrong
  weights);
* shape inference alone: one layer of a random registered type with random values in its
  parameter message (from the schema's descriptors) on random bottom shapes;
* verify's reference reader, on a real ``reference.npz`` with bytes mangled and with random
  JSON as its ``meta``;
* every reader on arbitrary bytes and text (random, and sequences of Caffe tokens).

The budget is the ``HYPOTHESIS_PROFILE`` (``adversarial-ci`` in ``make test``: derandomized
and small; ``fuzz`` in ``make fuzz``), registered in this folder's conftest.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from adversarial_harness import UNFORESEEN
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import caffelayers
from caffelayers.errors import CaffeFormatError, CaffeLayersError
from caffelayers.graph import build_graph, load_net_param
from caffelayers.layers.base import BuildContext
from caffelayers.limits import INT_MAX
from caffelayers.proto import caffe_pb2 as pb
from caffelayers.proto import io
from caffelayers.registry import LAYERS
from caffelayers.verify import load_reference

# The profiles are registered in this folder's conftest.py.
FUZZ = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "adversarial-ci")))
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
CASES = sorted(p.name for p in FIXTURES.iterdir()
               if (p / "net.prototxt").is_file() and (p / "weights.caffemodel").is_file())
# The caffemodels with parameters and below 20 KB carry the caffemodel fuzzing (a Net is
# built per example).
SMALL_CASES = [c for c in CASES if (FIXTURES / c / "weights.caffemodel").stat().st_size < 20000
               and io.read_caffemodel_blobs(FIXTURES / c / "weights.caffemodel")[1]]

_TEXT = {case: (FIXTURES / case / "net.prototxt").read_text() for case in CASES}
_MODEL = {case: (FIXTURES / case / "weights.caffemodel").read_bytes() for case in SMALL_CASES}

#: pieces of Caffe text, so that mutations get past the tokenizer into the schema.
TOKENS = ["layer {", "}", "{", ":", "name:", "type:", 'top: "x"', 'bottom: "x"', '"Input"',
          "input_param { shape { dim: 1 } }", "include { phase: TRAIN }", "phase: TEST",
          "num_output:", "kernel_size:", "stride:", "pad:", "axis:", "dim:", "tiles:",
          "engine: CUDNN", "pool: AVE", "operation: MAX", "coeff: 2", "ceil_mode: false",
          "round_mode: FLOOR", "#", "\n", '"', "\\", "\0", "\u00e9", "-", "[", "]", ",",
          "lr_mult: 0", "propagate_down: false", "loss_weight: 1", "blobs { }", "layers",
          "input", "input_dim", "input_shape", "4294967296", "1e5", "-inf", "shape", "RELU",
          "type: CONVOLUTION", "double_data", "num", "foo_param", "0x1F", "nan",
          '"\\xff"', ";", "'", "<", ">", "data", "param", "pooling_param", "ceil_mode",
          "CEIL", "pool", "MAX", "exclude", "state", "convolution_param"]
#: numbers that break size formulas.
EXTREME = ["0", "-1", "1", "3", "2147483647", "2147483648", "4294967297", "2000000000",
           "100000", "-2147483648", "1e38", "1e400", "-0", "nan", "inf", "0.5"]


@st.composite
def mutated_prototxt(draw, kinds=("number", "number", "insert", "cut", "duplicate")):
    """A fixture prototxt with 1-4 mutations: a number replaced by an extreme one, a token
    inserted, a stretch cut, a line duplicated."""
    case = draw(st.sampled_from(CASES))
    text = _TEXT[case]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        if kind == "number":
            numbers = list(re.finditer(r"(?<=: )-?[0-9][0-9.e+-]*", text))
            if numbers:
                match = draw(st.sampled_from(numbers))
                text = text[:match.start()] + draw(st.sampled_from(EXTREME)) + text[match.end():]
            continue
        position = draw(st.integers(0, len(text)))
        if kind == "insert":
            text = text[:position] + " " + draw(st.sampled_from(TOKENS)) + " " + text[position:]
        elif kind == "cut":
            text = text[:position] + text[position + draw(st.integers(1, 80)):]
        else:
            lines = text.splitlines(keepends=True)
            index = draw(st.integers(0, len(lines) - 1))
            lines.insert(index, lines[index])
            text = "".join(lines)
    return case, text


@FUZZ
@given(mutated_prototxt())
def test_mutated_prototxt_parses_or_fails_cleanly(sample):
    _, text = sample
    try:
        io.parse_prototxt(text, "net.prototxt")
    except CaffeFormatError as error:
        assert str(error).startswith("net.prototxt"), error


@FUZZ
@given(mutated_prototxt(kinds=("number", "number", "number", "duplicate")),
       st.sampled_from(["TRAIN", "TEST"]))
def test_mutated_prototxt_shapes_or_fails_cleanly(sample, phase):
    """Through the reader, the phase filter and every shape rule (no allocation); mutations
    that keep the syntax, so that most examples reach the shape rules."""
    _, text = sample
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # upgrade notes: not under test here
            net_param, _ = load_net_param(io.parse_prototxt(text, "net.prototxt"), phase)
            graph = build_graph(net_param, ctx=BuildContext(phase=phase, fill=False),
                                device="meta", strict=False)
    except CaffeLayersError as error:
        assert UNFORESEEN not in str(error), f"no precise check: {error}"
        return
    for shapes in graph.blob_shapes.values():
        if shapes is not None:
            assert all(isinstance(d, int) and d >= 0 for d in shapes), shapes
            assert math.prod(shapes) <= INT_MAX, shapes


# Arbitrary input for every reader (folded in from tests/proto/test_fuzz.py): a
# CaffeFormatError or a message, nothing else.

def _reads_or_fails_cleanly(reader, data):
    try:
        reader(data)
    except CaffeFormatError:
        pass


BLOB = (FIXTURES / "infogain_source_file" / "H.binaryproto").read_bytes()


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_caffemodel(data):
    _reads_or_fails_cleanly(io.parse_caffemodel, data)


@FUZZ
@given(st.binary(max_size=200) | st.integers(0, len(BLOB)).map(lambda n: BLOB[:n]))
def test_random_bytes_as_binaryproto(data):
    _reads_or_fails_cleanly(io.parse_binaryproto, data)


@FUZZ
@given(st.text(max_size=200))
def test_random_text_as_prototxt(text):
    _reads_or_fails_cleanly(io.parse_prototxt, text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_caffe_like_text_as_prototxt(text):
    _reads_or_fails_cleanly(io.parse_prototxt, text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipping fields warns; that is not under test here
        _reads_or_fails_cleanly(lambda t: io.parse_prototxt(t, allow_unknown_fields=True), text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join))
def test_caffe_like_text_as_solver(text):
    _reads_or_fails_cleanly(io.parse_solver, "net_param { " + text + " }")


@FUZZ
@given(st.sampled_from([b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8", b"BM",
                        b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"P6\n", b"P1"]),
       st.binary(max_size=64))
def test_image_headers_read_or_give_none(prefix, rest):
    """The header reader on cut and random headers: a size or None, never an exception."""
    from caffelayers.data.headers import declared_size

    size = declared_size(prefix + rest)
    assert size is None or (len(size) == 2 and all(isinstance(n, int) and n >= 0
                                                    for n in size))


# --- caffemodels ----------------------------------------------------------------------------

@st.composite
def mutated_caffemodel(draw):
    case = draw(st.sampled_from(SMALL_CASES))
    data = bytearray(_MODEL[case])
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["overwrite", "overwrite", "insert", "cut", "truncate"]))
        position = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=8) |
                     st.sampled_from([b"\xff" * 5 + b"\x0f", b"\x80" * 9 + b"\x01", b"\x00"]))
        if kind == "overwrite":
            data[position:position + len(patch)] = patch
        elif kind == "insert":
            data[position:position] = patch
        elif kind == "cut":
            del data[position:position + draw(st.integers(1, 64))]
        else:
            del data[max(position, 1):]
    return case, bytes(data)


def _write(data: bytes, suffix: str) -> str:
    handle, path = tempfile.mkstemp(suffix=suffix, prefix="fuzz-")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    return path


@FUZZ
@given(mutated_caffemodel())
def test_mutated_caffemodel_reads_or_fails_cleanly(sample):
    """The lazy reader and the values it promises: a CaffeFormatError naming the file, or
    blobs whose read() gives their declared shape."""
    _, data = sample
    path = _write(data, ".caffemodel")
    try:
        _, blobs = io.read_caffemodel_blobs(path)
        for stored in blobs.values():
            for blob in stored:
                assert blob.read().shape == blob.shape
    except CaffeFormatError as error:
        assert path in str(error), error
    finally:
        os.unlink(path)


@FUZZ
@given(mutated_caffemodel())
def test_mutated_caffemodel_loads_what_it_stores(sample):
    """A mangled caffemodel that still loads into its net loads exactly the values the file
    holds for every layer it names (Caffe's ShapeEquals: no reinterpreted shapes)."""
    case, data = sample
    path = _write(data, ".caffemodel")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers the mangled file lost: fillers, warned
            net = caffelayers.Net(FIXTURES / case / "net.prototxt", path)
            _, stored = io.read_caffemodel_blobs(path)
            stored = {layer: [(blob, blob.read()) for blob in blobs]
                      for layer, blobs in stored.items()}
    except CaffeLayersError as error:
        assert path in str(error), error
        return
    finally:
        os.unlink(path)
    for layer, blobs in net.caffe_params().items():
        if layer not in stored:
            continue
        for ours, (theirs, values) in zip(blobs, stored[layer]):
            assert theirs.fits(tuple(ours.shape))
            np.testing.assert_array_equal(ours.detach().numpy().reshape(-1),
                                          values.astype(np.float32).reshape(-1))


# --- shape inference ------------------------------------------------------------------------

def _param_field(type_name: str):
    """The LayerParameter field holding a type's parameters (Deconvolution uses
    convolution_param), or None."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type_name).lower()
    special = {"Deconvolution": "convolution_param", "ConvolutionDepthwise": "convolution_param",
               "DepthwiseConvolution": "convolution_param", "InfogainLossLegacy":
               "infogain_loss_param", "SoftmaxWithLoss": "softmax_param",
               "MarginHead": "margin_head_param", "BN": "bn_param", "ReLU6": "relu6_param",
               "HDF5Data": "hdf5_data_param", "LRN": "lrn_param", "MVN": "mvn_param",
               "PReLU": "prelu_param", "ELU": "elu_param", "BNLL": None}
    name = special.get(type_name, f"{snake}_param")
    fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    return name if name in fields else None


INTS = st.sampled_from([0, 1, 2, 3, 5, -1, -2, 7, 100000, 2**31 - 1, 2**31, 2**32 - 1,
                        2 * 10**9]) | st.integers(-3, 9)
FLOATS = st.sampled_from([0.0, -1.0, 0.5, 1.0, 2.0, 1e-30, 1e30, float("inf"), float("nan")])


def _value(draw, field):
    from google.protobuf.descriptor import FieldDescriptor as F

    if field.type == F.TYPE_ENUM:
        return draw(st.sampled_from([v.number for v in field.enum_type.values]))
    if field.type == F.TYPE_BOOL:
        return draw(st.booleans())
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return draw(FLOATS)
    if field.type == F.TYPE_STRING:
        return draw(st.sampled_from(["", "x", "constant", "gaussian", "../nowhere"]))
    if field.type in (F.TYPE_UINT32, F.TYPE_UINT64):
        return abs(draw(INTS)) % 2**32
    if field.type in (F.TYPE_INT32, F.TYPE_SINT32):
        return max(-2**31, min(draw(INTS), 2**31 - 1))
    if field.type in (F.TYPE_INT64, F.TYPE_SINT64):
        return draw(INTS)
    return None


def _fill(draw, message, depth: int = 0) -> None:
    """Random values for a random subset of a message's fields, from its descriptor."""
    from google.protobuf.descriptor import FieldDescriptor as F

    fields = list(message.DESCRIPTOR.fields)
    if not fields:
        return
    chosen = draw(st.lists(st.sampled_from(fields), max_size=5, unique_by=lambda f: f.name))
    for field in chosen:
        repeated = field.is_repeated if hasattr(field, "is_repeated") else \
            field.label == F.LABEL_REPEATED
        count = draw(st.integers(0, 4)) if repeated else 1
        for _ in range(count):
            if field.type == F.TYPE_MESSAGE:
                if depth >= 2:
                    break
                target = getattr(message, field.name).add() if repeated else \
                    getattr(message, field.name)
                target.SetInParent()
                _fill(draw, target, depth + 1)
                continue
            value = _value(draw, field)
            if value is None:
                continue
            if repeated:
                getattr(message, field.name).append(value)
            else:
                setattr(message, field.name, value)


# Mostly small sizes (so that layers get past their first checks), sometimes extreme ones.
DIMS = st.integers(1, 9) | st.sampled_from([0, 1, 2, 3, 5, 7, 100000, 2**31 - 1])


@st.composite
def one_layer_net(draw):
    """One layer of a random registered type on Input bottoms: mostly as many bottoms
    as the type takes and one shape shared by them, sometimes anything."""
    type_name = draw(st.sampled_from(sorted(t for t, cls in LAYERS.items()
                                            if not getattr(cls, "is_input", False))))
    least, most = LAYERS[type_name].num_bottoms
    most = least + 2 if most is None else most
    bottoms = draw(st.integers(least, max(least, min(most, 4))) | st.integers(0, 4))
    shared = draw(st.lists(DIMS, min_size=1, max_size=5))
    net = pb.NetParameter(name="fuzz")
    for index in range(bottoms):
        shape = shared if draw(st.booleans()) else draw(st.lists(DIMS, max_size=5))
        layer = net.layer.add(name=f"in{index}", type="Input", top=[f"b{index}"])
        layer.input_param.shape.add().dim.extend(shape)
    tops = draw(st.sampled_from([1, 1, 1, 2]) | st.integers(0, 3))
    layer = net.layer.add(name="probe", type=type_name, bottom=[f"b{i}" for i in range(bottoms)],
                          top=[f"t{i}" for i in range(tops)])
    field = _param_field(type_name)
    if field is not None and draw(st.integers(0, 3)):
        target = getattr(layer, field)
        target.SetInParent()
        _fill(draw, target)
    if draw(st.integers(0, 4)) == 0:
        _fill(draw, layer)  # anything else of the layer: phase rules, loss weights, ...
    return net


@FUZZ
@given(one_layer_net())
def test_random_layer_parameters_shape_or_fail_cleanly(net):
    """Every registered type's shape rule, on random parameters and bottoms, without
    allocating: a CaffeLayersError from a check of the layer's own (not an exception that
    the build's safety net turned into one), or shapes within Caffe's limits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net_param, _ = load_net_param(io.parse_prototxt(str(net)), "TEST")
            graph = build_graph(net_param, ctx=BuildContext(fill=False), device="meta")
    except CaffeLayersError as error:
        assert UNFORESEEN not in str(error), f"no precise check: {error}"
        return
    for shape in graph.blob_shapes.values():
        if shape is not None:
            assert all(isinstance(d, int) and d >= 0 for d in shape), shape
            assert math.prod(shape) <= INT_MAX, shape


# --- reference.npz --------------------------------------------------------------------------

REFERENCE = (FIXTURES / "conv_basic" / "reference.npz").read_bytes()

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                    st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) |
                    st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
META_KEYS = ["inputs", "iterations", "phase", "backward", "solver", "case", "labels"]


@st.composite
def mutated_meta(draw):
    meta = json.loads(str(np.load(FIXTURES / "conv_basic" / "reference.npz")["meta"]))
    for _ in range(draw(st.integers(1, 3))):
        meta[draw(st.sampled_from(META_KEYS) | st.text(max_size=5))] = draw(JSON)
    if draw(st.integers(0, 5)) == 0:
        return draw(JSON)
    return meta


@FUZZ
@given(st.integers(0, len(REFERENCE) - 1), st.binary(min_size=1, max_size=8),
       st.integers(1, len(REFERENCE)))
def test_mangled_reference_reads_or_fails_cleanly(position, patch, cut):
    data = (REFERENCE[:position] + patch + REFERENCE[position + len(patch):])[:cut]
    path = _write(data, ".npz")
    try:
        meta, arrays = load_reference(path)
        assert isinstance(meta, dict) and all(isinstance(v, np.ndarray) for v in arrays.values())
    except CaffeLayersError as error:
        assert path in str(error), error
    finally:
        os.unlink(path)


@FUZZ
@given(mutated_meta())
def test_random_meta_is_checked_before_use(meta):
    """A meta that load_reference accepts is one the replay can use: verify then ends in a
    result or a CaffeLayersError."""
    from caffelayers.verify import verify_case

    with tempfile.TemporaryDirectory(prefix="fuzz-case-") as folder:
        case = Path(folder)
        for name in ("net.prototxt", "weights.caffemodel"):
            (case / name).write_bytes((FIXTURES / "conv_basic" / name).read_bytes())
        with np.load(FIXTURES / "conv_basic" / "reference.npz") as archive:
            arrays = {k: archive[k] for k in archive.files}
        try:
            text = json.dumps(meta, allow_nan=True)
        except (ValueError, TypeError):
            assume(False)
        # A valid meta asking for thousands of iterations is a correct, slow replay.
        assume(not (isinstance(meta, dict) and isinstance(meta.get("iterations"), int)
                    and meta["iterations"] > 20))
        arrays["meta"] = np.array(text)
        np.savez(case / "reference.npz", **arrays)
        try:
            result = verify_case(case)
        except CaffeLayersError:
            return
        assert result.checks


def test_fuzz_targets_accept_their_unmangled_inputs():
    """The mutations start from inputs that read, build and load (so the fuzzing reaches
    past the first check)."""
    for case in SMALL_CASES[:5]:
        net = caffelayers.Net(FIXTURES / case / "net.prototxt",
                              FIXTURES / case / "weights.caffemodel")
        assert net.caffe_params()
    meta, arrays = load_reference(FIXTURES / "conv_basic")
    assert meta["inputs"] and arrays
    assert len(SMALL_CASES) >= 5 and len(CASES) >= 20
    assert io.parse_binaryproto(BLOB).size > 0
    with pytest.raises(CaffeFormatError):
        io.parse_caffemodel(pb.NetParameter(name="no layers").SerializeToString())

