"""Caffe's text format (.prototxt nets and solvers) read with the checks protobuf lacks.

Unknown fields and misspelt enum names are reported with ``FILE:LINE:COLUMN`` and the nearest
known name; the fork spelling ``ceil_mode: true|false`` is read as BVLC's ``round_mode``; a
file is refused before it is read when it is not a regular file or when parsing it would
not fit in memory. :func:`parse_text` is the entry point; :class:`Scan` keeps where each
field and layer sits so that later checks can name a line.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path
from typing import Optional, Union

from google.protobuf import descriptor_pool, text_format

from ..errors import CaffeFormatError, CaffeLayersError, nearest_name
from ..limits import check_bytes
from . import caffe_pb2 as pb
from .upgrade import caller_stacklevel

PathLike = Union[str, os.PathLike]


#: Parsing text costs up to this many bytes of memory per byte of the file (protobuf's
#: tokenizer and our position scan, measured on a prototxt that is one long quoted string).
_TEXT_COST = 250


def read_text(path: PathLike) -> str:
    try:
        size = regular_size(path)
        check_bytes(size * _TEXT_COST, f"parsing this {size:,}-byte text file")
        data = Path(path).read_bytes()
    except OSError as error:
        raise CaffeFormatError(f"cannot read the file: {error.strerror or error}", path) \
            from None
    except CaffeLayersError as error:
        raise CaffeFormatError(str(error), path) from None
    return decode_text(data, path)


def regular_size(path: PathLike) -> int:
    """The size of a regular file; anything else (a FIFO, a device, a folder) would block or
    never end, and is refused."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if \
            stat.S_ISFIFO(info.st_mode) else "a special file"
        raise CaffeLayersError(f"cannot read {kind}: expected a regular file")
    return info.st_size


def decode_text(data: bytes, path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise CaffeFormatError("not UTF-8 text (is this a binary file such as a "
                               ".caffemodel?)", path, line, column) from None


class Scan:
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


def _scan_text(text: str, descriptor) -> Scan:
    """Walk the text's field names against the schema, without building the message.

    Finds unknown fields (for warnings and nearest names), the position of each top-level
    field (so that later errors can point at a layer) and the fork spelling ``ceil_mode``.
    Text it cannot follow is left to protobuf's parser, which reports it.
    """
    scan = Scan()
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


def parse_text(text: str, message_class, path, allow_unknown_fields: bool):
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


def field_position(scan: Optional[Scan], names) -> Optional[tuple]:
    if scan is None:
        return None
    for name, line, column in scan.top_fields:
        if name in names:
            return line, column
    return None


def layer_position(scan: Optional[Scan], index: int) -> Optional[tuple]:
    if scan is None:
        return None
    layers = [(line, column) for name, line, column in scan.top_fields
              if name in ("layer", "layers")]
    return layers[index] if index < len(layers) else None


