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
import mmap
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from google.protobuf import descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError, Message

from ..errors import CaffeFormatError, CaffeLayersError, nearest_name
from ..limits import check_bytes
from . import caffe_pb2 as pb
from . import forks
from .netstate import check_unique_tops, layer_included, make_state
from .upgrade import (V0_TYPE_TO_V1, V1_TYPE_NAMES, caller_stacklevel, upgrade_net,
                      upgrade_solver)

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

PathLike = Union[str, os.PathLike]

#: Caffe's Blob keeps its element count in an int: no blob may hold more.
MAX_BLOB_COUNT = 2 ** 31 - 1


# --- public readers ---------------------------------------------------------------------

def read_prototxt(path: PathLike, allow_unknown_fields: bool = False) -> pb.NetParameter:
    """Read a text net definition, upgraded to today's format.

    Args:
        path: the .prototxt file.
        allow_unknown_fields: skip fields our schema lacks (other forks' additions) with a
            warning naming them, instead of failing.
    """
    return parse_prototxt(_read_text(path), path, allow_unknown_fields)


def parse_prototxt(text: str, path: Optional[PathLike] = None,
                   allow_unknown_fields: bool = False) -> pb.NetParameter:
    """:func:`read_prototxt` for text in memory; ``path`` only names it in errors."""
    raw, scan = _parse_text(text, pb.NetParameter, path, allow_unknown_fields)
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
    with _open_binary(path) as data:
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
    with _open_binary(path) as data:
        try:
            net, places = _parse_net(data, path, strip=True)
        except _NotCaffeLayout:
            net = parse_caffemodel(data, path)
            return net, _by_layer_name(net, StoredBlob.from_blob, path)
    if not len(net.layer) and not len(net.layers):
        raise CaffeFormatError("no layers: this is not a Caffe model (or an empty one)", path)

    def stored(blob):
        return places[_place_index(blob)].count

    def stored_blob(blob):
        place = places[_place_index(blob)]
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
    net, _ = _parse_net(data, path)
    if not len(net.layer) and not len(net.layers):
        raise CaffeFormatError("no layers: this is not a Caffe model (or an empty one)", path)
    _check_net(net, path, None)
    return _upgrade(net, path, None)


def read_binaryproto(path: PathLike) -> np.ndarray:
    """Read a .binaryproto blob (a mean file, an InfogainLoss H matrix) as an array.

    The array has the blob's shape (``shape { dim }``, else legacy num/channels/height/width)
    and is float32, or float64 when the blob stores ``double_data``.
    """
    with _open_binary(path) as data:
        return parse_binaryproto(data, path)


def parse_binaryproto(data, path: Optional[PathLike] = None) -> np.ndarray:
    """:func:`read_binaryproto` for bytes (or any buffer) in memory."""
    blob = _parse_binary(data, pb.BlobProto, path, "a blob (BlobProto)")
    if not blob.ListFields():
        raise CaffeFormatError("the blob is empty: no shape and no data", path)
    _check_blob(blob, "the blob", path)
    return blob_to_array(blob)


def read_solver(path: PathLike, allow_unknown_fields: bool = False) -> pb.SolverParameter:
    """Read a solver.prototxt; ``solver_type`` is upgraded to ``type``, inline nets too."""
    return parse_solver(_read_text(path), path, allow_unknown_fields)


def parse_solver(text: str, path: Optional[PathLike] = None,
                 allow_unknown_fields: bool = False) -> pb.SolverParameter:
    """:func:`read_solver` for text in memory."""
    solver, _ = _parse_text(text, pb.SolverParameter, path, allow_unknown_fields)
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
    with _open_binary(source) as data:
        if _looks_like_text(data):
            text = _decode(bytes(data), source)
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
        (file_dtype, dtype), problem = _raw_dtypes(raw_type, len(blob.raw_data))
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
    blob.MergeFromString(_varint((field << 3) | 2) + _varint(len(payload)) + payload)
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
    pieces = _canonical_pieces(net.SerializeToString())
    with open(path, "wb") as file:
        for piece in pieces:
            file.write(piece)


def write_binaryproto(blob, path: PathLike) -> None:
    """Write a BlobProto, or an array (through :func:`array_to_blob`), as .binaryproto."""
    if not isinstance(blob, pb.BlobProto):
        blob = array_to_blob(blob)
    Path(path).write_bytes(blob.SerializeToString())


# --- text parsing -----------------------------------------------------------------------

#: Parsing text costs up to this many bytes of memory per byte of the file (protobuf's
#: tokenizer and our position scan, measured on a prototxt that is one long quoted string).
_TEXT_COST = 250


def _read_text(path: PathLike) -> str:
    try:
        size = _regular_size(path)
        check_bytes(size * _TEXT_COST, f"parsing this {size:,}-byte text file")
        data = Path(path).read_bytes()
    except OSError as error:
        raise CaffeFormatError(f"cannot read the file: {error.strerror or error}", path) \
            from None
    except CaffeLayersError as error:
        raise CaffeFormatError(str(error), path) from None
    return _decode(data, path)


def _regular_size(path: PathLike) -> int:
    """The size of a regular file; anything else (a FIFO, a device, a folder) would block or
    never end, and is refused."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if \
            stat.S_ISFIFO(info.st_mode) else "a special file"
        raise CaffeLayersError(f"cannot read {kind}: expected a regular file")
    return info.st_size


def _decode(data: bytes, path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise CaffeFormatError("not UTF-8 text (is this a binary file such as a "
                               ".caffemodel?)", path, line, column) from None


class _Scan:
    """What the pre-scan of a text message found (see :func:`_scan_text`)."""

    def __init__(self):
        self.top_fields = []   # (name, line, column) of each top-level field, in order
        self.unknown = []      # (field name, message type, line, column)
        self.edits = []        # (start, end, replacement) in the text


_TOKEN = re.compile(r"""
    (?P<newline>\n) | (?P<space>[ \t\r\f\v]+) | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<word>[-+]?(?:\d[\w.]*(?:[eE][-+]?\d+)?|\.\d[\w.]*|[A-Za-z_]\w*))
  | (?P<punct>[{}<>\[\]:,;])
  | (?P<other>.)
""", re.VERBOSE)

_CEIL_MODE = {"true": "CEIL", "True": "CEIL", "t": "CEIL", "1": "CEIL",
              "false": "FLOOR", "False": "FLOOR", "f": "FLOOR", "0": "FLOOR"}


def _tokens(text: str):
    """(kind, text, start, end, line, column) of each significant token."""
    line, line_start = 1, 0
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "newline":
            line, line_start = line + 1, match.end()
        elif kind not in ("space", "comment"):
            yield kind, match.group(), match.start(), match.end(), line, \
                match.start() - line_start + 1


def _scan_text(text: str, descriptor) -> _Scan:
    """Walk the text's field names against the schema, without building the message.

    Finds unknown fields (for warnings and nearest names), the position of each top-level
    field (so that later errors can point at a layer) and the fork spelling ``ceil_mode``.
    Text it cannot follow is left to protobuf's parser, which reports it.
    """
    scan = _Scan()
    tokens = list(_tokens(text))
    # Each frame is a message descriptor, None inside an unknown field's value, or a
    # ("list", field descriptor) inside [ ... ].
    stack = [descriptor]
    i = 0
    while i < len(tokens):
        kind, value, start, end, line, column = tokens[i]
        frame = stack[-1]
        if value in ("}", ">", "]"):
            if len(stack) == 1:
                break
            stack.pop()
            i += 1
            continue
        if value in (",", ";"):
            i += 1
            continue
        if isinstance(frame, tuple):  # a list element
            field = frame[1]
            if value in ("{", "<"):
                stack.append(field.message_type if field is not None else None)
            i += 1
            continue
        if kind != "word":
            break
        field = None
        if frame is not None:
            field = frame.fields_by_name.get(value)
            if field is None:
                if frame.full_name == "caffe.PoolingParameter" and value == "ceil_mode":
                    i = _rewrite_ceil_mode(tokens, i, scan)
                    continue
                scan.unknown.append((value, frame.full_name, line, column))
            elif len(stack) == 1:
                scan.top_fields.append((value, line, column))
        i += 1
        if i < len(tokens) and tokens[i][1] == ":":
            i += 1
        if i >= len(tokens):
            break
        opener = tokens[i][1]
        if opener in ("{", "<"):
            stack.append(field.message_type if field is not None else None)
            i += 1
        elif opener == "[":
            stack.append(("list", field))
            i += 1
        else:
            i += 1
            while i < len(tokens) and tokens[i][0] == "string" and tokens[i - 1][0] == "string":
                i += 1
    return scan


def _rewrite_ceil_mode(tokens, i, scan) -> int:
    """Turn ``ceil_mode: true|false`` at token ``i`` into ``round_mode: CEIL|FLOOR``."""
    name = tokens[i]
    j = i + 1
    if j < len(tokens) and tokens[j][1] == ":":
        j += 1
    if j < len(tokens) and tokens[j][1] in _CEIL_MODE:
        scan.edits.append((name[2], name[3], "round_mode"))
        scan.edits.append((tokens[j][2], tokens[j][3], _CEIL_MODE[tokens[j][1]]))
        return j + 1
    # Anything else is left for the parser to report against the field's name.
    scan.unknown.append(("ceil_mode", "caffe.PoolingParameter", name[4], name[5]))
    return i + 1


def _parse_text(text: str, message_class, path, allow_unknown_fields: bool):
    scan = _scan_text(text, message_class.DESCRIPTOR)
    for start, end, replacement in sorted(scan.edits, reverse=True):
        # Same line, same place: positions in errors still match the file.
        text = text[:start] + replacement + text[end:]
    message = message_class()
    try:
        with warnings.catch_warnings():
            # Python's protobuf accepts unknown escapes such as "\c" with a warning of its own.
            warnings.simplefilter("ignore", DeprecationWarning)
            text_format.Parse(text, message, allow_unknown_field=allow_unknown_fields)
    except text_format.ParseError as error:
        raise _text_error(error, path) from None
    except (ValueError, OverflowError, RecursionError) as error:
        # A few malformed values escape ParseError in some protobuf versions.
        raise CaffeFormatError(f"malformed text: {error}", path) from None
    if allow_unknown_fields and scan.unknown:
        listing = ", ".join(f"{name!r} in {_short(type_)} (line {line})"
                            for name, type_, line, _ in scan.unknown)
        warnings.warn(f"{path or '<input>'}: skipped fields that Caffe's schema lacks: "
                      f"{listing}", stacklevel=caller_stacklevel())
    return message, scan


_UNKNOWN_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_UNKNOWN_ENUM_NAME = re.compile(r'Enum type "([\w.]+)" has no value named ("?)(\w+)')
_UNKNOWN_ENUM_NUMBER = re.compile(r'Enum type "([\w.]+)" has no value with number (-?\d+)')
_LOCATION = re.compile(r"^\d+:\d+ : (?:'.*?': )?", re.DOTALL)


#: A file of the other kind, told by its first field the schema lacks: (its message, what
#: it is, what was expected, what to do).
_OTHER_KIND = {
    "caffe.NetParameter": (pb.SolverParameter, "a solver definition (SolverParameter)",
                           "a net", ("give the net file it names (its 'net' or 'train_net'), "
                                     "or give the solver to 'caffelayers train'")),
    "caffe.SolverParameter": (pb.NetParameter, "a net definition (NetParameter)", "a solver",
                              "write a solver.prototxt whose 'net' names this file"),
}


def _text_error(error: text_format.ParseError, path) -> CaffeFormatError:
    """Our error for protobuf's, with its line and column and a nearest-name hint."""
    message = str(error)
    detail = _LOCATION.sub("", message, count=1)
    pool = descriptor_pool.Default()
    match = _UNKNOWN_FIELD.search(message)
    if match:
        type_name, field = match.groups()
        known = pool.FindMessageTypeByName(type_name).fields_by_name
        detail = (f"{_short(type_name)} has no field {field!r}{nearest_name(field, known)}; "
                  "fields from other Caffe forks can be skipped with allow_unknown_fields")
        other = _OTHER_KIND.get(type_name)
        if other and field in other[0].DESCRIPTOR.fields_by_name:
            detail = f"this is {other[1]}, not {other[2]} (it sets {field!r}): {other[3]}"
    match = _UNKNOWN_ENUM_NAME.search(message)
    if match:
        type_name, quote, value = match.groups()
        names = [v.name for v in pool.FindEnumTypeByName(type_name).values]
        if quote and value in names:
            detail = f"{_short(type_name)} values are written without quotes: {value}"
        else:
            detail = (f"{_short(type_name)} has no value {value!r}"
                      f"{nearest_name(value, names)}; allowed: {', '.join(names)}")
    match = _UNKNOWN_ENUM_NUMBER.search(message)
    if match:
        type_name, number = match.groups()
        values = pool.FindEnumTypeByName(type_name).values
        allowed = ", ".join(f"{v.number} ({v.name})" for v in values)
        detail = f"{_short(type_name)} has no value {number}; allowed: {allowed}"
    line = error.GetLine() if hasattr(error, "GetLine") else None
    column = error.GetColumn() if hasattr(error, "GetColumn") else None
    return CaffeFormatError(detail, path, line, column)


def _short(type_name: str) -> str:
    return type_name[len("caffe."):] if type_name.startswith("caffe.") else type_name


# --- binary parsing ---------------------------------------------------------------------

class _open_binary:
    """Context manager giving a file's bytes as a read-only memory map (bytes if empty)."""

    def __init__(self, path):
        self.path = path
        self.file = self.map = self.view = None

    def __enter__(self):
        try:
            _regular_size(self.path)  # before open(): opening a FIFO blocks
            self.file = open(self.path, "rb")
            size = os.fstat(self.file.fileno()).st_size
        except CaffeLayersError as error:
            raise CaffeFormatError(str(error), self.path) from None
        except OSError as error:
            self.close()
            raise CaffeFormatError(f"cannot read the file: {error.strerror or error}",
                                   self.path) from None
        if size == 0:
            return b""
        self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        self.view = memoryview(self.map)
        return self.view

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self.view is not None:
            self.view.release()
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass  # a slice of the view is still alive; the map closes when it is freed
        if self.file is not None:
            self.file.close()


def _parse_binary(data, message_class, path, what: str):
    if not len(data):
        raise CaffeFormatError(f"the file is empty, not {what}", path)
    message = message_class()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise CaffeFormatError(f"not {what}: the bytes do not parse as protobuf "
                               f"({error}); truncated or another kind of file?", path) from None
    return message


class _NotCaffeLayout(Exception):
    """Blob values not laid out as Caffe writes them (unpacked floats): the file is parsed
    whole instead of having its values left in the file."""


class _Malformed(Exception):
    """The bytes break protobuf's encoding at ``offset``."""

    def __init__(self, offset: int, detail: str):
        super().__init__(detail)
        self.offset, self.detail = offset, detail


_LAYER = pb.LayerParameter.DESCRIPTOR
_V1 = pb.V1LayerParameter.DESCRIPTOR
_V0 = pb.V0LayerParameter.DESCRIPTOR
# Where blobs sit in a serialized net: (message, field number) of a BlobProto.
_BLOB_FIELDS = {(_LAYER.full_name, 7), (_V1.full_name, 6), (_V0.full_name, 50)}
_WALK = forks.RELEVANT
_WALK_STRIP = forks.RELEVANT | {_LAYER.full_name, _V1.full_name, _V0.full_name}
_FLOAT_DATA, _FLOAT_DIFF, _DOUBLE_DATA, _DOUBLE_DIFF = 5, 6, 8, 9  # BlobProto's values
_RAW_DATA_TYPE, _RAW_DATA, _RAW_DIFF = 10, 12, 13                  # NVCaffe's
#: NVCaffe's raw blob types: Type -> (dtype in the file, dtype of the array read).
_RAW_DTYPES = {
    pb.FLOAT: ("<f4", "<f4"), pb.FLOAT16: ("<f2", "<f4"), pb.DOUBLE: ("<f8", "<f8"),
    pb.INT: ("<i4", "<f4"), pb.UINT: ("<u4", "<f4"),
}
_NVCAFFE_NET = frozenset(forks.FIELD_NUMBERS[forks.NVCAFFE]["NetParameter"].values())
_NVCAFFE_BLOB = frozenset(forks.FIELD_NUMBERS[forks.NVCAFFE]["BlobProto"].values())


def _varint_at(data, pos: int, end: int):
    start, value, shift = pos, 0, 0
    while True:
        if pos >= end:
            raise _Malformed(start, "a number runs past the end of its message")
        if shift > 63:
            raise _Malformed(start, "a number longer than 10 bytes")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip(data, number: int, wire: int, pos: int, end: int, at: int, depth: int = 0) -> tuple:
    """``(payload start, end)`` of a field's value that starts at ``pos``."""
    if wire == 0:
        return pos, _varint_at(data, pos, end)[1]
    if wire == 1:
        return pos, pos + 8
    if wire == 5:
        return pos, pos + 4
    if wire == 2:
        length, body = _varint_at(data, pos, end)
        return body, body + length
    if wire == 3:  # a group: fields up to the matching end-group key
        if depth >= 100:  # as protobuf's own recursion limit
            raise _Malformed(at, "groups nested more than 100 deep")
        while True:
            if pos >= end:
                raise _Malformed(at, f"group {number} does not end")
            key_at = pos
            key, pos = _varint_at(data, pos, end)
            if key & 7 == 4:
                if key >> 3 != number:
                    raise _Malformed(key_at, f"group {number} ends as group {key >> 3}")
                return pos, pos
            _, pos = _skip(data, key >> 3, key & 7, pos, end, key_at, depth + 1)
    raise _Malformed(at, f"field {number} has the invalid wire type {wire}")


def _fields(data, start: int, end: int):
    """``(number, wire type, key offset, value offset, payload offset, end)`` of each field
    of the message ``data[start:end]``; the payload of a length-delimited field follows its
    length."""
    pos = start
    while pos < end:
        key, value_at = _varint_at(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed(pos, "a field numbered 0")
        body, after = _skip(data, number, wire, value_at, end, pos)
        if after > end:
            raise _Malformed(pos, f"field {number} claims {after - body} bytes, past the end of "
                                  f"its message by {after - end}")
        yield number, wire, pos, value_at, body, after
        pos = after


class _Layer:
    """Where a layer is in a file and what it is called, for messages and decisions."""

    __slots__ = ("index", "offset", "number", "name", "type")

    def __init__(self, index: int, offset: int, number: int):
        self.index, self.offset, self.number = index, offset, number
        self.name = self.type = ""

    def describe(self) -> str:
        name = repr(self.name) if self.name else "(no name)"
        return f"layer {self.index} {name}" + (f" ({self.type})" if self.type else "")


def _text_of(data, body: int, after: int) -> str:
    return bytes(data[body:after]).decode("utf-8", "replace")


_CLASSES: dict = {}


def _fits(field, wire: int, content) -> bool:
    """Whether a field's bytes are what its declared type holds (wire types are checked
    before)."""
    if wire != 2:
        return True
    if field.message_type is not None:
        cls = _CLASSES.get(field.message_type.full_name)
        if cls is None:
            cls = _CLASSES[field.message_type.full_name] = \
                message_factory.GetMessageClass(field.message_type)
        try:
            cls.FromString(bytes(content))
        except (DecodeError, RuntimeError, ValueError):
            return False
        return True
    if field.type == field.TYPE_STRING:
        try:
            bytes(content).decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


class _NetReader:
    """A serialized NetParameter cut into pieces that protobuf parses with our schema.

    Fields that Caffe forks number otherwise are renumbered to our schema's numbers, as
    :func:`forks.decide` rules (by the layer's type, or the fork the net comes from); fields
    nothing fits keep their number, or move to ``forks.UNKNOWN_BASE + number`` where that
    number is another field of ours, and stay unknown. Only the messages on the way to such
    a field are rewritten; the rest of the file is handed to protobuf as it is.

    With ``strip``, every blob also loses its values: it keeps its shape and gets
    ``double_diff: [i]`` (a field no caffemodel needs), ``i`` indexing :attr:`places`.
    """

    def __init__(self, data, strip: bool = False):
        self.data = data
        self.strip = strip
        self.places: list = []
        self.where: Optional[_Layer] = None   # the layer being read, for errors
        self._walk = _WALK_STRIP if strip else _WALK

    def top(self) -> list:
        """The fields of the net (``_fields``' tuples), its layers found (:attr:`layers`)."""
        data, end = self.data, len(self.data)
        top = []
        try:
            for field in _fields(data, 0, end):
                top.append(field)
        except _Malformed as error:
            count = sum(1 for number, wire, *_ in top if wire == 2 and number in (100, 2))
            self.where = self._partial(error.offset, count)
            raise
        return top

    def net_fork(self, top) -> Optional[str]:
        """The fork whose Caffe wrote the net (:func:`forks.net_fork`); fills :attr:`layers`
        (``{offset of a layer field: _Layer}``)."""
        signals, layers = [], {}
        for number, wire, at, _, body, after in top:
            if wire == 2 and number in (100, 2):
                layers[at] = self._scan(number, at, body, after, len(layers), signals)
            elif number in _NVCAFFE_NET:
                signals.append((forks.NVCAFFE,))
        self.where = None
        self.layers = layers
        return forks.net_fork(signals)

    def pieces(self):
        """``[(start, end, bytes, layer or None)]``: consecutive pieces of the message,
        each the original ``data[start:end]`` or a rewritten top-level field."""
        data, end = self.data, len(self.data)
        top = self.top()
        fork = self.net_fork(top)
        tiers = (frozenset({fork}),) if fork else ()
        layers = self.layers
        out, run = [], 0
        for number, _, at, _, body, after in top:
            layer = layers.get(at)
            if layer is None:
                continue
            self.where = layer
            if number == 100:
                new = self._message(_LAYER, body, after, tiers, layer.type)
            elif _V1.full_name in self._walk:
                new = self._message(_V1, body, after, tiers, None)
            else:
                new = None
            if new is not None:
                if run < at:
                    out.append((run, at, data[run:at], None))
                out.append((at, after, bytes(_varint((number << 3) | 2) + _varint(len(new)))
                            + new, layer))
                run = after
        self.where = None
        if run < end:
            out.append((run, end, data[run:end], None))
        return out

    def _partial(self, at: int, index: int) -> Optional[_Layer]:
        """The layer whose key is at ``at`` in a file that ends (or breaks) inside it, with
        the name and type that can still be read."""
        data, end = self.data, len(self.data)
        try:
            key, pos = _varint_at(data, at, end)
            if key not in ((100 << 3) | 2, (2 << 3) | 2):
                return None
            length, start = _varint_at(data, pos, end)
        except _Malformed:
            return None
        layer = _Layer(index, at, key >> 3)
        name_field, type_field = (1, 2) if layer.number == 100 else (4, 5)
        try:
            for field, wire, _, _, body, after in _fields(data, start,
                                                          min(start + length, end)):
                if field == name_field and wire == 2:
                    layer.name = _text_of(data, body, after)
                elif field == type_field and wire == 2 and layer.number == 100:
                    layer.type = _text_of(data, body, after)
        except _Malformed:
            pass
        return layer

    def _scan(self, number: int, at: int, start: int, end: int, index: int, signals) -> _Layer:
        """A layer's name and type, and what it shows of its fork."""
        data = self.data
        layer = _Layer(index, at, number)
        self.where = layer
        fields = list(_fields(data, start, end))
        name_field, type_field = (1, 2) if number == 100 else (4, 5)
        for field, wire, _, value_at, body, after in fields:
            if field == name_field and wire == 2:
                layer.name = _text_of(data, body, after)
            elif field == type_field and number == 100 and wire == 2:
                layer.type = _text_of(data, body, after)
            elif field == type_field and wire == 0:
                layer.type = V1_TYPE_NAMES.get(_varint_at(data, value_at, after)[0], "")
        _layer_signals(data, layer.type, [(f[0], f[1], f[4], f[5]) for f in fields]
                        if number == 100 else (), signals)
        return layer

    def _message(self, descriptor, start: int, end: int, tiers, layer_type):
        """The message ``data[start:end]`` rewritten, or ``None`` if nothing changes."""
        data = self.data
        claims = forks.CLAIMS.get(descriptor.full_name, {})
        out, copied = None, start
        for number, wire, at, value_at, body, after in _fields(data, start, end):
            target, claim, new_body, new_value = number, None, None, None
            if number in claims:
                claim = forks.decide(claims[number], wire,
                                     layer_type if descriptor is _LAYER else None, tiers)
                target = claim.target.number if claim is not None \
                    else _unknown_number(descriptor, number)
                field = claim.target if claim is not None else None
            else:
                field = descriptor.fields_by_number.get(number)
            if wire == 2 and field is not None and field.message_type is not None:
                if self.strip and (descriptor.full_name, target) in _BLOB_FIELDS:
                    new_body = self._blob(body, after)
                elif field.message_type.full_name in self._walk:
                    inner = tiers
                    if claim is not None and forks.BVLC not in claim.forks:
                        inner = (claim.forks,) + tiers
                    try:
                        new_body = self._message(field.message_type, body, after, inner, None)
                    except _Malformed:
                        if claim is None:
                            raise
                        claim = None  # not this field's bytes: kept unknown below
            if number in claims and claim is None:
                target, new_body = _unknown_number(descriptor, number), None
            elif claim is not None:
                content = new_body if new_body is not None else data[body:after]
                if not _fits(claim.target, wire, content):
                    target, new_body = _unknown_number(descriptor, number), None
                elif claim.values and wire == 0:
                    value = _varint_at(data, value_at, after)[0]
                    mapped = dict(claim.values).get(value, value)
                    if mapped != value:
                        new_value = mapped
            if target == number and new_body is None and new_value is None:
                continue
            if out is None:
                out = bytearray()
            out += data[copied:at]
            out += _varint((target << 3) | wire)
            if new_value is not None:
                out += _varint(new_value)
            elif new_body is not None:
                out += _varint(len(new_body))
                out += new_body
            else:
                out += data[value_at:after]
            copied = after
        if out is None:
            return None
        out += data[copied:end]
        return out

    def _blob(self, start: int, end: int) -> bytearray:
        """A BlobProto without its values, and the place of its values."""
        data = self.data
        out = bytearray()
        segments = {_FLOAT_DATA: [], _DOUBLE_DATA: [], _RAW_DATA: []}
        raw_type = None
        for number, wire, at, value_at, body, after in _fields(data, start, end):
            if number in (_FLOAT_DATA, _FLOAT_DIFF, _DOUBLE_DATA, _DOUBLE_DIFF, _RAW_DATA,
                          _RAW_DIFF):
                if wire != 2:
                    raise _NotCaffeLayout  # unpacked values
                if number == _RAW_DATA:  # bytes: the last one counts
                    segments[_RAW_DATA] = [(body, after - body)]
                elif number in segments:
                    segments[number].append((body, after - body))
                continue
            if number == _RAW_DATA_TYPE and wire == 0:
                raw_type = _varint_at(data, value_at, after)[0]
            out += data[at:after]
        # As blob_to_array: double_data if there is any, else data, else NVCaffe's raw_data.
        problem = None
        if any(length for _, length in segments[_DOUBLE_DATA]):
            dtypes, chosen = ("<f8", "<f8"), segments[_DOUBLE_DATA]
        elif any(length for _, length in segments[_FLOAT_DATA]) or not segments[_RAW_DATA]:
            dtypes, chosen = ("<f4", "<f4"), segments[_FLOAT_DATA]
        else:
            chosen = segments[_RAW_DATA]
            dtypes, problem = _raw_dtypes(raw_type, chosen[0][1])
        file_dtype = np.dtype(dtypes[0])
        total = sum(length for _, length in chosen)
        if problem is None and total % file_dtype.itemsize:
            raise _NotCaffeLayout
        marker = np.array([len(self.places)], "<f8").tobytes()
        self.places.append(_Place(problem or total // file_dtype.itemsize, file_dtype,
                                  np.dtype(dtypes[1]), chosen))
        out += _varint((_DOUBLE_DIFF << 3) | 2) + _varint(len(marker)) + marker
        return out

    def locate(self, start: int, end: int, piece, layer: Optional[_Layer]):
        """``(byte offset, layer or None)`` of the field protobuf refused in a piece."""
        data = self.data
        if layer is None:
            for _, _, at, _, _, after in _fields(data, start, end):
                if not _parses(pb.NetParameter, data[at:after]):
                    layer = self.layers.get(at)
                    if layer is None:
                        return at, None
                    start, end, piece = at, after, data[at:after]
                    break
            else:
                return start, None
        # The piece is one layer, as in the file or rewritten field for field.
        cls = pb.LayerParameter if layer.number == 100 else pb.V1LayerParameter
        inner = list(_fields(piece, 0, len(piece)))[0]
        original = list(_fields(data, start, end))[0]
        rewritten = list(_fields(piece, inner[4], inner[5]))
        for k, (_, _, at, _, _, after) in enumerate(rewritten):
            if not _parses(cls, piece[at:after]):
                fields = list(_fields(data, original[4], original[5]))
                return (fields[k][2] if k < len(fields) else start), layer
        return start, layer


def _layer_signals(data, layer_type: str, fields, signals: list) -> None:
    """What a layer shows of the fork that wrote it: its type, the fork fields it is read
    with, NVCaffe's raw blobs. ``fields``: ``(number, wire type, payload start, end)``."""
    if layer_type in forks.TYPE_FORKS:
        signals.append(forks.signal_forks(forks.TYPE_FORKS[layer_type]))
    claims = forks.CLAIMS[_LAYER.full_name]
    for number, wire, body, after in fields:
        if number in claims:
            claim = forks.decide(claims[number], wire, layer_type, ())
            if claim is not None and forks.BVLC not in claim.forks:
                signals.append(forks.signal_forks(claim.forks))
        elif number == 7 and wire == 2 and any(
                n in _NVCAFFE_BLOB for n, *_ in _fields(data, body, after)):
            signals.append((forks.NVCAFFE,))


class _Place:
    """Where a blob's values are in the file: ``count`` values (or a problem) of
    ``file_dtype`` in ``segments``, read as ``dtype``."""

    __slots__ = ("count", "file_dtype", "dtype", "segments")

    def __init__(self, count, file_dtype, dtype, segments):
        self.count, self.file_dtype, self.dtype, self.segments = \
            count, file_dtype, dtype, segments


def _raw_dtypes(raw_type, length: int):
    """``((file dtype, array dtype), problem)`` of NVCaffe raw values."""
    if raw_type is None:
        return ("<f4", "<f4"), "raw_data without raw_data_type"
    if raw_type not in _RAW_DTYPES:
        name = pb.Type.Name(raw_type) if raw_type in pb.Type.values() else str(raw_type)
        return ("<f4", "<f4"), (f"raw_data of type {name}, which Caffe cannot read (allowed: "
                                f"{', '.join(pb.Type.Name(t) for t in _RAW_DTYPES)})")
    dtypes = _RAW_DTYPES[raw_type]
    if length % np.dtype(dtypes[0]).itemsize:
        return dtypes, (f"raw_data of {length} bytes is not a whole number of "
                        f"{pb.Type.Name(raw_type)} values")
    return dtypes, None


def _unknown_number(descriptor, number: int) -> int:
    """Where an unknown field is kept: its number, unless that is one of our fields."""
    if number in descriptor.fields_by_number:
        return forks.UNKNOWN_BASE + number
    return number


def _parses(cls, data) -> bool:
    try:
        cls().MergeFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return True


def _parse_net(data, path, strip: bool = False):
    """A NetParameter from a caffemodel's bytes, fork fields read by :class:`_NetReader`;
    and the places of the blob values when they are ``strip``-ped."""
    what = "a Caffe model (NetParameter)"
    if not len(data):
        raise CaffeFormatError(f"the file is empty, not {what}", path)
    view = data if isinstance(data, memoryview) else memoryview(data)
    reader = _NetReader(view, strip)
    try:
        pieces = reader.pieces()
    except _Malformed as error:
        raise CaffeFormatError(_not_parsed(what, error.detail, error.offset, reader.where),
                               path) from None
    net = pb.NetParameter()
    for start, end, piece, layer in pieces:
        try:
            net.MergeFromString(piece)
        except (DecodeError, RuntimeError, ValueError) as error:
            try:
                offset, layer = reader.locate(start, end, piece, layer)
            except _Malformed:
                offset = start
            raise CaffeFormatError(_not_parsed(what, str(error), offset, layer), path) \
                from None
    return net, reader.places


def _not_parsed(what: str, detail: str, offset: int, layer: Optional[_Layer]) -> str:
    where = f"; the parse stopped at byte {offset}"
    if layer is not None:
        where += f", in {layer.describe()} (which starts at byte {layer.offset})"
    return (f"not {what}: the bytes do not parse as protobuf ({detail}){where}; truncated "
            "or another kind of file?")


def _place_index(blob: pb.BlobProto) -> int:
    return int(blob.double_diff[0])


def _canonical_pieces(data) -> list:
    """A serialized NetParameter with every field at the number a Caffe fork reads it at
    (:func:`forks.write_number`, :func:`forks.nested_write_number`; unknown fields at their
    own numbers): pieces to write one after the other.

    The fork whose numbers the net's other messages take is the one a reader will guess
    from the written file: the guess is made on the layers' written numbers."""
    view = memoryview(data)
    top = list(_fields(view, 0, len(view)))
    signals = []
    for number, wire, _, _, body, after in top:
        if wire == 2 and number == 100:
            layer_type, fields = "", []
            for field, field_wire, _, _, field_body, field_end in _fields(view, body, after):
                target = _layer_target(view, field, field_wire, field_body, field_end)[0]
                fields.append((target, field_wire, field_body, field_end))
                if field == 2 and field_wire == 2:
                    layer_type = _text_of(view, field_body, field_end)
            _layer_signals(view, layer_type, fields, signals)
        elif number in _NVCAFFE_NET:
            signals.append((forks.NVCAFFE,))
    fork = forks.net_fork(signals)
    out, run = [], 0
    for number, wire, at, _, body, after in top:
        if wire != 2 or number not in (100, 2):
            continue
        new = _canonical(_LAYER if number == 100 else _V1, view, body, after, fork)
        if new is not None:
            out.append(view[run:at])
            out.append(bytes(_varint((number << 3) | 2) + _varint(len(new))) + new)
            run = after
    out.append(view[run:])
    return out


def _layer_target(data, number: int, wire: int, body: int, after: int):
    """``(number to write, forks numbering it so)`` for a LayerParameter field."""
    if forks.UNKNOWN_BASE <= number < forks.PRIVATE_BASE:
        return number - forks.UNKNOWN_BASE, frozenset()
    field = _LAYER.fields_by_number.get(number)
    if field is None:
        return number, frozenset()
    nested = ()
    if wire == 2 and field.message_type is not None and field.name in forks.PARAM_TYPES:
        nested = [n for n, *_ in _fields(data, body, after)]
    return forks.write_number(field, nested)


def _canonical(descriptor, data, start: int, end: int, fork: Optional[str]):
    """``data[start:end]`` (a ``descriptor`` message) renumbered for writing in a net (or
    inside a fork field) of ``fork``, or ``None`` if nothing changes."""
    out, copied = None, start
    for number, wire, at, value_at, body, after in _fields(data, start, end):
        target, new_body, new_value, inner = number, None, None, fork
        field = descriptor.fields_by_number.get(number)
        if descriptor is _LAYER:
            target, numbering = _layer_target(data, number, wire, body, after)
            if numbering and fork not in numbering:
                inner = min(numbering, key=forks.FORK_ORDER.__getitem__)
        elif forks.UNKNOWN_BASE <= number < forks.PRIVATE_BASE:
            target = number - forks.UNKNOWN_BASE
        elif field is not None:
            target = forks.nested_write_number(descriptor.name, field, fork)
            values = forks.WRITE_VALUES.get((fork, descriptor.name, field.name))
            if values and wire == 0:
                value = _varint_at(data, value_at, after)[0]
                if values.get(value, value) != value:
                    new_value = values[value]
        if field is not None and wire == 2 and field.message_type is not None \
                and field.message_type.full_name in _WALK:
            new_body = _canonical(field.message_type, data, body, after, inner)
        if target == number and new_body is None and new_value is None:
            continue
        if out is None:
            out = bytearray()
        out += data[copied:at]
        out += _varint((target << 3) | wire)
        if new_value is not None:
            out += _varint(new_value)
        elif new_body is not None:
            out += _varint(len(new_body))
            out += new_body
        else:
            out += data[value_at:after]
        copied = after
    if out is None:
        return None
    out += data[copied:end]
    return out


def _looks_like_text(data) -> bool:
    head = bytes(data[:4096])
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut at the end of the sample is still text.
        return error.start >= len(head) - 3
    return all(b >= 0x20 or b in b"\t\n\r\f\v" for b in head)


# --- checks -----------------------------------------------------------------------------

def _check_net(net: pb.NetParameter, path, scan: Optional[_Scan], stored=None) -> None:
    """Names are text and every declared shape is a possible Caffe blob shape.

    ``stored(blob)`` gives the number of values a blob holds, where they are not in the
    message (:func:`read_caffemodel_blobs`); by default, the length of its data.
    """
    _check_name(net.name, "the net name", path)
    for name in net.input:
        _check_name(name, "a net input name", path)
    where_inputs = _field_position(scan, ("input_dim", "input_shape", "input"))
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
            *(_field_position(scan, ("layers",)) or (None, None)))
    entries = list(net.layer) if len(net.layer) else list(net.layers)
    for index, layer in enumerate(entries):
        where = _layer_position(scan, index)
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
    (file_dtype, _), problem = _raw_dtypes(raw_type, len(blob.raw_data))
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


def _upgrade(net: pb.NetParameter, path, scan: Optional[_Scan]) -> pb.NetParameter:
    try:
        return upgrade_net(net, path, in_place=True)
    except CaffeFormatError as error:
        # What is left to fail here is the net inputs (layers were checked before) or a V0
        # padding layer; point at the inputs, else at the start.
        where = _field_position(scan, ("input", "input_shape", "input_dim")) or \
            (scan.top_fields[0][1:] if scan is not None and scan.top_fields else None)
        if error.line is None and where is not None:
            raise CaffeFormatError(error.detail, path, *where) from None
        raise


def _check_tops_per_phase(net: pb.NetParameter, file_layers: int, path,
                          scan: Optional[_Scan]) -> None:
    """A top produced twice is an error in whichever phase the net is built."""
    # Upgrading put one Input layer per net input in front of the file's layers.
    inputs = len(net.layer) - file_layers
    positions = [_field_position(scan, ("input",)) if i < inputs
                 else _layer_position(scan, i - inputs) for i in range(len(net.layer))]
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


def _field_position(scan: Optional[_Scan], names) -> Optional[tuple]:
    if scan is None:
        return None
    for name, line, column in scan.top_fields:
        if name in names:
            return line, column
    return None


def _layer_position(scan: Optional[_Scan], index: int) -> Optional[tuple]:
    if scan is None:
        return None
    layers = [(line, column) for name, line, column in scan.top_fields
              if name in ("layer", "layers")]
    return layers[index] if index < len(layers) else None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
