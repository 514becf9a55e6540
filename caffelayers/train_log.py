"""The trainer's output: Caffe's glog-style log lines and a progress bar on a terminal.

The log lines are Caffe's (``I0703 10:20:30.123456  1234 solver.py:228] Iteration 100 ...``)
so that Caffe's ``parse_log.py`` and ``caffelayers plot`` read them; the bar sits below them
and is lifted out of the way of each line.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import shutil
import sys
import threading
from typing import Optional

__all__ = ["GlogFormatter", "ProgressBar", "caffe_log"]


class ProgressBar:
    """One status line redrawn in place on a terminal: iteration, smoothed loss, learning
    rate, lambda (of a MarginInnerProduct layer) and images per second.

    Args:
        total: the last iteration (``max_iter``).
        stream: the terminal (``sys.stderr``).
    """

    def __init__(self, total: int, stream=None):
        self.total = max(int(total), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.text = ""
        self._lock = threading.Lock()

    def update(self, iteration: int, loss: float, rate: float,
               lambda_: Optional[float] = None, images_per_second: Optional[float] = None
               ) -> None:
        done = min(iteration / self.total, 1.0)
        width = 20
        filled = int(round(done * width))
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] {iteration}/{self.total}",
                 f"loss {loss:.4g}", f"lr {rate:.3g}"]
        if lambda_ is not None:
            parts.append(f"lambda {lambda_:.4g}")
        if images_per_second is not None:
            parts.append(f"{images_per_second:.1f} img/s")
        self.text = " | ".join(parts)
        self.redraw()

    def clear(self) -> None:
        with self._lock:
            if self.text:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def redraw(self) -> None:
        with self._lock:
            if self.text:
                columns = shutil.get_terminal_size((100, 20)).columns
                self.stream.write("\r\x1b[K" + self.text[:columns - 1])
                self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.text:
                self.stream.write("\n")
                self.stream.flush()
                self.text = ""


class GlogFormatter(logging.Formatter):
    """Caffe's (glog's) line prefix: ``I0703 10:20:30.123456  1234 solver.py:228] ...``,
    which Caffe's log parsers read the time from."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created)
        prefix = (f"{record.levelname[:1]}{when:%m%d %H:%M:%S}.{when.microsecond:06d} "
                  f"{record.process:5d} {record.filename}:{record.lineno}]")
        return f"{prefix} {record.getMessage()}"


class _BarHandler(logging.StreamHandler):
    """A log handler that lifts the progress bar out of the way of each line."""

    def __init__(self, stream, bar: Optional[ProgressBar]):
        super().__init__(stream)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is not None:
            self.bar.clear()
        super().emit(record)
        if self.bar is not None:
            self.bar.redraw()


@contextlib.contextmanager
def caffe_log(stream, bar: Optional[ProgressBar]):
    """Caffe's log lines on ``stream`` while the block runs."""
    handler = _BarHandler(stream, bar)
    handler.setFormatter(GlogFormatter())
    package = logging.getLogger("caffelayers")
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


