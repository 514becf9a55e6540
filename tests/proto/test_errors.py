"""Every bad input is a CaffeFormatError naming the file and, for text, the line and column."""

from pathlib import Path

import pytest

from caffelayers.errors import CaffeFormatError
from caffelayers.proto import caffe_pb2 as pb
from caffelayers.proto import io

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"

INPUT = 'layer {\n  name: "x"\n  type: "Input"\n  top: "x"\n  input_param { shape { dim: 2 dim: 3 } }\n}\n'

# (case id, prototxt text, message fragment (regex), line, column or None)
BAD_PROTOTXT = [
    ("unknown layer parameter", INPUT + 'layer {\n  name: "r"\n  type: "ReLU"\n  relu_parm { }\n}\n',
     r"LayerParameter has no field 'relu_parm' \(did you mean 'relu_param'\?\)", 10, 3),
    ("unknown nested field", INPUT.replace("dim: 3", "dims: 3"),
     r"BlobShape has no field 'dims' \(did you mean 'dim'\?\)", 5, 32),
    ("unknown top-level field", 'nam: "n"\n',
     r"NetParameter has no field 'nam' \(did you mean 'name'\?\)", 1, 1),
    ("unknown enum name", INPUT + 'layer {\n  name: "p"\n  pooling_param {\n    pool: AVERAGE\n  }\n}\n',
     r"PoolMethod has no value 'AVERAGE'.*allowed: MAX, AVE, STOCHASTIC", 10, 11),
    ("unknown enum number", 'layer {\n  eltwise_param { operation: 3 }\n}\n',
     r"EltwiseOp has no value 3; allowed: 0 \(PROD\), 1 \(SUM\), 2 \(MAX\)", 2, 30),
    ("string for enum", 'layer { pooling_param { pool: "MAX" } }',
     r"PoolMethod values are written without quotes: MAX", 1, 31),
    ("missing brace", INPUT + 'layer {\n  name: "r"\n', r'Expected "}"', 8, None),
    ("stray brace", INPUT + '}\n', r"Expected identifier or number, got }", 7, 1),
    ("unquoted string", 'layer {\n  type: ReLU\n}\n', r"Expected string", 2, None),
    ("quoted unknown enum", 'layer { pooling_param { pool: "MAXX" } }',
     r"PoolMethod has no value 'MAXX' \(did you mean 'MAX'\?\)", 1, 31),
    ("value out of range", 'layer {\n  convolution_param { num_output: -4 }\n}\n',
     r"out of range", 2, None),
    ("singular field twice", 'name: "a"\nname: "b"\n', r"name", 2, None),
    ("negative input dim", INPUT.replace("dim: 3", "dim: -3"),
     r"layer 'x' \(Input\): input_param shape 0: dimension -3 is negative", 1, 1),
    ("absurd input dim", INPUT.replace("dim: 3", "dim: 4294967296"),
     r"more than a Caffe blob can hold", 1, 1),
    ("absurd element count", INPUT.replace("dim: 3", "dim: 100000 dim: 100000"),
     r"shape 2 x 100000 x 100000 has 20000000000 elements", 1, 1),
    ("negative net input_dim", 'input: "d"\ninput_dim: 1\ninput_dim: -3\ninput_dim: 4\ninput_dim: 4\n',
     r"input_dim.*dimension -3 is negative", 1, 1),
    ("negative net input_shape", 'name: "n"\ninput: "d"\ninput_shape { dim: -1 }\n',
     r"input_shape 0: dimension -1 is negative", 2, 1),
    ("negative dummy data dim", 'name: "n"\n\nlayer { name: "dd" type: "DummyData" top: "d" '
     'dummy_data_param { shape { dim: 2 dim: -1 } } }\n',
     r"dummy_data_param shape 0: dimension -1", 3, 1),
    ("input_dim count", 'name: "n"\ninput: "d"\ninput_dim: 1\ninput_dim: 3\n',
     r"'input_dim' takes four values", 2, 1),
    ("duplicate top", INPUT + 'layer {\n  name: "a"\n  type: "ReLU"\n  bottom: "x"\n  top: "y"\n}\n'
     'layer {\n  name: "b"\n  type: "Sigmoid"\n  bottom: "x"\n  top: "y"\n}\n',
     r"layer 'b' \(Sigmoid\): top blob 'y' is already produced by layer 'a'", 13, 1),
    ("duplicate top in one phase", INPUT + 'layer {\n  name: "a"\n  top: "y"\n  include { phase: TRAIN }\n}\n'
     'layer {\n  name: "b"\n  top: "y"\n}\n',
     r"top blob 'y' is already produced by layer 'a'", 12, 1),
    ("duplicate net input", 'input: "x"\ninput_shape { dim: 1 }\n' + INPUT,
     r"top blob 'x' is already produced by layer 'x'", 3, 1),
    ("include and exclude", INPUT + 'layer {\n  name: "r"\n  include { phase: TRAIN }\n'
     '  exclude { stage: "s" }\n}\n', r"both 'include' and 'exclude'", 7, 1),
    ("layer and layers", INPUT + 'layers { name: "r" type: RELU }\n', r"both 'layer'.*'layers'",
     7, 1),
    ("V1 layer without type", 'layers {\n  name: "a"\n  type: RELU\n}\nlayers {\n  name: "r"\n}\n',
     r"V1 layer 'r' has no layer type", 5, 1),
    ("V0 unknown type", 'name: "v0"\n  layers { layer { name: "c" type: "convolution" } }',
     r"V0 layer 'c' has the unknown type 'convolution'", 2, 3),
]


@pytest.mark.parametrize("text, fragment, line, column",
                         [case[1:] for case in BAD_PROTOTXT],
                         ids=[case[0] for case in BAD_PROTOTXT])
def test_bad_prototxt(tmp_path, text, fragment, line, column):
    path = tmp_path / "bad_net.prototxt"
    path.write_text(text)
    with pytest.raises(CaffeFormatError, match=fragment) as info:
        io.read_prototxt(path)
    error = info.value
    assert error.path == str(path) and str(path) in str(error)
    assert error.line == line, str(error)
    if column is not None:
        assert error.column == column, str(error)
    assert f"bad_net.prototxt:{line}:" in str(error)


def test_good_inputs_next_to_the_bad_ones():
    """The same texts without their mistake parse (so the table tests the mistake)."""
    io.parse_prototxt(INPUT)
    io.parse_prototxt(INPUT + 'layer {\n  name: "p"\n  pooling_param {\n    pool: AVE\n  }\n}\n')
    io.parse_prototxt('layer {\n  eltwise_param { operation: 2 }\n}\n')
    io.parse_prototxt('input: "d"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 4\ninput_dim: 4\n')
    io.parse_prototxt(INPUT.replace("dim: 3", "dim: 0"))  # empty blobs are allowed
    io.parse_prototxt(INPUT + 'layer {\n  name: "a"\n  top: "y"\n  include { phase: TRAIN }\n}\n'
                      'layer {\n  name: "b"\n  top: "y"\n  include { phase: TEST }\n}\n')


def test_missing_files(tmp_path):
    missing = tmp_path / "nowhere.prototxt"
    for reader in (io.read_prototxt, io.read_caffemodel, io.read_binaryproto, io.read_solver,
                   io.read_net):
        with pytest.raises(CaffeFormatError, match="cannot read the file") as info:
            reader(missing)
        assert info.value.path == str(missing)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(CaffeFormatError, match="cannot read"):
        io.read_caffemodel(tmp_path)


def test_binary_file_as_prototxt():
    path = FIXTURES / "conv_basic" / "weights.caffemodel"
    with pytest.raises(CaffeFormatError) as info:
        io.read_prototxt(path)
    assert info.value.path == str(path) and info.value.line is not None


@pytest.fixture
def model_bytes():
    return (FIXTURES / "conv_basic" / "weights.caffemodel").read_bytes()


def _write(tmp_path, data, name="bad.caffemodel"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("mangle, fragment", [
    (lambda data: data[:len(data) // 2], "do not parse"),           # truncated
    (lambda data: data[:-3], "do not parse"),
    (lambda data: b"", "empty"),
    (lambda data: b"\x00" * 64, "do not parse"),
    (lambda data: b"GIF89a not a model at all", "no layers|do not parse"),
    (lambda data: b"name: \"a text net\"\n", "no layers|do not parse"),
    (lambda data: data[:2] + b"\xff" + data[3:], "do not parse|no layers|UTF-8"),
])
def test_bad_caffemodel(tmp_path, model_bytes, mangle, fragment):
    path = _write(tmp_path, mangle(model_bytes))
    with pytest.raises(CaffeFormatError, match=fragment) as info:
        io.read_caffemodel(path)
    assert info.value.path == str(path)


def test_prototxt_as_caffemodel():
    path = FIXTURES / "conv_basic" / "net.prototxt"
    with pytest.raises(CaffeFormatError) as info:
        io.read_caffemodel(path)
    assert info.value.path == str(path)


def _model_with_blob(blob):
    net = pb.NetParameter()
    net.layer.add(name="fc", type="InnerProduct").blobs.append(blob)
    return net.SerializeToString()


@pytest.mark.parametrize("blob, fragment", [
    (pb.BlobProto(shape=pb.BlobShape(dim=[2, 3]), data=[1.0] * 5), "shape 2 x 3 needs 6 values but the file holds 5"),
    (pb.BlobProto(shape=pb.BlobShape(dim=[2, -3]), data=[]), "dimension -3 is negative"),
    (pb.BlobProto(shape=pb.BlobShape(dim=[2 ** 40]), data=[]), "shape 1099511627776 has .* more than a Caffe blob"),
    (pb.BlobProto(num=-1, channels=1, height=1, width=1), "dimension -1 is negative"),
    (pb.BlobProto(shape=pb.BlobShape(dim=[4]), double_data=[1.0] * 3), "shape 4 needs 4 values but the file holds 3"),
])
def test_bad_blob_in_caffemodel(tmp_path, blob, fragment):
    path = _write(tmp_path, _model_with_blob(blob))
    with pytest.raises(CaffeFormatError, match=fr"layer 'fc' \(InnerProduct\) blob 0: {fragment}"):
        io.read_caffemodel(path)


def test_non_utf8_names_in_caffemodel(tmp_path):
    # Field 1 (name) of a layer holding the bytes ff fe: protobuf keeps them as bytes.
    layer = b"\x0a\x02\xff\xfe"
    path = _write(tmp_path, b"\xa2\x06" + bytes([len(layer)]) + layer)
    with pytest.raises(CaffeFormatError, match="not UTF-8"):
        io.read_caffemodel(path)


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty"),
    (b"\x3a\x05\x08", "do not parse"),
    (pb.BlobProto(shape=pb.BlobShape(dim=[3]), data=[1, 2]).SerializeToString(), "needs 3"),
    (pb.BlobProto(shape=pb.BlobShape(dim=[-3])).SerializeToString(), "negative"),
])
def test_bad_binaryproto(tmp_path, data, fragment):
    path = _write(tmp_path, data, "bad.binaryproto")
    with pytest.raises(CaffeFormatError, match=fragment) as info:
        io.read_binaryproto(path)
    assert info.value.path == str(path)


def test_non_utf8_prototxt(tmp_path):
    path = tmp_path / "latin1.prototxt"
    path.write_bytes(b'name: "caf\xe9"\n')
    with pytest.raises(CaffeFormatError, match="not UTF-8") as info:
        io.read_prototxt(path)
    assert (info.value.line, info.value.column) == (1, 11)


def test_bad_solver(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text('base_lr: 0.1\nlr_polcy: "step"\n')
    with pytest.raises(CaffeFormatError, match=r"did you mean 'lr_policy'") as info:
        io.read_solver(path)
    assert (info.value.path, info.value.line) == (str(path), 2)


def test_blob_to_array_count_mismatch():
    with pytest.raises(CaffeFormatError, match="holds 2 values"):
        io.blob_to_array(pb.BlobProto(shape=pb.BlobShape(dim=[3]), data=[1, 2]))


def test_error_is_a_caffelayers_error():
    from caffelayers.errors import CaffeLayersError
    with pytest.raises(CaffeLayersError):
        io.parse_prototxt("layer {")
