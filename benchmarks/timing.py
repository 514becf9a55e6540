"""What the micro-benchmarks share: device, threads and clock options, interleaved timing.

Run the scripts as ``python benchmarks/NAME.py``; Python then finds this module beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def add_options(parser: argparse.ArgumentParser, repeat: int) -> None:
    """``--device``, ``--repeat``, ``--threads`` and ``--clock``."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--repeat", type=int, default=repeat, help="timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared "
                             "machine; CPU device only; counts the work of all threads)")


def apply_options(parser: argparse.ArgumentParser, args):
    """Set the thread count; return ``(device, clock)`` for :func:`median_times`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU work only; use it with --device cpu")
    return device, (time.process_time if args.clock == "cpu" else time.perf_counter)


def median_times(steps, repeat: int, device: torch.device, clock=time.perf_counter):
    """Median seconds of each step over ``repeat`` rounds, after a warm-up round.

    The steps take turns within every round, so that a load change on the machine hits all
    of them alike instead of skewing one ratio.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in steps}
    for round_ in range(repeat + 1):
        for name, step in steps.items():
            sync()
            start = clock()
            step()
            sync()
            if round_:
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}
