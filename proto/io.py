"""Read and write Caffe's files: .prototxt nets and solvers, .caffemodel weights, .binaryproto
blobs.

Every reader returns messages of our own schema (``caffe_pb2``), nets already upgraded to
today's format (:mod:`.upgrade`), and reports every problem as a
:class:`~caffelayers.errors.CaffeFormatError` naming the file and, for text, the line and
column. What the readers check beyond protobuf's own parsing:

* unknown fields and misspelt enum names, with the nearest known name; with
  ``allow_unknown_fields=True`` fields of other Caffe forks are skipped with a warning;
* the fork spelling ``ceil_mode: true|false`` inside ``pooling_param`` is read as BVLC's
  ``round_mode: CEIL|FLOOR`` (text only: in binary files the same field number 13 holds a
  bool, so a fork's ``ceil_mode: true`` reads as FLOOR, and the prototxt must be trusted);
* shapes: dimensions below 0 or a blob of more than ``2**31 - 1`` elements (Caffe's limit),
  in net inputs, ``Input``/``DummyData``/``Parameter`` layers and stored blobs; a stored
  blob whose data does not fill its shape;
* a top blob produced twice other than in place, in the TRAIN or the TEST net;
* a caffemodel that does not parse, or parses to a net without layers (most non-protobuf
  bytes do), or holds names that are not UTF-8.

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
from google.protobuf import descriptor_pool, text_format
from google.protobuf.message import DecodeError, Message

from ..errors import CaffeFormatError, CaffeLayersError, nearest_name
from ..limits import check_bytes
from . import caffe_pb2 as pb
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
            stripped, places = _strip_blob_values(data)
        except _NotCaffeLayout:
            net = parse_caffemodel(data, path)
            return net, _by_layer_name(net, StoredBlob.from_blob, path)
    net = _parse_binary(stripped, pb.NetParameter, path, "a Caffe model (NetParameter)")
    if not len(net.layer) and not len(net.layers):
        raise CaffeFormatError("no layers: this is not a Caffe model (or an empty one)", path)

    def stored(blob):
        return places[_place_index(blob)][0]

    _check_net(net, path, None, stored)
    net = _upgrade(net, path, None)
    blobs = _by_layer_name(net, lambda blob: StoredBlob(
        blob_shape(blob), *places[_place_index(blob)][1:], path=path, legacy=_is_legacy(blob)),
        path)
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
    net = _parse_binary(data, pb.NetParameter, path, "a Caffe model (NetParameter)")
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
    """The blob's data as a new array: float32 from ``data``, float64 from ``double_data``.

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
    else:
        values = np.array(blob.data, dtype=np.float32)
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
            file stores them (``read(out=...)`` wants exactly this dtype).
        size: the number of values.
        legacy: the shape came from the legacy num/channels/height/width fields, which
            Caffe matches against a blob's shape padded with leading 1s to four axes.
    """

    def __init__(self, shape, dtype, segments=(), path=None, array=None, legacy=False):
        self.shape = tuple(int(d) for d in shape)
        self.legacy = legacy
        self.dtype = np.dtype(dtype)
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
        return out

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
    """Write a NetParameter (with its blobs) in binary, as Caffe's .caffemodel."""
    Path(path).write_bytes(net.SerializeToString())


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
    """The file is not laid out as Caffe writes it (or is not protobuf at all): leave it to
    protobuf's parser, which knows every encoding and reports what is wrong."""


# Where blobs sit in a serialized net: message kind -> {field number: kind of its message}.
_BLOB_PARENTS = {
    "net": {100: "layer", 2: "v1"},   # NetParameter.layer, .layers (V1)
    "layer": {7: "blob"},             # LayerParameter.blobs
    "v1": {6: "blob", 1: "v0"},       # V1LayerParameter.blobs, .layer (V0)
    "v0": {50: "blob"},               # V0LayerParameter.blobs
}
_FLOAT_DATA, _FLOAT_DIFF, _DOUBLE_DATA, _DOUBLE_DIFF = 5, 6, 8, 9  # BlobProto's values


def _read_varint(data, pos: int, end: int):
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotCaffeLayout
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _strip_blob_values(data):
    """The serialized net with every blob's values left out, and the places of the values.

    Each blob keeps its shape and gets ``double_diff: [i]`` (a field no caffemodel needs),
    ``i`` indexing the returned places: ``(count, dtype, [(offset, bytes), ...])``. The
    rest of the file is copied as it is; only the messages on the way to a blob are
    rewritten (with their new lengths).
    """
    places = []
    stripped = _strip(data, 0, len(data), "net", places)
    return bytes(stripped), places


def _strip(data, start: int, end: int, kind: str, places: list) -> bytearray:
    """``data[start:end]``, a message of ``kind``, rewritten by :func:`_strip_blob_values`."""
    out = bytearray()
    children = _BLOB_PARENTS.get(kind, {})
    values = {_FLOAT_DATA: [], _DOUBLE_DATA: []}
    pos = start
    while pos < end:
        key, body = _read_varint(data, pos, end)
        field, wire = key >> 3, key & 7
        length = 0
        if wire == 0:
            _, after = _read_varint(data, body, end)
        elif wire == 1:
            after = body + 8
        elif wire == 5:
            after = body + 4
        elif wire == 2:
            length, body = _read_varint(data, body, end)
            after = body + length
        else:
            raise _NotCaffeLayout  # groups: not in Caffe's schema
        if after > end or field == 0:
            raise _NotCaffeLayout
        if kind == "blob" and field in (_FLOAT_DATA, _FLOAT_DIFF, _DOUBLE_DATA, _DOUBLE_DIFF):
            if wire != 2:
                raise _NotCaffeLayout  # unpacked values
            if field in values:
                values[field].append((body, length))
        elif wire == 2 and field in children:
            inner = _strip(data, body, after, children[field], places)
            out += _varint(key) + _varint(len(inner)) + inner
        else:
            out += data[pos:after]
        pos = after
    if kind == "blob":
        # As blob_to_array: double_data when there is any, else data.
        if any(length for _, length in values[_DOUBLE_DATA]):
            dtype, segments = np.dtype("<f8"), values[_DOUBLE_DATA]
        else:
            dtype, segments = np.dtype("<f4"), values[_FLOAT_DATA]
        total = sum(length for _, length in segments)
        if total % dtype.itemsize:
            raise _NotCaffeLayout
        marker = np.array([len(places)], "<f8").tobytes()
        places.append((total // dtype.itemsize, dtype, segments))
        out += _varint((_DOUBLE_DIFF << 3) | 2) + _varint(len(marker)) + marker
    return out


def _place_index(blob: pb.BlobProto) -> int:
    return int(blob.double_diff[0])


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
    if stored is not None:
        stored = stored(blob)
    else:
        stored = len(blob.double_data) if len(blob.double_data) else len(blob.data)
    if stored != count:
        raise CaffeFormatError(f"{what}: shape {_fmt_shape(shape)} needs {count} values but "
                               f"the file holds {stored}", path, *(where or (None, None)))


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
