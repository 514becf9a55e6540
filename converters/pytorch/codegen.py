"""Generate ``model.py`` (readable PyTorch source) and ``weights.pt`` from a built net.

The generator walks the graph in Caffe's order. Input blobs become ``forward``'s arguments;
every other layer is written by the source emitter registered for its type, which declares
submodules (with the tensors for ``weights.pt``) and writes ``forward`` lines. Blob names
become local variables, so an in-place chain reads ``conv1 = self.relu1(conv1)``, as Caffe's
shared blob behaves. ``forward`` returns the net's output blobs: the tensor itself when there
is one, else a dict keyed by the Caffe blob names (the same keys as ``Net.forward``).
"""

from __future__ import annotations

import importlib.util
import itertools
import keyword
import re
import sys
import textwrap
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from caffelayers.errors import CaffeLayersError, UnknownLayerError, shape_text
from caffelayers.registry import LAYERS

from . import emit_layers, emit_neuron, emit_project, emit_shape  # noqa: F401  (registers)
from .registry import SOURCE_EMITTERS
from .source import LINE_WIDTH, LayerSource, Namespace, comment_lines, literal, wrap

MODEL_FILE = "model.py"
WEIGHTS_FILE = "weights.pt"

#: names the generated file binds at module level, plus the builtin its forward code calls;
#: a blob variable must not shadow them. ``l``, ``I`` and ``O`` are refused by ruff (E741).
_GLOBAL_NAMES = ({"self", "torch", "nn", "F", "float", "l", "I", "O"}
                 | {cls.__name__ for cls in LAYERS.values()})
#: a submodule must not hide an nn.Module method or attribute (a layer named "train").
_MODULE_ATTRIBUTES = set(dir(nn.Module())) | {"input_names", "output_names"}

_HOW = ('register one with @caffelayers.converters.pytorch.register_source_emitter("TYPE"); '
        "emitters live in converters/pytorch/emit_*.py")

_module_counter = itertools.count()


@dataclass
class GeneratedModel:
    """The generated source and the state_dict that goes with it.

    The state's tensors share memory with the net's parameters where those are whole CPU
    tensors already (no copy of the weights is made): change the net, and the state follows.
    """

    source: str
    state: "OrderedDict[str, torch.Tensor]"
    class_name: str
    input_names: List[str]
    output_names: List[str]
    #: ``(name, type)`` of the layers built from an imported caffelayers module.
    imported_layers: List[Tuple[str, str]]


def missing_emitters(graph) -> List[tuple]:
    """``(name, type)`` of every non-input layer without a source emitter, in net order."""
    return [(node.name, node.type) for node in graph.nodes
            if not node.is_input and node.type not in SOURCE_EMITTERS]


class _Writer:
    """Collects what the emitters write, then assembles the file."""

    def __init__(self, graph):
        self.graph = graph
        self.attributes = Namespace(_MODULE_ATTRIBUTES, fallback="layer")
        self.init_lines: List[str] = []
        self.forward_lines: List[str] = []
        self.state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.parameter_keys: Dict[int, str] = {}  # id of a Net parameter -> its first key
        self.ties: List[str] = []
        self.imports: Set[str] = set()
        self.imported_layers: List[Tuple[str, str]] = []
        variables = Namespace(_GLOBAL_NAMES, fallback="blob")
        self.variable: Dict[str, str] = {}
        for node in graph.nodes:
            for blob in node.bottoms + node.tops:
                if blob not in self.variable:
                    self.variable[blob] = variables.claim(blob)

    def declare(self, code: str, layer_name: str, attribute: str, note: str = "") -> None:
        notes = [] if attribute.startswith(layer_name) else [f"Caffe layer {layer_name!r}"]
        notes += [note] if note else []
        if notes:
            self.init_lines.append("# " + "; ".join(notes))
        self.init_lines.append(code)

    def add_state(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.state:
            raise ValueError(f"state_dict key {key!r} declared twice")
        # A parameter the Net ties between layers (Caffe's `param { name }`) is one object
        # there; the generated module ties it the same way, after every layer is built.
        owner = self.parameter_keys.setdefault(id(tensor), key)
        if owner != key and isinstance(tensor, nn.Parameter):
            self.ties.append(f"self.{key} = self.{owner}  # shared, as Caffe's param name")
        tensor = tensor.detach().to("cpu").contiguous()
        # A tensor that is a whole storage of its own (a CPU parameter as the net holds
        # it) is kept, not copied: the state then shares memory with the net. A view into
        # a larger storage is copied, since torch.save would write the whole storage.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() \
                or tensor.storage_offset():
            tensor = tensor.clone()
        self.state[key] = tensor

    def read_later(self, node, variable: str) -> bool:
        index = self.graph.nodes.index(node)
        for later in self.graph.nodes[index + 1:]:
            if any(self.variable[b] == variable for b in later.bottoms):
                return True
            if any(self.variable[t] == variable for t in later.tops):
                return False
        return any(self.variable[b] == variable for b in self.graph.outputs)


def class_name_for(net_name: str) -> str:
    """A CamelCase class name from a prototxt's ``name:``: the runs of ASCII letters and
    digits, each with its first letter capitalised and the rest kept
    (``"VGG_ILSVRC_16_layers"`` gives ``VGGILSVRC16Layers``, ``"ResNet-50"`` ``ResNet50``).
    A name that starts with a digit gets ``Net`` in front, one that gives a keyword ``Net``
    after it; no name at all gives ``CaffeNet``."""
    words = re.findall(r"[A-Za-z0-9]+", net_name or "")
    name = "".join(word[0].upper() + word[1:] for word in words)
    if not name:
        return "CaffeNet"
    if name[0].isdigit():
        name = "Net" + name
    return name + "Net" if keyword.iskeyword(name) else name


def generate_pytorch(net, class_name: Optional[str] = "CaffeNet") -> GeneratedModel:
    """The source of ``model.py`` and the matching state_dict for a built ``Net``; its class
    is ``class_name``, or named after the net (:func:`class_name_for`) when that is None.

    Raises:
        UnknownLayerError: listing every layer whose type has no source emitter.
    """
    if class_name is None:
        class_name = class_name_for(net.graph.name)
    if not class_name.isidentifier() or keyword.iskeyword(class_name):
        raise CaffeLayersError(f"class name {class_name!r} is not a Python identifier")
    graph = net.graph
    missing = missing_emitters(graph)
    if missing:
        raise UnknownLayerError(missing, what="PyTorch source emitter", how=_HOW)
    writer = _Writer(graph)
    for node in graph.nodes:
        if node.is_input:
            continue
        layer = LayerSource(node, [writer.variable[b] for b in node.bottoms],
                            [writer.variable[t] for t in node.tops], writer)
        SOURCE_EMITTERS[node.type](layer)
    inputs, outputs = list(graph.inputs), list(graph.outputs)
    source = _assemble(writer, net, class_name, inputs, outputs)
    return GeneratedModel(source, writer.state, class_name, inputs, outputs,
                          writer.imported_layers)


def _indented(lines: List[str], indent: str) -> List[str]:
    """Statements and comments laid out to fit the line width after ``indent``."""
    result = []
    for line in lines:
        if line.startswith("# "):
            pieces = comment_lines(line[2:], indent)
        else:
            pieces = wrap(line, indent)
        result += [indent + piece for piece in pieces]
    return result


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _docstring(paragraphs: List[str], indent: str) -> List[str]:
    """A docstring of wrapped paragraphs; a paragraph starting with spaces is kept as is.
    Backslashes and quotes from Caffe names are escaped so that they cannot end it, and
    control characters (a NUL is not allowed in Python source) are written as escapes."""
    width = LINE_WIDTH - len(indent)
    lines: List[str] = []
    for paragraph in paragraphs:
        paragraph = paragraph.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
        paragraph = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", paragraph)
        if lines:
            lines.append("")
        if paragraph.startswith(" "):
            lines += paragraph.split("\n")
        else:
            lines += textwrap.wrap(paragraph, width - 3)
    lines[0] = '"""' + lines[0]
    lines.append('"""')
    return [indent + line if line else "" for line in lines]


def _import_lines(imports: Set[str]) -> List[str]:
    """The import block in the order ruff's isort wants: plain imports, then from-imports,
    each sorted; caffelayers' imports go in a block of their own behind ``# isort: split``,
    since isort files them as first- or third-party depending on where the file lies."""
    plain = sorted(i for i in imports if i.startswith("import "))
    names: Dict[str, Set[str]] = {}
    for line in imports:
        if line.startswith("from "):
            module, _, imported = line[5:].partition(" import ")
            names.setdefault(module, set()).update(n.strip() for n in imported.split(","))

    def from_line(module: str) -> List[str]:
        text = f"from {module} import {', '.join(sorted(names[module]))}"
        if len(text) <= LINE_WIDTH:
            return [text]
        return ([f"from {module} import ("] + [f"    {n}," for n in sorted(names[module])]
                + [")"])
    outside = [m for m in sorted(names) if not m.startswith("caffelayers")]
    project = [m for m in sorted(names) if m.startswith("caffelayers")]
    lines = plain + [line for m in outside for line in from_line(m)]
    if project:
        lines += ["", "# isort: split"] + [line for m in project for line in from_line(m)]
    return lines


def _assemble(writer: _Writer, net, class_name: str, inputs: List[str],
              outputs: List[str]) -> str:
    from caffelayers import __version__

    graph = writer.graph
    arguments = [writer.variable[name] for name in inputs]
    described_inputs = ", ".join(f"{name} ({shape_text(graph.blob_shapes.get(name))})"
                                 for name in inputs)
    described_outputs = ", ".join(f"{name} ({shape_text(graph.blob_shapes.get(name))})"
                                  for name in outputs)
    single = len(outputs) == 1
    returns = "torch.Tensor" if single else "dict[str, torch.Tensor]"
    if single:
        result = writer.variable[outputs[0]]
        usage = f"{result} = model({', '.join(arguments)})"
    else:
        result = "{" + ", ".join(f"{literal(name)}: {writer.variable[name]}"
                                 for name in outputs) + "}"
        usage = f"outputs = model({', '.join(arguments)})  # keyed by Caffe blob name"
    net_name = graph.name or "(unnamed)"
    lines = _docstring([
        (f"The Caffe net {literal(net_name)} as a PyTorch module, generated by caffelayers "
         f"{__version__}."),
        "Usage::",
        "\n".join([f"    model = {class_name}()",
                   f'    model.load_state_dict(torch.load("{WEIGHTS_FILE}", weights_only=True))',
                   "    model.eval()",
                   f"    {usage}"]),
        (f"The Caffe net was built in phase {getattr(net, 'phase', 'TEST')}; eval() mode "
         "computes what it computed (Dropout is the identity, BatchNorm with "
         "use_global_stats uses the stored statistics)."),
    ], "")
    body_text = "\n".join(writer.init_lines + writer.forward_lines)
    imports = set(writer.imports) | {"import torch", "from torch import nn"}
    if re.search(r"(?<![\w.])F\.", body_text):
        imports.add("import torch.nn.functional as F")
    lines += [""] + _import_lines(imports) + ["", ""]
    lines.append(f"class {class_name}(nn.Module):")
    lines += _docstring([
        f"The Caffe net {literal(net_name)}, converted by caffelayers.",
        f"Inputs: {described_inputs or 'none'}. Returns "
        + (described_outputs if single else f"a dict of {described_outputs or 'nothing'}")
        + ".",
    ], "    ")
    lines.append("")
    lines += _indented([f"input_names = {literal(tuple(inputs))}",
                        f"output_names = {literal(tuple(outputs))}"], "    ")
    lines += ["", "    def __init__(self) -> None:", "        super().__init__()"]
    lines += _indented(writer.init_lines + writer.ties, "        ")
    signature = ", ".join(["self"] + [f"{a}: torch.Tensor" for a in arguments])
    lines.append("")
    lines += _indented([f"def forward({signature}) -> {returns}:"], "    ")
    lines += _indented(writer.forward_lines + [f"return {result}"], "        ")
    return "\n".join(lines) + "\n"


def convert_to_pytorch(net, out_dir, class_name: Optional[str] = "CaffeNet") -> Path:
    """Write ``model.py`` and ``weights.pt`` for a built ``Net`` into ``out_dir``.

    The weights are checked against the generated module before returning: the file must
    import, and every key and shape must match (``load_state_dict(strict=True)``), on a
    module built on the meta device (no memory for weights, no initializers run).

    Returns:
        The directory written.
    """
    out = Path(out_dir)
    generated = _write_files(net, out, class_name)
    check_state(out / MODEL_FILE, generated.state, generated.class_name)
    return out


def _write_files(net, out: Path, class_name: Optional[str]) -> GeneratedModel:
    generated = generate_pytorch(net, class_name)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_text(generated.source)
    torch.save(generated.state, out / WEIGHTS_FILE)
    return generated


def check_state(model_file, state: Mapping[str, torch.Tensor],
                class_name: Optional[str] = None) -> None:
    """Import the generated ``model_file`` and load ``state`` into its module built on the
    meta device, every key required: raises (``RuntimeError``, as ``load_state_dict``)
    when a key is missing or unexpected, or a shape differs."""
    cls = import_model_class(model_file, class_name)
    try:
        with torch.device("meta"):
            model = cls()
    except (NotImplementedError, RuntimeError):
        model = cls()  # an __init__ that reads tensor values cannot run on the meta device
    # assign=True puts the tensors themselves into the module: nothing is copied.
    model.load_state_dict(state, strict=True, assign=True)


def write_pytorch(net, out_dir, class_name: Optional[str] = "CaffeNet"
                  ) -> Tuple[GeneratedModel, nn.Module]:
    """:func:`convert_to_pytorch`, returning what was generated and the module it loaded
    from the files to check them (eval mode, weights loaded)."""
    out = Path(out_dir)
    generated = _write_files(net, out, class_name)
    return generated, load_pytorch(out, generated.class_name, state=generated.state)


def import_model_class(model_file, class_name: Optional[str] = None):
    """The module class defined in a generated ``model.py`` (the only ``nn.Module``
    subclass defined there when ``class_name`` is None).

    The module stays registered in ``sys.modules`` under a unique name: TorchScript reads
    a class's source through it.
    """
    model_file = Path(model_file)
    name = f"caffelayers_generated_{next(_module_counter)}"
    spec = importlib.util.spec_from_file_location(name, model_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if class_name is None:
        found = [value for value in vars(module).values() if isinstance(value, type)
                 and issubclass(value, nn.Module) and value.__module__ == name]
        if len(found) != 1:
            raise CaffeLayersError(f"{model_file}: expected one nn.Module class, found "
                                   f"{len(found)}; give the class name")
        return found[0]
    return getattr(module, class_name)


def load_pytorch(out_dir, class_name: Optional[str] = None,
                 state: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """Import ``out_dir/model.py``, load ``out_dir/weights.pt`` (``weights_only=True``) with
    every key required, and return the module in eval mode."""
    out = Path(out_dir)
    cls = import_model_class(out / MODEL_FILE, class_name)
    if state is None:
        state = torch.load(out / WEIGHTS_FILE, weights_only=True)
    # Built on the CPU, not the meta device: some initializers (normal_) run PyTorch's
    # Python reference kernels there, whose first use imports torch._dynamo (seconds).
    model = cls()
    model.load_state_dict(state, strict=True)
    return model.eval()


def forward_by_name(model: nn.Module, inputs: Mapping[str, object],
                    input_names: Optional[List[str]] = None,
                    output_names: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """Run a generated (or TorchScript) module on inputs keyed by Caffe blob name and return
    its outputs keyed by Caffe blob name, as ``Net.forward`` does.

    The names default to the generated class's ``input_names`` and ``output_names``.
    """
    input_names = list(input_names if input_names is not None else model.input_names)
    output_names = list(output_names if output_names is not None else model.output_names)
    missing = [name for name in input_names if name not in inputs]
    if missing:
        raise CaffeLayersError(f"missing inputs {', '.join(missing)} (the model's inputs are "
                               f"{', '.join(input_names) or 'none'})")
    floating = [t for t in itertools.chain(model.parameters(), model.buffers())
                if t.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.float32
    arguments = [torch.as_tensor(inputs[name]).to(dtype) for name in input_names]
    result = model(*arguments)
    if isinstance(result, torch.Tensor):
        return {output_names[0]: result}
    return dict(result)

