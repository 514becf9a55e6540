"""No input, however mangled, makes a reader raise anything but CaffeFormatError."""

import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffelayers.errors import CaffeFormatError
from caffelayers.proto import caffe_pb2 as pb
from caffelayers.proto import io

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
MODEL = (FIXTURES / "classic_mix_deploy" / "weights.caffemodel").read_bytes()
V1_MODEL = (FIXTURES / "v1_alexnet_mini" / "weights.caffemodel").read_bytes()
PROTOTXT = (FIXTURES / "classic_mix_deploy" / "net.prototxt").read_text()
BLOB = (FIXTURES / "infogain_source_file" / "H.binaryproto").read_bytes()

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# Pieces of Caffe text, so that random sequences get past the tokenizer into the schema.
TOKENS = ["layer", "layers", "{", "}", ":", "name", "type", '"x"', '"Input"', "top", "bottom",
          "input", "input_dim", "input_shape", "dim", "-3", "7", "4294967296", "1e5", "-inf",
          "shape", "input_param", "pooling_param", "ceil_mode", "round_mode", "true", "CEIL",
          "pool", "MAX", "include", "exclude", "phase", "TRAIN", "state", "convolution_param",
          "kernel_size", "[", "]", ",", "#", "\n", " ", "'", "\\", "<", ">", "layer {", "RELU",
          "blobs", "data", "double_data", "num", "operation", "eltwise_param", "param",
          "lr_mult", "foo_param", "0x1F", "nan", "\"\\xff\"", ";", "type: CONVOLUTION"]


def _reads_or_fails_cleanly(reader, data):
    try:
        reader(data)
    except CaffeFormatError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_caffemodel(data):
    _reads_or_fails_cleanly(io.parse_caffemodel, data)


@FUZZ
@given(st.integers(0, len(MODEL) - 1), st.binary(min_size=1, max_size=8),
       st.integers(0, len(MODEL)))
def test_mangled_caffemodel(position, patch, cut):
    """A real model with a few bytes overwritten and maybe truncated."""
    data = (MODEL[:position] + patch + MODEL[position + len(patch):])[:max(cut, 1)]
    _reads_or_fails_cleanly(io.parse_caffemodel, data)


@FUZZ
@given(st.integers(0, len(V1_MODEL) - 1), st.binary(min_size=1, max_size=8))
def test_mangled_v1_caffemodel(position, patch):
    data = V1_MODEL[:position] + patch + V1_MODEL[position + len(patch):]
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
@given(st.integers(0, len(PROTOTXT)), st.integers(0, 40), st.sampled_from(TOKENS))
def test_mangled_prototxt(position, length, token):
    text = PROTOTXT[:position] + token + PROTOTXT[position + length:]
    _reads_or_fails_cleanly(io.parse_prototxt, text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join))
def test_caffe_like_text_as_solver(text):
    _reads_or_fails_cleanly(io.parse_solver, "net_param { " + text + " }")


def test_fuzz_targets_accept_good_input():
    """The targets above do parse their unmangled inputs (so the fuzzing reaches past them)."""
    assert len(io.parse_caffemodel(MODEL).layer) > 5
    assert len(io.parse_caffemodel(V1_MODEL).layer) > 5
    assert io.parse_binaryproto(BLOB).size > 0
    assert len(io.parse_prototxt(PROTOTXT).layer) > 5
    with pytest.raises(CaffeFormatError):
        io.parse_caffemodel(pb.NetParameter(name="no layers").SerializeToString())
