"""The processes of a data-parallel ``caffelayers train``: ``--nproc N``, or one rank of
``torchrun``.

``--nproc N`` starts N ranks on this machine with ``torch.multiprocessing.start_processes``
(spawn). That is the library's launcher for a known number of local processes: it joins
them, stops the others when one fails (SIGTERM, then SIGKILL after a grace period), brings a
rank's traceback back, and sets each rank's parent-death signal. ``torch.distributed.run``'s
elastic agent (what ``torchrun`` runs) adds a rendezvous server, restarts and membership
changes, which a fixed-size run on one machine does not need; a run across machines uses
``torchrun`` itself. Each rank joins a ``torch.distributed`` group (gloo on CPU, NCCL on
GPUs) and runs the single-process trainer with its rank; the ranks return normally, so that
their loaders' semaphores are released (a rank that skipped its interpreter's exit left
them to the resource tracker, which reported them as leaked).

Signals. The launcher is the one that handles SIGINT, SIGTERM and SIGHUP: it applies
``--sigint-effect``, ``--sigterm-effect`` and ``--sighup-effect`` by sending each rank
SIGUSR1 (stop) or SIGUSR2 (snapshot); the ranks, and their loader workers, ignore the first
three, which a terminal sends to the whole process group and a scheduler (SLURM) to every
process of a job, so that a signal counts once. The ranks agree on the iteration at which to
act. A second stop signal (a second or more after the first: a signal can arrive twice at
once) makes the ranks abort at once, a third kills them. A rank whose
launcher dies gets SIGUSR1 (its parent-death signal) and stops with a snapshot.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set), ``caffelayers train`` is one rank: it joins the group through
``env://`` on ``cuda:LOCAL_RANK`` (or the CPU) and launches nothing; its signals are its
own (torchrun's agent passes SIGTERM and SIGINT on to every rank).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .errors import CaffeLayersError

__all__ = ["EFFECTS", "INTERRUPTED", "check_device", "launch", "signal_effects",
           "torchrun_environment", "torchrun_rank"]

#: exit status of a run stopped by a signal (after its snapshot), as a shell reports SIGINT.
INTERRUPTED = 130

#: what a signal may ask of a run (Caffe's ``-sigint_effect``/``-sighup_effect`` values).
EFFECTS = ("stop", "snapshot", "none")

#: seconds within which a second stop signal is the first arriving again (a terminal signals
#: the whole process group, a scheduler every process), not a request to abort.
SAME_REQUEST_S = 1.0

#: the signals a launched rank acts on; the launcher translates the user's into these.
_RANK_EFFECTS = {signal.SIGUSR1: "stop", signal.SIGUSR2: "snapshot", signal.SIGINT: "none",
                 signal.SIGTERM: "none", signal.SIGHUP: "none"}

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def signal_effects(args) -> Dict[int, str]:
    """``{signal: effect}`` for a training process: the user's ``--sig*-effect`` options
    (SIGTERM as SIGINT unless ``--sigterm-effect`` says otherwise), or, in a rank of
    ``--nproc``, the launcher's SIGUSR1/SIGUSR2."""
    if getattr(args, "launched_rank", False):
        return dict(_RANK_EFFECTS)
    sigint = getattr(args, "sigint_effect", "stop")
    return {signal.SIGINT: sigint,
            signal.SIGTERM: getattr(args, "sigterm_effect", None) or sigint,
            signal.SIGHUP: getattr(args, "sighup_effect", "snapshot")}


def torchrun_environment() -> Optional[Tuple[int, int, int]]:
    """``(rank, world size, local rank)`` when ``torchrun`` (or a scheduler setting its
    variables) started this process, else ``None``."""
    if not all(name in os.environ for name in _TORCHRUN_VARIABLES):
        return None
    try:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ["LOCAL_RANK"]))
    except ValueError:
        raise CaffeLayersError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                               f"{os.environ['RANK']!r}, {os.environ['WORLD_SIZE']!r}, "
                               f"{os.environ['LOCAL_RANK']!r}") from None


def check_device(device: str, nproc: int, local_rank: Optional[int] = None) -> None:
    if nproc < 1:
        raise CaffeLayersError(f"--nproc must be at least 1, got {nproc}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CaffeLayersError("--device cuda: CUDA is not available here")
        if nproc > torch.cuda.device_count():
            raise CaffeLayersError(f"--nproc {nproc} needs {nproc} GPUs, "
                                   f"{torch.cuda.device_count()} are visible")
        if local_rank is not None and local_rank >= torch.cuda.device_count():
            raise CaffeLayersError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, "
                                   f"{torch.cuda.device_count()} are visible")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- --nproc --------------------------------------------------------------------------------

def launch(args) -> int:
    """Start ``--nproc`` ranks and wait; the first to fail stops the others. Returns the
    command's exit status (0, :data:`INTERRUPTED`, or a failed rank's)."""
    import torch.multiprocessing as mp

    world = args.nproc
    effects = signal_effects(args)
    options = dict(vars(args), launched_rank=True)
    options.pop("run", None)
    ranks: List = []
    stops, last_stop = 0, 0.0

    def forward(signum, frame) -> None:
        nonlocal stops, last_stop
        effect = effects.get(signum, "none")
        if effect == "snapshot":
            _signal_ranks(ranks, signal.SIGUSR2)
        elif effect == "stop" and time.monotonic() - last_stop >= SAME_REQUEST_S:
            stops, last_stop = stops + 1, time.monotonic()
            _signal_ranks(ranks, signal.SIGUSR1 if stops <= 2 else signal.SIGKILL)

    # Installed before the ranks start: a signal during their start is theirs to act on.
    previous = {signum: signal.signal(signum, forward) for signum in effects}
    try:
        with tempfile.TemporaryDirectory(prefix="caffelayers-train-") as status_dir:
            context = mp.start_processes(
                _process_main, args=(world, _free_port(), os.getpid(), options, status_dir),
                nprocs=world, join=False, start_method="spawn")
            ranks.extend(context.processes)
            if stops:
                _signal_ranks(ranks, signal.SIGUSR1)
            try:
                status, failure = _join(context)
            finally:
                for error_file in context.error_files:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(error_file)
            codes = [int(path.read_text()) for path in Path(status_dir).glob("rank*")]
            if len(codes) == world and not failure:
                # Every rank finished and said how: a crash in an interpreter's teardown
                # after that (gloo's threads can abort one: "terminate called without an
                # active exception") does not undo the run.
                status = next((code for code in codes if code not in (0, INTERRUPTED)),
                              INTERRUPTED if INTERRUPTED in codes else 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stops and status != 0 and (stops > 1 or status == INTERRUPTED):
        # An abort: a rank that was in a collective sees the others leave, as a failure.
        print("aborted: a second stop signal" if stops > 1 else "stopped while starting",
              file=sys.stderr)
        return INTERRUPTED
    if failure:
        print(f"error: {failure}", file=sys.stderr)
    # (a rank stopped before it trained leaves no status)
    if status == 0 and (INTERRUPTED in codes or (stops and len(codes) < world)):
        return INTERRUPTED
    return status


def _signal_ranks(ranks, signum: int) -> None:
    for process in ranks:
        if process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)


def _join(context) -> Tuple[int, str]:
    """Wait for every rank: ``(status, the traceback of a rank that raised)``. A rank's
    failure stops the others (``start_processes`` sends SIGTERM, which ranks ignore, then
    SIGKILL after the grace period)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    try:
        while not context.join(grace_period=10):
            pass
    except ProcessExitedException as failure:
        if failure.exit_code == -signal.SIGUSR1:  # stopped before its handlers were set
            return INTERRUPTED, ""
        return (failure.exit_code if failure.exit_code > 0 else 1), ""
    except ProcessRaisedException as failure:
        return 1, str(failure)
    return 0, ""


def _die_with_parent(signum: int) -> None:
    """Linux's parent-death signal: ``signum`` when the launcher is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signum), 0, 0, 0)  # PR_SET_PDEATHSIG


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _process_main(rank: int, world: int, port: int, launcher: int, options: Dict,
                  status_dir: str) -> None:
    """One rank of ``--nproc``: join the group, train, leave its status in ``status_dir``
    (a failure exits with it, which stops the other ranks)."""
    import torch.distributed as dist

    # Replaces start_processes' SIGINT, which a rank ignores: the launcher's death stops
    # the run with a snapshot.
    _die_with_parent(signal.SIGUSR1)
    # Until the trainer installs its handlers (and after it restores these): a stop ends
    # the start-up, the rest waits for the launcher's word.
    for signum, effect in _RANK_EFFECTS.items():
        signal.signal(signum, _interrupt if effect == "stop" else signal.SIG_IGN)
    if os.getppid() != launcher:
        sys.exit(1)
    args = argparse.Namespace(**options)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    code = _run_rank(args, rank, world)
    Path(status_dir, f"rank{rank}").write_text(str(code))
    if code not in (0, INTERRUPTED):
        sys.exit(code)


def _run_rank(args, rank: int, world: int) -> int:
    """Train as ``rank`` of an initialized group; errors are printed with the rank."""
    import torch.distributed as dist

    from .train import run_process

    code, clean = 1, False
    try:
        code = run_process(args, rank, world, getattr(args, "seed", None))
        clean = True
    except KeyboardInterrupt:  # a second stop signal
        code = INTERRUPTED
    except CaffeLayersError as error:
        print(f"error: [process {rank}] {error}", file=sys.stderr)
        code = 2
    except OSError as error:
        print(f"error: [process {rank}] {error.filename or ''}: {error.strerror or error}",
              file=sys.stderr)
        code = 2
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        # After a failure or an abort the others may be gone: leaving the group would wait.
        if clean:
            # the solver's DDP holds the group through reference cycles: free it now, not in
            # the interpreter's teardown, where gloo's threads can abort the process
            gc.collect()
            dist.destroy_process_group()
    return code


# --- torchrun -------------------------------------------------------------------------------

def torchrun_rank(args) -> Optional[int]:
    """Train as one rank of a ``torchrun`` group (``init_method="env://"``) and return the
    exit status; ``None`` when no ``torchrun`` started this process."""
    import torch.distributed as dist

    group = torchrun_environment()
    if group is None:
        return None
    rank, world, local_rank = group
    if args.nproc != 1:
        raise CaffeLayersError("under torchrun every process is one rank: leave out --nproc "
                               "(torchrun's --nproc-per-node and --nnodes decide)")
    check_device(args.device, 1, local_rank)
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method="env://",
                            rank=rank, world_size=world)
    return _run_rank(args, rank, world)
