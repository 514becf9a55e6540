"""torch.export: a ``.pt2`` written by ``convert_to_exported`` runs after ``torch.export.load``
and reproduces Caffe's recorded forward, MarginInnerProduct and the losses included."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from caffelayers import CaffeLayersError, Net
from caffelayers.cli import main
from caffelayers.converters.pytorch import forward_by_name
from caffelayers.converters.pytorch.exported import (
    METADATA_FILE,
    convert_to_exported,
    load_exported,
)
from caffelayers.verify import compare, load_reference

CASES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
CASES = sorted(p for p in CASES_DIR.iterdir() if (p / "reference.npz").is_file())


def case_phase(case: Path, meta: dict):
    """The phase to export a case in, or why it is no forward check.

    Inference cases are exported in TEST. Cases with MarginInnerProduct or a loss layer are
    exported in their recorded phase (the margin and the loss are what they record); other
    cases whose recorded phase computes differently from TEST (Dropout or BatchNorm with
    batch statistics in TRAIN) and solver cases are no forward check.
    """
    if meta.get("solver"):
        return None, "solver case"
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase=meta["phase"])
    if any(node.module.is_loss or node.type == "MarginInnerProduct" for node in net.graph.nodes):
        return meta["phase"], None
    for node in net.graph.nodes:
        if node.type == "Dropout" and node.module.training:
            return None, "Dropout in TRAIN"
        if node.type == "BatchNorm" and not node.module.use_global_stats:
            return None, "BatchNorm with batch statistics"
    return "TEST", None


def assert_first_iteration_matches(outputs, arrays, name) -> None:
    checks = [compare(f"iter0/data/{blob}", value, arrays[f"iter0/data/{blob}"])
              for blob, value in outputs.items() if f"iter0/data/{blob}" in arrays]
    assert checks, f"no output of {name} was recorded"
    failures = [check.describe() for check in checks if not check.passed]
    assert not failures, failures


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_fixture_case_matches_caffe(case, tmp_path):
    meta, arrays = load_reference(case)
    phase, reason = case_phase(case, meta)
    if phase is None:
        pytest.skip(reason)
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase=phase)
    inputs = {name: arrays[f"input/{name}"] for name in meta["inputs"]}
    path = tmp_path / "model.pt2"
    convert_to_exported(net, path, example_inputs=inputs)
    module, input_names, output_names = load_exported(path)
    assert input_names == net.inputs and output_names == net.outputs
    with torch.no_grad():
        outputs = forward_by_name(module, inputs, input_names, output_names)
    assert_first_iteration_matches(outputs, arrays, case.name)


def test_margin_and_loss_cases_are_covered():
    """Every MarginInnerProduct, SoftmaxWithLoss and InfogainLoss case is a forward check
    (none is skipped)."""
    covered = {case.name for case in CASES
               if case_phase(case, load_reference(case)[0])[0] is not None}
    heads = {case.name for case in CASES if case.name.startswith(("mip_", "softmax_loss_",
                                                                   "infogain_"))}
    assert heads and heads <= covered
    assert "sphereface20_mini_grad" in covered


def test_plain_torch_export_load_with_dynamic_batch(tmp_path):
    """A deploy net exports without tracing branches, its batch symbolic: the program that
    ``torch.export.load`` returns runs batch 1 and the recorded batch."""
    case = CASES_DIR / "sphereface4_deploy"
    _, arrays = load_reference(case)
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase="TEST")
    path = tmp_path / "model.pt2"
    assert convert_to_exported(net, path) == "export"
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(METADATA_FILE))
        metadata = json.loads(archive.read(name))
    assert metadata == {"inputs": ["data"], "outputs": ["fc5"], "method": "export",
                        "dynamic_batch": True}
    program = torch.export.load(str(path))
    data = torch.from_numpy(arrays["input/data"])
    with torch.no_grad():
        full = program.module()(data)
        assert_first_iteration_matches({"fc5": full}, arrays, case.name)
        single = program.module()(data[:1])
    assert torch.allclose(single, full[:1], rtol=1e-5, atol=1e-6)


def test_margin_program_is_stateless_and_checks_labels(tmp_path):
    """MarginInnerProduct's lambda is frozen at the next iteration: every call gives Caffe's
    first iteration (Net's second forward moves on). The label range check became a
    runtime assertion: an out-of-range label raises instead of giving numbers."""
    case = CASES_DIR / "mip_quadruple_m4k6n5"
    meta, arrays = load_reference(case)
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase=meta["phase"])
    inputs = {name: arrays[f"input/{name}"] for name in meta["inputs"]}
    path = tmp_path / "model.pt2"
    assert convert_to_exported(net, path, example_inputs=inputs) == "draft"
    head = next(node.module for node in net.graph.nodes if node.type == "MarginInnerProduct")
    assert int(head.iteration) == 0  # the net itself did not move on
    module, input_names, output_names = load_exported(path)
    for _ in range(2):
        outputs = forward_by_name(module, inputs, input_names, output_names)
        assert_first_iteration_matches(outputs, arrays, case.name)
    # The batch stayed symbolic: the first row alone gives the first row of logits.
    first = forward_by_name(module, {name: value[:1] for name, value in inputs.items()},
                            input_names, output_names)
    assert torch.allclose(first["fc6"], outputs["fc6"][:1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(arrays["iter0/data/lambda"], arrays["iter1/data/lambda"])
    bad = dict(inputs, label=np.full_like(inputs["label"], 99))
    with pytest.raises(RuntimeError, match="assertion"):
        forward_by_name(module, bad, input_names, output_names)


def test_foreign_file_is_refused(tmp_path):
    program = torch.export.export(torch.nn.ReLU(), (torch.zeros(2),))
    torch.export.save(program, str(tmp_path / "foreign.pt2"))
    with pytest.raises(CaffeLayersError, match="not written by caffelayers"):
        load_exported(tmp_path / "foreign.pt2")


def test_cli_convert_to_exported_reports_parity(capsys, tmp_path):
    case = CASES_DIR / "mip_head_softmax_loss"
    out = tmp_path / "head.pt2"
    status = main(["convert", str(case / "net.prototxt"), str(case / "weights.caffemodel"),
                   "--phase", "TRAIN", "--to", "exported", "-o", str(out),
                   "--reference", str(case / "reference.npz")])
    stdout, _ = capsys.readouterr()
    assert status == 0, stdout
    assert f"wrote {out}" in stdout
    assert "verify: PASS 2/2 arrays" in stdout and "iter0/data/loss" in stdout
