"""Replay a Caffe reference case and compare every recorded array.

A case directory holds ``net.prototxt``, ``weights.caffemodel`` and ``reference.npz`` (format:
``fixtures/caffe/README.md``). An array passes when
``max|ours - caffe| <= atol + rtol * max|caffe|``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .errors import CaffeLayersError
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
        return f"verify: {verdict} {good}/{len(self.checks)} arrays{worst}"

    def to_json(self) -> Dict:
        return {"case": self.case, "passed": self.passed, "summary": self.summary,
                "arrays": [{"key": c.key, "error": c.error, "tolerance": c.tolerance,
                            "passed": c.passed, "problem": c.problem} for c in self.checks]}


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


def load_reference(case: str | Path):
    """``(meta, arrays)`` of a ``reference.npz``, given the file or its case directory."""
    path = Path(case)
    if path.is_dir():
        path = path / "reference.npz"
    if not path.is_file():
        raise CaffeLayersError(f"{case}: not a reference case (no reference.npz)")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    meta = json.loads(str(arrays.pop("meta")))
    return meta, arrays


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
    case_dir = Path(case_dir)
    meta, arrays = load_reference(case_dir)
    if meta.get("solver"):
        return verify_solver_case(case_dir, rtol, atol, **net_options)
    weights = case_dir / "weights.caffemodel"
    net = Net(case_dir / "net.prototxt", weights if weights.is_file() else None,
              phase=meta.get("phase", "TEST"), **net_options)
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
    return result


def verify_solver_case(case_dir: str | Path, rtol: float = RTOL, atol: float = ATOL,
                       **options) -> VerifyResult:
    """Replay a solver case (``meta.solver``): one :meth:`Solver.step` per recorded iteration
    on the recorded inputs, comparing every recorded array of that iteration: ``data`` and
    ``diff`` (the step's forward and backward), ``param`` and ``param_diff`` (before the
    update), ``param_after`` and ``update`` (the value subtracted).

    ``options`` go to :class:`Solver` (``margin_backward``, ``loss_mode``, ...). The case's
    snapshots are switched off so that nothing is written into it.
    """
    case_dir = Path(case_dir)
    meta, arrays = load_reference(case_dir)
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
