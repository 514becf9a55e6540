"""Running the adversarial jobs and judging them by the README's promise.

A run passes when it ends in one of two ways:

* a clean error: exit status 2, exactly one stderr line starting ``error: ``, naming what
  the case says it must (the file, and ``FILE:LINE`` for prototxt errors), not from the
  build's safety net for unforeseen exceptions, and no ``Traceback`` anywhere;
* a correct result: exit status 0 and no ``Traceback``; correctness itself is checked by the
  run (``convert --reference``, ``verify``, the API snippets' own comparisons).

Anything else (a traceback, another status, a timeout, a kill by the memory cap, a missing
name) is a failure, described by :meth:`Run.problem`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
#: ``ADVERSARIAL_FULL=1`` (``make fuzz``): every entry point on every case.
FULL = os.environ.get("ADVERSARIAL_FULL") == "1"
#: (case, entry, problem or None, seconds) of every corpus run, for the session summary.
RESULTS: list = []
#: The wording of caffelayers.graph's safety net for exceptions that no check of a layer
#: foresaw (an IndexError in a shape formula): a clean line, but hiding a missing check.
UNFORESEEN = "cannot be built on bottoms of shape"
#: A run may take this long (seconds) ...
TIMEOUT = 60
#: ... and map this much address space (RLIMIT_AS).
MEMORY = 4 * 2**30


@dataclass
class Expect:
    """What a run must end in.

    Args:
        outcome: ``"error"`` (a clean error), ``"ok"`` (exit 0) or ``"either"``.
        names: substrings the error line must contain (paths, ``path:line``, layer names).
        warns: substrings that some ``warning: `` line must contain (on an ``ok`` run).
        absent: substrings that no stderr line may contain (wrong advice).
    """

    outcome: str = "error"
    names: Sequence[str] = ()
    warns: Sequence[str] = ()
    absent: Sequence[str] = ()


@dataclass
class Run:
    """One finished run."""

    rc: int
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0
    expect: Expect = field(default_factory=Expect)

    @property
    def error_lines(self) -> List[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]

    def problem(self) -> Optional[str]:
        """Why the run breaks the promise, or None."""
        expect = self.expect
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s (a hang)"
        if "Traceback" in self.stderr or "Traceback" in self.stdout:
            return "a traceback"
        if self.rc < 0:
            return f"killed by signal {-self.rc} (the memory cap?)"
        for text in expect.absent:
            if text in self.stderr:
                return f"stderr says {text!r}"
        if self.rc == 2:
            lines = self.error_lines
            if len(lines) != 1:
                return f"{len(lines)} 'error: ' lines, expected exactly one"
            if expect.outcome == "ok":
                return "a clean error where a result was expected"
            missing = [name for name in expect.names if name not in lines[0]]
            if missing:
                return f"the error line does not name {', '.join(map(repr, missing))}"
            if UNFORESEEN in lines[0]:
                return "an exception no check foresaw, behind the error line"
            return None
        if self.rc == 0:
            if expect.outcome == "error":
                return "exit 0 where an error was expected (silently accepted)"
            if self.error_lines:
                return "exit 0 with an 'error: ' line"
            warnings = [line for line in self.stderr.splitlines() if line.startswith("warning: ")]
            for text in expect.warns:
                if not any(text in line for line in warnings):
                    return f"no warning line names {text!r}"
            return None
        return f"exit status {self.rc}"

    def describe(self) -> str:
        tail = "\n".join((self.stderr.strip().splitlines() or [""])[-15:])
        return f"{self.problem()} (rc {self.rc}, {self.seconds:.1f} s)\n--- stderr tail:\n{tail}"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


class Runner:
    """Runs jobs through the fork server (or, with ``spawn``, as fresh ``caffelayers``
    processes: slower, the console script itself)."""

    def __init__(self, spawn: bool = False):
        self.spawn = spawn
        self.scratch = Path(tempfile.mkdtemp(prefix="adversarial-runs-"))
        self.count = 0
        self.server: Optional[subprocess.Popen] = None
        if not spawn:
            self.server = subprocess.Popen(
                [sys.executable, str(HERE / "forkserver.py")], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, cwd=str(self.scratch),
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
            ready = self.server.stdout.readline()
            if not ready.strip():
                raise RuntimeError("the fork server did not start")

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def cli(self, argv: Sequence[str], expect: Expect, cwd: Path, env=None,
            timeout: float = TIMEOUT) -> Run:
        return self._run({"argv": [str(a) for a in argv]}, expect, cwd, env, timeout)

    def api(self, code: str, expect: Expect, cwd: Path, env=None,
            timeout: float = TIMEOUT) -> Run:
        return self._run({"code": code}, expect, cwd, env, timeout)

    def _run(self, job: dict, expect: Expect, cwd: Path, env, timeout: float) -> Run:
        self.count += 1
        out = self.scratch / f"{self.count}.out"
        err = self.scratch / f"{self.count}.err"
        env = {"PYTHONHASHSEED": "0", **(env or {})}
        if self.spawn:
            return self._spawn(job, expect, cwd, env, timeout)
        job.update(cwd=str(cwd), env=env, timeout=timeout, memory=MEMORY, stdout=str(out),
                   stderr=str(err))
        self.server.stdin.write(json.dumps(job) + "\n")
        self.server.stdin.flush()
        answer = json.loads(self.server.stdout.readline())
        return Run(answer["rc"], out.read_text(errors="replace"),
                   err.read_text(errors="replace"), answer["timed_out"], answer["seconds"],
                   expect)

    def _spawn(self, job: dict, expect: Expect, cwd: Path, env, timeout: float) -> Run:
        if "argv" in job:
            command = [str(Path(sys.executable).parent / "caffelayers"), *job["argv"]]
        else:
            command = [sys.executable, "-c", ("import sys; sys.path.insert(0, sys.argv[1]); "
                       "import forkserver; sys.exit(forkserver._api(sys.argv[2]))"),
                       str(HERE), job["code"]]
        try:
            done = subprocess.run(command, cwd=cwd, env={**os.environ, **env},
                                  capture_output=True, text=True, errors="replace",
                                  timeout=timeout, preexec_fn=_limit_memory,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as stop:
            return Run(-9, str(stop.stdout or ""), str(stop.stderr or ""), True, timeout, expect)
        return Run(done.returncode, done.stdout, done.stderr, False, 0.0, expect)
