"""Caffe net to ONNX graph: the emitter registry's driver and the context emitters write into.

``convert_to_onnx`` walks the net's graph (``caffelayers.graph.NetGraph``) in Caffe's order and
hands each layer to the emitter registered for its type (``@register_emitter("Type")``), which
adds ONNX nodes through an :class:`EmitContext`. Before anything is emitted the whole net is
checked and every layer without an emitter is reported at once.

Naming:
    * A Caffe blob's last value carries the blob's name, so the graph's outputs are named as in
      the prototxt. A blob rewritten in place (``conv1 -> relu1 -> conv1``) has earlier values
      named ``blob/layer``, after the layer that produced them (``conv1/conv1``, then
      ``conv1``). Graph inputs keep their names; a value written over an input is suffixed.
    * Caffe parameter blob ``k`` of layer ``L`` is the initializer ``L/k`` (the key the
      fixtures use), or the ``param { name }`` Caffe shares it under.
    * Other values and constants are ``layer/what``; every name is made unique.

Batch: unless ``static_batch``, axis 0 of every input of the net's batch size is the
symbolic ``batch``. Which axes of every other blob follow the batch is found by running the
layers' shape rules at a second batch size, so reshape-like emitters can put ``-1`` on the
one axis that varies.

Height and width: unless ``static_shape``, the axes after the channels of every image-like
input (rank 3 or more) are symbolic (``height`` and ``width``) when the net is fully
convolutional: the layers' shape rules still hold at twice the prototxt's size, and every
layer whose blobs change size there is one whose emitter writes nothing that depends on the
size (:data:`ANY_SIZE`). One layer that fixes the size (an InnerProduct, a Reshape to fixed
dims, a Crop to a fixed size) keeps every input at the prototxt's size;
:func:`fixed_size_reason` says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import (CaffeLayersError, ShapeError, UnknownLayerError,
                       UnsupportedParameterError)
from ...registry import EMITTERS, LAYERS
from .sizes import SizePlan

#: The opset emitted unless told otherwise, and the oldest one the emitters can write.
DEFAULT_OPSET = 17
MIN_OPSET = 13

#: Serialized protobuf messages cannot exceed 2 GiB.
PROTOBUF_LIMIT = 2 ** 31
#: Above this many bytes of tensors, :func:`save_onnx` writes them to a separate data file
#: (64 MiB below the protobuf limit, for the graph itself).
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 2 ** 26

#: The symbolic name of the batch axis in a dynamic-batch model.
BATCH = "batch"

#: Metadata key holding ``{onnx output name: caffe blob}`` for the graph's outputs.
OUTPUTS_METADATA = "caffelayers.outputs"

#: Metadata keys holding the file names (without their directories) of the prototxt and the
#: caffemodel the model was converted from, where the net knows them.
PROTOTXT_METADATA = "caffelayers.prototxt"
CAFFEMODEL_METADATA = "caffelayers.caffemodel"

#: Caffe types that have no ONNX emitter on purpose, with the reason given to the user.
UNSUPPORTED: Dict[str, str] = {
    "MultiBoxLoss": "SSD's training loss, whose greedy matching and hard-negative mining are "
                    "data-dependent loops (train it with caffelayers.Net)",
}

Shape = Tuple[int, ...]
Names = Union[None, int, str, Sequence[str]]

def fixed_size_reason(net, static_shape: bool = False) -> Optional[str]:
    """Why :func:`convert_to_onnx` keeps the net's input height and width at the
    prototxt's size, or None when they are symbolic (``height``, ``width``) and the model
    runs at any size the net accepts.

    The rule: every input of rank 3 or more gets symbolic axes after the channels unless
    ``static_shape``, or a layer fixes them: its shape rule fails at another size, or its
    blobs change size and its emitter writes a size into the graph (:data:`ANY_SIZE`).
    """
    return SizePlan(_graph_of(net), static_shape).reason


def _unique(name: str, taken: set) -> str:
    candidate, index = name, 1
    while candidate in taken:
        candidate = f"{name}_{index}"
        index += 1
    taken.add(candidate)
    return candidate


class EmitContext:
    """What an emitter sees of the conversion: names, shapes, and a graph to add nodes to.

    An emitter is ``emit(ctx, node) -> None`` for a ``caffelayers.graph.Node``; it reads the
    layer's settings from ``node.module`` (and its parameters from ``caffe_blobs()``), takes
    its inputs from :meth:`bottoms` and must produce every name in :meth:`tops`. It may add
    graph inputs (:meth:`add_input`), and raises :meth:`unsupported` for settings ONNX cannot
    express.

    Example::

        @caffelayers.register_emitter("Swish")
        def emit_swish(ctx, node):
            (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
            ctx.op("Mul", [x, ctx.op("Sigmoid", [x])], top)

    Attributes:
        graph: the ``NetGraph`` being converted.
        opset: the ONNX opset (default domain) the model declares.
        static_batch: whether every shape is fixed at the net's batch size.
        dynamic_size: whether the inputs' height and width are symbolic
            (:meth:`follows_size` tells the emitters which layers see them change).
        nodes, inputs, value_info: the ONNX graph built so far.
        initializers: the initializers so far, kept in the model being built
            (``model.graph.initializer``), so that no tensor is copied into it afterwards.
        model: the ``ModelProto`` the conversion fills in.
    """

    def __init__(self, graph, opset: int = DEFAULT_OPSET, static_batch: bool = False,
                 defer_values: bool = False, static_shape: bool = False):
        self.graph = graph
        self.opset = int(opset)
        self.static_batch = bool(static_batch)
        self._size = SizePlan(graph, static_shape)
        self.nodes: List[onnx.NodeProto] = []
        self.model = onnx.ModelProto()
        self.inputs: List[onnx.ValueInfoProto] = []
        self.value_info: List[onnx.ValueInfoProto] = []
        self.node: Optional[object] = None  # the layer being emitted
        self._taken = set(graph.blob_shapes)
        self._current: Dict[str, str] = {}  # Caffe blob -> ONNX name of its latest value
        # ONNX value -> its shape at the build, at the probe batch and at the probe size
        self._shapes: Dict[str, Tuple[Shape, Shape, Shape]] = {}
        self._initializer_arrays: Dict[str, np.ndarray] = {}
        # With defer_values, large initializers get their type and shape only; their
        # values stay in _initializer_arrays until export_onnx writes them to the file.
        self._defer_values = defer_values
        self.deferred: Dict[str, np.ndarray] = {}
        self._node_names: set = set()
        self._produced: set = set()
        self._input_values = {top for node in graph.nodes if node.is_input for top in node.tops}
        self._read = {bottom for node in graph.nodes for bottom in node.bottoms}
        self.batch = self._batch_size()
        self._probe = self._probe_shapes()
        self._top_names = self._name_tops()

    @property
    def initializers(self):
        """The model's initializers so far (``model.graph.initializer``)."""
        return self.model.graph.initializer

    # -- batch ---------------------------------------------------------------------------
    def _batch_size(self) -> Optional[int]:
        for node in self.graph.nodes:
            if node.is_input:
                for shape in node.top_shapes:
                    if shape:
                        return shape[0]
        return None

    def _is_batched_input(self, shape: Shape) -> bool:
        return (not self.static_batch and self.batch is not None and len(shape) > 0
                and shape[0] == self.batch)

    @property
    def probe_batch(self) -> Optional[int]:
        """The second batch size the shape rules run at: twice the net's, so that blobs
        split evenly along the batch still split."""
        return None if self.batch is None else max(2 * self.batch, 1)

    def _probe_shapes(self) -> Dict[int, Tuple[List[Shape], List[Shape]]]:
        """Every node's bottom and top shapes at :attr:`probe_batch` (the build's own shapes
        when the batch is static): the axes that differ follow the batch."""
        probe: Dict[int, Tuple[List[Shape], List[Shape]]] = {}
        blobs: Dict[str, Shape] = {}
        for node in self.graph.nodes:
            bottoms = [blobs[b] for b in node.bottoms]
            if self.static_batch:
                tops = list(node.top_shapes)
            elif node.is_input:
                tops = [(self.probe_batch,) + tuple(s[1:]) if self._is_batched_input(s) else s
                        for s in node.top_shapes]
            else:
                try:
                    tops = [tuple(s) for s in node.module.output_shapes(bottoms)]
                except ShapeError as error:
                    raise UnsupportedParameterError(
                        f"layer {node.name!r} ({node.type}) only fits batch size "
                        f"{self.batch} ({error}); convert with a static batch "
                        "(static_batch=True, --static-batch)") from None
            probe[id(node)] = (bottoms, tops)
            for top, shape in zip(node.tops, tops):
                blobs[top] = shape
        return probe

    def probe_shapes(self, node) -> Tuple[List[Shape], List[Shape]]:
        """``(bottom_shapes, top_shapes)`` of ``node`` at the probe batch size."""
        return self._probe[id(node)]

    # -- height and width ----------------------------------------------------------------
    @property
    def dynamic_size(self) -> bool:
        """Whether the inputs' height and width are symbolic (see the module docstring)."""
        return self._size.reason is None

    @property
    def fixed_size_reason(self) -> Optional[str]:
        """Why height and width stay at the prototxt's size (None when they are symbolic)."""
        return self._size.reason

    def follows_size(self, node) -> bool:
        """Whether ``node``'s blobs change with the inputs' height and width, so that its
        emitter must write nothing that depends on them."""
        if not self.dynamic_size:
            return False
        bottoms, tops = self._size.probe[id(node)]
        return ([tuple(s) for s in bottoms + tops] !=
                [tuple(s) for s in list(node.bottom_shapes) + list(node.top_shapes)])

    def flexible(self, build: Sequence[int], probe: Sequence[int]) -> List[int]:
        """A reshape target: ``build`` with ``-1`` on the one axis that follows the batch.

        ``build`` and ``probe`` are the same target computed at the build and the probe batch
        size; more than one differing axis cannot be written as a static target.
        """
        build, probe = list(build), list(probe)
        varying = [i for i, (a, b) in enumerate(zip(build, probe)) if a != b]
        if len(build) != len(probe) or len(varying) > 1:
            raise self.unsupported(f"the batch size reaches more than one axis of a reshape "
                                   f"to {'x'.join(map(str, build))}; convert with a static "
                                   "batch (static_batch=True, --static-batch)")
        for i in varying:
            build[i] = -1
        return build

    # -- names ---------------------------------------------------------------------------
    def _name_tops(self) -> Dict[int, List[str]]:
        """The ONNX name of every value each node produces (see the module docstring)."""
        last: Dict[str, int] = {}
        for node in self.graph.nodes:
            if not node.is_input:
                for top in node.tops:
                    last[top] = id(node)
        names: Dict[int, List[str]] = {}
        for node in self.graph.nodes:
            tops = []
            for top in node.tops:
                if node.is_input or (last.get(top) == id(node) and top not in self._input_values):
                    tops.append(top)
                else:
                    tops.append(_unique(f"{top}/{node.name}", self._taken))
            names[id(node)] = tops
        return names

    def fresh(self, hint: str) -> str:
        """A new unique value name ``layer/hint``."""
        prefix = self.node.name if self.node is not None else "caffelayers"
        return _unique(f"{prefix}/{hint}", self._taken)

    def bottoms(self, node) -> List[str]:
        """The ONNX names of the current values of ``node``'s bottoms."""
        return [self._current[b] for b in node.bottoms]

    def tops(self, node) -> List[str]:
        """The ONNX names ``node``'s emitter must produce, one per top."""
        return list(self._top_names[id(node)])

    def is_read(self, blob: str) -> bool:
        """Whether any layer reads ``blob``."""
        return blob in self._read

    # -- building ------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], outputs: Names = None,
           **attributes) -> Union[str, List[str]]:
        """Add one node; returns its output name (a list when it has several).

        ``outputs`` names the outputs (a Caffe top, typically), or is their number (fresh
        names); None means one fresh output. Empty strings in ``inputs`` skip optional
        inputs; attributes that are None are left out.
        """
        if outputs is None or isinstance(outputs, int):
            outputs = [self.fresh(op_type.lower()) for _ in range(outputs or 1)]
        elif isinstance(outputs, str):
            outputs = [outputs]
        outputs = list(outputs)
        prefix = self.node.name if self.node is not None else "caffelayers"
        # A layer's first node is named after it, the others after their op too.
        name = _unique(prefix if prefix not in self._node_names else f"{prefix}/{op_type}",
                       self._node_names)
        attributes = {k: v for k, v in attributes.items() if v is not None}
        # Every node says which Caffe layer it computes (a layer may take several nodes).
        doc = None if self.node is None else \
            f"Caffe layer {self.node.name!r} of type {self.node.type}"
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name,
                                           doc_string=doc, **attributes))
        self._produced.update(outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add ``array`` as an initializer named ``name`` (made unique); returns the name."""
        array = np.asarray(array)
        existing = self._initializer_arrays.get(name)
        if existing is not None and existing.dtype == array.dtype and \
                existing.shape == array.shape and np.array_equal(existing, array):
            return name  # a parameter shared by name (Caffe's param { name })
        name = _unique(name, self._taken)
        self._initializer_arrays[name] = array
        tensor = self.model.graph.initializer.add()
        if self._defer_values and array.dtype.kind in "biuf" and \
                array.nbytes >= CHECK_INLINE_LIMIT:
            tensor.name = name
            tensor.dims.extend(array.shape)
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            self.deferred[name] = array
        else:
            _fill_tensor(tensor, array, name)
        return name

    def param(self, node, index: int, array: Optional[np.ndarray] = None) -> str:
        """Caffe parameter blob ``index`` of ``node`` as a float32 initializer.

        Named ``layer/index``, or by the layer's ``param { name }`` when Caffe shares it.
        ``array`` replaces the blob's values where the emitter needs another layout of the
        same numbers (a broadcastable shape, a folded statistic).
        """
        if array is None:
            array = node.module.caffe_blobs()[index].detach().cpu().numpy()
        specs = node.param.param
        name = specs[index].name if index < len(specs) and specs[index].name else \
            f"{node.name}/{index}"
        return self.initializer(name, np.asarray(array, dtype=np.float32))

    def const(self, value, hint: str, dtype=np.float32) -> str:
        """A constant initializer ``layer/hint`` (float32 unless ``dtype`` says otherwise)."""
        prefix = self.node.name if self.node is not None else "caffelayers"
        return self.initializer(f"{prefix}/{hint}", np.asarray(value, dtype=dtype))

    def ints(self, values: Iterable[int], hint: str) -> str:
        """A 1-D int64 constant (shapes, axes, pads)."""
        return self.const(list(values), hint, np.int64)

    def reshape(self, value: str, build: Sequence[int], probe: Sequence[int],
                outputs: Names = None) -> str:
        """``Reshape`` to a target given at both batch sizes (see :meth:`flexible`)."""
        target = self.flexible(build, probe)
        return self.op("Reshape", [value, self.ints(target, "shape")], outputs)

    def reduce(self, op_type: str, value: str, axes: Sequence[int], keepdims: bool,
               outputs: Names = None) -> str:
        """A ``Reduce*`` node, with ``axes`` as an input or an attribute as the opset wants
        (ReduceSum takes an input from opset 13, the others from opset 18)."""
        keep = int(bool(keepdims))
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [value, self.ints(axes, "axes")], outputs, keepdims=keep)
        return self.op(op_type, [value], outputs, axes=list(axes), keepdims=keep)

    def add_input(self, name: str, shape: Sequence[int], elem_type: int = TensorProto.FLOAT,
                  batched: Optional[bool] = None) -> str:
        """Declare a graph input; axis 0 is the symbolic batch when ``batched`` (by default,
        when the batch is dynamic and axis 0 has the net's batch size), and the axes after
        the channels are symbolic when the input's height and width are."""
        shape = tuple(shape)
        if batched is None:
            batched = self._is_batched_input(shape)
        sized = self._size.axes.get(name, {})
        dims = [BATCH if batched and i == 0 else sized.get(i, d) for i, d in enumerate(shape)]
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, dims))
        self._taken.add(name)
        return name

    def unsupported(self, message: str) -> UnsupportedParameterError:
        """An ``UnsupportedParameterError`` naming the layer being emitted."""
        node = self.node
        where = f"layer {node.name!r} ({node.type}): " if node is not None else ""
        return UnsupportedParameterError(f"{where}{message} (ONNX export)")

    # -- values of Caffe blobs -----------------------------------------------------------
    def _value_dims(self, build: Shape, probe: Shape, sized: Shape
                    ) -> List[Union[int, str, None]]:
        dims: List[Union[int, str, None]] = []
        for a, b, c in zip(build, probe, sized):
            if a != c:
                dims.append(None)  # follows the height or width: left to shape inference
            elif a == b:
                dims.append(a)
            elif a == self.batch and b == self.probe_batch:
                dims.append(BATCH)
            else:
                dims.append(None)  # follows the batch some other way: left unknown
        return dims

    def value_info_for(self, value: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(value, TensorProto.FLOAT,
                                             self._value_dims(*self._shapes[value]))

    def _emit(self, node) -> None:
        """Run ``node``'s emitter; its tops are bound to their names even when it raises,
        so that the layers after it can still be emitted and their problems reported."""
        self.node = node
        tops = self.tops(node)
        try:
            EMITTERS[node.type](self, node)
        finally:
            self._bind_tops(node, tops)
            self.node = None
        missing = [t for t in tops if t not in self._produced and not node.is_input]
        if missing:
            raise RuntimeError(f"the ONNX emitter for {node.type} did not produce "
                               f"{', '.join(missing)} for layer {node.name!r}")

    def _bind_tops(self, node, tops: List[str]) -> None:
        _, probe_tops = self.probe_shapes(node)
        _, sized_tops = self._size.probe.get(id(node), (None, node.top_shapes))
        for top, value, build, probe, sized in zip(node.tops, tops, node.top_shapes,
                                                   probe_tops, sized_tops):
            self._current[top] = value
            self._shapes[value] = (tuple(build), tuple(probe), tuple(sized))
            if not node.is_input:
                self.value_info.append(self.value_info_for(value))


def _fill_tensor(tensor: onnx.TensorProto, array: np.ndarray, name: str) -> None:
    """Write ``array`` into ``tensor`` as ``numpy_helper.from_array`` would, with one copy
    of the values (the bytes handed to protobuf) instead of its several."""
    if array.dtype.kind not in "biuf":
        tensor.CopyFrom(numpy_helper.from_array(array, name))
        return
    tensor.name = name
    tensor.dims.extend(array.shape)
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    # ONNX stores raw data little-endian.
    tensor.raw_data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def missing_emitters(graph) -> List[Tuple[str, str]]:
    """``(name, type)`` of every layer of ``graph`` that has no ONNX emitter."""
    return [(node.name, node.type) for node in graph.nodes if node.type not in EMITTERS]


def check_convertible(graph) -> None:
    """Raise one ``UnknownLayerError`` listing every layer that has no ONNX emitter, with the
    reason for the types that are left out on purpose.

    ``graph`` may come from ``build_graph(..., strict=False)`` (as ``inspect`` builds it), so
    that types without a module are listed together with those without an emitter, before
    any ``Net`` is built.
    """
    missing = missing_emitters(graph)
    if not missing:
        return
    reasons = []
    for type_ in dict.fromkeys(type_ for _, type_ in missing):
        if type_ in UNSUPPORTED:
            reasons.append(f"{type_} is {UNSUPPORTED[type_]}")
        elif type_ not in LAYERS:
            reasons.append(f"{type_} has no module either "
                           '(@caffelayers.register_layer("TYPE"))')
    how = 'register one with @caffelayers.register_emitter("TYPE")'
    if reasons:
        how = "; ".join(reasons) + "; for other types, " + how
    raise UnknownLayerError(missing, what="ONNX emitter", how=how)


def _graph_of(net):
    return getattr(net, "graph", net)


def convert_to_onnx(net, opset: int = DEFAULT_OPSET, static_batch: bool = False,
                    outputs: Optional[Iterable[str]] = None, check: bool = True,
                    static_shape: bool = False) -> onnx.ModelProto:
    """Convert a built ``caffelayers.Net`` (or its ``NetGraph``) to an ONNX model.

    Args:
        net: the net, with its parameters loaded (``Net(prototxt, caffemodel)``).
        opset: the ONNX opset of the default domain, 13 or newer.
        static_batch: fix axis 0 of the inputs at the net's batch size instead of a symbolic
            ``batch``.
        outputs: Caffe blobs to expose as graph outputs besides the net's own outputs (each
            as its last value; input blobs are left out, they are the inputs).
        check: run ONNX's full checker (:func:`check_model`) on the model.
        static_shape: keep the inputs' height and width at the prototxt's size even where
            the net is fully convolutional (by default they are then the symbolic
            ``height`` and ``width``; :func:`fixed_size_reason` says why a net keeps them).

    Returns:
        The model. Its metadata ``caffelayers.outputs`` maps each graph output to its blob.

    Raises:
        UnknownLayerError: listing every layer without an emitter, before anything else.
        UnsupportedParameterError: listing every layer whose settings ONNX cannot express
            (Dropout in a TRAIN net, for example).
    """
    return _convert(net, opset, static_batch, outputs, check, defer_values=False,
                    static_shape=static_shape).model


def _convert(net, opset, static_batch, outputs, check, defer_values,
             static_shape=False) -> EmitContext:
    """:func:`convert_to_onnx`, returning the context (its ``model``, and the ``deferred``
    values of large initializers when ``defer_values``)."""
    if not MIN_OPSET <= int(opset) <= onnx.defs.onnx_opset_version():
        raise CaffeLayersError(f"opset {opset} is not supported: give {MIN_OPSET} to "
                               f"{onnx.defs.onnx_opset_version()} (default {DEFAULT_OPSET})")
    graph = _graph_of(net)
    check_convertible(graph)
    ctx = EmitContext(graph, opset, static_batch, defer_values, static_shape)
    problems = []
    for node in graph.nodes:
        try:
            ctx._emit(node)
        except UnsupportedParameterError as error:
            problems.append(str(error))
    if problems:
        raise UnsupportedParameterError("; ".join(problems))

    wanted = list(graph.outputs)
    for blob in outputs or ():
        if blob not in graph.blob_shapes:
            raise CaffeLayersError(f"output {blob!r}: the net has no blob of that name")
        if blob not in wanted:
            wanted.append(blob)
    graph_outputs, mapping = [], {}
    for blob in wanted:
        value = ctx._current.get(blob)
        if value is None or value in ctx._input_values:
            continue  # an input blob nothing rewrites: a graph input (or unused) already
        graph_outputs.append(ctx.value_info_for(value))
        mapping[value] = blob
    declared = {v.name for v in graph_outputs}
    # The model is filled in place: the initializers are already in ctx.model, and
    # make_graph/make_model would copy every tensor (twice).
    model = ctx.model
    onnx_graph = model.graph
    onnx_graph.name = graph.name or "caffe_net"
    onnx_graph.node.extend(ctx.nodes)
    onnx_graph.input.extend(ctx.inputs)
    onnx_graph.output.extend(graph_outputs)
    onnx_graph.value_info.extend(v for v in ctx.value_info if v.name not in declared)
    opset_imports = [helper.make_opsetid("", int(opset))]
    model.opset_import.extend(opset_imports)
    from ... import __version__
    model.ir_version = helper.find_min_ir_version_for(opset_imports)
    model.producer_name, model.producer_version = "caffelayers", __version__
    props = {OUTPUTS_METADATA: json.dumps(mapping)}
    sources = {key: Path(path).name for key, path in
               ((PROTOTXT_METADATA, getattr(net, "source_file", None)),
                (CAFFEMODEL_METADATA, getattr(net, "weights_path", None))) if path}
    props.update(sources)
    helper.set_model_props(model, props)
    if sources:
        model.doc_string = "Converted by caffelayers from " + " and ".join(sources.values())
    if check:
        _check(model, set(ctx.deferred))
    return ctx


def output_blobs(model: onnx.ModelProto) -> Dict[str, str]:
    """``{graph output name: Caffe blob}`` as recorded by :func:`convert_to_onnx`."""
    for prop in model.metadata_props:
        if prop.key == OUTPUTS_METADATA:
            return json.loads(prop.value)
    return {out.name: out.name for out in model.graph.output}


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of the values of the model's initializers kept in the model itself (not in
    external data): the size of a serialized model, less the graph around them.

    Counted from the shapes and types, without serializing anything (``ByteSize`` does).
    """
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        size = _item_size(tensor.data_type)
        total += tensor.ByteSize() if size is None else size * int(np.prod(tensor.dims))
    return total


def _item_size(data_type: int) -> Optional[int]:
    """Bytes per element of a tensor type, None for strings (no fixed size)."""
    if data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _large(tensor: onnx.TensorProto, threshold: int) -> bool:
    """Whether ``tensor`` keeps at least ``threshold`` bytes in ``raw_data`` (the tensors
    that external data moves out of the model, as ONNX's own saver does)."""
    if tensor.data_location == TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return False
    size = _item_size(tensor.data_type)
    return size is not None and size * int(np.prod(tensor.dims)) >= threshold


#: Initializers of at least this many bytes are left out of the copy the checker reads
#: (small ones stay: shape inference reads constant shapes and axes from them).
CHECK_INLINE_LIMIT = 2 ** 16


def check_model(model: onnx.ModelProto) -> None:
    """ONNX's full checker (``onnx.checker.check_model(full_check=True)``, shape inference
    included) on ``model`` without the values of its large initializers.

    The checker takes a serialized model, which for a large model costs seconds and a
    second copy of every weight; what it checks of a weight is its type and shape, and
    that its data is where the tensor says. So the large tensors go to the checker as
    external data (type and shape, no values) in an empty file, and the values are known
    to fit their shapes because :class:`EmitContext` wrote them from arrays of those shapes.
    """
    _check(model, set())


def _check(model: onnx.ModelProto, deferred) -> None:
    """:func:`check_model`; the initializers named in ``deferred`` have no values yet."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="caffelayers-onnx-check-") as folder:
        data = "weights.data"
        (Path(folder) / data).touch()
        path = Path(folder) / "model.onnx"

        def parts(tensor):
            if tensor.name in deferred or _large(tensor, CHECK_INLINE_LIMIT):
                return [_external_header(tensor, data, 0, 0).SerializeToString()]
            return _tensor_parts(tensor)

        with open(path, "wb") as file:
            _write_model(file, model, parts)
        onnx.checker.check_model(str(path), full_check=True)


# Serialized ModelProto: field 7 is the graph; in GraphProto field 5 is an initializer.
# Protobuf merges repeated occurrences of a message field, so a model written as the model
# without initializers followed by one ``graph { initializer }`` record per tensor reads
# back as the model itself: each tensor is serialized on its own, never the whole model.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _record(field: int, payload_size: int) -> bytes:
    """The key and length of a length-delimited field."""
    return _varint((field << 3) | 2) + _varint(payload_size)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose graph has no initializers (copied field by field, so that
    no tensor is copied)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    if model.HasField("graph"):
        shell.graph.SetInParent()
        _copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def _repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; ``label`` before
    return field.label == field.LABEL_REPEATED if repeated is None else repeated


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if _repeated(field):
            getattr(target, field.name).extend(value)
        else:
            _copy_value(target, field, value)


def _header(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """``tensor`` without its ``raw_data`` (copied field by field: reading ``raw_data``
    copies the values)."""
    header = onnx.TensorProto()
    for field in tensor.DESCRIPTOR.fields:
        if field.name == "raw_data":
            continue
        if _repeated(field):
            getattr(header, field.name).extend(getattr(tensor, field.name))
        elif tensor.HasField(field.name):
            _copy_value(header, field, getattr(tensor, field.name))
    return header


def _copy_value(target, field, value) -> None:
    if field.message_type is not None:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _external_header(tensor: onnx.TensorProto, location: str, offset: int,
                     length: int) -> onnx.TensorProto:
    """``tensor`` without its values, pointing at ``length`` bytes at ``offset`` of the
    external data file ``location``."""
    header = _header(tensor)
    header.ClearField("external_data")
    header.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        entry = header.external_data.add()
        entry.key, entry.value = key, value
    return header


_TENSOR_RAW_DATA = 9  # TensorProto.raw_data


def _write_model(file, model: onnx.ModelProto, parts_for) -> None:
    """Write ``model`` to ``file`` one tensor at a time, each tensor as the pieces
    ``parts_for(tensor)`` returns (which add up to the tensor, or to what stands for it)."""
    file.write(_without_initializers(model).SerializeToString())
    for tensor in model.graph.initializer:
        # The parts are a temporary: one tensor's values are held at a time.
        _write_initializer(file, parts_for(tensor))


def _tensor_parts(tensor: onnx.TensorProto, values=None) -> list:
    """The serialized ``tensor`` in pieces; ``values`` (any buffer) are its raw data where
    the tensor holds none itself.

    A tensor with ``raw_data`` is written as its other fields, then the values: protobuf's
    ``SerializeToString`` would hold the values twice (its buffer and the bytes object).
    """
    if values is None:
        if not tensor.HasField("raw_data"):
            return [tensor.SerializeToString()]
        values = tensor.raw_data
    values = memoryview(values).cast("B")
    return [_header(tensor).SerializeToString(), _record(_TENSOR_RAW_DATA, len(values)),
            values]


def _write_initializer(file, parts: list) -> None:
    """One ``graph { initializer { parts } }`` record."""
    size = sum(len(part) for part in parts)
    inner = _record(_GRAPH_INITIALIZER, size)
    file.write(_record(_MODEL_GRAPH, len(inner) + size))
    file.write(inner)
    for part in parts:
        file.write(part)


#: Offsets of tensors in an external data file are multiples of this (mmap-friendly).
EXTERNAL_ALIGNMENT = 4096


def save_onnx(model: onnx.ModelProto, path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
              check: bool = True) -> List[Path]:
    """Write ``model`` to ``path``; returns the files written.

    Models whose tensors exceed ``external_data_threshold`` bytes (by default just under the
    2 GiB protobuf limit) keep their tensors of 1 KiB or more in ``<file name>.data`` next
    to the model, as ONNX's external data; the model object itself is left as it was. The
    model is written one tensor at a time, so that saving costs one tensor's bytes of
    memory, not the whole serialized model.

    Args:
        model: an ONNX model (from :func:`convert_to_onnx`).
        path: the ``.onnx`` file to write.
        external_data_threshold: tensor bytes above which external data is used.
        check: run the full checker on the written file when external data was used (with
            the data inline, :func:`convert_to_onnx` has checked the model already).
    """
    return _save(model, path, external_data_threshold, check, {})


def _save(model: onnx.ModelProto, path, external_data_threshold: int, check: bool,
          deferred: Mapping[str, np.ndarray]) -> List[Path]:
    """:func:`save_onnx`; the initializers named in ``deferred`` take their values from
    those arrays."""
    path = Path(path)

    def values_of(tensor):
        array = deferred.get(tensor.name)
        if array is None or tensor.HasField("raw_data"):
            return None
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))

    if tensor_bytes(model) <= external_data_threshold:
        with open(path, "wb") as file:
            _write_model(file, model, lambda tensor: _tensor_parts(tensor, values_of(tensor)))
        return [path]
    location = path.name + ".data"
    data_path = path.parent / location
    with open(data_path, "wb") as data:  # replaced, never appended to

        def parts(tensor: onnx.TensorProto) -> list:
            values = values_of(tensor)  # deferred values are all large
            if values is None:
                if not _large(tensor, 1024):
                    return _tensor_parts(tensor)
                values = tensor.raw_data
            values = memoryview(values).cast("B")
            offset = -data.tell() % EXTERNAL_ALIGNMENT + data.tell()
            data.seek(offset)
            data.write(values)
            return [_external_header(tensor, location, offset, len(values)).SerializeToString()]

        with open(path, "wb") as file:
            _write_model(file, model, parts)
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    return [path, data_path]


def export_onnx(net, path, opset: int = DEFAULT_OPSET, static_batch: bool = False,
                outputs: Optional[Iterable[str]] = None, check: bool = True,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                static_shape: bool = False) -> List[Path]:
    """``save_onnx(convert_to_onnx(net, ...), path)`` without a model in memory: the large
    tensors go from the net's parameters straight to the file, so converting costs the
    graph and one tensor at most, not a second copy of the weights.

    Args: as :func:`convert_to_onnx` and :func:`save_onnx`.

    Returns:
        The files written (the model, and its external data past the threshold).
    """
    ctx = _convert(net, opset, static_batch, outputs, check, defer_values=True,
                   static_shape=static_shape)
    return _save(ctx.model, path, external_data_threshold, check, ctx.deferred)
