"""The one graph every consumer reads: layers in order, their blobs, modules and shapes.

``build_graph`` walks an upgraded, phase-filtered ``NetParameter`` once, in Caffe's order. It
checks that every bottom exists, builds each layer's module through its ``from_caffe`` and
runs its shape rule, so ``inspect``, the runtime and the converters can never disagree about
a shape. With ``strict=False`` (``inspect``), unknown layer types and unknown input shapes are
kept as ``None`` and reported instead of raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import (CaffeFormatError, CaffeLayersError, UnknownLayerError,
                     UnsupportedParameterError)
from .layers.base import BuildContext, CaffeLayer, Shape
from .limits import check_bytes, check_count, memory_limit
from .registry import LAYERS

PYTHON_LAYER_NOTE = ("Python layers are never executed (they would run arbitrary code); "
                     'register a module for the layer type with @caffelayers.register_layer("Python")')
#: Python layers recognised by (module, layer) and built as the native type replacing them.
PYTHON_REPLACEMENTS = {("rpn.proposal_layer", "ProposalLayer"): "Proposal"}


def layer_type(param) -> str:
    """The registry key of a layer: its type, or the native type that replaces a recognised
    Python layer (which is never executed)."""
    if param.type == "Python":
        python = param.python_param
        return PYTHON_REPLACEMENTS.get((python.module, python.layer), param.type)
    return param.type


@dataclass
class Node:
    """One Caffe layer in the graph."""

    name: str
    type: str
    bottoms: List[str]
    tops: List[str]
    param: object  # caffe_pb2.LayerParameter
    module: Optional[CaffeLayer] = None
    bottom_shapes: List[Optional[Shape]] = field(default_factory=list)
    top_shapes: List[Optional[Shape]] = field(default_factory=list)
    loss_weights: List[float] = field(default_factory=list)

    @property
    def is_input(self) -> bool:
        return bool(getattr(self.module, "is_input", False))

    @property
    def num_params(self) -> Optional[int]:
        if self.module is None:
            return None
        return sum(blob.numel() for blob in self.module.caffe_blobs())


@dataclass
class NetGraph:
    """Layers in execution order with every blob's shape (``None`` when unknown)."""

    name: str
    nodes: List[Node]
    blob_shapes: Dict[str, Optional[Shape]]
    unknown: List[Tuple[str, str]]
    notes: List[str]

    @property
    def inputs(self) -> List[str]:
        """Blobs fed from outside: the tops of input and data layers, in net order."""
        return [top for node in self.nodes if node.is_input for top in node.tops]

    @property
    def outputs(self) -> List[str]:
        """Blobs that no later layer reads: Caffe's net outputs (an in-place top stays open)."""
        available: Dict[str, None] = {}
        for node in self.nodes:
            for bottom in node.bottoms:
                available.pop(bottom, None)
            for top in node.tops:
                available[top] = None
        return list(available)


def _loss_weights(param, module: Optional[CaffeLayer], num_tops: int) -> List[float]:
    if param.loss_weight:
        weights = list(param.loss_weight)
        if len(weights) != num_tops:
            raise CaffeFormatError(f"layer {param.name!r}: {len(weights)} loss_weight values for "
                                   f"{num_tops} tops; give one per top")
        return weights
    weights = [0.0] * num_tops
    if weights and module is not None and module.is_loss:
        weights[0] = 1.0
    return weights


def _parse_shape(text: str) -> Shape:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise CaffeLayersError(f"--input: {text!r} is not a shape; write N,C,H,W") from None
    if not dims or any(d < 0 for d in dims):
        raise CaffeLayersError(f"--input: {text!r} is not a shape; write N,C,H,W with dims >= 0")
    return dims


def parse_input_specs(specs: Iterable[str]) -> Dict[str, Shape]:
    """``["data=1,3,112,96"]`` to ``{"data": (1, 3, 112, 96)}`` (the CLI's ``--input``)."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        if not sep or not name:
            raise CaffeLayersError(f"--input: {spec!r} should be NAME=N,C,H,W")
        shapes[name] = _parse_shape(dims)
    return shapes


def layer_line(path: Path, layer_name: str) -> Optional[int]:
    """The 1-based line where layer ``layer_name`` is named in a prototxt, if found."""
    pattern = re.compile(r"\bname\s*:\s*([\"'])" + re.escape(layer_name) + r"\1")
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line):
            return number
    return None


@contextlib.contextmanager
def located(path: Optional[Path], layer_name: Optional[str] = None):
    """Prefix a layer's build or shape error with ``FILE:LINE:`` of the layer in the prototxt
    (the layer's own errors name the layer but cannot know where it is written); without a
    layer name, with the file alone."""
    try:
        yield
    except CaffeLayersError as error:
        if path is None or getattr(error, "path", None):
            raise
        line = None if layer_name is None else layer_line(path, layer_name)
        if isinstance(error, CaffeFormatError):
            error.path, error.line = str(path), line
            error.args = (error._compose(),)
        else:
            error.args = (f"{path}{'' if line is None else f':{line}'}: {error}",)
            error.path = str(path)  # located once: an enclosing located leaves it alone
        raise


#: What a layer's own code may raise on parameters or shapes it did not foresee (a value
#: out of every range, an overflow in a shape formula): reported as that layer's error.
_UNFORESEEN = (ArithmeticError, IndexError, KeyError, TypeError, ValueError, RuntimeError)


@contextlib.contextmanager
def _in_layer(param, bottom_shapes):
    """Name the layer in an error its build or shape rule raises: a parameter error that
    lacks the name (``__init__`` validates plain values and cannot know it), or an error
    that no check of ours foresaw."""
    try:
        yield
    except UnsupportedParameterError as error:
        if repr(param.name) in str(error):
            raise
        raise UnsupportedParameterError(f"layer {param.name!r} ({param.type}): {error}") from None
    except CaffeLayersError:
        raise
    except _UNFORESEEN as error:
        shapes = ", ".join("x".join(map(str, s)) for s in bottom_shapes) or "none"
        raise CaffeFormatError(f"layer {param.name!r} ({param.type}) cannot be built on bottoms "
                               f"of shape {shapes}: {type(error).__name__}: {error}") from None


def _check_blob_counts(cls, param) -> None:
    """Caffe's ``CheckBlobCounts``: the numbers of bottoms and tops the type allows."""
    for what, count, (low, high) in (("bottoms", len(param.bottom), cls.num_bottoms),
                                     ("tops", len(param.top), cls.num_tops)):
        if count < low or (high is not None and count > high):
            allowed = (f"exactly {low}" if low == high else f"at least {low}" if high is None
                       else f"{low} to {high}")
            raise CaffeFormatError(f"layer {param.name!r} ({param.type}) has {count} {what}; "
                                   f"a {param.type} layer takes {allowed}")


class _Budget:
    """Bytes a run will hold (parameters and every blob), checked against the memory limit
    layer by layer, before the layer allocates; also Caffe's INT_MAX per blob."""

    def __init__(self, allocating: bool):
        self.allocating = allocating
        self.limit = memory_limit() if allocating else None
        self.used = 0

    def add(self, node: Node, blobs: Dict[str, Sequence[int]]) -> None:
        size = 0
        for what, shape in blobs.items():
            size += 4 * check_count(shape, f"layer {node.name!r} ({node.type}): {what}")
        if self.allocating and size:
            self.used += size
            biggest = max(blobs, key=lambda k: math.prod(blobs[k]))
            check_bytes(self.used, f"layer {node.name!r} ({node.type}) (its {biggest} is "
                        f"{' x '.join(map(str, blobs[biggest]))}; the net up to it, in "
                        "float32)", self.limit)


def _parameter_shapes(cls, param, bottom_shapes, ctx) -> Dict[str, Shape]:
    """The shapes of the blobs a layer would allocate, from a build that allocates nothing."""
    with torch.device("meta"):
        probe = cls.from_caffe(param, bottom_shapes, dataclasses.replace(ctx, fill=False))
    return {f"blob {i}": tuple(blob.shape) for i, blob in enumerate(probe.caffe_blobs())}


def build_graph(net_param, input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                ctx: Optional[BuildContext] = None, device: str | torch.device = "meta",
                strict: bool = True, no_fill: Iterable[str] = ()) -> NetGraph:
    """Build modules and infer every blob's shape, in Caffe's layer order.

    Args:
        net_param: an upgraded and phase-filtered ``NetParameter``.
        input_shapes: shapes for input blobs, overriding what the prototxt says.
        ctx: the build context (phase, source directory, options, random generator).
        device: where parameters are allocated; ``"meta"`` allocates nothing (inspect).
        strict: raise on unknown layer types and unknown shapes (the runtime) instead of
            recording them (inspect).
        no_fill: layer names whose parameters will be loaded, so fillers are skipped.
    """
    ctx = ctx or BuildContext()
    input_shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    no_fill = set(no_fill)
    unknown = [(layer.name, layer.type) for layer in net_param.layer
               if layer_type(layer) not in LAYERS]
    if strict and unknown:
        how = 'register one with @caffelayers.register_layer("TYPE")'
        if any(type_ == "Python" for _, type_ in unknown):
            how += "; " + PYTHON_LAYER_NOTE
        with located(ctx.source_file, unknown[0][0] if len(unknown) == 1 else None):
            raise UnknownLayerError(unknown, how=how)

    blob_shapes: Dict[str, Optional[Shape]] = {}
    nodes: List[Node] = []
    notes: List[str] = []
    used_inputs = set()
    open_inputs: List[Tuple[Node, str]] = []  # input tops whose shape nobody gave
    budget = _Budget(allocating=torch.device(device).type != "meta")
    # Errors of the net as a whole (a bottom nobody produces) name the prototxt too.
    with located(ctx.source_file):
        for param in net_param.layer:
            node = Node(param.name, layer_type(param), list(param.bottom), list(param.top),
                        param)
            for bottom in node.bottoms:
                if bottom not in blob_shapes:
                    message = (f"layer {param.name!r} ({param.type}) reads bottom {bottom!r}, which "
                               f"no earlier layer produces in phase {ctx.phase}")
                    if strict:
                        raise CaffeFormatError(message)
                    notes.append(message + " (a layer that needs a --stage or --level?)")
                    blob_shapes[bottom] = None
            node.bottom_shapes = [blob_shapes[b] for b in node.bottoms]
            cls = LAYERS.get(node.type)
            if cls is not None and all(s is not None for s in node.bottom_shapes):
                layer_ctx = dataclasses.replace(ctx, fill=ctx.fill and param.name not in no_fill)
                with located(ctx.source_file, param.name), _in_layer(param, node.bottom_shapes):
                    _check_blob_counts(cls, param)
                    if budget.allocating and not getattr(cls, "is_input", False):
                        budget.add(node, _parameter_shapes(cls, param, node.bottom_shapes, layer_ctx))
                    with torch.device(device):
                        node.module = cls.from_caffe(param, node.bottom_shapes, layer_ctx)
                    node.module.layer_name = param.name
                    if node.module.is_loss and not node.tops:
                        # Caffe's AutoTopBlobs: a loss layer without tops still outputs its loss.
                        node.tops = [f"(automatic {param.name})"]
                    node.top_shapes = list(node.module.output_shapes(node.bottom_shapes))
                if len(node.top_shapes) != len(node.tops):
                    raise CaffeFormatError(f"layer {param.name!r} ({param.type}) has "
                                           f"{len(node.tops)} tops, its type produces "
                                           f"{len(node.top_shapes)}")
            else:
                node.top_shapes = [None] * len(node.tops)
            if node.is_input:
                for i, top in enumerate(node.tops):
                    if top in input_shapes:
                        node.top_shapes[i] = input_shapes[top]
                        used_inputs.add(top)
                    elif node.top_shapes[i] is None:
                        open_inputs.append((node, top))
            with located(ctx.source_file, param.name):
                budget.add(node, {f"top {t!r}": shape for t, shape in
                                  zip(node.tops, node.top_shapes) if shape is not None})
            node.loss_weights = _loss_weights(param, node.module, len(node.tops))
            for top, shape in zip(node.tops, node.top_shapes):
                blob_shapes[top] = shape
            nodes.append(node)
        # Told once every layer is known, so that the hint can follow the blob's readers.
        for node, top in open_inputs:
            unreadable = getattr(node.module, "source_error", None)
            if unreadable is not None and strict and \
                    not any(t in input_shapes for t in node.tops):
                # A data layer whose tops nobody shapes is read from its source: the reason
                # it could not be read is the error (train has no --input to suggest).
                raise unreadable
            message = (f"the shape of input {top!r} (layer {node.name!r}, {node.param.type}) "
                       f"is not in the prototxt; give it (--input {top}="
                       f"{_input_shape_hint(top, nodes, ctx)} with one number per axis on the "
                       "command line, inputs= in Python)")
            if strict:
                raise CaffeLayersError(message)
            notes.append(message if unreadable is None else
                         f"{message}; its source cannot be read: {unreadable}")
    for name in input_shapes:
        if name not in used_inputs:
            raise CaffeLayersError(f"--input {name}: the net has no input blob {name!r}; its "
                                   f"inputs are {', '.join(t for n in nodes if n.is_input for t in n.tops) or 'none'}")
    graph = NetGraph(net_param.name, nodes, blob_shapes, unknown, notes)
    return graph


def _input_shape_hint(top: str, nodes: List[Node], ctx: BuildContext) -> str:
    """What to write for input ``top`` in ``--input``: the labels' shape when a loss or
    Accuracy reads it beside scores of known shape (the shape its layer accepts, e.g. ``4``
    for 4 x 10 scores), ``N`` for such labels beside scores of unknown shape, else
    ``N,C,H,W``."""
    for node in nodes:
        cls = LAYERS.get(node.type)
        if top not in node.bottoms[1:] or node.module is not None or cls is None or \
                not (cls.is_loss or node.type == "Accuracy"):
            continue
        known = [shape for bottom, shape in zip(node.bottoms, node.bottom_shapes)
                 if bottom != top]
        scores = known[0] if known else None
        if scores is None or any(shape is None for shape in known):
            return "N"
        # The scores without their class axis (Caffe's default axis 1), then the same with
        # a unit class axis, then the scores' own shape (targets of a regression loss).
        for labels in (scores[:1] + scores[2:], scores[:1] + (1,) + scores[2:], scores):
            shapes = [labels if bottom == top else shape
                      for bottom, shape in zip(node.bottoms, node.bottom_shapes)]
            try:
                with torch.device("meta"):
                    module = cls.from_caffe(node.param, shapes, dataclasses.replace(ctx, fill=False))
                module.layer_name = node.name
                module.output_shapes(shapes)
            except CaffeLayersError:
                continue
            return ",".join(map(str, labels))
        return "N"
    return "N,C,H,W"


def reshape_graph(graph: NetGraph, input_shapes: Mapping[str, Sequence[int]],
                  source_file: Optional[Path] = None) -> None:
    """Caffe's ``Net::Reshape`` after new input shapes: every layer's shape rule runs again
    on the built modules (weights untouched). The graph changes only when every layer
    accepts its new bottoms; otherwise the layer that does not is named."""
    inputs = graph.inputs
    strange = [name for name in input_shapes if name not in inputs]
    if strange:
        raise CaffeLayersError(f"cannot reshape {', '.join(map(repr, strange))}: the net's "
                               f"inputs are {', '.join(inputs) or 'none'}")
    shapes: Dict[str, Optional[Shape]] = {}
    new: List[Tuple[List[Shape], List[Shape]]] = []
    budget = _Budget(allocating=True)
    for node in graph.nodes:
        bottoms = [shapes[b] for b in node.bottoms]
        with located(source_file, node.name), _in_layer(node.param, bottoms):
            if node.is_input:
                tops = [tuple(int(d) for d in input_shapes[t]) if t in input_shapes else shape
                        for t, shape in zip(node.tops, node.top_shapes)]
            else:
                tops = list(node.module.output_shapes(bottoms))
            budget.add(node, {f"top {t!r}": shape for t, shape in zip(node.tops, tops)})
        new.append((bottoms, tops))
        shapes.update(zip(node.tops, tops))
    for node, (bottoms, tops) in zip(graph.nodes, new):
        node.bottom_shapes, node.top_shapes = bottoms, tops
    graph.blob_shapes = shapes


def load_net_param(source, phase: str = "TEST", level: int = 0, stages: Sequence[str] = (),
                   allow_unknown_fields: bool = False):
    """Read (if a path), upgrade and phase-filter a net definition.

    Returns ``(net_param, source_dir)``; ``source_dir`` is where relative file names in the
    prototxt are resolved (the prototxt's directory, or None for an in-memory message).
    """
    from .proto import io, netstate

    phase = phase.upper()
    if phase not in ("TRAIN", "TEST"):
        raise CaffeLayersError(f"phase must be TRAIN or TEST, got {phase!r}")
    if isinstance(source, (str, Path)):
        net_param = io.read_prototxt(source, allow_unknown_fields=allow_unknown_fields)
        source_dir, path = Path(source).resolve().parent, str(source)
    else:
        net_param, source_dir, path = source, None, None
    filtered = netstate.filter_net(net_param, phase=phase, level=level, stages=stages, path=path)
    if not filtered.layer:
        # Nothing to inspect, run or convert (an empty file, or every layer excluded).
        where = f" in phase {phase} (its include/exclude rules leave none)" if \
            net_param.layer else ""
        raise CaffeFormatError(f"the net has no layers{where}", path)
    return filtered, source_dir
