"""What a source emitter sees of one layer, and the helpers it writes Python with.

An emitter reads the built caffelayers module (``layer.module``, with every hyperparameter as
an attribute and the blobs from ``caffe_blobs()``) and the graph's shapes, then declares
submodules, parameters and buffers for ``__init__`` (with the tensors that go into
``weights.pt``) and writes ``forward`` lines that read ``layer.bottoms`` and assign
``layer.tops``, which are Python variable names, not Caffe blob names.
"""

from __future__ import annotations

import inspect
import json
import keyword
import math
import re
import textwrap
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set

import numpy as np
import torch


def identifier(name: str, fallback: str) -> str:
    """``name`` as a Python identifier: runs of other characters become ``_``; a name that
    would start with a digit gets ``fallback_`` in front."""
    text = re.sub(r"\W+", "_", name, flags=re.ASCII).strip("_")
    if not text:
        return fallback
    if text[0].isdigit():
        text = f"{fallback}_{text}"
    return text


class Namespace:
    """Unique identifiers in one scope (the module's attributes, or forward's locals)."""

    def __init__(self, reserved: Iterable[str], fallback: str):
        self._taken: Set[str] = set(reserved)
        self._fallback = fallback

    def claim(self, name: str) -> str:
        base = identifier(name, self._fallback)
        if keyword.iskeyword(base) or keyword.issoftkeyword(base) or base in self._taken:
            base += "_"
        candidate, index = base, 2
        while candidate in self._taken:
            candidate, index = f"{base}{index}", index + 1
        self._taken.add(candidate)
        return candidate


def number(value: float) -> str:
    """A float literal. Values that are float32 numbers (everything a prototxt holds) are
    written in their shortest float32 form, ``0.3`` rather than ``0.30000001192092896``; the
    literal rounds back to the same float32 value."""
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    single = np.float32(value)
    text = str(single) if float(single) == value else repr(value)
    if abs(float(text)) > float(np.finfo(np.float32).max):
        text = repr(value)  # FLT_MAX's shortest form rounds past it as a double
    return text if any(c in text for c in ".en") else text + ".0"


def literal(value) -> str:
    """Python source for a plain value (numbers, strings, None, tuples and lists of them)."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return repr(None if value is None else bool(value))
    if isinstance(value, (int, np.integer)):
        return repr(int(value))
    if isinstance(value, (float, np.floating)):
        return number(value)
    if isinstance(value, str):
        # JSON's escapes are Python's for ASCII text; repr keeps other characters exact.
        return json.dumps(value) if value.isascii() else repr(value)
    if isinstance(value, tuple):
        items = ", ".join(literal(v) for v in value)
        return f"({items},)" if len(value) == 1 else f"({items})"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    raise TypeError(f"no literal for {value!r}")


def call(function: str, *args, **kwargs) -> str:
    """``function(args..., key=value...)`` with every argument written by :func:`literal`;
    an argument that is already source text is passed as :class:`Code`."""
    parts = [a if isinstance(a, Code) else literal(a) for a in args]
    parts += [f"{k}={v if isinstance(v, Code) else literal(v)}" for k, v in kwargs.items()]
    return f"{function}({', '.join(parts)})"


class Code(str):
    """Source text passed to :func:`call` as it is (not quoted as a string)."""


def square(values: Sequence[int]):
    """``3`` for ``(3, 3)``: PyTorch's modules take one int for equal sizes."""
    values = tuple(int(v) for v in values)
    return values[0] if len(set(values)) == 1 else values


def canonical_axis(axis: int, rank: int) -> int:
    """Caffe's ``CanonicalAxisIndex``: a negative axis counts from the end."""
    return axis + rank if axis < 0 else axis


def tensor_init(function: str, shape: Sequence[int]) -> str:
    """``torch.zeros(64, 1, 1)``: an ``__init__`` placeholder that ``weights.pt`` fills."""
    dims = ", ".join(str(int(d)) for d in shape)
    return f"torch.{function}({dims or '()'})"


class LayerSource:
    """One Caffe layer as an emitter writes it.

    Attributes:
        node: the graph node (``name``, ``type``, ``param``, ``bottom_shapes``,
            ``top_shapes``).
        module: the built caffelayers module, weights loaded.
        bottoms: the Python variables holding the bottoms, in Caffe's order.
        tops: the Python variables to assign the tops to (an in-place top reuses its
            bottom's variable).
    """

    def __init__(self, node, bottoms: List[str], tops: List[str], writer):
        self.node = node
        self.module = node.module
        self.bottoms = bottoms
        self.tops = tops
        self._writer = writer
        self._attribute: Optional[str] = None

    # -- what the layer looks like ---------------------------------------------------------
    @property
    def name(self) -> str:
        """The Caffe layer name."""
        return self.node.name

    def bottom_shape(self, index: int = 0):
        return tuple(self.node.bottom_shapes[index])

    def top_shape(self, index: int = 0):
        return tuple(self.node.top_shapes[index])

    def read_later(self, variable: str) -> bool:
        """Whether a later layer (or the return statement) reads ``variable``."""
        return self._writer.read_later(self.node, variable)

    # -- __init__ --------------------------------------------------------------------------
    def _claim(self, suffix: str) -> str:
        if not suffix:
            if self._attribute is None:
                self._attribute = self._writer.attributes.claim(self.name)
            return self._attribute
        return self._writer.attributes.claim(f"{self.name}_{suffix}")

    def submodule(self, constructor: str, state: Optional[Mapping[str, torch.Tensor]] = None,
                  note: str = "") -> str:
        """Declare ``self.<layer> = constructor`` with its ``state_dict`` entries (keys
        relative to the submodule); returns ``self.<layer>`` for forward lines. ``note``
        becomes a comment line above it."""
        attribute = self._claim("")
        self._writer.declare(f"self.{attribute} = {constructor}", self.name, attribute, note)
        for key, tensor in (state or {}).items():
            self._writer.add_state(f"{attribute}.{key}", tensor)
        return f"self.{attribute}"

    def parameter(self, suffix: str, tensor: torch.Tensor, init: str = "zeros",
                  note: str = "") -> str:
        """Declare ``self.<layer>_<suffix> = nn.Parameter(torch.<init>(shape))`` holding
        ``tensor``; returns the attribute for forward lines."""
        attribute = self._claim(suffix)
        placeholder = tensor_init(init, tensor.shape)
        self._writer.declare(f"self.{attribute} = nn.Parameter({placeholder})", self.name,
                             attribute, note)
        self._writer.add_state(attribute, tensor)
        return f"self.{attribute}"

    def buffer(self, suffix: str, tensor: torch.Tensor, init: str = "ones",
               note: str = "") -> str:
        """Declare a registered buffer ``self.<layer>_<suffix>`` holding ``tensor``."""
        attribute = self._claim(suffix)
        placeholder = tensor_init(init, tensor.shape)
        self._writer.declare(f'self.register_buffer("{attribute}", {placeholder})', self.name,
                             attribute, note)
        self._writer.add_state(attribute, tensor)
        return f"self.{attribute}"

    def project_module(self, cls, *args, **kwargs) -> str:
        """Declare ``self.<layer> = Cls(args)`` for a caffelayers module (imported from where
        it is defined), with the built module's whole ``state_dict``: for layers PyTorch has
        no exact equivalent of."""
        self.require(f"from {cls.__module__} import {cls.__name__}")
        self._writer.imported_layers.append((self.name, self.node.type))
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        kwargs = {key: value for key, value in kwargs.items()
                  if key not in defaults or not _same(defaults[key], value)}
        state = {key: value for key, value in self.module.state_dict().items()
                 if value is not None}
        return self.submodule(call(cls.__name__, *args, **kwargs), state)

    def require(self, import_line: str) -> None:
        """An import the generated file needs (``from caffelayers.layers.x import X``)."""
        self._writer.imports.add(import_line)

    # -- forward ---------------------------------------------------------------------------
    def line(self, code: str) -> None:
        self._writer.forward_lines.append(code)

    def assign(self, expression: str, comment: str = "") -> None:
        """``top = expression`` (or ``top_a, top_b = expression`` for several tops), after
        an optional comment line."""
        if comment:
            self.comment(comment)
        targets = ", ".join(self.tops) if self.tops else "_"
        self.line(f"{targets} = {expression}")

    def comment(self, text: str) -> None:
        self.line(f"# {text}")


def _same(default, value) -> bool:
    """Whether a keyword argument equals the constructor's default (so it can be left out)."""
    if default is inspect.Parameter.empty or isinstance(value, (torch.Tensor, Code)):
        return False
    return type(default) is type(value) and default == value


def state_of(**tensors: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The non-None tensors, for ``submodule(..., state=...)``."""
    return {key: value for key, value in tensors.items() if value is not None}


# -- layout -------------------------------------------------------------------------------
#: ruff's default line length: the generated file fits it.
LINE_WIDTH = 88

_OPEN, _CLOSE = "([{", ")]}"


def _scan(code: str):
    """Top-level structure of one statement: ``(pairs, commas, operators)`` where pairs maps
    each depth-0 opening bracket to its closing one, commas are the depth-1 commas of the
    first pair, and operators the depth-0 binary operators; strings are skipped."""
    pairs, commas, operators = {}, [], []
    stack: List[int] = []
    quote = ""
    index = 0
    while index < len(code):
        char = code[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in _OPEN:
            stack.append(index)
        elif char in _CLOSE:
            start = stack.pop()
            if not stack:
                pairs[start] = index
        elif char == "," and len(stack) == 1 and len(pairs) == 0:
            commas.append(index)
        elif not stack and code[index - 1:index + 2] in (" + ", " - ", " * ", " / "):
            operators.append(index)
        index += 1
    return pairs, commas, operators


def _pack(items: List[str], indent: str) -> List[str]:
    """Items joined by commas into lines that fit, each line a continuation."""
    lines: List[str] = []
    for item in items:
        if lines and len(indent) + len(lines[-1]) + len(item) + 2 <= LINE_WIDTH:
            lines[-1] += f" {item},"
        elif len(indent) + len(item) + 1 <= LINE_WIDTH:
            lines.append(f"{item},")
        else:
            wrapped = wrap(item, indent)
            wrapped[-1] += ","
            lines += wrapped
    lines[-1] = lines[-1][:-1]  # no comma after the last item: it would change a subscript
    return lines


def wrap(code: str, indent: str) -> List[str]:
    """One statement as lines that fit in :data:`LINE_WIDTH` after ``indent``: broken inside
    its first top-level bracket, else (an assignment) at its top-level operators; the lines
    after the first are relative to ``indent``."""
    if len(indent) + len(code) <= LINE_WIDTH:
        return [code]
    inner = indent + "    "
    pairs, commas, operators = _scan(code)
    if pairs:
        start = min(pairs)
        end = pairs[start]
        bounds = [start] + commas + [end]
        items = [code[a + 1:b].strip() for a, b in zip(bounds, bounds[1:])]
        if end > start + 1:
            body = _pack(items, inner)
            return [code[:start + 1]] + ["    " + line for line in body] + [code[end:]]
    head, sep, expression = code.partition(" = ")
    if sep and operators:
        offset = len(head) + len(sep)
        cuts = [i - offset for i in operators if i > offset]
        pieces = [expression[a:b].strip() for a, b in zip([0] + cuts, cuts + [None])]
        return [f"{head} = ("] + ["    " + piece for piece in pieces] + [")"]
    return [code]


def comment_lines(text: str, indent: str) -> List[str]:
    """``text`` as ``# `` comment lines that fit."""
    width = max(LINE_WIDTH - len(indent) - 2, 20)
    return [f"# {line}" for line in textwrap.wrap(text, width)]
