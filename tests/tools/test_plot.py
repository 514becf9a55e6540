"""``caffelayers plot``: series parsed from a log in Caffe's own format (two test nets, both
forms of the iteration line, a new year mid-run) and from a log ``caffelayers train`` wrote;
the figure they make."""

import json
from pathlib import Path

import pytest

from caffelayers.cli import main
from caffelayers.tools.plot import parse_log

CAFFE_LOG = Path(__file__).resolve().parent / "data" / "caffe_lenet.log"


def values(series, column=2):
    return [point[column] for point in series]


def test_caffe_log_series():
    log = parse_log(CAFFE_LOG)
    assert values(log.train_loss, 0) == [0, 100, 200, 300]
    assert values(log.train_loss) == [2.31502, 0.284113, 0.151387, 0.0872]
    # Seconds from the Solving line (23:58:42 on 31 December), across the new year.
    assert values(log.train_loss, 1) == pytest.approx([2.1, 48.25, 96.5, 142.8])
    assert values(log.learning_rate) == [0.01, 0.00992565, 0.00985258]
    assert values(log.learning_rate, 0) == [0, 100, 200]
    assert sorted(log.test_outputs) == ["accuracy", "accuracy (#1)", "loss"]
    assert values(log.test_outputs["accuracy"]) == [0.0812, 0.9573]
    assert values(log.test_outputs["accuracy"], 0) == [0, 200]
    assert values(log.test_outputs["accuracy (#1)"]) == [0.079, 0.9511]
    assert values(log.test_outputs["loss"]) == [2.30721, 0.137605]
    assert values(log.train_outputs["loss"]) == [2.31502, 0.284113, 0.151387]


def test_our_train_log_and_figure(toy, capsys):
    assert main(["train", "solver.prototxt", "--workers", "0"]) == 0
    (toy / "train.log").write_text(capsys.readouterr().err)
    log = parse_log(toy / "train.log")
    assert values(log.train_loss, 0) == [0, 5, 10, 15, 20]
    assert values(log.learning_rate) == [0.1, 0.1, 0.05, 0.05]
    assert values(log.test_outputs["accuracy"], 0) == [0, 10, 20]
    assert values(log.train_loss)[-1] < values(log.train_loss)[0]
    seconds = values(log.train_loss, 1)
    assert seconds == sorted(seconds) and seconds[0] >= 0
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is missing")
    assert main(["plot", "train.log", str(CAFFE_LOG), "-o", "curves.png", "--x", "seconds"]) == 0
    assert capsys.readouterr().out.strip() == "wrote curves.png"
    assert (toy / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json(capsys):
    assert main(["plot", str(CAFFE_LOG), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (log,) = result["logs"]
    assert log["test_outputs"]["accuracy"][1] == {"iteration": 200, "seconds": 95.9,
                                                  "value": 0.9573}
    assert [p["value"] for p in log["learning_rate"]] == [0.01, 0.00992565, 0.00985258]


def test_not_a_log(tmp_path, capsys):
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    assert main(["plot", str(other), "--json"]) == 2
    assert "no glog lines" in capsys.readouterr().err
    assert main(["plot", str(CAFFE_LOG)]) == 2
    assert "-o FILE" in capsys.readouterr().err


def test_defaults_shown_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    assert "(default: iters)" in " ".join(capsys.readouterr().out.split())
