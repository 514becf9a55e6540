"""What the benchmarks share: device, thread counts and clock options, interleaved timing,
the resident set.

Run the scripts as ``python benchmarks/NAME.py``; Python then finds this module beside them.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch


def add_options(parser: argparse.ArgumentParser, repeat: int) -> None:
    """``--device``, ``--repeat``, ``--threads``, ``--clock`` and ``--quick``."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--repeat", type=int, default=None,
                        help=f"timed rounds (default {repeat}, 3 with --quick)")
    parser.add_argument("--threads", default="1,all",
                        help="comma-separated torch CPU thread counts to measure one after "
                             "the other; 'all' is every core this process may use "
                             "(default: 1,all)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared "
                             "machine; CPU device only; counts the work of all threads)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and only the smaller shapes: a smoke run")
    parser.set_defaults(default_repeat=repeat)


def all_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_counts(text: str) -> list[int]:
    """``"1,all"`` -> ``[1, cores]``, in order, without repeats; ValueError when a count is
    neither a positive integer nor ``all``."""
    counts: list[int] = []
    for item in text.split(","):
        item = item.strip().lower()
        count = all_cores() if item == "all" else int(item)
        if count < 1:
            raise ValueError(f"a thread count must be positive, got {count}")
        if count not in counts:
            counts.append(count)
    return counts


def apply_options(parser: argparse.ArgumentParser, args):
    """``(device, clock, thread counts)`` from the options; fills in ``args.repeat``."""
    if args.repeat is None:
        args.repeat = 3 if args.quick else args.default_repeat
    try:
        threads = thread_counts(args.threads)
    except ValueError as error:
        parser.error(f"--threads: {error}")
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU work only; use it with --device cpu")
    return device, (time.process_time if args.clock == "cpu" else time.perf_counter), threads


def median_times(steps, repeat: int, device: torch.device, clock=time.perf_counter,
                 min_sample: float = 0.0):
    """Median seconds of each step over ``repeat`` rounds, after a warm-up round.

    The steps take turns within every round, so that a load change on the machine hits all
    of them alike instead of skewing one ratio. A step faster than ``min_sample`` seconds
    (in the warm-up) runs often enough per round to last about that long, and its sample is
    the mean of those calls: one call of a few milliseconds is at the mercy of a single
    page fault or preemption.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(step, calls: int) -> float:
        sync()
        start = clock()
        for _ in range(calls):
            step()
        sync()
        return (clock() - start) / calls

    calls = {}
    for name, step in steps.items():
        warm = timed(step, 1)
        calls[name] = max(1, math.ceil(min_sample / warm)) if warm > 0 else 1
    times = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            times[name].append(timed(step, calls[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def resident_bytes() -> int:
    """The current resident set of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
