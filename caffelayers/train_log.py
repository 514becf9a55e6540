"""The trainer's output: Caffe's glog-style log lines, and its progress.

The log lines are Caffe's (``I0703 10:20:30.123456  1234 solver.py:228] Iteration 100 ...``)
so that Caffe's ``parse_log.py`` and ``caffelayers plot`` read them. Progress is a tqdm bar
below them on a terminal (lifted out of the way of each line), and plain periodic
``Progress: ...`` lines otherwise (piped through ``tee``, redirected to a file), worded so
that the log parsers skip them (no ``Iteration N``, no ``lr =`` or ``loss =``).

Options (:func:`add_log_options`): ``--log FILE`` writes every log line to FILE as well as
stderr (the ``Progress:`` lines stay on stderr, so FILE is Caffe's log); ``--quiet`` leaves
only warnings and errors on stderr and no progress; ``--log-level`` (default: glog's
``GLOG_minloglevel`` variable, 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL, else INFO) drops the
lines below it everywhere, as glog does; ``--progress-interval`` spaces the ``Progress:``
lines (30 s); ``--skip-data-check`` skips :mod:`caffelayers.data.precheck`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import logging
import math
import os
import sys
import threading
import time
from typing import Iterator, Optional

__all__ = ["GlogFormatter", "ProgressBar", "add_log_options", "caffe_log", "is_terminal",
           "log_level", "quiet_opencv", "tool_bar", "train_output"]

#: glog's severities (``GLOG_minloglevel`` numbers them from 0) as Python logging levels.
LEVELS = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
          "FATAL": logging.CRITICAL}


def _interval(seconds: Optional[float]) -> str:
    from tqdm import tqdm

    return "?" if seconds is None or not math.isfinite(seconds) else \
        tqdm.format_interval(max(seconds, 0.0))


class ProgressBar:
    """The trainer's progress: iteration ``n/max_iter``, elapsed time, ETA, smoothed loss,
    learning rate, lambda (of a MarginInnerProduct layer), images per second of training,
    and the test under way.

    Nothing shows before the first call, and no loss or rate before an iteration of this run
    has finished. Images per second count training time only: the time between two updates
    less the time spent testing in between.

    Args:
        total: the last iteration (``max_iter``); settable until the first update.
        stream: where the progress goes (``sys.stderr``).
        terminal: a redrawn tqdm bar (True) or a ``Progress:`` line every ``interval``
            seconds (False); default: whether ``stream`` is a terminal.
        interval: seconds between two progress lines (0: at every update).
    """

    def __init__(self, total: int, stream=None, *, terminal: Optional[bool] = None,
                 interval: float = 30.0):
        self.total = max(int(total), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = is_terminal(self.stream) if terminal is None else bool(terminal)
        self.interval = float(interval)
        self.iteration: Optional[int] = None
        self.status = ""  # "loss 2.3, lr 0.01, ..." once an iteration has finished
        self.testing_text = ""
        self._bar = None
        self._lock = threading.RLock()
        self._first: Optional[int] = None
        self._started = 0.0
        self._last_line = -math.inf
        self._last_state: Optional[tuple] = None  # (iteration, status) of the last line
        self._clock: Optional[tuple] = None  # (time, images, test seconds) at the last update
        self._test_seconds = 0.0
        self._test_started: Optional[float] = None
        self._images_per_second: Optional[float] = None

    # -- what the trainer reports ----------------------------------------------------------
    def update(self, iteration: int, loss: Optional[float] = None,
               rate: Optional[float] = None, lambda_: Optional[float] = None,
               images: Optional[int] = None) -> None:
        """The state before iteration ``iteration``: the smoothed loss and the rate of the
        last update, and ``images`` read for training so far (for images per second)."""
        with self._lock:
            now = time.perf_counter()
            self._start(iteration, now)
            self.iteration = int(iteration)
            if images is not None:
                self._measure(now, images)
            if iteration > self._first:
                parts = [f"loss {loss:.4g}" if loss is not None else None,
                         f"lr {rate:.3g}" if rate is not None else None,
                         f"lambda {lambda_:.4g}" if lambda_ is not None else None,
                         f"{self._images_per_second:.1f} img/s"
                         if self._images_per_second is not None else None]
                self.status = ", ".join(part for part in parts if part)
            if self._bar is not None:
                self._bar.set_postfix_str(self.status, refresh=False)
                self._bar.update(self.iteration - self._bar.n)
            self._line(now)

    def testing(self, net_id: int, done: int, total: int, iteration: int) -> None:
        """Test net ``net_id`` has run ``done`` of its ``total`` passes (0: starting) at
        iteration ``iteration``."""
        with self._lock:
            now = time.perf_counter()
            self._start(iteration, now)
            self.iteration = int(iteration)
            if done == 0:
                self._test_started = now
            finished = done >= total
            if finished and self._test_started is not None:
                self._test_seconds += now - self._test_started
                self._test_started = None
            self.testing_text = "" if finished else f"Testing net #{net_id}: {done}/{total}"
            if self._bar is not None:
                self._bar.set_description_str(self.testing_text and self.testing_text + " | ",
                                              refresh=False)
                self._bar.update(self.iteration - self._bar.n)
                if finished or done == 0 or now - self._bar.last_print_t >= \
                        self._bar.mininterval:
                    self._bar.refresh()
            elif not finished:
                self._line(now)

    @contextlib.contextmanager
    def lifted(self) -> Iterator[None]:
        """Clear the bar while the block writes a line, then redraw it below."""
        with self._lock:
            if self._bar is None:
                yield
                return
            self._bar.clear()
            try:
                yield
            finally:
                self._bar.refresh()

    def close(self) -> None:
        """Leave the bar's last state on its own line (or write a last progress line)."""
        with self._lock:
            if self._bar is not None:
                self._bar.set_description_str("", refresh=False)
                self._bar.close()
                self._bar = None
            elif self._first is not None:
                self._line(time.perf_counter(), final=True)
            self._first = None

    # -- helpers ---------------------------------------------------------------------------
    def _start(self, iteration: int, now: float) -> None:
        if self._first is not None:
            return
        self._first, self._started = int(iteration), now
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=int(iteration), file=self.stream,
                             dynamic_ncols=True, mininterval=0.2, unit="it", leave=True,
                             bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                        "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")

    def _measure(self, now: float, images: int) -> None:
        """Images per second over training time, smoothed (new measures weigh 0.2)."""
        if self._clock is not None:
            then, before, tested = self._clock
            training = (now - then) - (self._test_seconds - tested)
            if training > 0 and images > before:
                measured = (images - before) / training
                self._images_per_second = measured if self._images_per_second is None else \
                    0.8 * self._images_per_second + 0.2 * measured
        self._clock = (now, images, self._test_seconds)

    def _line(self, now: float, final: bool = False) -> None:
        """A plain ``Progress:`` line when not on a terminal, every ``interval`` seconds."""
        if self.terminal or (not final and now - self._last_line < self.interval):
            return
        iteration = self.iteration if self.iteration is not None else self._first
        elapsed = now - self._started
        done = iteration - self._first
        eta = (self.total - iteration) * elapsed / done if done > 0 else None
        text = (f"Progress: {iteration}/{self.total} iterations "
                f"({100 * iteration / self.total:.0f}%), elapsed {_interval(elapsed)}, "
                f"ETA {_interval(0.0 if iteration >= self.total else eta)}")
        if self.testing_text and not final:
            text += f"; {self.testing_text}"
        elif self.status:
            text += f"; {self.status}"
        state = (iteration, self.status)
        if final and state == self._last_state:
            return  # the last line said it all
        self._last_line, self._last_state = now, state
        record = logging.LogRecord("caffelayers.train", logging.INFO, __file__,
                                   inspect.currentframe().f_lineno, text, None, None)
        self.stream.write(GlogFormatter().format(record) + "\n")
        self.stream.flush()


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (a bar may be redrawn on it)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class GlogFormatter(logging.Formatter):
    """Caffe's (glog's) line prefix: ``I0703 10:20:30.123456  1234 solver.py:228] ...``,
    which Caffe's log parsers read the time from."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created)
        prefix = (f"{record.levelname[:1]}{when:%m%d %H:%M:%S}.{when.microsecond:06d} "
                  f"{record.process:5d} {record.filename}:{record.lineno}]")
        text = f"{prefix} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _BarHandler(logging.StreamHandler):
    """A log handler that lifts the progress bar (a :class:`ProgressBar` or a tqdm bar) out
    of the way of each line."""

    def __init__(self, stream, bar=None):
        super().__init__(stream)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(self.bar, ProgressBar):
            with self.bar.lifted():
                super().emit(record)
        elif self.bar is not None:  # a tqdm bar
            with self.bar.external_write_mode(file=self.stream):
                super().emit(record)
        else:
            super().emit(record)


@contextlib.contextmanager
def caffe_log(stream, bar=None, level: int = logging.INFO, log_file: Optional[str] = None,
              stream_level: Optional[int] = None):
    """Caffe's log lines on ``stream`` (and in ``log_file``) while the block runs.

    Args:
        stream: the console (``sys.stderr``).
        bar: a :class:`ProgressBar` or a tqdm bar to lift out of the way of each line.
        level: the lowest level logged anywhere.
        log_file: a file that gets every line as well (overwritten).
        stream_level: the lowest level on ``stream`` (default ``level``).
    """
    from .errors import CaffeLayersError

    handlers = [_BarHandler(stream, bar)]
    handlers[0].setLevel(max(level, stream_level or level))
    if log_file:
        try:
            handlers.append(logging.FileHandler(log_file, "w", encoding="utf-8"))
        except OSError as error:
            raise CaffeLayersError(f"--log {log_file}: cannot write the log file: "
                                   f"{error.strerror or error}") from None
        handlers[1].setLevel(level)
    package = logging.getLogger("caffelayers")
    saved = package.level
    for handler in handlers:
        handler.setFormatter(GlogFormatter())
        package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        for handler in handlers:
            package.removeHandler(handler)
            handler.close()
        package.setLevel(saved)


def log_level(name: Optional[str] = None) -> int:
    """The lowest level logged: ``name`` (INFO, WARNING, ERROR, FATAL), else glog's
    ``GLOG_minloglevel`` variable (0 to 3), else INFO."""
    from .errors import CaffeLayersError

    if name:
        return LEVELS[name.upper()]
    value = os.environ.get("GLOG_minloglevel", "").strip()
    if not value:
        return logging.INFO
    try:
        number = int(value)
    except ValueError:
        raise CaffeLayersError(f"GLOG_minloglevel={value!r}: expected 0 (INFO), 1 (WARNING), "
                               "2 (ERROR) or 3 (FATAL)") from None
    return list(LEVELS.values())[min(max(number, 0), 3)]


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """``--log``, ``--quiet``, ``--log-level``, ``--progress-interval`` and
    ``--skip-data-check`` on a command's parser."""
    group = parser.add_argument_group("log and progress")
    group.add_argument("--log", metavar="FILE",
                       help="also write every log line to FILE (overwritten; without the "
                            "Progress lines); stderr keeps them too")
    group.add_argument("--quiet", action="store_true",
                       help="only warnings and errors on stderr, and no progress (--log "
                            "still gets every line)")
    group.add_argument("--log-level", type=str.upper, choices=list(LEVELS),
                       help="drop lines below this level everywhere (default: "
                            "GLOG_minloglevel 0-3 when set, else INFO)")
    group.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                       help="when stderr is not a terminal: seconds between two "
                            "'Progress:' lines (default: 30)")
    group.add_argument("--skip-data-check", action="store_true",
                       help="do not check the data layers' files and labels before the "
                            "first iteration")


@contextlib.contextmanager
def train_output(args, total: int = 1, rank: int = 0,
                 stream=None) -> Iterator[Optional[ProgressBar]]:
    """The trainer's log and progress from :func:`add_log_options`'s ``args`` while the
    block runs; yields the :class:`ProgressBar` (None with ``--quiet``, a level above INFO,
    or on a process other than rank 0, which prints nothing, as Caffe's other solvers)."""
    quiet_opencv()
    if rank != 0:
        yield None
        return
    stream = stream if stream is not None else sys.stderr
    level = log_level(args.log_level)
    bar = None
    if not args.quiet and level <= logging.INFO:
        bar = ProgressBar(total, stream, interval=args.progress_interval)
    with caffe_log(stream, bar, level, args.log,
                   stream_level=logging.WARNING if args.quiet else None):
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()


def quiet_opencv() -> None:
    """Keep OpenCV's own warnings (``imread_(...): can't open/read file``) off stderr, in
    this process and in the loader processes it starts (which read ``OPENCV_LOG_LEVEL``);
    the data check and the readers report bad images themselves. A level the user set
    wins."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and os.environ["OPENCV_LOG_LEVEL"].upper() == "ERROR":
        try:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        except AttributeError:  # builds without the logging module
            pass


@contextlib.contextmanager
def tool_bar(total: int, unit: str = "img", stream=None):
    """A tqdm bar over a tool's loop while the block runs, when ``stream`` (``sys.stderr``)
    is a terminal; yields it, or None elsewhere (the tool's periodic ``Processed N files.``
    lines then say how far it is). The log lines of an enclosing :func:`caffe_log` are
    written above the bar."""
    stream = stream if stream is not None else sys.stderr
    if not is_terminal(stream):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, file=stream, dynamic_ncols=True, leave=False)
    handlers = [handler for handler in logging.getLogger("caffelayers").handlers
                if isinstance(handler, _BarHandler) and handler.bar is None]
    for handler in handlers:
        handler.bar = bar
    try:
        yield bar
    finally:
        for handler in handlers:
            handler.bar = None
        bar.close()
