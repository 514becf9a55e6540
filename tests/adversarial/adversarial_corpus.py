"""The adversarial corpus: bad input of every class the README's promise covers, built by
the tests themselves into a temporary folder (nothing binary is committed).

A :class:`Case` writes one case directory with conventional names (``net.prototxt``,
``weights.caffemodel``, ``reference.npz`` for the deploy net; ``train.prototxt``,
``solver.prototxt`` and its data for training) and says, per entry point, what a run must end
in. :func:`command` turns a case and an entry point into a job for the runner: the
``caffelayers`` command line (``inspect``, ``convert --to ...``, ``verify --runtime ...``,
``train``) or a Python API snippet (``Net(...)``, ``Solver(...)``).
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from adversarial_harness import Expect

NET, WEIGHTS, REFERENCE = "net.prototxt", "weights.caffemodel", "reference.npz"
TRAIN, SOLVER = "train.prototxt", "solver.prototxt"

CONVERT = ("convert-onnx", "convert-pytorch", "convert-torchscript")
VERIFY = ("verify-torch", "verify-onnxruntime", "verify-pytorch-source")
#: entry points that read the deploy net (and its weights and reference).
NET_ENTRIES = ("inspect", *CONVERT, *VERIFY, "Net")
#: entry points that train: the command line and the API.
TRAIN_ENTRIES = ("train", "Solver")
#: entry points that read the train net alone: inspect and Net on train.prototxt.
TRAIN_NET_ENTRIES = ("inspect-train", "Net-train")
#: entry points that read a reference.npz.
REFERENCE_ENTRIES = (*VERIFY, *(f"{entry}+reference" for entry in CONVERT))


# --- the base nets --------------------------------------------------------------------------

DEPLOY_TEXT = """\
name: "tiny"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""

HDF5_DATA = """\
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train.txt" batch_size: 2 } }
"""

IMAGE_DATA = """\
layer { name: "data" type: "ImageData" top: "data" top: "label"
  image_data_param { source: "images.txt" batch_size: 2%s } }
"""

#: the deploy net with a data layer and a loss in place of Input and Softmax.
TRAIN_TEXT = (DEPLOY_TEXT.split("layer {", 1)[0] + HDF5_DATA
              + "layer {" + DEPLOY_TEXT.split("layer {", 2)[2].rsplit("layer {", 1)[0]
              + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" '
                'top: "loss" }\n')

SOLVER_TEXT = """\
net: "train.prototxt"
base_lr: 0.01
lr_policy: "fixed"
max_iter: 2
display: 1
snapshot_prefix: "snap/tiny"
random_seed: 1
"""

#: a train net with a layer counter (MarginInnerProduct's iteration), for the sidecar cases.
MARGIN_TRAIN_TEXT = """\
name: "margin"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train.txt" batch_size: 2 } }
layer { name: "fc5" type: "InnerProduct" bottom: "data" top: "fc5"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: "label" top: "fc6"
  margin_inner_product_param { num_output: 5 type: DOUBLE base: 10 gamma: 0.1 power: 1
    lambda_min: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "loss" }
"""

INPUT_SHAPE = (2, 3, 8, 8)


def line_of(text: str, layer: str) -> int:
    """The line of ``name: "layer"`` in a prototxt (1-based)."""
    pattern = f'name: "{layer}"'
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern in line:
            return number
    raise AssertionError(f"no layer {layer!r} in the text")


def input_batch(shape=INPUT_SHAPE) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def write_reference(path: Path, inputs: Dict[str, np.ndarray],
                    outputs: Dict[str, np.ndarray], **meta) -> None:
    """A reference.npz in the fixtures' format: ``meta`` JSON, ``input/NAME`` and
    ``iter0/data/BLOB``."""
    arrays = {f"input/{k}": v for k, v in inputs.items()}
    arrays.update({f"iter0/data/{k}": v for k, v in outputs.items()})
    meta = {"case": path.parent.name, "phase": "TEST", "iterations": 1, "backward": False,
            "solver": False, "inputs": list(inputs), "labels": [], **meta}
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def net_reference(d: Path, net_text: str, weights: Optional[Path], name: str = "data",
                  shape=INPUT_SHAPE) -> bool:
    """Write weights (from seeded fillers, when ``weights`` is None) and the reference of a
    net computed by caffelayers itself; False when the net does not build (a clean error)."""
    import caffelayers
    from caffelayers.errors import CaffeLayersError

    (d / NET).write_text(net_text)
    try:
        net = caffelayers.Net(d / NET, weights, seed=0)
    except CaffeLayersError:
        write_reference(d / REFERENCE, {name: input_batch(shape)}, {})
        return False
    if weights is None:
        net.save_caffemodel(d / WEIGHTS)
    x = input_batch(shape)
    out = net(**{name: x})
    write_reference(d / REFERENCE, {name: x},
                    {k: v.detach().numpy() for k, v in out.items()})
    return True


def write_train_files(d: Path, train_text: str = TRAIN_TEXT, solver_text: str = SOLVER_TEXT,
                      rows: int = 4) -> None:
    import h5py

    (d / TRAIN).write_text(train_text)
    (d / SOLVER).write_text(solver_text)
    (d / "train.txt").write_text("train.h5\n")
    rng = np.random.default_rng(0)
    with h5py.File(d / "train.h5", "w") as handle:
        handle["data"] = rng.standard_normal((rows, *INPUT_SHAPE[1:])).astype(np.float32)
        handle["label"] = np.arange(rows, dtype=np.float32) % 5


def write_tiny(d: Path, deploy: str = DEPLOY_TEXT, train: str = TRAIN_TEXT) -> None:
    """The good tiny case: deploy net, its weights and reference; train net, solver, data."""
    assert net_reference(d, deploy, None)
    write_train_files(d, train)


# --- cases ----------------------------------------------------------------------------------

@dataclass
class Case:
    """One corpus entry.

    Args:
        name: ``group/what``.
        build: writes the case into an empty directory; returns values for the
            expectations' placeholders (``line``, ``train_line``, ...), or None.
        expects: per entry point, what a run must end in. Placeholders in ``names``:
            ``{net}`` (the net file the entry reads: net.prototxt, or train.prototxt for the
            training entries), ``{line}`` (``line`` or ``train_line`` likewise),
            ``{weights}``, ``{reference}``, ``{solver}``, ``{dir}``, and any key ``build``
            returns.
        options: how :func:`command` builds the jobs (``weights``: pass the weights file
            even when it is not a regular file; ``case_file``: give verify the reference
            file, not the folder; ``convert_reference``: convert with ``--reference``;
            ``train_args``; ``resume``: the Solver snippet restores this state; ``compare``:
            the Net snippet compares with the reference; ``cwd_up``: run from the folder
            above the case).
        ci: run in ``make test`` (False: only under ``make fuzz``); ``options["ci_entries"]``
            narrows the entry points ``make test`` runs.
    """

    name: str
    build: Callable[[Path], Optional[dict]]
    expects: Dict[str, Expect]
    options: dict = field(default_factory=dict)
    ci: bool = True

    @property
    def group(self) -> str:
        return self.name.split("/", 1)[0]


def _entries(entries: Sequence[str], expect: Expect, **overrides: Expect) -> Dict[str, Expect]:
    out = {entry: expect for entry in entries}
    out.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return out


def resolve(expect: Expect, entry: str, d: Path, info: dict) -> Expect:
    training = entry in TRAIN_ENTRIES or entry in TRAIN_NET_ENTRIES
    # the solver names its net "train.prototxt", relative: errors name it so
    net = TRAIN if entry in TRAIN_ENTRIES else d / (TRAIN if training else NET)
    values = {"net": net, "weights": d / WEIGHTS,
              "reference": d / REFERENCE, "solver": d / SOLVER, "dir": d, "train": d / TRAIN}
    values.update(info)
    if training and "train_line" in info:
        values["line"] = info["train_line"]
    return replace(expect, names=[name.format(**values) for name in expect.names],
                   warns=[text.format(**values) for text in expect.warns])


def command(entry: str, d: Path, options: dict):
    """``("cli", argv)`` or ``("api", code)`` of an entry point on the case in ``d``."""
    weights = d / WEIGHTS
    with_weights = options.get("weights", weights.is_file())
    w = [str(weights)] if with_weights else []
    if entry in ("inspect", "inspect-train"):
        return "cli", ["inspect", str(d / (NET if entry == "inspect" else TRAIN)), *w[:entry == "inspect"]]
    if entry.startswith("convert-"):
        target = entry.split("-", 1)[1].split("+")[0]
        out = d / "out" / {"onnx": "model.onnx", "pytorch": "model",
                           "torchscript": "model.pt"}[target]
        reference = ["--reference", str(d / REFERENCE)] if (
            entry.endswith("+reference") or options.get("convert_reference", True)) else []
        return "cli", ["convert", str(d / NET), *w, "--to", target, "-o", str(out), *reference]
    if entry.startswith("verify-"):
        case = d / REFERENCE if options.get("case_file") else d
        return "cli", ["verify", str(case), "--runtime", entry.split("-", 1)[1]]
    if entry == "train":
        return "cli", ["train", str(d / SOLVER), *(["--weights", *w] if w else []),
                       *options.get("train_args", []), "--workers", "0"]
    if entry in ("Net", "Net-train"):
        net = d / (NET if entry == "Net" else TRAIN)
        code = (f"import numpy as np, caffelayers\n"
                f"net = caffelayers.Net({str(net)!r}, {(w or [None])[0]!r})\n")
        if entry == "Net" and options.get("compare", True):
            code += (f"reference = np.load({str(d / REFERENCE)!r})\n"
                     "inputs = {k[6:]: reference[k] for k in reference.files "
                     "if k.startswith('input/')}\n"
                     "for blob, value in net(**inputs).items():\n"
                     "    np.testing.assert_allclose(value.detach().numpy(), "
                     "reference['iter0/data/' + blob], rtol=1e-4, atol=1e-6)\n")
        return "api", code
    if entry == "Solver":
        state = options.get("resume")
        return "api", (
            "import caffelayers\n"
            "from caffelayers.data import net_inputs\n"
            f"solver = caffelayers.Solver({str(d / SOLVER)!r}, {(w or [None])[0]!r})\n"
            + (f"solver.restore({str(d / state)!r})\n" if state else "")
            + "solver.inputs = net_inputs(solver.net, workers=0)\n"
            "solver.solve()\n")
    raise AssertionError(entry)


CASES: List[Case] = []


def case(name: str, expects: Dict[str, Expect], ci: bool = True, **options):
    def register(build):
        CASES.append(Case(name, build, expects, options, ci))
        return build
    return register


# --- weights that do not fit ----------------------------------------------------------------

def _edit_weights(d: Path, edit) -> None:
    """The tiny case with its caffemodel edited by ``edit(NetParameter)``."""
    from caffelayers.proto import io

    write_tiny(d)
    model = io.read_caffemodel(d / WEIGHTS)
    edit(model)
    (d / WEIGHTS).write_bytes(model.SerializeToString())


def _layer(model, name):
    return next(layer for layer in model.layer if layer.name == name)


def _reshape_blob(blob, shape=None, legacy=None) -> None:
    blob.ClearField("shape")
    for f in ("num", "channels", "height", "width"):
        blob.ClearField(f)
    if shape is not None:
        blob.shape.dim.extend(shape)
    if legacy is not None:
        blob.num, blob.channels, blob.height, blob.width = legacy


WEIGHT_ERROR = Expect("error", names=["{weights}", "conv1", "shape"])
WEIGHTS_ENTRIES = (*NET_ENTRIES, *TRAIN_ENTRIES)


@case("weights/conv-3x4x3x3", _entries(WEIGHTS_ENTRIES, WEIGHT_ERROR))
def _(d):
    _edit_weights(d, lambda m: _reshape_blob(_layer(m, "conv1").blobs[0], (3, 4, 3, 3)))


@case("weights/conv-flat", _entries(WEIGHTS_ENTRIES, WEIGHT_ERROR))
def _(d):
    _edit_weights(d, lambda m: _reshape_blob(_layer(m, "conv1").blobs[0], (108,)))


@case("weights/ip-legacy-4d", _entries(WEIGHTS_ENTRIES, Expect("ok")))
def _(d):
    """Caffe's old files store an InnerProduct's N x K weight as 1x1xNxK: Caffe loads it."""
    def edit(model):
        ip = _layer(model, "ip1")
        _reshape_blob(ip.blobs[0], legacy=(1, 1, 5, 36))
        _reshape_blob(ip.blobs[1], legacy=(1, 1, 1, 5))
    _edit_weights(d, edit)


@case("weights/ip-legacy-4d-transposed",
      _entries(WEIGHTS_ENTRIES, Expect("error", names=["{weights}", "ip1", "shape"])))
def _(d):
    _edit_weights(d, lambda m: _reshape_blob(_layer(m, "ip1").blobs[0], legacy=(1, 1, 36, 5)))


@case("weights/missing-layer",
      _entries(WEIGHTS_ENTRIES, Expect("ok", warns=["{weights}", "ip1"]),
               **{entry.replace("-", "_"): Expect("error", names=["{dir}", "ip1"])
                  for entry in VERIFY}),
      convert_reference=False, compare=False)
def _(d):
    """A caffemodel without one layer: the layer keeps its fillers, with a warning naming it
    (as Caffe, which loads by name); verify refuses (fillers prove nothing)."""
    _edit_weights(d, lambda m: m.layer.remove(_layer(m, "ip1")))


@case("weights/duplicate-layer",
      _entries(WEIGHTS_ENTRIES, Expect("error", names=["{weights}", "conv1"])))
def _(d):
    def edit(model):
        model.layer.add().CopyFrom(_layer(model, "conv1"))
    _edit_weights(d, edit)


@case("weights/another-net",
      _entries(WEIGHTS_ENTRIES, Expect("error", names=["{weights}", "another net"])))
def _(d):
    def edit(model):
        for layer in model.layer:
            layer.name = "other_" + layer.name
    _edit_weights(d, edit)


# --- typos ----------------------------------------------------------------------------------

def _typo(d: Path, deploy: str, train: str, layer: str, weights: bool = True) -> dict:
    """A deploy and a train net with one mistyped layer; weights and a reference when the
    deploy net still builds."""
    if weights:
        net_reference(d, deploy, None)
    else:
        (d / NET).write_text(deploy)
        write_reference(d / REFERENCE, {"data": input_batch()}, {})
    write_train_files(d, train)
    info = {"line": line_of(deploy, layer)}
    if f'name: "{layer}"' in train:
        info["train_line"] = line_of(train, layer)
    return info


def _append(text: str, layer: str) -> str:
    return text + layer + "\n"


TYPO_ENTRIES = (*NET_ENTRIES, *TRAIN_ENTRIES)
LAYER_ERROR = Expect("error", names=["{net}:{line}", "'{layer}'"])


def _typo_case(name: str, edit: Callable[[str], str], layer: str, ci: bool = True,
               entries: Sequence[str] = TYPO_ENTRIES, expect: Expect = LAYER_ERROR,
               weights: bool = False, **overrides: Expect):
    def build(d):
        info = _typo(d, edit(DEPLOY_TEXT), edit(TRAIN_TEXT), layer, weights)
        info["layer"] = layer
        return info
    CASES.append(Case(f"typos/{name}", build, _entries(entries, expect, **overrides),
                      {"convert_reference": False, "compare": False}, ci))


def _set(field_name: str, value, layer: str = "conv1"):
    """Set ``field: value`` inside the first ``{...}`` parameter block of ``layer``."""
    def edit(text):
        start = text.index(f'name: "{layer}"')
        block = text.index("_param {", start) + len("_param {")
        body = text[block:]
        pattern = re.compile(rf"\b{field_name}: [^ }}]+")
        if pattern.search(body.split("\nlayer", 1)[0]):
            body = pattern.sub(f"{field_name}: {value}", body, count=1)
        else:
            body = f" {field_name}: {value}" + body
        return text[:block] + body
    return edit


def _layers_needing_bottoms() -> List[str]:
    from caffelayers.registry import LAYERS

    return sorted(name for name, cls in LAYERS.items() if cls.num_bottoms[0] >= 1)


for _type in _layers_needing_bottoms():
    _typo_case(f"missing-bottom/{_type}",
               lambda text, t=_type: _append(text, f'layer {{ name: "broken" type: "{t}" '
                                                   f'top: "broken" }}'),
               "broken", expect=Expect("error", names=["{net}:{line}", "'broken'", "bottom"]))
    # One check serves every type: make test runs it through inspect (the lenient build)
    # and train (the strict one, through the Solver), make fuzz through every entry point.
    CASES[-1].options["ci_entries"] = ("inspect", "train")

HUGE = 2_000_000_000
_typo_case("conv-kernel-2e9", _set("kernel_size", HUGE), "conv1")
_typo_case("conv-pad-2e9", _set("pad", HUGE), "conv1")
# a 1x1 output, which the 2x2 pooling after it refuses
_typo_case("conv-stride-2e9", _set("stride", HUGE), "conv1", expect=Expect("either",
           names=["{net}:", "'pool1'"]))
_typo_case("conv-num-output-2e9", _set("num_output", HUGE), "conv1")
_typo_case("conv-dilation-2e9", _set("dilation", HUGE), "conv1")
_typo_case("conv-group-2e9", _set("group", HUGE), "conv1")
_typo_case("ip-num-output-2e9", _set("num_output", HUGE, "ip1"), "ip1")
_typo_case("pool-kernel-2e9", _set("kernel_size", HUGE, "pool1"), "pool1")
_typo_case("pool-pad-2e9", _set("pad", HUGE, "pool1"), "pool1")
_typo_case("tile-2e9", lambda t: _append(t, 'layer { name: "tile" type: "Tile" bottom: "ip1" '
                                            f'top: "tile" tile_param {{ tiles: {HUGE} }} }}'),
           "tile")
_typo_case("deconv-stride-1e5",
           lambda t: _append(t, 'layer { name: "up" type: "Deconvolution" bottom: "pool1" '
                                'top: "up" convolution_param { num_output: 2 kernel_size: 3 '
                                'stride: 100000 } }'), "up")
# DummyData has no PyTorch-source emitter: those conversions refuse it first.
_typo_case("dummydata-int-max",
           lambda t: _append(t, 'layer { name: "dummy" type: "DummyData" top: "dummy" '
                                'dummy_data_param { shape { dim: 2147483647 } } }'),
           "dummy", inspect=Expect("ok"),
           expect=Expect("error", names=["{net}:{line}", "'dummy'", "2147483647"]),
           convert_pytorch=Expect("error", names=["{net}", "'dummy'"]),
           convert_torchscript=Expect("error", names=["{net}", "'dummy'"]))
_typo_case("dummydata-over-int-max",
           lambda t: _append(t, 'layer { name: "dummy" type: "DummyData" top: "dummy" '
                                'dummy_data_param { shape { dim: 2 dim: 1073741824 } } }'),
           "dummy")
_typo_case("reshape-2e9",
           lambda t: _append(t, 'layer { name: "flat" type: "Reshape" bottom: "ip1" '
                                f'top: "flat" reshape_param {{ shape {{ dim: {HUGE} '
                                'dim: -1 } } }'), "flat")
_typo_case("embed-2e9",
           lambda t: _append(t, 'layer { name: "embed" type: "Embed" bottom: "ip1" '
                                f'top: "embed" embed_param {{ num_output: {HUGE} '
                                f'input_dim: {HUGE} }} }}'), "embed")


# inspect lists unknown types rather than failing; convert lists every layer it cannot
# convert at once, naming the file.
_typo_case("unknown-type", lambda t: t.replace('"ReLU"', '"Relu"'), "relu1",
           expect=Expect("error", names=["{net}:{line}", "'relu1'"]), inspect=Expect("ok"),
           **{entry.replace("-", "_"): Expect("error", names=["{net}", "'relu1'"])
              for entry in CONVERT})
_typo_case("every-layer-excluded",
           lambda t: t.replace("layer {", "layer { include { phase: TRAIN }"), "conv1",
           entries=NET_ENTRIES, expect=Expect("error", names=["{net}", "no layers"]))
_typo_case("everything-silenced",
           lambda t: _append(t.replace('"Softmax"', '"Silence"').replace('top: "prob" ', ""),
                             ""), "prob", entries=NET_ENTRIES, expect=Expect("either"))


def _pool_net(stride: int) -> str:
    return ('name: "pool"\n'
            'layer { name: "data" type: "Input" top: "data"\n'
            '  input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'
            'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"\n'
            f'  pooling_param {{ pool: MAX kernel_size: 2 stride: {stride} }} }}\n')


def _pool_case(d: Path, stride: int) -> dict:
    """MAX pooling, kernel 2, on 4x4, with Caffe's window rule computed here in numpy:
    ceil((4 - 2) / stride) + 1 windows per axis (no pad, so no clip), each window cut to
    the input; a window starting past the input is -FLT_MAX."""
    import caffelayers

    text = _pool_net(stride)
    (d / NET).write_text(text)
    x = input_batch((1, 2, 4, 4))
    count = -(-2 // stride) + 1
    out = np.full((1, 2, count, count), -np.finfo(np.float32).max, np.float32)
    for i in range(count):
        for j in range(count):
            window = x[:, :, i * stride:i * stride + 2, j * stride:j * stride + 2]
            if window.size:
                out[:, :, i, j] = window.max(axis=(2, 3))
    write_reference(d / REFERENCE, {"data": x}, {"pool": out})
    if stride < 10:
        caffelayers.Net(d / NET).save_caffemodel(d / WEIGHTS)
    return {"line": line_of(text, "pool")}


@case("typos/pool-max-stride-1e5",
      _entries(NET_ENTRIES, Expect("error", names=["{net}:{line}", "'pool'", "100002"])),
      weights=False)
def _(d):
    """Caffe gives 2x2 windows here, three of them past the input; computing them pads the
    input to 100002 x 100002: refused, naming the size, before anything is allocated."""
    return _pool_case(d, 100000)


@case("typos/pool-max-stride-3", _entries(NET_ENTRIES, Expect("ok")))
def _(d):
    """The control: the second window starts inside the input and is cut to it."""
    return _pool_case(d, 3)


def _rename(old: str, new: str):
    """Rename a blob or layer: every quoted occurrence of ``old``."""
    escaped = (new.replace("\\", "\\\\").replace('"', '\\"').replace("\0", "\\000")
               .replace("\n", "\\n"))
    return lambda text: text.replace(f'"{old}"', f'"{escaped}"')


for _label, _odd in (("nul", "a\0b"), ("quote", 'a"b'), ("backslash", "a\\b"),
                     ("newline", "a\nb"), ("python", "__import__('os')"),
                     ("docstring-end", 'a"""\nimport os\n"""'), ("unicode", "\u00e9\u6f22")):
    for _what, _old in (("input", "data"), ("layer", "conv1"), ("blob", "pool1")):
        def _build(d, old=_old, odd=_odd):
            deploy = _rename(old, odd)(DEPLOY_TEXT)
            name = odd if old == "data" else "data"
            # the net with odd names is checked against the same net with plain names
            net_reference(d, DEPLOY_TEXT, None)
            plain = np.load(d / REFERENCE)
            (d / NET).write_text(deploy)
            outputs = {(odd if k == f"iter0/data/{old}" else k)[len("iter0/data/"):]:
                       plain[k] for k in plain.files if k.startswith("iter0/data/")}
            write_reference(d / REFERENCE, {name: plain["input/data"]}, outputs)
            if old != "data":
                from caffelayers.proto import io

                model = io.read_caffemodel(d / WEIGHTS)
                for layer in model.layer:
                    layer.name = odd if layer.name == old else layer.name
                (d / WEIGHTS).write_bytes(model.SerializeToString())
            return {"line": line_of(DEPLOY_TEXT, old if old != "data" else "data")}
        CASES.append(Case(f"typos/names-{_label}-{_what}", _build,
                          _entries(NET_ENTRIES, Expect("either")),
                          # the generated source is what odd names break: make test
                          # runs every entry point on odd input names, these on the rest
                          {} if _what == "input" else
                          {"ci_entries": ("convert-onnx", "convert-pytorch", "Net")}))


# --- files ----------------------------------------------------------------------------------

def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


FILE_NET = Expect("error", names=["{net}"])
FILE_WEIGHTS = Expect("error", names=["{weights}"])
FILE_REFERENCE = Expect("error", names=["{reference}"])
FILE_ENTRIES = (*NET_ENTRIES, *TRAIN_ENTRIES)


def _replace(which: Sequence[str], how):
    def build(d):
        write_tiny(d)
        for name in which:
            how(d / name)
    return build


for _kind, _how in (("fifo", _fifo), ("folder", _folder)):
    CASES.append(Case(f"files/{_kind}-prototxt", _replace([NET, TRAIN], _how),
                      _entries(FILE_ENTRIES, FILE_NET), {"weights": True}))
    CASES.append(Case(f"files/{_kind}-caffemodel", _replace([WEIGHTS], _how),
                      _entries(FILE_ENTRIES, FILE_WEIGHTS), {"weights": True}))
    CASES.append(Case(f"files/{_kind}-reference", _replace([REFERENCE], _how),
                      _entries(REFERENCE_ENTRIES, FILE_REFERENCE)))
    CASES.append(Case(f"files/{_kind}-solver", _replace([SOLVER], _how),
                      _entries(TRAIN_ENTRIES, Expect("error", names=["{solver}"]))))


@case("files/empty-prototxt", _entries(FILE_ENTRIES, Expect("error", names=["{net}"])),
      weights=True)
def _(d):
    write_tiny(d)
    (d / NET).write_text("")
    (d / TRAIN).write_text("")


@case("files/empty-caffemodel", _entries(FILE_ENTRIES, FILE_WEIGHTS), weights=True)
def _(d):
    write_tiny(d)
    (d / WEIGHTS).write_bytes(b"")


@case("files/truncated-caffemodel", _entries(FILE_ENTRIES, FILE_WEIGHTS))
def _(d):
    write_tiny(d)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[:len(data) * 2 // 3])


@case("files/caffemodel-as-prototxt", _entries(FILE_ENTRIES, FILE_NET))
def _(d):
    write_tiny(d)
    (d / NET).write_bytes((d / WEIGHTS).read_bytes())
    (d / TRAIN).write_bytes((d / WEIGHTS).read_bytes())


@case("files/prototxt-as-caffemodel", _entries(FILE_ENTRIES, FILE_WEIGHTS))
def _(d):
    write_tiny(d)
    (d / WEIGHTS).write_text(DEPLOY_TEXT)


@case("files/solver-as-net",
      _entries(FILE_ENTRIES, Expect("error", names=["{net}", "a solver"])))
def _(d):
    write_tiny(d)
    (d / NET).write_text(SOLVER_TEXT)
    (d / TRAIN).write_text(SOLVER_TEXT)


@case("files/net-as-solver",
      _entries(TRAIN_ENTRIES, Expect("error", names=["{solver}", "a net"])))
def _(d):
    write_tiny(d)
    (d / SOLVER).write_text(TRAIN_TEXT)


@case("files/binary-garbage-prototxt", _entries(FILE_ENTRIES, FILE_NET))
def _(d):
    write_tiny(d)
    garbage = bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8))
    (d / NET).write_bytes(garbage)
    (d / TRAIN).write_bytes(garbage)


# --- data sources ---------------------------------------------------------------------------

DATA_ENTRIES = (*TRAIN_ENTRIES, *TRAIN_NET_ENTRIES)


@case("data/hdf5-2e8-rows",
      _entries(DATA_ENTRIES, Expect("error", names=["huge.h5"]),
               inspect_train=Expect("either")))
def _(d):
    """A 20 KB HDF5 file whose datasets declare 2e8 rows (chunks never written)."""
    import h5py

    write_tiny(d)
    (d / "train.txt").write_text("huge.h5\n")
    rows = 200_000_000
    with h5py.File(d / "huge.h5", "w") as handle:
        handle.create_dataset("data", shape=(rows, *INPUT_SHAPE[1:]), dtype=np.float32,
                              chunks=(1, *INPUT_SHAPE[1:]))
        handle.create_dataset("label", shape=(rows,), dtype=np.float32, chunks=(1024,))
    assert (d / "huge.h5").stat().st_size < 64 * 1024


def _png(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB and holds a few rows of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress((b"\0" + bytes(3 * width)) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


def _image_case(d: Path, size: int, resize: str) -> None:
    write_tiny(d)
    text = TRAIN_TEXT.replace(HDF5_DATA, IMAGE_DATA % resize)
    (d / TRAIN).write_text(text)
    (d / "big.png").write_bytes(_png(size, size))
    (d / "images.txt").write_text("big.png 0\nbig.png 1\n")


@case("data/png-30000x30000",
      _entries(DATA_ENTRIES, Expect("error", names=["big.png"]),
               inspect_train=Expect("either")))
def _(d):
    _image_case(d, 30000, "")


@case("data/png-60000x60000-resized",
      _entries(DATA_ENTRIES, Expect("error", names=["big.png"]),
               inspect_train=Expect("either"), Net_train=Expect("either")))
def _(d):
    _image_case(d, 60000, " new_height: 8 new_width: 8")


LMDB_DATA = """\
layer { name: "data" type: "Data" top: "data" top: "label"
  data_param { source: "db" batch_size: 2 backend: LMDB } }
"""


@case("data/lmdb-encoded-png-30000x30000",
      _entries(DATA_ENTRIES, Expect("error", names=["db", "30000"]),
               inspect_train=Expect("either")))
def _(d):
    """An LMDB Datum holding an encoded PNG that declares 30000 x 30000."""
    import lmdb

    from caffelayers.proto import caffe_pb2

    write_tiny(d)
    (d / TRAIN).write_text(TRAIN_TEXT.replace(HDF5_DATA, LMDB_DATA))
    datum = caffe_pb2.Datum(encoded=True, data=_png(30000, 30000), label=0)
    with lmdb.open(str(d / "db"), map_size=2**20) as env, env.begin(write=True) as txn:
        txn.put(b"00000000", datum.SerializeToString())


@case("data/png-good",
      _entries(DATA_ENTRIES, Expect("ok")))
def _(d):
    """The control: an 8x8 PNG list trains."""
    import cv2

    write_tiny(d)
    (d / TRAIN).write_text(TRAIN_TEXT.replace(HDF5_DATA, IMAGE_DATA % ""))
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    cv2.imwrite(str(d / "small.png"), image)
    (d / "images.txt").write_text("small.png 0\nsmall.png 1\n")


# --- reference.npz --------------------------------------------------------------------------

REF_ERROR = Expect("error", names=["{reference}"])


def _reference_case(name: str, write: Callable[[Path], None], expect: Expect = REF_ERROR,
                    entries: Sequence[str] = REFERENCE_ENTRIES, **options):
    def build(d):
        write_tiny(d)
        write(d / REFERENCE)
    CASES.append(Case(f"reference/{name}", build, _entries(entries, expect), options))


def _good_arrays(path: Path) -> dict:
    with np.load(path) as archive:
        return {k: archive[k] for k in archive.files}


def _with_meta(meta) -> Callable[[Path], None]:
    def write(path):
        arrays = _good_arrays(path)
        arrays["meta"] = np.array(meta if isinstance(meta, str) else json.dumps(meta))
        np.savez(path, **arrays)
    return write


def _good_meta(path: Path) -> dict:
    return json.loads(str(_good_arrays(path)["meta"]))


_reference_case("not-a-zip", lambda p: p.write_bytes(b"PK\x03\x04 not really a zip" * 50))
_reference_case("no-meta", lambda p: np.savez(p, **{k: v for k, v in _good_arrays(p).items()
                                                     if k != "meta"}))
_reference_case("meta-not-json", _with_meta("{not json"))
_reference_case("meta-not-object", _with_meta("[1, 2]"))
_reference_case("meta-deep-json", _with_meta("[" * 100000 + "]" * 100000))
_reference_case("meta-inputs-not-list", _with_meta({"inputs": "data", "iterations": 1}))
_reference_case("meta-iterations-string", _with_meta({"inputs": ["data"], "iterations": "3"}))
_reference_case("meta-iterations-1e9", _with_meta({"inputs": ["data"], "iterations": 10**9}))
_reference_case("meta-phase-number", _with_meta({"inputs": ["data"], "phase": 1}))
_reference_case("meta-array-not-string",
                lambda p: np.savez(p, **{**_good_arrays(p), "meta": np.arange(3)}))


def _pickled(path: Path) -> None:
    arrays = _good_arrays(path)
    arrays["iter0/data/prob"] = np.array([{"a": 1}, None], dtype=object)
    np.savez(path, **arrays)


_reference_case("pickled-object-array", _pickled)


def _crc32_zeros(crc: int, count: int) -> int:
    """zlib.crc32 of ``count`` zero bytes continuing from ``crc``, in O(log count): a zero
    byte acts linearly on the CRC register, so the operator is squared, not applied."""
    mask = 0xFFFFFFFF

    def apply(matrix, vector):
        out, bit = 0, 0
        while vector:
            if vector & 1:
                out ^= matrix[bit]
            vector >>= 1
            bit += 1
        return out

    matrix = [zlib.crc32(b"\0", (1 << bit) ^ mask) ^ mask for bit in range(32)]
    register = crc ^ mask
    while count:
        if count & 1:
            register = apply(matrix, register)
        matrix = [apply(matrix, column) for column in matrix]
        count >>= 1
    return register ^ mask


def _zip(members: List[tuple]) -> bytes:
    """A zip archive (zip64 sizes) of ``(name, deflated stream, crc32, size)`` members."""
    body, directory = b"", b""
    for name, stream, crc, size in members:
        name = name.encode()
        extra = struct.pack("<HHQQ", 1, 16, size, len(stream))
        offset = len(body)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF,
                            0xFFFFFFFF, len(name), len(extra)) + name + extra + stream
        directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0x21, crc,
                                 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0,
                                 offset) + name + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                      len(directory), len(body), 0)
    return body + directory + end


def _npy_header(shape, dtype="<f4") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def _zip_bomb(path: Path, size: int = 8 * 2**30) -> None:
    """An npz of about 8 MB whose prediction array inflates to 8 GB of zeros (a real deflate
    stream with a right CRC, built from one compressed megabyte repeated)."""
    meta = _npy_header((), "<U200")
    meta_body = np.array(json.dumps({"inputs": ["data"], "phase": "TEST"}),
                         dtype="<U200").tobytes()
    good = _good_arrays(path)
    members = []
    for key in ("meta", "input/data"):
        if key == "meta":
            raw = meta + meta_body
        else:
            raw = _npy_header(good[key].shape) + good[key].astype("<f4").tobytes()
        members.append((key + ".npy", _deflate(raw), zlib.crc32(raw), len(raw)))
    header = _npy_header((size // 4,))
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = 2**20
    stream = packer.compress(header) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(chunk)) + packer.flush(zlib.Z_FULL_FLUSH)
    stream += block * (size // chunk) + packer.flush()
    crc = _crc32_zeros(zlib.crc32(header), size)
    members.append(("iter0/data/prob.npy", stream, crc, len(header) + size))
    path.write_bytes(_zip(members))


def _lying_header(path: Path) -> None:
    """A small member whose .npy header declares 2^31 floats."""
    good = _good_arrays(path)
    members = []
    for key, value in good.items():
        raw = _npy_header(value.shape, value.dtype.str) + value.tobytes()
        members.append((key + ".npy", _deflate(raw), zlib.crc32(raw), len(raw)))
    raw = _npy_header((2**31,)) + bytes(64)
    members.append(("iter0/data/ip1.npy", _deflate(raw), zlib.crc32(raw), len(raw)))
    path.write_bytes(_zip(members))


_reference_case("zip-bomb-8gb", _zip_bomb)
_reference_case("npy-header-lies", _lying_header)


def _inputs(shape):
    def write(path):
        arrays = _good_arrays(path)
        arrays["input/data"] = np.zeros(shape, np.float32)
        np.savez(path, **arrays)
    return write


_reference_case("inputs-wrong-size", _inputs((2, 3, 9, 9)),
                Expect("error", names=["ip1"]))
_reference_case("inputs-wrong-rank", _inputs((2, 3, 8)), Expect("error"))
_reference_case("inputs-scalar", _inputs(()), Expect("error"))


@case("reference/verify-a-file",
      _entries(VERIFY, Expect("error", names=["{reference}", "directory"])),
      case_file=True)
def _(d):
    write_tiny(d)


@case("reference/no-weights", _entries(VERIFY, Expect("error", names=["{dir}", "weights"])))
def _(d):
    write_tiny(d)
    (d / WEIGHTS).unlink()


@case("reference/no-net", _entries(VERIFY, Expect("error", names=["{net}"])))
def _(d):
    write_tiny(d)
    (d / NET).unlink()


@case("reference/no-reference", _entries(REFERENCE_ENTRIES, Expect("error",
                                                                   names=["{reference}"])))
def _(d):
    write_tiny(d)
    (d / REFERENCE).unlink()


# --- training -------------------------------------------------------------------------------

SOLVER_ERROR = Expect("error", names=["{solver}"])


@case("training/snapshot-under-a-file",
      _entries(TRAIN_ENTRIES, Expect("error", names=["{solver}", "blocker"])))
def _(d):
    write_tiny(d)
    (d / "blocker").write_text("a regular file, not a folder")
    (d / SOLVER).write_text(SOLVER_TEXT.replace('"snap/tiny"', '"blocker/snap/tiny"'))


@case("training/max-iter-negative", _entries(TRAIN_ENTRIES, SOLVER_ERROR))
def _(d):
    write_tiny(d)
    (d / SOLVER).write_text(SOLVER_TEXT.replace("max_iter: 2", "max_iter: -1"))


@case("training/net-param-error",
      _entries(TRAIN_ENTRIES, Expect("error", names=["{solver}", "ip1"])))
def _(d):
    """An inline net_param whose ip1 reads a bottom nobody produces."""
    write_tiny(d)
    inline = TRAIN_TEXT.replace('bottom: "pool1" top: "ip1"', 'bottom: "pool9" top: "ip1"')
    text = SOLVER_TEXT.replace('net: "train.prototxt"', "net_param {\n" + inline + "}")
    (d / SOLVER).write_text(text)


@case("training/net-param-bad-value",
      _entries(TRAIN_ENTRIES, Expect("error", names=["{solver}", "conv1"])))
def _(d):
    write_tiny(d)
    inline = _set("num_output", HUGE)(TRAIN_TEXT)
    (d / SOLVER).write_text(SOLVER_TEXT.replace('net: "train.prototxt"',
                                                "net_param {\n" + inline + "}"))


@case("training/run-from-elsewhere", _entries(TRAIN_ENTRIES, Expect("ok")), cwd_up=True)
def _(d):
    """The control: a solver run from another working directory finds its net next to it
    and the net's data next to the net."""
    write_tiny(d)


NO_INPUT_ADVICE = ("--input",)


@case("training/unreadable-hdf5-list",
      _entries((*TRAIN_ENTRIES, "Net-train"),
               Expect("error", names=["missing.txt"], absent=NO_INPUT_ADVICE)))
def _(d):
    write_tiny(d)
    (d / TRAIN).write_text(TRAIN_TEXT.replace('"train.txt"', '"missing.txt"'))


@case("training/hdf5-list-names-missing-file",
      _entries((*TRAIN_ENTRIES, "Net-train"),
               Expect("error", names=["train.txt", "gone.h5"], absent=NO_INPUT_ADVICE)))
def _(d):
    write_tiny(d)
    (d / "train.txt").write_text("gone.h5\n")


@case("training/image-list-missing-image",
      _entries((*TRAIN_ENTRIES, "Net-train"),
               Expect("error", names=["images.txt", "gone.png"], absent=NO_INPUT_ADVICE)))
def _(d):
    write_tiny(d)
    (d / TRAIN).write_text(TRAIN_TEXT.replace(HDF5_DATA, IMAGE_DATA % ""))
    (d / "images.txt").write_text("gone.png 0\n")


@case("training/hdf5-not-hdf5",
      _entries((*TRAIN_ENTRIES, "Net-train"),
               Expect("error", names=["train.h5"], absent=NO_INPUT_ADVICE)))
def _(d):
    write_tiny(d)
    (d / "train.h5").write_text("not an HDF5 file")


def _margin_snapshot(d: Path) -> None:
    """Train the margin net two iterations and keep its snapshot (counters included)."""
    from caffelayers.train import train

    write_train_files(d, MARGIN_TRAIN_TEXT,
                      SOLVER_TEXT.replace('"snap/tiny"', f'"{d}/snap/tiny"'))
    import h5py
    with h5py.File(d / "train.h5", "w") as handle:
        rng = np.random.default_rng(0)
        handle["data"] = rng.standard_normal((4, 7)).astype(np.float32)
        handle["label"] = np.arange(4, dtype=np.float32)
    train(str(d / SOLVER), workers=0)
    assert (d / "snap" / "tiny_iter_2.caffelayers.json").is_file()
    (d / SOLVER).write_text(SOLVER_TEXT)  # relative names again: runs use copies of the case


SIDECAR = "snap/tiny_iter_2.caffelayers.json"
STATE = "snap/tiny_iter_2.solverstate"


SIDECAR_ERROR = Expect("error", names=["tiny_iter_2.caffelayers.json"])


def _sidecar_case(name: str, content, expect: Expect = SIDECAR_ERROR):
    def build(d):
        _margin_snapshot(d)
        (d / SIDECAR).write_bytes(content if isinstance(content, bytes) else content.encode())
    CASES.append(Case(f"training/sidecar-{name}", build, _entries(TRAIN_ENTRIES, expect),
                      {"train_args": ["--snapshot", STATE], "resume": STATE}))


@case("training/sidecar-intact", _entries(TRAIN_ENTRIES, Expect("ok")),
      train_args=["--snapshot", STATE], resume=STATE)
def _(d):
    _margin_snapshot(d)


_sidecar_case("list", "[1, 2, 3]")
_sidecar_case("ragged", json.dumps({"iter": 2, "nets": {"train": {"fc6": {
    "iteration": [1, [2, 3]]}}}}))
_sidecar_case("huge-int", json.dumps({"iter": 2, "nets": {"train": {"fc6": {
    "iteration": 10**40}}}}))
_sidecar_case("huge-float", '{"iter": 2, "nets": {"train": {"fc6": {"iteration": 1e999}}}}')
_sidecar_case("nan", '{"iter": 2, "nets": {"train": {"fc6": {"iteration": NaN}}}}')
_sidecar_case("string", json.dumps({"iter": 2, "nets": {"train": {"fc6": {
    "iteration": "2"}}}}))
_sidecar_case("wrong-iter", json.dumps({"iter": 7, "nets": {"train": {}}}))
_sidecar_case("iter-float", json.dumps({"iter": 1e308, "nets": {}}))
_sidecar_case("deep", "[" * 100000 + "]" * 100000)
_sidecar_case("not-utf8", b"{\"iter\": 2, \"nets\": {\xff}}")


def build_case(case: Case, d: Path) -> dict:
    """Write ``case`` into the empty directory ``d``; the values its expectations name."""
    return case.build(d) or {}
