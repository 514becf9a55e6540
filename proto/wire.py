"""Caffe's binary files (.caffemodel, .binaryproto) at the wire level.

A caffemodel is walked field by field before protobuf parses it: contested field numbers are
moved to the field the layer's ``type`` implies (:mod:`.forks`), fields that fit nothing are
kept as unknown fields, blob values can be left in the file and read later
(:func:`parse_net` with ``strip``), and a file that does not parse is reported with the
byte offset and the layer where the parse stopped. :func:`canonical_pieces` writes every
fork field back at its fork's number.
"""

from __future__ import annotations

import mmap
import os
from typing import Optional

import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from ..errors import CaffeFormatError, CaffeLayersError
from . import caffe_pb2 as pb
from . import forks
from .text import regular_size
from .upgrade import V1_TYPE_NAMES


class open_binary:
    """Context manager giving a file's bytes as a read-only memory map (bytes if empty)."""

    def __init__(self, path):
        self.path = path
        self.file = self.map = self.view = None

    def __enter__(self):
        try:
            regular_size(self.path)  # before open(): opening a FIFO blocks
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


def parse_binary(data, message_class, path, what: str):
    if not len(data):
        raise CaffeFormatError(f"the file is empty, not {what}", path)
    message = message_class()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise CaffeFormatError(f"not {what}: the bytes do not parse as protobuf "
                               f"({error}); truncated or another kind of file?", path) from None
    return message


class NotCaffeLayout(Exception):
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
                out.append((at, after, bytes(varint((number << 3) | 2) + varint(len(new)))
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
            out = _append_field(out, data[copied:at], target, wire, new_value, new_body,
                                data[value_at:after])
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
                    raise NotCaffeLayout  # unpacked values
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
            dtypes, problem = raw_dtypes(raw_type, chosen[0][1])
        file_dtype = np.dtype(dtypes[0])
        total = sum(length for _, length in chosen)
        if problem is None and total % file_dtype.itemsize:
            raise NotCaffeLayout
        marker = np.array([len(self.places)], "<f8").tobytes()
        self.places.append(_Place(problem or total // file_dtype.itemsize, file_dtype,
                                  np.dtype(dtypes[1]), chosen))
        out += varint((_DOUBLE_DIFF << 3) | 2) + varint(len(marker)) + marker
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


def raw_dtypes(raw_type, length: int):
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


def parse_net(data, path, strip: bool = False):
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


def place_index(blob: pb.BlobProto) -> int:
    return int(blob.double_diff[0])


def canonical_pieces(data) -> list:
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
            out.append(bytes(varint((number << 3) | 2) + varint(len(new))) + new)
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


def _append_field(out: Optional[bytearray], before, target: int, wire: int,
                  new_value: Optional[int], new_body, old_value) -> bytearray:
    """``out`` (a new buffer when None) + the bytes ``before`` the field + the field at number
    ``target``: with a new varint value, a new length-delimited body, or its old value."""
    out = bytearray() if out is None else out
    out += before
    out += varint((target << 3) | wire)
    if new_value is not None:
        out += varint(new_value)
    elif new_body is not None:
        out += varint(len(new_body))
        out += new_body
    else:
        out += old_value
    return out


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
        out = _append_field(out, data[copied:at], target, wire, new_value, new_body,
                            data[value_at:after])
        copied = after
    if out is None:
        return None
    out += data[copied:end]
    return out


def looks_like_text(data) -> bool:
    head = bytes(data[:4096])
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut at the end of the sample is still text.
        return error.start >= len(head) - 3
    return all(b >= 0x20 or b in b"\t\n\r\f\v" for b in head)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
