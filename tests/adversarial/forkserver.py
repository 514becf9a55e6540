"""A fork server for the adversarial runs: the ``caffelayers`` command line and Python API
calls, each in its own process with a time limit and an address-space cap.

Starting ``caffelayers`` as a fresh interpreter costs seconds (torch, onnx and onnxruntime
load); the corpus makes hundreds of runs. This script is started once, as a real subprocess
(``python forkserver.py``), imports those modules, then forks one child per job. A child is
what ``caffelayers ARGS`` would be: its own process group, ``RLIMIT_AS`` set before anything
runs (the ``preexec_fn`` of a subprocess), its stdout and stderr in files, and the console
script's ``sys.exit(main())``, an uncaught exception printing its traceback and exiting 1
as the interpreter does. Past its time limit the whole group is killed.

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout.

* job: ``{"argv": [...]} | {"code": "..."}, "cwd", "env", "timeout", "memory", "stdout",
  "stderr"``. ``code`` is Python run as a user of the API would: a ``CaffeLayersError`` is
  reported as one ``error: ...`` line and status 2 (with its class on stdout), success is 0.
* answer: ``{"rc": int, "timed_out": bool, "seconds": float}``; ``rc`` is ``-signal`` when
  the child died from a signal.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import sys
import time
import traceback


def _preload() -> None:
    """What every job needs, imported once: the command line and what it imports lazily."""
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch

    import caffelayers.cli
    import caffelayers.convert
    import caffelayers.verify

    caffelayers.cli.build_parser()  # imports what the parser needs (the tools' commands)
    for extra in ("h5py", "cv2", "lmdb"):  # the data layers' readers, imported on first use
        try:
            importlib.import_module(extra)
        except ImportError:
            pass
    torch.set_num_threads(1)  # a forked child must not inherit a started thread pool


def _api(code: str) -> int:
    import warnings

    from caffelayers.errors import CaffeLayersError

    # Warnings as the command line shows them: one "warning: " line each.
    warnings.simplefilter("default")
    warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}",
                                                              file=sys.stderr)
    try:
        exec(compile(code, "<api>", "exec"), {"__name__": "__adversarial__"})  # noqa: S102
    except CaffeLayersError as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"raised {type(error).__module__}.{type(error).__qualname__}")
        return 2
    return 0


def _child(job: dict) -> None:
    code = 1
    try:
        os.setpgid(0, 0)
        memory = job.get("memory")
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        os.chdir(job["cwd"])
        os.environ.update(job.get("env") or {})
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(os.devnull)  # noqa: SIM115 (the child's stdin until it exits)
        try:
            if "argv" in job:
                from caffelayers.cli import main

                sys.argv = ["caffelayers", *job["argv"]]
                code = main(job["argv"])
            else:
                code = _api(job["code"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 (as the interpreter does with an uncaught one)
            traceback.print_exc()
            code = 1
        code = 0 if code is None else code
    finally:
        # No atexit handlers (they cost 40 ms a run): the server kills the child's process
        # group after it exits, which stops any worker it left.
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF if isinstance(code, int) else 1)


def _wait(pid: int, timeout: float):
    start = time.monotonic()
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        if time.monotonic() - start > timeout:
            _kill_group(pid)
            _, status = os.waitpid(pid, 0)
            return status, True
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def serve() -> None:
    _preload()
    answers = sys.stdout
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(job)
        status, timed_out = _wait(pid, job.get("timeout", 60))
        _kill_group(pid)  # whatever the child left behind (data-loader workers)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"rc": rc, "timed_out": timed_out,
                          "seconds": round(time.monotonic() - start, 3)}),
              file=answers, flush=True)


if __name__ == "__main__":
    serve()
