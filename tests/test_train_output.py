"""The trainer's output: the progress bar on a (pseudo-)terminal, plain ``Progress:`` lines
when piped (which Caffe's log parsers and ``caffelayers plot`` skip), ``--log FILE``,
``--quiet``, ``--log-level`` and ``GLOG_minloglevel``; only rank 0 prints."""

import argparse
import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from caffelayers.cli import main
from caffelayers.tools.plot import parse_log
from caffelayers.train_log import ProgressBar, add_log_options, log_level, train_output

cv2 = pytest.importorskip("cv2", reason="the data extra (opencv-python-headless) is missing")

# toy: the images, list and working directory in tmp_path (used with usefixtures)
from test_train import toy, write_solver  # noqa: F401

#: a glog line: severity, date, time, thread, file:line]
GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")
CLI = [sys.executable, "-m", "caffelayers"]


class Clock:
    """A stand-in for ``time.perf_counter`` that moves only when told."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def values(series, column=2):
    return [point[column] for point in series]


# --- the progress object ---------------------------------------------------------------------

def test_lines_when_not_a_terminal_and_images_per_second_without_tests(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("caffelayers.train_log.time", clock)
    stream = io.StringIO()
    bar = ProgressBar(100, stream, terminal=False, interval=0)
    bar.update(0, 0.0, 0.0, images=0)  # before the first iteration: nothing measured yet
    clock.now += 2.0                    # 2 s of training, 40 images
    bar.testing(0, 0, 4, iteration=10)
    clock.now += 10.0                   # 10 s of testing: not training time
    bar.testing(0, 4, 4, iteration=10)
    bar.update(10, 2.5, 0.01, 61.5, images=40)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and all(GLOG.match(line) for line in lines)
    texts = [GLOG.sub("", line) for line in lines]
    assert texts[0] == "Progress: 0/100 iterations (0%), elapsed 00:00, ETA ?"
    # 10 of 100 iterations in 2 s: 18 s left
    assert texts[1] == ("Progress: 10/100 iterations (10%), elapsed 00:02, ETA 00:18; "
                        "Testing net #0: 0/4")
    # 10 of 100 iterations in 12 s: 108 s left; 40 images in 2 s of training: 20 img/s.
    assert texts[2] == ("Progress: 10/100 iterations (10%), elapsed 00:12, ETA 01:48; "
                        "loss 2.5, lr 0.01, lambda 61.5, 20.0 img/s")
    assert len(texts) == 3  # close() repeats no line


def test_lines_every_interval_seconds(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("caffelayers.train_log.time", clock)
    stream = io.StringIO()
    bar = ProgressBar(10, stream, terminal=False, interval=30)
    for iteration in range(11):
        bar.update(iteration, 1.0, 0.1)
        clock.now += 7.0
    bar.close()
    texts = [GLOG.sub("", line) for line in stream.getvalue().splitlines()]
    # at 0 s, 35 s (iteration 5), 70 s (iteration 10), and the last state at close
    assert [t.split(",")[0] for t in texts] == ["Progress: 0/10 iterations (0%)",
                                                "Progress: 5/10 iterations (50%)",
                                                "Progress: 10/10 iterations (100%)"]
    assert texts[-1].endswith("ETA 00:00; loss 1, lr 0.1")


def test_bar_on_a_terminal_lifts_itself_for_log_lines():
    stream = io.StringIO()
    bar = ProgressBar(50, stream, terminal=True)
    bar.update(0, 0.0, 0.0)
    first = stream.getvalue()
    assert "0/50" in first and "loss" not in first and "lr" not in first
    bar.update(5, 1.25, 0.05, images=20)
    bar.testing(0, 2, 4, iteration=5)
    bar._bar.refresh()
    with bar.lifted():
        stream.write("I0101 00:00:00.000000  1 x.py:1] a log line\n")
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and re.search(r"5/50 \[\d\d:\d\d<\d\d:\d\d", text)
    assert "Testing net #0: 2/4 | " in text and "loss 1.25, lr 0.05" in text
    # the log line starts a line of its own
    assert re.search(r"(^|[\r\n])I0101 00:00:00.000000  1 x.py:1\] a log line\n", text)


def test_log_level_flag_and_glog_variable(monkeypatch):
    from caffelayers import CaffeLayersError

    monkeypatch.delenv("GLOG_minloglevel", raising=False)
    assert log_level(None) == logging.INFO
    monkeypatch.setenv("GLOG_minloglevel", "2")
    assert log_level(None) == logging.ERROR and log_level("warning") == logging.WARNING
    monkeypatch.setenv("GLOG_minloglevel", "3")
    assert log_level(None) == logging.CRITICAL
    monkeypatch.setenv("GLOG_minloglevel", "loud")
    with pytest.raises(CaffeLayersError, match="GLOG_minloglevel='loud'"):
        log_level(None)


def test_other_ranks_print_nothing():
    parser = argparse.ArgumentParser()
    add_log_options(parser)
    stream = io.StringIO()
    handlers = list(logging.getLogger("caffelayers").handlers)
    with train_output(parser.parse_args([]), 10, rank=1, stream=stream) as bar:
        logging.getLogger("caffelayers.solver").warning("from rank 1")
        assert bar is None and logging.getLogger("caffelayers").handlers == handlers
    assert stream.getvalue() == ""


# --- the command -----------------------------------------------------------------------------

@pytest.mark.usefixtures("toy")
def test_piped_log_file_and_plot(tmp_path):
    """Through a pipe (as ``| tee``): no bar, no carriage return, Progress lines with the
    elapsed time and ETA; the log parses as before; --log FILE holds Caffe's lines only."""
    solver = write_solver(tmp_path)
    run = subprocess.run(CLI + ["train", solver, "--workers", "0", "--progress-interval", "0",
                                "--log", "train.log"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    err = run.stderr
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert all(GLOG.match(line) for line in lines), [l for l in lines if not GLOG.match(l)]
    progress = [line for line in lines if "] Progress: " in line]
    assert any("Testing net #0: 2/4" in line for line in progress)
    assert any(re.search(r"20/20 iterations \(100%\), elapsed \d\d:\d\d, ETA 00:00; loss "
                         r"[\d.]+, lr 0\.025, lambda 1, [\d.]+ img/s$", line)
               for line in progress)
    assert all(re.search(r"elapsed \d\d:\d\d, ETA (\d\d:\d\d|\?)", line) for line in progress)
    # what Caffe's parser reads is unchanged by the Progress lines
    logged = (tmp_path / "train.log").read_text()
    assert "Progress:" not in logged
    assert [line for line in lines if "Progress:" not in line] == logged.splitlines()
    (tmp_path / "piped.log").write_text(err)
    for path in ("piped.log", "train.log"):
        log = parse_log(tmp_path / path)
        assert values(log.train_loss, 0) == [0, 5, 10, 15, 20]
        assert values(log.learning_rate) == [0.05, 0.05, 0.025, 0.025]
        assert values(log.test_outputs["accuracy"], 0) == [0, 10, 20]


def _run_on_a_terminal(argv, cwd):
    """Run ``argv`` with a pseudo-terminal (100 x 30) as its stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                               close_fds=True)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert process.wait(timeout=300) == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


@pytest.mark.usefixtures("toy")
def test_bar_with_eta_and_tests_on_a_terminal(tmp_path):
    text = _run_on_a_terminal(CLI + ["train", write_solver(tmp_path), "--workers", "0"], tmp_path)
    assert re.search(r"\d+/20 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(it/s|s/it)\]", text)
    assert re.search(r"Testing net #0: \d/4 \| ", text)
    assert re.search(r"loss [\d.]+, lr 0\.0\d+, lambda [\d.]+, [\d.]+ img/s", text)
    # the log lines stay whole between the bar's redraws
    pieces = re.split(r"[\r\n]+", text)
    assert sum("] Iteration 10, Testing net (#0)" in piece for piece in pieces) == 1
    assert sum(bool(re.search(r"\] Iteration 15 \(.*\), loss = [\d.]+$", piece))
               for piece in pieces) == 1
    assert "Progress:" not in text
    assert "loss 0, lr 0" not in text  # nothing shown before the first iteration finished


@pytest.mark.usefixtures("toy")
def test_quiet_and_log_levels(tmp_path, capsys, monkeypatch):
    solver = write_solver(tmp_path, max_iter=5)
    assert main(["train", solver, "--workers", "0", "--quiet", "--log", "all.log"]) == 0
    assert capsys.readouterr().err == ""
    logged = (tmp_path / "all.log").read_text()
    assert "] Solving toy" in logged and "] Optimization Done." in logged
    monkeypatch.setenv("GLOG_minloglevel", "1")
    assert main(["train", solver, "--workers", "0", "--log", "warn.log"]) == 0
    assert capsys.readouterr().err == "" and (tmp_path / "warn.log").read_text() == ""
    assert main(["train", solver, "--workers", "0", "--log-level", "info"]) == 0
    err = capsys.readouterr().err
    assert "] Solving toy" in err and "] Progress: 5/5 iterations (100%)" in err
    assert main(["train", solver, "--log", str(tmp_path / "missing" / "x.log")]) == 2
    assert "--log " in capsys.readouterr().err


def test_help_says_where_the_lines_go(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--log FILE", "stderr keeps them too", "--quiet", "GLOG_minloglevel",
                 "--skip-data-check"):
        assert text in out
