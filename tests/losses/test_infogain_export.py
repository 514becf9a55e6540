"""InfogainLoss through ``torch.export``: its label checks are graph assertions, so every
InfogainLoss fixture exports with plain ``torch.export.export`` (no draft) and the loaded
program reproduces Caffe's recorded loss; a bad label raises when the program runs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from caffelayers import LabelError, Net
from caffelayers.converters.pytorch import forward_by_name
from caffelayers.converters.pytorch.exported import convert_to_exported, load_exported
from caffelayers.losses.infogain import softmax_infogain_loss
from caffelayers.verify import compare, load_reference

CASES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "caffe"
CASES = sorted(p for p in CASES_DIR.glob("infogain_*") if (p / "reference.npz").is_file())


def export_case(case: Path, tmp_path: Path, mode: str = "caffe"):
    meta, arrays = load_reference(case)
    net = Net(case / "net.prototxt", case / "weights.caffemodel", phase=meta["phase"],
              loss_mode=mode)
    inputs = {name: arrays[f"input/{name}"] for name in meta["inputs"]}
    path = tmp_path / "model.pt2"
    method = convert_to_exported(net, path, example_inputs=inputs)
    module, input_names, output_names = load_exported(path)
    return net, inputs, arrays, method, module, input_names, output_names


def test_cases_exist():
    assert len(CASES) >= 8, CASES


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_exported_program_matches_caffe(case, tmp_path):
    _, inputs, arrays, method, module, input_names, output_names = export_case(case,
                                                                               tmp_path)
    assert method == "export"
    with torch.no_grad():
        outputs = forward_by_name(module, inputs, input_names, output_names)
    checks = [compare(f"iter0/data/{blob}", value, arrays[f"iter0/data/{blob}"])
              for blob, value in outputs.items() if f"iter0/data/{blob}" in arrays]
    assert checks
    assert all(check.passed for check in checks), [c.describe() for c in checks]


@pytest.mark.parametrize("name", ["infogain_saturated", "infogain_spatial_ignore"])
@pytest.mark.parametrize("mode", ["caffe", "exact"])
def test_exported_program_matches_eager_net(name, mode, tmp_path):
    """Beyond the recorded inputs: new logits (saturated ones included, where Caffe's floor
    counts) and labels with no ignored position give the eager net's loss."""
    net, inputs, _, _, module, input_names, output_names = export_case(
        CASES_DIR / name, tmp_path, mode)
    generator = np.random.default_rng(0)
    for scale in (1.0, 60.0):
        fresh = {key: value.copy() for key, value in inputs.items()}
        data_name = input_names[0]
        fresh[data_name] = (generator.standard_normal(inputs[data_name].shape) * scale
                            ).astype(inputs[data_name].dtype)
        if "ignore" in name:  # every label kept: the program must not assume one is ignored
            label_name = input_names[1]
            fresh[label_name] = np.ones_like(inputs[label_name])
        with torch.no_grad():
            program = forward_by_name(module, fresh, input_names, output_names)
            eager = net.forward(**{k: torch.from_numpy(v) for k, v in fresh.items()})
        for blob in output_names:
            torch.testing.assert_close(program[blob], eager[blob], rtol=1e-5, atol=1e-6)


def test_out_of_range_label_raises_when_the_program_runs(tmp_path):
    net, inputs, _, _, module, input_names, output_names = export_case(
        CASES_DIR / "infogain_valid", tmp_path)
    label_name = input_names[1]
    bad = dict(inputs, **{label_name: np.full_like(inputs[label_name], 99)})
    with pytest.raises(RuntimeError, match=r"label\(s\) outside \[0, "):
        forward_by_name(module, bad, input_names, output_names)
    with pytest.raises(LabelError, match=r"label\(s\) outside \[0, "):
        net.forward(**{k: torch.from_numpy(v) for k, v in bad.items()})


def test_functional_loss_exports_with_float_labels():
    """The functional form with float labels (Caffe's) and an ignore label traces without
    data-dependent guards and agrees with the eager call."""
    class Loss(torch.nn.Module):
        def __init__(self, H):
            super().__init__()
            self.register_buffer("H", H)

        def forward(self, logits, labels):
            return softmax_infogain_loss(logits, labels, self.H, ignore_label=2, mode="caffe")

    generator = torch.Generator().manual_seed(0)
    H = torch.rand(5, 5, generator=generator)
    logits = torch.randn(6, 5, generator=generator) * 30
    labels = torch.tensor([0.0, 1, 2, 3, 4, 2])
    program = torch.export.export(Loss(H), (logits, labels))
    torch.testing.assert_close(program.module()(logits, labels), Loss(H)(logits, labels))
    kept = torch.tensor([0.0, 1, 3, 3, 4, 0])
    torch.testing.assert_close(program.module()(logits, kept), Loss(H)(logits, kept))
