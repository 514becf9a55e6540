"""``caffelayers train --nproc N``: the processes of a data-parallel run.

Each process joins a ``torch.distributed`` group (gloo on CPU, NCCL on GPUs) and runs the
single-process trainer with its rank; the launcher waits, and the first failure stops the
others.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from typing import Dict

import torch

from .errors import CaffeLayersError

__all__ = ["INTERRUPTED", "check_device", "launch"]

#: exit status of a run stopped by Ctrl-C (after its snapshot), as a shell reports SIGINT.
INTERRUPTED = 130


def check_device(device: str, nproc: int) -> None:
    if nproc < 1:
        raise CaffeLayersError(f"--nproc must be at least 1, got {nproc}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CaffeLayersError("--device cuda: CUDA is not available here")
        if nproc > torch.cuda.device_count():
            raise CaffeLayersError(f"--nproc {nproc} needs {nproc} GPUs, "
                                   f"{torch.cuda.device_count()} are visible")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args) -> int:
    """Start ``--nproc`` processes and wait; the first to fail stops the others."""
    world = args.nproc
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    seed = int.from_bytes(os.urandom(4), "little")
    options = dict(vars(args))
    options.pop("run", None)
    processes = [context.Process(target=_process_main, args=(rank, world, port, seed, options),
                                 name=f"caffelayers-train-{rank}") for rank in range(world)]
    for process in processes:
        process.start()
    # The processes handle Ctrl-C themselves (they agree on an iteration and snapshot).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status = 0
        running = list(processes)
        while running:
            multiprocessing.connection.wait([p.sentinel for p in running])
            for process in [p for p in running if p.exitcode is not None]:
                running.remove(process)
                code = process.exitcode
                if code != 0 and status in (0, INTERRUPTED):
                    status = code if code > 0 else 1
                    if code != INTERRUPTED:
                        for other in running:
                            other.terminate()
        return status
    finally:
        signal.signal(signal.SIGINT, previous)
        for process in processes:
            process.join()


def _process_main(rank: int, world: int, port: int, seed: int, options: Dict) -> None:
    """One process of ``--nproc``: join the group, train, exit with the command's status."""
    import torch.distributed as dist

    from .train import run_process

    args = argparse.Namespace(**options)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    code = 1
    try:
        code = run_process(args, rank, world, seed)
    except CaffeLayersError as error:
        print(f"error: [process {rank}] {error}", file=sys.stderr)
        code = 2
    except OSError as error:
        print(f"error: [process {rank}] {error.filename or ''}: {error.strerror or error}",
              file=sys.stderr)
        code = 2
    finally:
        if code in (0, INTERRUPTED):
            dist.destroy_process_group()
    # Skip the interpreter's teardown (seconds of torch and gloo clean-up): the parent only
    # waits for the exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
