"""``Net``: a Caffe net as a ``torch.nn.Module``, with Caffe's blob semantics.

Blobs are named as in the prototxt. An in-place layer (``top == bottom``) rebinds the name to
its output, so ``net.blobs[name]`` is the last version, as Caffe's shared buffer would hold;
``net.diffs[name]`` is the gradient at the blob's first producer, which is what Caffe's shared
diff holds after every in-place layer's backward. A blob read by several layers gets the sum
of their gradients (Caffe's split layers), which autograd does by itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .errors import CaffeFormatError, CaffeLayersError, shape_text
from .graph import located, build_graph, load_net_param, reshape_graph
from .layers.base import BuildContext, CaffeLayer


def _module_key(layer_name: str, taken) -> str:
    """A ModuleDict key for a Caffe layer name: no '.', and no clash with an attribute of
    ``nn.ModuleDict`` (a layer may be called ``train`` or ``double``) or another key."""
    key = layer_name.replace(".", "_")
    while hasattr(nn.ModuleDict, key) or key in taken:
        key += "_"
    return key


def read_weights(path, lazy: bool = False) -> Dict[str, list]:
    """A caffemodel's blobs by layer name (only layers that have blobs): arrays, or with
    ``lazy`` :class:`~caffelayers.proto.io.StoredBlob` objects (``shape``, ``size``,
    ``dtype``, ``read(out=None)``) that read their values from the file when asked.

    Either way the file is scanned without parsing the values into a protobuf message, so
    reading costs the arrays (or, lazily, nothing until they are read).
    """
    from .proto import io

    _, stored = io.read_caffemodel_blobs(path)
    if lazy:
        return stored
    return {name: [blob.read() for blob in blobs] for name, blobs in stored.items()}


def check_weights_fit(nodes, trained: Mapping[str, list], path) -> List[str]:
    """Raise one error naming every layer whose trained blobs do not fit the net; return the
    names of the layers with parameters that the file leaves on their fillers.

    ``trained`` is :func:`read_weights`'s lazy result (stored blobs; only their shapes are
    read). As Caffe's ``CopyTrainedLayersFrom``: layers absent from the net are ignored, and
    a blob fits when ``Blob::ShapeEquals`` says so: the same shape, or for a blob stored with
    the legacy num/channels/height/width fields the net's shape padded with leading 1s to four
    axes. A flat blob with the right count, or 3x4x3x3 where the net wants 4x3x3x3, does not
    fit. A file that shares no layer with the net's parametrised layers is the weights of
    another net.
    """
    problems = []
    with_params = [node for node in nodes if node.module is not None
                   and node.module.caffe_blobs()]
    for node in with_params:
        if node.name not in trained:
            continue
        targets, stored = node.module.caffe_blobs(), trained[node.name]
        if len(stored) != len(targets):
            problems.append(f"layer {node.name!r} ({node.type}) has {len(stored)} blobs, the "
                            f"net expects {len(targets)}")
            continue
        for index, (blob, target) in enumerate(zip(stored, targets)):
            if not blob.fits(target.shape):
                problems.append(f"layer {node.name!r} ({node.type}) blob {index}: shape "
                                f"mismatch, the file has {shape_text(blob.shape)}"
                                f"{' (legacy num/channels/height/width)' if blob.legacy else ''}"
                                f", the net expects {shape_text(target.shape)}")
    if with_params and not any(node.name in trained for node in with_params):
        problems.append("none of the net's layers with parameters "
                        f"({', '.join(repr(n.name) for n in with_params[:5])}"
                        f"{', ...' if len(with_params) > 5 else ''}) is in the file, which has "
                        f"{', '.join(map(repr, list(trained)[:5])) or 'no blobs'}"
                        f"{', ...' if len(trained) > 5 else ''}: weights of another net?")
    if problems:
        raise CaffeFormatError("weights do not fit the net: " + "; ".join(problems), path=path)
    return [node.name for node in with_params if node.name not in trained]


def warn_unloaded(layers: Sequence[str], path) -> None:
    if layers:
        warnings.warn(f"{path}: no weights for layer{'s' if len(layers) > 1 else ''} "
                      f"{', '.join(map(repr, layers))}; they keep the prototxt's fillers",
                      stacklevel=3)


class Net(nn.Module):
    """A Caffe net built from a prototxt (and optionally a caffemodel).

    Args:
        prototxt: path to a net prototxt, or an upgraded ``NetParameter``.
        weights: path to a ``.caffemodel``; without it, parameters come from the fillers.
        phase: ``"TRAIN"`` or ``"TEST"``: which layers are in the net and how they behave.
        inputs: shapes for input blobs the prototxt leaves open (``{"data": (1, 3, 224, 224)}``).
        margin_backward: ``"caffe"`` (SphereFace's trick gradient) or ``"exact"``.
        loss_mode: ``"caffe"`` (Caffe's probability floors) or ``"exact"`` (stable log-softmax).
        seed: seeds the fillers, for a repeatable net without weights.
        dtype, device: where the parameters live; float64 serves gradient checks.
        source_file: the file a ``NetParameter`` given as ``prototxt`` was written in (a
            solver's inline ``net_param``), so that errors name it and the layer's line.

    Attributes:
        graph: the :class:`~caffelayers.graph.NetGraph` (layers, shapes).
        layers: submodules keyed by Caffe layer name.
        blobs, diffs: the named blobs after the last ``forward``/``backward``.
        param_specs: per layer, ``(lr_mult, decay_mult)`` for each Caffe blob.
    """

    def __init__(self, prototxt, weights: Optional[str | Path] = None, phase: str = "TEST",
                 inputs: Optional[Mapping[str, Sequence[int]]] = None, *, level: int = 0,
                 stages: Sequence[str] = (), margin_backward: str = "caffe",
                 loss_mode: str = "caffe", seed: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 allow_unknown_fields: bool = False, source_file: Optional[str | Path] = None):
        super().__init__()
        if margin_backward not in ("caffe", "exact"):
            raise CaffeLayersError(f"margin_backward must be 'caffe' or 'exact', got "
                                   f"{margin_backward!r}")
        if loss_mode not in ("caffe", "exact"):
            raise CaffeLayersError(f"loss_mode must be 'caffe' or 'exact', got {loss_mode!r}")
        if isinstance(prototxt, (str, Path)):
            source_file = Path(prototxt)
        elif source_file is not None:
            source_file = Path(source_file)
        with located(source_file):
            net_param, source_dir = load_net_param(prototxt, phase, level, stages,
                                                   allow_unknown_fields)
        #: where the data layers' relative file names are also looked for.
        self.source_dir = source_dir
        self.phase = phase.upper()
        self.weights_path = None if weights is None else str(weights)
        trained = read_weights(weights, lazy=True) if weights is not None else {}
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.source_file = source_file
        self._dtype, self._device = dtype, torch.device(device)
        ctx = BuildContext(phase=self.phase, source_dir=source_dir, source_file=source_file,
                           generator=generator,
                           options={"margin_backward": margin_backward, "loss_mode": loss_mode})
        self.graph = build_graph(net_param, inputs, ctx, device="cpu", strict=True,
                                 no_fill=trained.keys())
        #: layers with parameters that the caffemodel does not hold: they keep their fillers.
        self.unloaded_layers: List[str] = []
        if weights is not None:
            self.unloaded_layers = check_weights_fit(self.graph.nodes, trained,
                                                     self.weights_path)
            warn_unloaded(self.unloaded_layers, self.weights_path)
        self.layers = nn.ModuleDict()
        self._keys: Dict[str, str] = {}  # Caffe layer name -> key in self.layers
        self.param_specs: Dict[str, List[Tuple[float, float]]] = {}
        for node in self.graph.nodes:
            self._keys[node.name] = _module_key(node.name, self.layers)
            self.layers[self._keys[node.name]] = node.module
            blobs = node.module.caffe_blobs()
            specs = list(node.param.param)
            self.param_specs[node.name] = [
                (specs[i].lr_mult, specs[i].decay_mult) if i < len(specs) else (1.0, 1.0)
                for i in range(len(blobs))]
        self._load_trained(trained, self.weights_path)
        self._share_named_params()
        self.to(device=device, dtype=dtype)
        self.blobs: Dict[str, torch.Tensor] = {}
        self.diffs: Dict[str, torch.Tensor] = {}
        self._first_versions: Dict[str, torch.Tensor] = {}

    def copy_trained_layers(self, path: str | Path) -> None:
        """Caffe's ``CopyTrainedLayersFrom``: load the blobs of the layers that the caffemodel
        and the net share by name, after checking that all of them fit."""
        trained = read_weights(path, lazy=True)
        warn_unloaded(check_weights_fit(self.graph.nodes, trained, str(path)), path)
        self._load_trained(trained, str(path))

    def _load_trained(self, trained: Mapping[str, list], source) -> None:
        """Read stored blobs (fitted by :func:`check_weights_fit`) into the layers."""
        for node in self.graph.nodes:
            stored, blobs = trained.get(node.name), node.module.caffe_blobs()
            if not stored or not blobs:
                continue
            if type(node.module).load_caffe_blobs is CaffeLayer.load_caffe_blobs and all(
                    target.device.type == "cpu" and target.dtype == torch.float32
                    and target.is_contiguous() and blob.dtype == np.float32
                    for blob, target in zip(stored, blobs)):
                # Straight from the file into the parameters: no copy of the weights is
                # held beside them.
                for blob, target in zip(stored, blobs):
                    blob.read(out=target.detach().numpy())
            else:
                node.module.load_caffe_blobs([blob.read() for blob in stored], source=source)

    def _share_named_params(self) -> None:
        """Tie blobs whose ``param { name }`` repeats, as Caffe's shared weights (siamese nets):
        every later layer uses the first owner's parameter object."""
        owners: Dict[str, Tuple[str, torch.Tensor]] = {}
        for node in self.graph.nodes:
            blobs = node.module.caffe_blobs()
            for index, spec in enumerate(node.param.param[:len(blobs)]):
                if not spec.name:
                    continue
                if spec.name not in owners:
                    owners[spec.name] = (node.name, blobs[index])
                    continue
                owner_layer, shared = owners[spec.name]
                if tuple(shared.shape) != tuple(blobs[index].shape):
                    raise CaffeFormatError(
                        f"layer {node.name!r} shares parameter {spec.name!r} with layer "
                        f"{owner_layer!r}, but their shapes differ: "
                        f"{tuple(blobs[index].shape)} and {tuple(shared.shape)}")
                for attribute, value in list(node.module.named_parameters(recurse=False)):
                    if value is blobs[index]:
                        setattr(node.module, attribute, shared)

    # -- weights ---------------------------------------------------------------------------
    def layer(self, name: str):
        """The module of Caffe layer ``name``."""
        return self.layers[self._keys[name]]

    def caffe_params(self) -> Dict[str, List[torch.Tensor]]:
        """Each layer's blobs in Caffe's order (parameters and statistics buffers)."""
        return {node.name: node.module.caffe_blobs() for node in self.graph.nodes
                if node.module.caffe_blobs()}

    def save_caffemodel(self, path: str | Path) -> None:
        """Write the weights as a binary ``NetParameter`` that Caffe's ``CopyTrainedLayersFrom``
        reads: one entry per layer in net order (as Caffe's ``Net::ToProto``, so that a net
        without parameters still writes a model), blobs in today's ``shape`` field."""
        from .proto import caffe_pb2, io

        model = caffe_pb2.NetParameter(name=self.graph.name)
        for node in self.graph.nodes:
            blobs = node.module.caffe_blobs()
            layer = model.layer.add(name=node.name, type=node.type)
            layer.bottom.extend(node.bottoms)
            layer.top.extend(node.tops)
            for blob in blobs:
                layer.blobs.append(io.array_to_blob(blob.detach().cpu().numpy()))
        io.write_caffemodel(model, path)

    # -- running ---------------------------------------------------------------------------
    @property
    def inputs(self) -> List[str]:
        return self.graph.inputs

    @property
    def outputs(self) -> List[str]:
        return self.graph.outputs

    def _as_tensor(self, name: str, value) -> torch.Tensor:
        # The parameters' dtype and device (moved by .to() or .double() since the build), else
        # the ones the net was built with: a net without parameters still runs in float64.
        reference = next(iter(self.buffers()), None)
        reference = next(iter(self.parameters()), reference)
        dtype = reference.dtype if reference is not None else self._dtype
        device = reference.device if reference is not None else self._device
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value).reshape(np.shape(value)))
        elif not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        return value.to(device=device, dtype=dtype)  # labels too: Caffe stores them as floats

    def reshape(self, **input_shapes: Sequence[int]) -> None:
        """Caffe's ``net.blobs[name].reshape(...)`` then ``net.reshape()``: new shapes for input
        blobs, every layer's shape rule run again, weights untouched.

        ``forward`` does this by itself when it is fed inputs of other shapes (an image
        pyramid through a fully convolutional net); a layer whose weights fix a size
        (InnerProduct after the convolutions) refuses with its name.
        """
        reshape_graph(self.graph, input_shapes, self.source_file)

    def forward(self, **inputs) -> Dict[str, torch.Tensor]:
        """Run every layer in order; returns the net's output blobs by name.

        Keyword arguments feed the input blobs (numpy arrays or tensors; labels as floats
        holding integers, as Caffe stores them). Floating inputs require grad while grad mode
        is on, so that ``backward`` can report their diffs.
        """
        missing = [name for name in self.inputs if name not in inputs]
        extra = [name for name in inputs if name not in self.inputs]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing inputs {', '.join(missing)}")
            if extra:
                parts.append(f"unknown inputs {', '.join(extra)}")
            raise CaffeLayersError(f"net {self.graph.name!r}: {'; '.join(parts)} (its inputs "
                                   f"are {', '.join(self.inputs) or 'none'})")
        inputs = {name: self._as_tensor(name, value) for name, value in inputs.items()}
        changed = {name: tuple(value.shape) for name, value in inputs.items()
                   if tuple(value.shape) != self.graph.blob_shapes.get(name)}
        if changed:
            self.reshape(**changed)
        blobs: Dict[str, torch.Tensor] = {}
        first: Dict[str, torch.Tensor] = {}
        for node in self.graph.nodes:
            if node.is_input:
                for top in node.tops:
                    value = inputs[top]
                    if torch.is_grad_enabled() and not value.requires_grad:
                        value = value.detach().requires_grad_(True)
                    blobs[top] = first[top] = value
                continue
            bottoms = [blobs[b] for b in node.bottoms]
            for i, keep in enumerate(node.param.propagate_down):
                if not keep and i < len(bottoms):
                    bottoms[i] = bottoms[i].detach()
            out = node.module(*bottoms)
            tops = out if isinstance(out, tuple) else (out,)
            for top, value in zip(node.tops, tops):
                blobs[top] = value
                if top not in node.bottoms:
                    first[top] = value
        for value in first.values():
            if value.requires_grad and not value.is_leaf:
                value.retain_grad()
        self.blobs, self._first_versions, self.diffs = blobs, first, {}
        return {name: blobs[name] for name in self.outputs}

    def losses(self) -> List[Tuple[str, float, torch.Tensor]]:
        """``(blob, loss_weight, value)`` for every top with a non-zero loss weight."""
        found = []
        for node in self.graph.nodes:
            for top, weight in zip(node.tops, node.loss_weights):
                if weight:
                    found.append((top, weight, self.blobs[top]))
        return found

    def loss(self) -> torch.Tensor:
        """The weighted sum of the loss tops of the last forward (Caffe's net loss)."""
        terms = [weight * value.sum() for _, weight, value in self.losses()]
        if not terms:
            raise CaffeLayersError(f"net {self.graph.name!r} has no loss layer")
        return torch.stack(terms).sum()

    def backward(self, top_diffs: Optional[Mapping[str, object]] = None) -> Dict[str, torch.Tensor]:
        """Backpropagate from the loss tops (scaled by ``loss_weight``) and from ``top_diffs``.

        Parameter gradients accumulate into ``.grad`` as Caffe's param diffs do; call
        :meth:`clear_param_diffs` first for a fresh gradient. Returns and keeps
        ``net.diffs``: each blob's gradient at its first producer (zeros where none flows).
        """
        if not self.blobs:
            raise CaffeLayersError("backward needs a forward first")
        roots, grads = [], []
        for _, weight, value in self.losses():
            if value.requires_grad:
                roots.append(value)
                grads.append(torch.full_like(value, weight))
        for name, diff in (top_diffs or {}).items():
            if name not in self.blobs:
                raise CaffeLayersError(f"top diff for {name!r}: the net has no such blob")
            value = self.blobs[name]
            diff = self._as_tensor(name, diff) if not isinstance(diff, torch.Tensor) else diff
            if tuple(diff.shape) != tuple(value.shape):
                raise CaffeLayersError(f"top diff for {name!r} has shape {tuple(diff.shape)}, "
                                       f"the blob has {tuple(value.shape)}")
            if value.requires_grad:
                roots.append(value)
                grads.append(diff.to(dtype=value.dtype, device=value.device))
        if roots:
            torch.autograd.backward(roots, grads)
        self.diffs = {name: (value.grad if value.grad is not None else torch.zeros_like(value))
                      for name, value in self._first_versions.items()}
        return self.diffs

    def clear_param_diffs(self) -> None:
        """Zero every parameter gradient (Caffe's ``ClearParamDiffs``)."""
        for parameter in self.parameters():
            parameter.grad = None

    def param_diffs(self) -> Dict[str, List[torch.Tensor]]:
        """Each layer's blob gradients in Caffe's order (zeros for statistics buffers)."""
        return {name: [b.grad if b.grad is not None else torch.zeros_like(b) for b in blobs]
                for name, blobs in self.caffe_params().items()}

    def extra_repr(self) -> str:
        return f"name={self.graph.name!r}, phase={self.phase}"
