"""``caffelayers plot``: training curves from Caffe logs (Caffe's ``plot_training_log.py``).

    caffelayers plot LOG [LOG...] -o curves.png [--x iters|seconds] [--json]

Reads the log lines that Caffe's solver writes, and that ``caffelayers train`` writes in the
same form (glog lines ``I1203 07:05:32.123456  1234 solver.cpp:218] MESSAGE``):

* ``Iteration 100 (2.5 iter/s, 40s/100 iters), loss = 0.5`` (or Caffe's older
  ``Iteration 100, loss = 0.5``): the smoothed train loss;
* ``Iteration 100, lr = 0.01``: the learning rate;
* ``Train net output #0: loss = 0.49 (* 1 = 0.49 loss)``: each train output;
* ``Iteration 500, Testing net (#0)`` then ``Test net output #0: accuracy = 0.9``: each test
  output (of test net #1 and further, named ``accuracy (#1)``).

As Caffe's ``parse_log.py``, the last ``Iteration N`` seen gives the iteration of every later
line, and seconds count from the ``Solving`` line (else the first glog line), in the year of
glog's ``Log file created at:`` header (else the file's), rolled over when the month goes
back. The figure (matplotlib, the ``plot`` extra) has a
panel of losses (train loss and test outputs named ``*loss*``), one per other output
(accuracy, lambda...: train and test of one name together, since their scales differ) and
one of the learning rate (log scale), one curve per log and series.
``--json`` prints the parsed series instead of (or, with ``-o``, besides) drawing them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import CaffeLayersError

__all__ = ["TrainingLog", "add_parser", "cmd_plot", "parse_log", "plot_logs"]

_GLOG = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+)\s")
_CREATED = re.compile(r"^Log file created at: (\d{4})/", re.MULTILINE)
_ITERATION = re.compile(r"Iteration (\d+)")
_TRAIN_LOSS = re.compile(r"Iteration \d+.*?, loss = ([-+.\deEinfa]+)")
_LR = re.compile(r"\blr = ([-+.\deE]+)")
_TESTING = re.compile(r"Testing net \(#(\d+)\)")
_OUTPUT = re.compile(r"(Train|Test) net output #\d+: (\S+) = ([-+.\deEinfa]+)")


class TrainingLog:
    """The series of one log: each a list of ``(iteration, seconds, value)``.

    Attributes:
        path: the log file.
        train_loss: the solver's smoothed loss (``Iteration N (...), loss = X``).
        learning_rate: ``lr = X``.
        train_outputs, test_outputs: ``{output name: series}``.
    """

    def __init__(self, path: str):
        self.path = path
        self.train_loss: List[tuple] = []
        self.learning_rate: List[tuple] = []
        self.train_outputs: Dict[str, List[tuple]] = {}
        self.test_outputs: Dict[str, List[tuple]] = {}

    def to_json(self) -> Dict:
        def points(series):
            return [{"iteration": i, "seconds": s, "value": v} for i, s, v in series]

        return {"path": self.path, "train_loss": points(self.train_loss),
                "learning_rate": points(self.learning_rate),
                "train_outputs": {k: points(v) for k, v in self.train_outputs.items()},
                "test_outputs": {k: points(v) for k, v in self.test_outputs.items()}}


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def parse_log(path: str | Path) -> TrainingLog:
    """Read one Caffe (or ``caffelayers train``) log; see the module's docstring."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except IsADirectoryError:
        raise CaffeLayersError(f"{path}: a directory, not a log file") from None
    # glog's header names the year; without it, the file's (as Caffe's parser does).
    header = _CREATED.search(text[:200])
    year = int(header.group(1)) if header else \
        datetime.datetime.fromtimestamp(os.path.getmtime(path)).year
    lines = text.splitlines()
    stamped = [(line, _GLOG.match(line)) for line in lines]
    stamped = [(line, m) for line, m in stamped if m]
    if not stamped:
        raise CaffeLayersError(f"{path}: no glog lines (I1203 07:05:32.123456 ...]) in it; "
                               "is it a Caffe log?")
    start_match = next((m for line, m in stamped if "] Solving " in line),
                       stamped[0][1])
    log = TrainingLog(str(path))

    def when(match, year):
        month, day, hour, minute, second = (int(match.group(k)) for k in range(1, 6))
        micro = int(match.group(6)[:6].ljust(6, "0"))
        return datetime.datetime(year, month, day, hour, minute, second, micro)

    start = when(start_match, year)
    last_month = start.month
    iteration: Optional[int] = None
    test_net = 0
    for line, match in stamped:
        found = _ITERATION.search(line)
        if found:
            iteration = int(found.group(1))
        if iteration is None:
            continue  # as parse_log.py: nothing counts before the first iteration
        month = int(match.group(1))
        if month < last_month:
            year += 1
        last_month = month
        seconds = (when(match, year) - start).total_seconds()
        testing = _TESTING.search(line)
        if testing:
            test_net = int(testing.group(1))
            continue
        loss = _TRAIN_LOSS.search(line)
        if loss:
            log.train_loss.append((iteration, seconds, _float(loss.group(1))))
        rate = _LR.search(line)
        if rate:
            log.learning_rate.append((iteration, seconds, _float(rate.group(1))))
        output = _OUTPUT.search(line)
        if output:
            kind, name, value = output.groups()
            if kind == "Test":
                name = name if test_net == 0 else f"{name} (#{test_net})"
                log.test_outputs.setdefault(name, []).append((iteration, seconds, _float(value)))
            else:
                log.train_outputs.setdefault(name, []).append((iteration, seconds, _float(value)))
    return log


def plot_logs(logs: List[TrainingLog], output: str | Path, x: str = "iters") -> Path:
    """Draw the logs' curves into ``output`` (any format matplotlib writes: png, svg, pdf)."""
    try:
        import matplotlib
    except ImportError as error:
        raise CaffeLayersError(f"caffelayers plot draws with matplotlib ({error}): "
                               "pip install 'caffelayers[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = 0 if x == "iters" else 1
    panels: Dict[str, List] = {"loss": []}
    rates = []
    for log in logs:
        prefix = f"{Path(log.path).name}: " if len(logs) > 1 else ""

        def tag(name: str, prefix: str = prefix) -> str:
            return prefix + name

        if log.train_loss:
            panels["loss"].append((tag("train loss"), log.train_loss, "-"))
        for name, series in log.test_outputs.items():
            panel = "loss" if "loss" in name else name
            panels.setdefault(panel, []).append((tag(f"test {name}"), series, "o-"))
        for name, series in log.train_outputs.items():
            if "loss" not in name:
                panels.setdefault(name, []).append((tag(f"train {name}"), series, "--"))
        if log.learning_rate:
            rates.append((tag("lr"), log.learning_rate, "steps"))
    panels["learning rate"] = rates
    used = [(title, curves) for title, curves in panels.items() if curves]
    if not used:
        raise CaffeLayersError("the logs hold no iterations with a loss, an output or a "
                               "learning rate")
    figure, axes = plt.subplots(len(used), 1, figsize=(8, 3.2 * len(used)), sharex=True,
                                squeeze=False)
    for axis, (title, curves) in zip(axes[:, 0], used):
        for label, series, style in curves:
            xs, ys = [p[column] for p in series], [p[2] for p in series]
            if style == "steps":  # a rate holds from the iteration it is logged at
                axis.step(xs, ys, where="post", label=label)
            else:
                axis.plot(xs, ys, style, label=label, markersize=3)
        axis.set_ylabel(title)
        if title == "learning rate" and all(p[2] > 0 for _, s, _ in curves for p in s):
            axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    axes[-1, 0].set_xlabel("iterations" if x == "iters" else "seconds")
    figure.suptitle(", ".join(Path(log.path).name for log in logs))
    figure.tight_layout()
    output = Path(output)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def cmd_plot(args) -> int:
    logs = [parse_log(path) for path in args.logs]
    if args.output:
        plot_logs(logs, args.output, args.x)
    if args.json:
        print(json.dumps({"logs": [log.to_json() for log in logs]}, indent=2))
    elif args.output:
        print(f"wrote {args.output}")
    else:
        raise CaffeLayersError("give -o FILE to draw, or --json to print the series")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plot`` command to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "plot", help="training curves from Caffe logs (Caffe's plot_training_log.py)",
        description="Parse Caffe (and caffelayers train) logs: train loss, test outputs and "
                    "learning rate, drawn against iterations or seconds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("logs", nargs="+", metavar="LOG", help="Caffe log file(s)")
    parser.add_argument("-o", "--output", metavar="curves.png", help="figure file (.png, .svg, .pdf)")
    parser.add_argument("--x", default="iters", choices=["iters", "seconds"],
                        help="the horizontal axis")
    parser.add_argument("--json", action="store_true", help="print the parsed series")
    parser.set_defaults(run=cmd_plot)
    return parser
