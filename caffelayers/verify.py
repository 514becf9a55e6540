"""Replay a Caffe reference case and compare every recorded array.

A case directory holds ``net.prototxt``, ``weights.caffemodel`` and ``reference.npz`` (format:
``fixtures/caffe/README.md``). An array passes when
``max|ours - caffe| <= atol + rtol * max|caffe|``.
"""

from __future__ import annotations

import contextlib
import json
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import CaffeLayersError
from .limits import check_bytes
from .net import Net
from .solver import Solver

RTOL = 1e-4
ATOL = 1e-6


@dataclass
class ArrayCheck:
    """One recorded array compared with ours."""

    key: str
    error: float
    tolerance: float
    problem: str = ""  # set when the array could not be compared at all (missing, shape)

    @property
    def passed(self) -> bool:
        return not self.problem and self.error <= self.tolerance

    def describe(self) -> str:
        if self.problem:
            return f"{self.key}: {self.problem}"
        return f"{self.key}: max error {self.error:.3g} > tolerance {self.tolerance:.3g}"


@dataclass
class VerifyResult:
    """All comparisons of one case; ``summary`` is the CLI's last line."""

    case: str
    checks: List[ArrayCheck] = field(default_factory=list)
    #: ``(key, what, why)`` of the recorded arrays that were not compared (a converted
    #: model returns the net's outputs of one forward: no intermediate blob, no gradient).
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def failures(self) -> List[ArrayCheck]:
        return [check for check in self.checks if not check.passed]

    @property
    def summary(self) -> str:
        good = sum(check.passed for check in self.checks)
        comparable = [c for c in self.checks if not c.problem]
        worst = ""
        if comparable:
            top = max(comparable, key=lambda c: c.error / c.tolerance if c.tolerance else np.inf)
            worst = f" (worst {top.key} {top.error:.1e} of tolerance {top.tolerance:.1e})"
        verdict = "PASS" if self.passed else "FAIL"
        line = f"verify: {verdict} {good}/{len(self.checks)} arrays{worst}"
        if not self.skipped:
            return line
        groups: Dict[Tuple[str, str], List[str]] = {}
        for key, what, why in self.skipped:
            groups.setdefault((what, why), []).append(key)
        left = "; ".join(
            f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}): {why}"
            for (what, why), keys in groups.items())
        return (f"{line}; compared {', '.join(check.key for check in self.checks)}; not "
                f"compared: {left}")

    def to_json(self) -> Dict:
        return {"case": self.case, "passed": self.passed, "summary": self.summary,
                "arrays": [{"key": c.key, "error": c.error, "tolerance": c.tolerance,
                            "passed": c.passed, "problem": c.problem} for c in self.checks],
                "skipped": [{"key": key, "what": what, "why": why}
                            for key, what, why in self.skipped]}


def compare(key: str, ours, caffe: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> ArrayCheck:
    """Compare one array by the fixtures' rule (shape first, then the scaled max error)."""
    if ours is None:
        return ArrayCheck(key, float("inf"), 0.0, "not produced by caffelayers")
    if isinstance(ours, torch.Tensor):
        ours = ours.detach().cpu().double().numpy()
    ours = np.asarray(ours, dtype=np.float64)
    caffe = np.asarray(caffe, dtype=np.float64)
    if ours.size != caffe.size:
        return ArrayCheck(key, float("inf"), 0.0,
                          f"shape {ours.shape} where Caffe has {caffe.shape}")
    if ours.shape != caffe.shape and ours.squeeze().shape != caffe.squeeze().shape:
        return ArrayCheck(key, float("inf"), 0.0,
                          f"shape {ours.shape} where Caffe has {caffe.shape}")
    ours = ours.reshape(caffe.shape)
    # Caffe's non-finite values (NaN from 0/0 windows, -inf) must be matched exactly; the
    # tolerance scales with the finite ones.
    finite = np.isfinite(caffe)
    tolerance = atol + rtol * (float(np.abs(caffe[finite]).max()) if finite.any() else 0.0)
    if caffe.size == 0:
        return ArrayCheck(key, 0.0, tolerance)
    same_specials = np.array_equal(ours[~finite], caffe[~finite], equal_nan=True)
    if not same_specials or not np.isfinite(ours[finite]).all():
        return ArrayCheck(key, float("inf"), tolerance, "non-finite values differ from Caffe's")
    error = float(np.abs(ours[finite] - caffe[finite]).max()) if finite.any() else 0.0
    return ArrayCheck(key, error, tolerance)


#: No reference case records more iterations than this; a meta asking for more is refused
#: rather than replayed for hours.
MAX_ITERATIONS = 10_000


def load_reference(case: str | Path):
    """``(meta, arrays)`` of a ``reference.npz``, given the file or its case directory.

    Everything is checked before use: a regular file, a zip archive of ``.npy`` members
    whose sizes fit in memory and whose headers declare the arrays they hold, numeric arrays
    only (pickled objects are never loaded), and a ``meta`` JSON object whose fields have the
    types the replay needs.
    """
    path = Path(case)
    if path.is_dir():
        path = path / "reference.npz"
    _check_regular(path, "a reference (reference.npz)")
    with _reference_error(path):
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            strange = [m.filename for m in members if not m.filename.endswith(".npy")]
            if strange:
                raise CaffeLayersError(f"holds {strange[0]!r}, not a .npy array")
            check_bytes(sum(m.file_size for m in members), "its arrays")
            for member in members:
                _check_member(archive, member)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    if "meta" not in arrays:
        raise CaffeLayersError(f"{path}: no 'meta' entry (the JSON that says what was recorded)")
    meta = _read_meta(arrays.pop("meta"), path)
    for key, value in arrays.items():
        if value.dtype.kind not in "biuf":
            raise CaffeLayersError(f"{path}: array {key!r} has dtype {value.dtype}, not numbers")
    missing = [name for name in meta["inputs"] if f"input/{name}" not in arrays]
    if missing:
        raise CaffeLayersError(f"{path}: meta lists inputs {', '.join(map(repr, missing))} "
                               "but no 'input/NAME' array holds them")
    return meta, arrays


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def _check_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """A member's ``.npy`` header against the member's size, read before the array: numpy
    allocates the array a header declares before reading it, so a member of a few bytes
    declaring 2^31 floats would cost 8 GB."""
    name = member.filename[:-len(".npy")]
    with archive.open(member) as file:
        version = np.lib.format.read_magic(file)
        if version not in _NPY_HEADERS:
            raise CaffeLayersError(f"array {name!r}: .npy format {version} is not read here")
        shape, _, dtype = _NPY_HEADERS[version](file)
        if dtype.hasobject:
            raise CaffeLayersError(f"array {name!r} holds pickled objects, which are never "
                                   "loaded")
        declared, held = math.prod(shape) * dtype.itemsize, member.file_size - file.tell()
    if declared != held:
        raise CaffeLayersError(f"array {name!r} declares shape {shape} ({declared:,} bytes) "
                               f"but holds {held:,} bytes")


def _check_regular(path: Path, what: str) -> None:
    """A regular file: a FIFO or a device would block or never end."""
    if not path.exists():
        raise CaffeLayersError(f"{path}: not found; expected {what}")
    if not path.is_file():
        raise CaffeLayersError(f"{path}: not a regular file; expected {what}")


@contextlib.contextmanager
def _reference_error(path: Path):
    try:
        yield
    except CaffeLayersError as error:
        raise CaffeLayersError(f"{path}: {error}") from None
    except zipfile.BadZipFile:
        raise CaffeLayersError(f"{path}: not a reference.npz (not a zip archive of arrays)") \
            from None
    except zlib.error as error:  # a member's compressed stream is damaged
        raise CaffeLayersError(f"{path}: a damaged archive ({error})") from None
    except ValueError as error:
        why = ("it holds pickled objects, which are never loaded" if "pickle" in str(error)
               else f"a damaged array ({error})")
        raise CaffeLayersError(f"{path}: {why}") from None
    except (OSError, EOFError) as error:
        raise CaffeLayersError(f"{path}: cannot be read ({error})") from None


#: meta fields the replay reads: name -> (allowed types, description).
_META_FIELDS = {
    "case": ((str,), "a string"),
    "phase": ((str,), "TRAIN or TEST"),
    "backward": ((bool,), "true or false"),
    "solver": ((bool,), "true or false"),
    "iterations": ((int,), f"an integer from 1 to {MAX_ITERATIONS}"),
}


def _read_meta(value: np.ndarray, path: Path) -> Dict:
    if value.shape != () or value.dtype.kind not in "US":
        raise CaffeLayersError(f"{path}: 'meta' must be one JSON string, got a {value.dtype} "
                               f"array of shape {value.shape}")
    try:
        meta = json.loads(str(value))
    except (ValueError, RecursionError) as error:  # RecursionError: nested past Python's stack
        raise CaffeLayersError(f"{path}: 'meta' is not JSON ({error})") from None
    if not isinstance(meta, dict):
        raise CaffeLayersError(f"{path}: 'meta' must be a JSON object")
    inputs = meta.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(n, str) for n in inputs):
        raise CaffeLayersError(f"{path}: meta 'inputs' must be a list of blob names")
    for name, (types, allowed) in _META_FIELDS.items():
        if name not in meta:
            continue
        field_value = meta[name]
        bad = not isinstance(field_value, types) or (bool not in types and
                                                     isinstance(field_value, bool))
        if name == "phase" and not bad:
            bad = field_value not in ("TRAIN", "TEST")
        if name == "iterations" and not bad:
            bad = not 1 <= field_value <= MAX_ITERATIONS
        if bad:
            raise CaffeLayersError(f"{path}: meta {name!r} must be {allowed}, got "
                                   f"{field_value!r:.60}")
    return meta


def _case_dir(case_dir: str | Path) -> Path:
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        what = "a file" if case_dir.exists() else "not found"
        raise CaffeLayersError(f"{case_dir}: {what}; verify takes a case directory holding "
                               "net.prototxt, weights.caffemodel and reference.npz")
    return case_dir


def open_case(case_dir: str | Path, phase: Optional[str] = None, reference=None,
              **net_options):
    """``(meta, arrays, net)`` of a reference case directory, every part checked: the case is
    a directory, its reference reads, its net has weights for every parametrised layer
    (verifying fillers would prove nothing) and accepts the recorded input shapes.
    ``reference`` is the case's ``(meta, arrays)`` when the caller has read it already."""
    case_dir = _case_dir(case_dir)
    meta, arrays = reference or load_reference(case_dir)
    prototxt, weights = case_dir / "net.prototxt", case_dir / "weights.caffemodel"
    _check_regular(prototxt, "the case's net (net.prototxt)")
    net = Net(prototxt, weights if weights.exists() else None,
              phase=phase or meta.get("phase", "TEST"), **net_options)
    unfilled = net.unloaded_layers if weights.exists() else list(net.caffe_params())
    if unfilled:
        raise CaffeLayersError(f"{case_dir}: no weights for layers "
                               f"{', '.join(map(repr, unfilled[:5]))}"
                               f"{' ...' if len(unfilled) > 5 else ''} in "
                               f"{'weights.caffemodel' if weights.exists() else 'the case (no weights.caffemodel)'}"
                               ": verifying the prototxt's fillers would prove nothing")
    reshape_to_reference(net, meta, arrays)
    return meta, arrays, net


def reshape_to_reference(net: Net, meta: Dict, arrays: Dict[str, np.ndarray]) -> None:
    """Caffe's ``Reshape`` of ``net`` to the recorded inputs' shapes, before anything runs:
    a layer that cannot take them is named (the reference of another net, or of other
    sizes)."""
    net.reshape(**{name: arrays[f"input/{name}"].shape for name in meta["inputs"]
                   if name in net.inputs})


def _iteration(arrays: Dict[str, np.ndarray], index: int, kind: str) -> Dict[str, np.ndarray]:
    prefix = f"iter{index}/{kind}/"
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


def verify_case(case_dir: str | Path, rtol: float = RTOL, atol: float = ATOL,
                **net_options) -> VerifyResult:
    """Replay ``case_dir`` through :class:`caffelayers.Net` and compare every recorded array.

    Each iteration runs forward on the recorded inputs, then (when the case recorded backward)
    clears the parameter gradients and runs backward from the loss layers and the recorded
    top diffs. ``net_options`` go to ``Net`` (``margin_backward``, ``loss_mode``, ...).
    """
    reference = load_reference(_case_dir(case_dir))
    if reference[0].get("solver"):
        return verify_solver_case(case_dir, rtol, atol, reference=reference, **net_options)
    meta, arrays, net = open_case(case_dir, reference=reference, **net_options)
    case_dir = Path(case_dir)
    inputs = {name: arrays[f"input/{name}"] for name in meta["inputs"]}
    result = VerifyResult(meta.get("case", case_dir.name))
    for index in range(int(meta.get("iterations", 1))):
        backward = bool(meta.get("backward"))
        with torch.set_grad_enabled(backward):
            net(**inputs)
        for blob, expected in _iteration(arrays, index, "data").items():
            result.checks.append(compare(f"iter{index}/data/{blob}", net.blobs.get(blob),
                                         expected, rtol, atol))
        _compare_params(result, net.caffe_params(), _iteration(arrays, index, "param"),
                        f"iter{index}/param", rtol, atol)
        if not backward:
            continue
        net.clear_param_diffs()
        net.backward(_iteration(arrays, index, "top_diff"))
        for blob, expected in _iteration(arrays, index, "diff").items():
            result.checks.append(compare(f"iter{index}/diff/{blob}", net.diffs.get(blob),
                                         expected, rtol, atol))
        _compare_params(result, net.param_diffs(), _iteration(arrays, index, "param_diff"),
                        f"iter{index}/param_diff", rtol, atol)
    if not result.checks:
        raise CaffeLayersError(f"{case_dir}: reference.npz records no arrays to compare")
    return result


def _compare_params(result: VerifyResult, ours: Dict[str, List[torch.Tensor]],
                    recorded: Dict[str, np.ndarray], prefix: str, rtol: float,
                    atol: float) -> None:
    for key, expected in sorted(recorded.items()):
        layer, _, index = key.rpartition("/")
        blobs = ours.get(layer)
        value: Optional[torch.Tensor] = None
        if blobs is not None and int(index) < len(blobs):
            value = blobs[int(index)]
        result.checks.append(compare(f"{prefix}/{key}", value, expected, rtol, atol))


def compare_forward(meta: Dict, arrays: Dict[str, np.ndarray], run, rtol: float = RTOL,
                    atol: float = ATOL) -> VerifyResult:
    """Compare a converted model's outputs with the first iteration's recorded blobs.

    ``run(inputs) -> {blob: array}`` runs the converted model on the recorded inputs; every
    output blob that the reference recorded is compared (converted models are stateless
    forwards, so the first iteration is the one to match).
    """
    inputs = {name: arrays[f"input/{name}"] for name in meta["inputs"]}
    outputs = run(inputs)
    result = VerifyResult(meta.get("case", ""))
    for blob, value in outputs.items():
        expected = arrays.get(f"iter0/data/{blob}")
        if expected is not None:
            result.checks.append(compare(f"iter0/data/{blob}", value, expected, rtol, atol))
    if not result.checks:
        raise CaffeLayersError("the reference records none of the converted model's outputs "
                               f"({', '.join(outputs) or 'none'})")
    compared = {check.key for check in result.checks}
    fed = {f"iter0/data/{name}" for name in inputs}  # the inputs, recorded as blobs too
    for key in arrays:
        if key not in compared | fed and not key.startswith("input/"):
            result.skipped.append((key, *_not_compared(key)))
    return result


def _not_compared(key: str) -> Tuple[str, str]:
    """What a recorded array that :func:`compare_forward` leaves out is, and why."""
    iteration, kind = (key.split("/") + [""])[:2]
    if kind == "data" and iteration == "iter0":
        return "intermediate blobs", "a converted model returns only the net's outputs"
    if kind == "data":
        return "blobs of later iterations", "a converted model is one stateless forward"
    if kind in ("param", "param_after"):
        return "parameters", "the converted model holds the caffemodel's"
    return "gradients and updates", "a converted model runs forward only"


def verify_solver_case(case_dir: str | Path, rtol: float = RTOL, atol: float = ATOL,
                       reference=None, **options) -> VerifyResult:
    """Replay a solver case (``meta.solver``): one :meth:`Solver.step` per recorded iteration
    on the recorded inputs, comparing every recorded array of that iteration: ``data`` and
    ``diff`` (the step's forward and backward), ``param`` and ``param_diff`` (before the
    update), ``param_after`` and ``update`` (the value subtracted).

    ``options`` go to :class:`Solver` (``margin_backward``, ``loss_mode``, ...). The case's
    snapshots are switched off so that nothing is written into it. ``reference`` is the
    case's ``(meta, arrays)`` when the caller has read it already.
    """
    case_dir = Path(case_dir)
    meta, arrays = reference or load_reference(case_dir)
    inputs = {name: arrays[f"input/{name}"] for name in meta["inputs"]}
    weights = case_dir / "weights.caffemodel"
    solver = Solver(case_dir / "solver.prototxt", weights if weights.is_file() else None,
                    inputs=inputs, test_inputs=inputs, root=case_dir, **options)
    solver.param.snapshot = 0
    result = VerifyResult(meta.get("case", case_dir.name))
    before: Dict[str, Dict[str, List[torch.Tensor]]] = {}

    def capture(solver: Solver) -> None:
        before["param"] = {k: [b.detach().clone() for b in v]
                           for k, v in solver.net.caffe_params().items()}
        before["param_diff"] = {k: [b.detach().clone() for b in v]
                                for k, v in solver.net.param_diffs().items()}

    solver.on_gradients_ready.append(capture)
    for index in range(int(meta.get("iterations", 1))):
        solver.step(1)
        for kind, ours in (("data", solver.net.blobs), ("diff", solver.net.diffs)):
            for blob, expected in sorted(_iteration(arrays, index, kind).items()):
                result.checks.append(compare(f"iter{index}/{kind}/{blob}", ours.get(blob),
                                             expected, rtol, atol))
        after = {"param_after": solver.net.caffe_params(), "update": solver.net.param_diffs()}
        for kind, ours in [*before.items(), *after.items()]:
            _compare_params(result, ours, _iteration(arrays, index, kind),
                            f"iter{index}/{kind}", rtol, atol)
    if not result.checks:
        raise CaffeLayersError(f"{case_dir}: reference.npz records no arrays to compare")
    return result
