"""Read and write Caffe's files: .prototxt nets and solvers, .caffemodel weights, .binaryproto
blobs.

Every reader returns messages of our own schema (``caffe_pb2``), nets already upgraded to
today's format (:mod:`.upgrade`), and reports every problem as a
:class:`~caffelayers.errors.CaffeFormatError` naming the file and, for text, the line and
column. What the readers check beyond protobuf's own parsing:

* unknown fields and misspelt enum names, with the nearest known name (the schema has the
  fields of every Caffe fork in :mod:`.forks`; with ``allow_unknown_fields=True`` fields
  of any other fork are skipped with a warning);
* the fork spelling ``ceil_mode: true|false`` inside ``pooling_param`` is read as BVLC's
  ``round_mode: CEIL|FLOOR`` (in binary files the same number 13 holds the bool, read as
  ceil_mode only in a net numbered as OpenCV's schema; elsewhere a fork's ``ceil_mode:
  true`` reads as FLOOR, and the prototxt must be trusted);
* in binary files, field numbers that Caffe forks give different meanings: a layer's field
  is read as the one its ``type`` implies, a contested field inside another message as the
  one of the fork the net comes from, and a field that fits nothing is kept as an unknown
  field rather than refused (:mod:`.forks` has the tables and rules); files are written
  with every fork field at its fork's number. NVCaffe's ``raw_data`` blobs (FLOAT16 and
  others) are read as arrays like ``data``;
* shapes: dimensions below 0 or a blob of more than ``2**31 - 1`` elements (Caffe's limit),
  in net inputs, ``Input``/``DummyData``/``Parameter`` layers and stored blobs; a stored
  blob whose data does not fill its shape;
* a top blob produced twice other than in place, in the TRAIN or the TEST net;
* a caffemodel that does not parse (the error says at which byte, and in which layer), or
  parses to a net without layers (most non-protobuf bytes do), or holds names that are not
  UTF-8.

Numeric enum values (``operation: 1``) are valid text, as in Caffe. ``Python`` layers are read
like any other; nothing here runs them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message

from ..errors import CaffeFormatError
from ..limits import INT_MAX
from . import caffe_pb2 as pb
from .netstate import check_unique_tops, layer_included, make_state
from .text import (
    PathLike,
    Scan,
    decode_text,
    field_position,
    layer_position,
    parse_text,
    read_text,
)
from .upgrade import V0_TYPE_TO_V1, V1_TYPE_NAMES, upgrade_net, upgrade_solver
from .wire import (
    NotCaffeLayout,
    canonical_pieces,
    looks_like_text,
    open_binary,
    parse_binary,
    parse_net,
    place_index,
    raw_dtypes,
    varint,
)

__all__ = [
    "MAX_BLOB_COUNT",
    "StoredBlob",
    "array_to_blob",
    "blob_shape",
    "blob_to_array",
    "parse_binaryproto",
    "parse_caffemodel",
    "parse_prototxt",
    "parse_solver",
    "read_binaryproto",
    "read_caffemodel",
    "read_caffemodel_blobs",
    "read_net",
    "read_prototxt",
    "read_solver",
    "write_binaryproto",
    "write_caffemodel",
    "write_prototxt",
    "write_solver",
]

#: Caffe's Blob keeps its element count in an int: no blob may hold more.
MAX_BLOB_COUNT = INT_MAX


# --- public readers ---------------------------------------------------------------------

def read_prototxt(path: PathLike, allow_unknown_fields: bool = False) -> pb.NetParameter:
    """Read a text net definition, upgraded to today's format.

    Args:
        path: the .prototxt file.
        allow_unknown_fields: skip fields our schema lacks (other forks' additions) with a
            warning naming them, instead of failing.
    """
    return parse_prototxt(read_text(path), path, allow_unknown_fields)


def parse_prototxt(text: str, path: Optional[PathLike] = None,
                   allow_unknown_fields: bool = False) -> pb.NetParameter:
    """:func:`read_prototxt` for text in memory; ``path`` only names it in errors."""
    raw, scan = parse_text(text, pb.NetParameter, path, allow_unknown_fields)
    _check_net(raw, path, scan)
    file_layers = len(raw.layer) or len(raw.layers)
    net = _upgrade(raw, path, scan)
    _check_tops_per_phase(net, file_layers, path, scan)
    return net


def read_caffemodel(path: PathLike) -> pb.NetParameter:
    """Read a binary net with weights (.caffemodel), upgraded to today's format.

    The file is memory-mapped rather than read into a bytes object, so a model of several
    hundred MB costs the parsed message and little more; no 64 MB message limit applies
    (that limit belongs to protobuf's C++ stream readers, not to Python's parser).
    """
    with open_binary(path) as data:
        return parse_caffemodel(data, path)


def read_caffemodel_blobs(path: PathLike):
    """Read a caffemodel's net without the values of its blobs, and where those values are.

    Returns ``(net, blobs)``: the net as :func:`read_caffemodel` returns it (checked and
    upgraded) but with every blob's ``data``/``diff`` left out, and ``{layer name: [StoredBlob,
    ...]}`` for the layers with blobs, in Caffe's order. A :class:`StoredBlob` reads its
    values from the file when asked (:meth:`StoredBlob.read`), into a new array or straight
    into the caller's memory: a model is never held twice, nor its file mapped in memory,
    as parsing the whole message would (the message, then the arrays made from it).

    Files whose values protobuf stores otherwise than Caffe writes them (unpacked floats)
    are parsed whole, and their blobs are read from the message.
    """
    with open_binary(path) as data:
        try:
            net, places = parse_net(data, path, strip=True)
        except NotCaffeLayout:
            net = parse_caffemodel(data, path)
            return net, _by_layer_name(net, StoredBlob.from_blob, path)
    if not len(net.layer) and not len(net.layers):
        raise CaffeFormatError("no layers: this is not a Caffe model (or an empty one)", path)

    def stored(blob):
        return places[place_index(blob)].count

    def stored_blob(blob):
        place = places[place_index(blob)]
        return StoredBlob(blob_shape(blob), place.dtype, place.segments, path=path,
                          legacy=_is_legacy(blob), file_dtype=place.file_dtype)

    _check_net(net, path, None, stored)
    net = _upgrade(net, path, None)
    blobs = _by_layer_name(net, stored_blob, path)
    for layer in net.layer:
        for blob in layer.blobs:
            blob.ClearField("double_diff")  # the place marker
    return net, blobs


def _by_layer_name(net: pb.NetParameter, stored, path) -> dict:
    """``{layer name: [stored(blob), ...]}`` for the layers with blobs; two such layers with
    one name are an error (Caffe would load both in turn, the last one winning)."""
    blobs = {}
    for layer in net.layer:
        if len(layer.blobs):
            if layer.name in blobs:
                raise CaffeFormatError(f"two layers named {layer.name!r} hold blobs: which "
                                       "one the net should load is ambiguous", path)
            blobs[layer.name] = [stored(blob) for blob in layer.blobs]
    return blobs


def parse_caffemodel(data, path: Optional[PathLike] = None) -> pb.NetParameter:
    """:func:`read_caffemodel` for bytes (or any buffer) in memory."""
    net, _ = parse_net(data, path)
    if not len(net.layer) and not len(net.layers):
        raise CaffeFormatError("no layers: this is not a Caffe model (or an empty one)", path)
    _check_net(net, path, None)
    return _upgrade(net, path, None)


def read_binaryproto(path: PathLike) -> np.ndarray:
    """Read a .binaryproto blob (a mean file, an InfogainLoss H matrix) as an array.

    The array has the blob's shape (``shape { dim }``, else legacy num/channels/height/width)
    and is float32, or float64 when the blob stores ``double_data``.
    """
    with open_binary(path) as data:
        return parse_binaryproto(data, path)


def parse_binaryproto(data, path: Optional[PathLike] = None) -> np.ndarray:
    """:func:`read_binaryproto` for bytes (or any buffer) in memory."""
    blob = parse_binary(data, pb.BlobProto, path, "a blob (BlobProto)")
    if not blob.ListFields():
        raise CaffeFormatError("the blob is empty: no shape and no data", path)
    _check_blob(blob, "the blob", path)
    return blob_to_array(blob)


def read_solver(path: PathLike, allow_unknown_fields: bool = False) -> pb.SolverParameter:
    """Read a solver.prototxt; ``solver_type`` is upgraded to ``type``, inline nets too."""
    return parse_solver(read_text(path), path, allow_unknown_fields)


def parse_solver(text: str, path: Optional[PathLike] = None,
                 allow_unknown_fields: bool = False) -> pb.SolverParameter:
    """:func:`read_solver` for text in memory."""
    solver, _ = parse_text(text, pb.SolverParameter, path, allow_unknown_fields)
    for field in ("net_param", "train_net_param"):
        if solver.HasField(field):
            _check_net(getattr(solver, field), path, None)
    for net in solver.test_net_param:
        _check_net(net, path, None)
    return upgrade_solver(solver, path)


def read_net(source, allow_unknown_fields: bool = False) -> pb.NetParameter:
    """A net from whatever ``source`` is: a NetParameter, bytes, a file (text or binary,
    told apart by content), or prototxt text itself. Always upgraded."""
    if isinstance(source, Message):
        if not isinstance(source, pb.NetParameter):
            raise CaffeFormatError(f"expected a NetParameter, got a {type(source).__name__}")
        return upgrade_net(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return parse_caffemodel(source)
    if isinstance(source, str) and not os.path.exists(source) and \
            (re.search(r"[{}\n]", source) or re.match(r"\s*\w+\s*:\s", source)):
        return parse_prototxt(source, None, allow_unknown_fields)
    with open_binary(source) as data:
        if looks_like_text(data):
            text = decode_text(bytes(data), source)
            return parse_prototxt(text, source, allow_unknown_fields)
        return parse_caffemodel(data, source)


# --- blobs ------------------------------------------------------------------------------

def blob_shape(blob: pb.BlobProto) -> tuple:
    """The blob's shape: ``shape.dim`` if set, else legacy (num, channels, height, width)."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    return ()


def blob_to_array(blob: pb.BlobProto, expected_shape=None) -> np.ndarray:
    """The blob's data as a new array: float32 from ``data``, float64 from ``double_data``;
    without either, NVCaffe's ``raw_data`` of ``raw_data_type``: FLOAT16, FLOAT, INT and UINT
    as float32, DOUBLE as float64.

    Args:
        blob: a BlobProto.
        expected_shape: the shape the consumer needs. A legacy 4-D blob matches it when the
            shape, padded with leading 1s to four axes, equals (num, channels, height,
            width): an InnerProduct weight stored as 1 x 1 x N x K reads as N x K, as Caffe's
            ``Blob::ShapeEquals`` allows. Any other difference raises.

    Raises:
        CaffeFormatError: data that does not fill the shape, or a shape that does not match.
    """
    shape = blob_shape(blob)
    if len(blob.double_data):
        values = np.array(blob.double_data, dtype=np.float64)
    elif len(blob.data) or not blob.HasField("raw_data"):
        values = np.array(blob.data, dtype=np.float32)
    else:
        raw_type = blob.raw_data_type if blob.HasField("raw_data_type") else None
        (file_dtype, dtype), problem = raw_dtypes(raw_type, len(blob.raw_data))
        if problem:
            raise CaffeFormatError(f"the blob holds {problem}")
        values = np.frombuffer(blob.raw_data, dtype=file_dtype).astype(dtype)
    count = math.prod(shape)
    if values.size != count:
        raise CaffeFormatError(f"the blob has shape {_fmt_shape(shape)} ({count} values) but "
                               f"holds {values.size} values")
    if expected_shape is not None:
        expected = tuple(int(d) for d in expected_shape)
        if expected != shape and not _legacy_shape_matches(blob, shape, expected):
            raise CaffeFormatError(f"the blob has shape {_fmt_shape(shape)}, expected "
                                   f"{_fmt_shape(expected)}")
        shape = expected
    return values.reshape(shape)


class StoredBlob:
    """A caffemodel blob whose values are read when asked: from the file (a place found by
    :func:`read_caffemodel_blobs`), or from an array.

    Attributes:
        shape: the blob's shape (``shape { dim }``, else legacy num/channels/height/width).
        dtype: little-endian float32 for ``data``, float64 for ``double_data``, as the
            file stores them; for NVCaffe's ``raw_data``, float32 (FLOAT16, FLOAT, INT, UINT,
            converted as they are read) or float64 (DOUBLE). ``read(out=...)`` wants
            exactly this dtype.
        size: the number of values.
        legacy: the shape came from the legacy num/channels/height/width fields, which
            Caffe matches against a blob's shape padded with leading 1s to four axes.
    """

    def __init__(self, shape, dtype, segments=(), path=None, array=None, legacy=False,
                 file_dtype=None):
        self.shape = tuple(int(d) for d in shape)
        self.legacy = legacy
        self.dtype = np.dtype(dtype)
        self._file_dtype = self.dtype if file_dtype is None else np.dtype(file_dtype)
        self.size = math.prod(self.shape)
        self._segments = list(segments)  # (file offset, bytes): a packed field may repeat
        self._path = path
        self._array = array

    @classmethod
    def from_blob(cls, blob: pb.BlobProto) -> "StoredBlob":
        array = blob_to_array(blob)
        return cls(array.shape, array.dtype, array=array, legacy=_is_legacy(blob))

    def fits(self, shape) -> bool:
        """Caffe's ``Blob::ShapeEquals``: the same shape, or for a legacy blob the same
        (num, channels, height, width) as ``shape`` padded with leading 1s to four axes."""
        shape = tuple(int(d) for d in shape)
        if not self.legacy:
            return shape == self.shape
        return len(shape) <= 4 and (1,) * (4 - len(shape)) + shape == self.shape

    def read(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The values with the blob's shape: a new array, or written into ``out`` (a
        C-contiguous array of the blob's dtype and size, any shape) and ``out`` returned."""
        if out is None:
            out = np.empty(self.shape, self.dtype)
        elif out.dtype != self.dtype or out.size != self.size or not out.flags.c_contiguous \
                or not out.flags.writeable:
            raise ValueError(f"cannot read a {self.dtype} blob of {self.size} values into a "
                             f"{out.dtype} array of {out.size}")
        if self._array is not None:
            out.reshape(-1)[...] = self._array.reshape(-1)
            return out
        if self._file_dtype != self.dtype:  # NVCaffe's FLOAT16 (or integer) values
            stored = np.empty(self.size, self._file_dtype)
            self._read_into(stored)
            out.reshape(-1)[...] = stored
            return out
        self._read_into(out)
        return out

    def _read_into(self, out: np.ndarray) -> None:
        target = memoryview(out.reshape(-1).view(np.uint8))
        with open(self._path, "rb") as file:
            at = 0
            for offset, length in self._segments:
                file.seek(offset)
                view = target[at:at + length]
                while len(view):
                    got = file.readinto(view)
                    if not got:
                        raise CaffeFormatError("the file changed since it was read: a blob "
                                               "ends early", self._path)
                    view = view[got:]
                at += length

    def __repr__(self) -> str:
        return f"StoredBlob(shape={self.shape}, dtype={self.dtype})"


def array_to_blob(array, double: Optional[bool] = None) -> pb.BlobProto:
    """A BlobProto with ``shape { dim }`` and the array's values.

    ``double`` picks ``double_data`` (float64) over ``data`` (float32); by default float64
    arrays keep their precision and everything else is stored as float32. Caffe reads
    either into its blobs.
    """
    array = np.asarray(array)
    if double is None:
        double = array.dtype == np.float64
    values = np.ascontiguousarray(array, dtype="<f8" if double else "<f4").ravel()
    blob = pb.BlobProto()
    blob.shape.dim.extend(int(d) for d in array.shape)
    # Appending the packed field as bytes and parsing them is ~20x faster than extend().
    field = 8 if double else 5
    payload = values.tobytes()
    blob.MergeFromString(varint((field << 3) | 2) + varint(len(payload)) + payload)
    return blob


# --- writers ----------------------------------------------------------------------------

def write_prototxt(message: Message, path: PathLike) -> None:
    """Write a NetParameter (or any message) as protobuf text."""
    Path(path).write_text(text_format.MessageToString(message, as_utf8=True),
                          encoding="utf-8")


def write_solver(solver: pb.SolverParameter, path: PathLike) -> None:
    """Write a SolverParameter as protobuf text."""
    write_prototxt(solver, path)


def write_caffemodel(net: pb.NetParameter, path: PathLike) -> None:
    """Write a NetParameter (with its blobs) in binary, as Caffe's .caffemodel.

    Fields that our schema numbers privately (a fork's field at a number another fork
    uses, see :mod:`.forks`) are written at their fork's number: a MarginInnerProduct
    layer's margin_inner_product_param at SphereFace's 147, as SphereFace's Caffe reads it.
    """
    pieces = canonical_pieces(net.SerializeToString())
    with open(path, "wb") as file:
        for piece in pieces:
            file.write(piece)


def write_binaryproto(blob, path: PathLike) -> None:
    """Write a BlobProto, or an array (through :func:`array_to_blob`), as .binaryproto."""
    if not isinstance(blob, pb.BlobProto):
        blob = array_to_blob(blob)
    Path(path).write_bytes(blob.SerializeToString())


# --- checks -----------------------------------------------------------------------------

def _check_net(net: pb.NetParameter, path, scan: Optional[Scan], stored=None) -> None:
    """Names are text and every declared shape is a possible Caffe blob shape.

    ``stored(blob)`` gives the number of values a blob holds, where they are not in the
    message (:func:`read_caffemodel_blobs`); by default, the length of its data.
    """
    _check_name(net.name, "the net name", path)
    for name in net.input:
        _check_name(name, "a net input name", path)
    where_inputs = field_position(scan, ("input_dim", "input_shape", "input"))
    for i, shape in enumerate(net.input_shape):
        _check_dims(list(shape.dim), f"net input_shape {i}", path, where_inputs)
    if len(net.input_dim):
        dims = list(net.input_dim)
        for i in range(0, len(dims), 4):
            _check_dims(dims[i:i + 4], f"net input_dim values {i}..{i + 3}", path, where_inputs)
    if len(net.layer) and len(net.layers):
        raise CaffeFormatError(
            "the net has both 'layer' (today's format) and 'layers' (the V1 format) entries; "
            "Caffe refuses to mix them: write every layer in one format", path,
            *(field_position(scan, ("layers",)) or (None, None)))
    entries = list(net.layer) if len(net.layer) else list(net.layers)
    for index, layer in enumerate(entries):
        where = layer_position(scan, index)
        if isinstance(layer, pb.V1LayerParameter) and layer.HasField("layer"):
            v0 = layer.layer
            if v0.HasField("type") and v0.type != "padding" and v0.type not in V0_TYPE_TO_V1:
                raise CaffeFormatError(f"V0 layer {_name(v0)} has the unknown type {v0.type!r}; "
                                       f"known V0 types: {', '.join(sorted(V0_TYPE_TO_V1))}",
                                       path, *(where or (None, None)))
            for blob_index, blob in enumerate(v0.blobs):
                _check_blob(blob, f"V0 layer {_name(v0)} blob {blob_index}", path, where,
                            stored)
            continue
        for text in [layer.name] + list(layer.bottom) + list(layer.top):
            _check_name(text, "a layer or blob name", path, where)
        label = f"layer {layer.name!r}"
        if isinstance(layer, pb.V1LayerParameter):
            if layer.type not in V1_TYPE_NAMES:
                raise CaffeFormatError(f"V1 {label} has no layer type", path,
                                       *(where or (None, None)))
            label += f" ({V1_TYPE_NAMES[layer.type]})"
        else:
            _check_name(layer.type, "a layer type", path, where)
            label += f" ({layer.type})"
            for i, shape in enumerate(layer.input_param.shape):
                _check_dims(list(shape.dim), f"{label}: input_param shape {i}", path, where)
            if layer.HasField("parameter_param"):
                _check_dims(list(layer.parameter_param.shape.dim),
                            f"{label}: parameter_param shape", path, where)
        for i, shape in enumerate(layer.dummy_data_param.shape):
            _check_dims(list(shape.dim), f"{label}: dummy_data_param shape {i}", path, where)
        for blob_index, blob in enumerate(layer.blobs):
            _check_blob(blob, f"{label} blob {blob_index}", path, where, stored)


def _check_name(text, what: str, path, where=None) -> None:
    if not isinstance(text, str):
        raise CaffeFormatError(f"{what} is not UTF-8 text: {text!r}", path,
                               *(where or (None, None)))


def _name(v0) -> str:
    return repr(v0.name) if isinstance(v0.name, str) else "<unnamed>"


def _check_dims(dims, what: str, path, where=None) -> None:
    count = 1
    for dim in dims:
        if dim < 0:
            raise CaffeFormatError(f"{what}: dimension {dim} is negative (shape "
                                   f"{_fmt_shape(dims)})", path, *(where or (None, None)))
        count *= dim
    if count > MAX_BLOB_COUNT:
        raise CaffeFormatError(f"{what}: shape {_fmt_shape(dims)} has {count} elements, more "
                               f"than a Caffe blob can hold (2**31 - 1)", path,
                               *(where or (None, None)))


def _check_blob(blob: pb.BlobProto, what: str, path, where=None, stored=None) -> None:
    shape = blob_shape(blob)
    _check_dims(shape, what, path, where)
    count = math.prod(shape)
    stored = stored(blob) if stored is not None else _stored_count(blob)
    if isinstance(stored, str):
        raise CaffeFormatError(f"{what}: {stored}", path, *(where or (None, None)))
    if stored != count:
        raise CaffeFormatError(f"{what}: shape {_fmt_shape(shape)} needs {count} values but "
                               f"the file holds {stored}", path, *(where or (None, None)))


def _stored_count(blob: pb.BlobProto):
    """How many values a blob holds (as :func:`blob_to_array` reads them), or what is wrong
    with its NVCaffe raw values."""
    if len(blob.double_data):
        return len(blob.double_data)
    if len(blob.data) or not blob.HasField("raw_data"):
        return len(blob.data)
    raw_type = blob.raw_data_type if blob.HasField("raw_data_type") else None
    (file_dtype, _), problem = raw_dtypes(raw_type, len(blob.raw_data))
    return problem or len(blob.raw_data) // np.dtype(file_dtype).itemsize


def _is_legacy(blob: pb.BlobProto) -> bool:
    """The blob's shape is in the legacy num/channels/height/width fields."""
    return not blob.HasField("shape") and any(
        blob.HasField(f) for f in ("num", "channels", "height", "width"))


def _legacy_shape_matches(blob: pb.BlobProto, shape: tuple, expected: tuple) -> bool:
    if not _is_legacy(blob) or len(expected) > 4:
        return False
    return (1,) * (4 - len(expected)) + expected == shape


def _fmt_shape(shape) -> str:
    return " x ".join(str(d) for d in shape) or "()"


def _upgrade(net: pb.NetParameter, path, scan: Optional[Scan]) -> pb.NetParameter:
    try:
        return upgrade_net(net, path, in_place=True)
    except CaffeFormatError as error:
        # What is left to fail here is the net inputs (layers were checked before) or a V0
        # padding layer; point at the inputs, else at the start.
        where = field_position(scan, ("input", "input_shape", "input_dim")) or \
            (scan.top_fields[0][1:] if scan is not None and scan.top_fields else None)
        if error.line is None and where is not None:
            raise CaffeFormatError(error.detail, path, *where) from None
        raise


def _check_tops_per_phase(net: pb.NetParameter, file_layers: int, path,
                          scan: Optional[Scan]) -> None:
    """A top produced twice is an error in whichever phase the net is built."""
    # Upgrading put one Input layer per net input in front of the file's layers.
    inputs = len(net.layer) - file_layers
    positions = [field_position(scan, ("input",)) if i < inputs
                 else layer_position(scan, i - inputs) for i in range(len(net.layer))]
    for phase in ("TRAIN", "TEST"):
        state = make_state(net, phase)
        kept_layers, kept_positions = [], []
        for layer, position in zip(net.layer, positions):
            try:
                included = layer_included(layer, state, path)
            except CaffeFormatError as error:
                raise CaffeFormatError(error.detail, path, *(position or (None, None))) \
                    from None
            if included:
                kept_layers.append(layer)
                kept_positions.append(position)
        check_unique_tops(kept_layers, path, kept_positions)


