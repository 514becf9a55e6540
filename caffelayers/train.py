"""``caffelayers train``: Caffe's ``caffe train``, reading the data layers' own sources.

    caffelayers train SOLVER.prototxt [--weights W.caffemodel] [--snapshot S.solverstate]
        [--device cpu|cuda] [--margin-backward caffe|exact] [--nproc N] [--workers N]

The solver is :class:`~caffelayers.Solver`; the data layers are read by
:mod:`caffelayers.data` in worker processes. The log is Caffe's (glog-style lines such as
``Iteration 100 (...), loss = 2.3`` and ``Test net output #0: accuracy = 0.9``, which Caffe's
``parse_log.py`` reads) on stderr; on a terminal a progress bar sits below it. Ctrl-C stops
at the end of the iteration under way and writes a snapshot (a second Ctrl-C stops at once);
a non-finite loss stops with an error naming the first layer whose output became
non-finite. ``--nproc N`` trains with N processes through ``torch.distributed``
(``DistributedDataParallel``; gloo on CPU, NCCL on GPUs), each reading ``batch_size`` items
and the gradients averaged, as Caffe's multi-GPU training does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import CaffeLayersError
from .launch import INTERRUPTED, check_device, launch
from .solver import Solver
from .train_log import ProgressBar, caffe_log

__all__ = ["INTERRUPTED", "NonFiniteLossError", "TrainResult", "add_train_parser", "cmd_train",
           "describe_divergence", "run_process", "train"]

logger = logging.getLogger(__name__)



class NonFiniteLossError(CaffeLayersError):
    """The loss became NaN or infinite; the message names the first non-finite layer."""

    def __init__(self, message: str, iteration: int, layer: Optional[str]):
        super().__init__(message)
        self.iteration = iteration
        self.layer = layer


class _Stop(Exception):
    """Raised from a solver callback to leave ``solve`` at an iteration boundary."""


@dataclass
class TrainResult:
    """What :func:`train` leaves: the solver, whether Ctrl-C stopped it, and the
    ``(caffemodel, solverstate)`` written when it did."""

    solver: Solver
    interrupted: bool = False
    snapshot: Optional[Tuple[str, str]] = None


# --- diagnosis ------------------------------------------------------------------------------

class _Found(Exception):
    pass


def _non_finite(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and \
        not bool(torch.isfinite(value).all())


def describe_divergence(net, batch: Mapping) -> Tuple[str, Optional[str]]:
    """Find where a net's values first became non-finite: ``(sentence, layer name)``.

    Looks at the batch, then the parameters, then runs the forward pass again on ``batch``
    and stops at the first layer with a non-finite top. The net's buffers (MarginInnerProduct's
    iteration) are restored afterwards.
    """
    nodes = net.graph.nodes
    for node in nodes:
        if node.is_input:
            for top in node.tops:
                if top in batch and _non_finite(torch.as_tensor(batch[top])):
                    return (f"the data layer {node.name!r} ({node.type}) produced non-finite "
                            f"values in {top!r}", node.name)
    bad_params = [node.name for node in nodes
                  if any(_non_finite(blob) for blob in node.module.caffe_blobs())]
    saved = {name: buffer.detach().clone() for name, buffer in net.named_buffers()}
    found: List = []

    def watch(node):
        def hook(module, inputs, output):
            tops = output if isinstance(output, tuple) else (output,)
            if any(_non_finite(top) for top in tops):
                found.append(node)
                raise _Found
        return hook

    handles = [node.module.register_forward_hook(watch(node)) for node in nodes
               if not node.is_input]
    try:
        with torch.no_grad():
            net(**batch)
    except _Found:
        pass
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, buffer in net.named_buffers():
                buffer.copy_(saved[name])
    suffix = (f"; layers with non-finite parameters: {', '.join(map(repr, bad_params))}"
              if bad_params else "")
    if not found:
        return ("the forward pass on the same batch is finite again (a random layer, or "
                f"an earlier pass of iter_size){suffix}", None)
    node = found[0]
    inputs = "its bottoms are finite" if node.bottoms else "it has no bottoms"
    return (f"layer {node.name!r} ({node.type}) is the first whose output is non-finite "
            f"(tops {', '.join(node.tops)}; {inputs}){suffix}", node.name)


# --- progress -------------------------------------------------------------------------------

class _Monitor:
    """The trainer's solver callbacks: progress, Ctrl-C and the non-finite loss check
    (agreed across processes, so that all of them stop at the same iteration)."""

    def __init__(self, solver: Solver, inputs, bar: Optional[ProgressBar], world: int,
                 device: torch.device):
        self.solver, self.inputs, self.bar = solver, inputs, bar
        self.world, self.device = world, device
        self.stop_requested = False
        self.images = 0
        self._clock: Optional[Tuple[float, int]] = None
        self._rate: Optional[float] = None
        self._margin = next((node.module for node in solver.net.graph.nodes
                             if node.type == "MarginInnerProduct"), None)

    def request_stop(self, signum=None, frame=None) -> None:
        self.stop_requested = True
        # A second Ctrl-C interrupts at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logger.info("Stopping after this iteration and snapshotting (Ctrl-C again to abort)")

    def gradients_ready(self, solver: Solver) -> None:
        diverged = not math.isfinite(solver.smoothed_loss)
        stop = self.stop_requested
        if self.world > 1:
            import torch.distributed as dist

            flags = torch.tensor([float(diverged), float(stop)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop = bool(flags[1])
            if bool(flags[0]) and not diverged:
                raise NonFiniteLossError(f"iteration {solver.iter}: the loss of another "
                                         "process became non-finite", solver.iter, None)
        if diverged:
            batch = self.inputs.last_batch if self.inputs is not None else {}
            where, layer = describe_divergence(solver.net, batch or {})
            raise NonFiniteLossError(f"the loss became {solver.smoothed_loss} at iteration "
                                     f"{solver.iter}: {where}", solver.iter, layer)
        if stop:
            raise _Stop

    def progress(self, solver: Solver) -> None:
        """Redraw the bar with the state after the last update (an ``on_start`` callback)."""
        if self.bar is None:
            return
        now = time.perf_counter()
        images = self.inputs.batches * self.inputs.items_per_batch * self.world \
            if self.inputs is not None else 0
        if self._clock is not None and now > self._clock[0]:
            rate = (images - self._clock[1]) / (now - self._clock[0])
            self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate
        self._clock = (now, images)
        lambda_ = None
        if self._margin is not None:
            lambda_ = self._margin.lambda_at(int(self._margin.iteration))
        self.bar.update(solver.iter, solver.smoothed_loss, solver.learning_rate, lambda_,
                        self._rate if self.inputs is not None else None)


def _layers_off_the_loss(graph) -> List[str]:
    """Layers with parameters from which no gradient reaches a loss (walking the graph back
    from the loss tops, through the bottoms that ``propagate_down`` lets through)."""
    needed, off = set(), []
    for node in reversed(graph.nodes):
        if any(node.loss_weights) or any(top in needed for top in node.tops):
            keep = list(node.param.propagate_down)
            needed.update(bottom for index, bottom in enumerate(node.bottoms)
                          if index >= len(keep) or keep[index])
        elif node.module is not None and any(isinstance(blob, torch.nn.Parameter)
                                             for blob in node.module.caffe_blobs()):
            off.append(node.name)
    return off


class _DistributedSolver(Solver):
    """A :class:`Solver` whose forward and backward passes go through
    ``DistributedDataParallel``: the backward averages the gradients over the processes
    (all but the last of ``iter_size`` passes skip the exchange)."""

    ddp = None
    _passes = 0

    def distribute(self, device_ids: Optional[List[int]]) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # Every parameter is broadcast from rank 0 here, as Caffe's root solver does. The
        # search for parameters without gradients costs a graph walk per pass (and a warning
        # line in the log), so it is asked for only when the net has such parameters.
        self.ddp = DistributedDataParallel(
            self.net, device_ids=device_ids,
            find_unused_parameters=bool(_layers_off_the_loss(self.net.graph)))

    def _forward_backward(self) -> float:
        self._passes += 1
        last = self._passes % self.param.iter_size == 0
        with (contextlib.nullcontext() if last else self.ddp.no_sync()), torch.enable_grad():
            self.ddp(**self._batch(self.net, self._next_inputs, "train net"))
            loss = self._net_loss(self.net)
            self.net.backward()
        return loss


# --- training -------------------------------------------------------------------------------

def _data_seed(solver: Solver, seed: Optional[int]) -> int:
    if solver.param.random_seed >= 0:
        return int(solver.param.random_seed)
    return int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little")


def train(solver, *, weights=None, snapshot=None, device: str = "cpu",
          margin_backward: str = "caffe", loss_mode: str = "caffe", workers: int = 2,
          arrays: Optional[Mapping[str, np.ndarray]] = None,
          test_arrays: Optional[Mapping[str, np.ndarray]] = None, seed: Optional[int] = None,
          rank: int = 0, world: int = 1, progress: Optional[ProgressBar] = None,
          callbacks: Sequence = ()) -> TrainResult:
    """Train a ``solver.prototxt`` to ``max_iter``, reading its data layers.

    Args:
        solver: path to the ``solver.prototxt``.
        weights: caffemodel(s) to start from (``--weights``).
        snapshot: a ``.solverstate`` to resume from (``--snapshot``); the train data
            continues where that iteration left it.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        margin_backward, loss_mode: passed to the nets (see :class:`~caffelayers.Net`).
        workers: loader processes per file-backed data layer (0 reads in this process).
        arrays, test_arrays: ``{top: array}`` for ``MemoryData``/``Input`` layers of the
            train and test nets (``test_arrays`` defaults to ``arrays``).
        seed: the data seed when the solver has no ``random_seed``.
        rank, world: this process among ``world`` in an initialized ``torch.distributed``
            group (see :func:`cmd_train`); only rank 0 tests, logs and snapshots.
        progress: a :class:`ProgressBar` to update after every iteration.
        callbacks: extra ``on_gradients_ready`` callbacks ``f(solver)``.

    Returns:
        a :class:`TrainResult`. Ctrl-C (SIGINT, when this runs in the main thread) stops at
        the end of the iteration under way and snapshots; the result says so.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (nothing is updated with it).
    """
    if weights and snapshot:
        raise CaffeLayersError("give a snapshot to resume training or weights to fine-tune, "
                               "not both")
    device = torch.device(device)
    solver_class = _DistributedSolver if world > 1 else Solver
    solver = solver_class(solver, weights, device=device, margin_backward=margin_backward,
                          loss_mode=loss_mode)
    if rank > 0:
        # Caffe's root solver alone tests and snapshots.
        solver.param.test_interval = 0
        solver.param.snapshot = 0
        solver.param.snapshot_after_train = False
    if snapshot:
        solver.restore(snapshot)
    data_seed = _data_seed(solver, seed)
    pin = device.type == "cuda"
    from .data import net_inputs

    inputs = net_inputs(solver.net, seed=data_seed, rank=rank, world=world, workers=workers,
                        start=solver.iter * solver.param.iter_size, arrays=arrays,
                        pin_memory=pin)
    tests = [net_inputs(net, seed=data_seed, workers=workers,
                        arrays=arrays if test_arrays is None else test_arrays, pin_memory=pin)
             for net in (solver.test_nets if rank == 0 else [])]
    solver.inputs = inputs if inputs.loaders else None
    if solver.test_nets:
        solver.test_inputs = tests if rank == 0 else None
    if world > 1:
        solver.distribute([device.index] if device.type == "cuda" else None)
    monitor = _Monitor(solver, inputs if inputs.loaders else None, progress, world, device)
    solver.on_start.append(monitor.progress)
    solver.on_gradients_ready.append(monitor.gradients_ready)
    solver.on_gradients_ready.extend(callbacks)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, monitor.request_stop) if in_main else None
    result = TrainResult(solver)
    try:
        solver.solve()
        monitor.progress(solver)
    except _Stop:
        result.interrupted = True
        if rank == 0:
            result.snapshot = solver.snapshot()
        logger.info("Optimization stopped early at iteration %d.", solver.iter)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
        for feeder in [inputs] + tests:
            feeder.close()
        if progress is not None:
            progress.close()
    return result


# --- command line ---------------------------------------------------------------------------

def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` command to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "train", help="train a solver.prototxt, reading its data layers (Caffe's caffe train)")
    parser.add_argument("solver", help="solver .prototxt")
    parser.add_argument("--weights", help="caffemodel(s) to fine-tune from (comma-separated)")
    parser.add_argument("--snapshot", help=".solverstate to resume from")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--margin-backward", choices=["caffe", "exact"], default="caffe")
    parser.add_argument("--loss-mode", choices=["caffe", "exact"], default="caffe")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (one GPU each with --device cuda); batch_size is per "
                             "process and the gradients are averaged")
    parser.add_argument("--workers", type=int, default=2,
                        help="data loading processes per data layer and process (0: none)")
    parser.set_defaults(run=cmd_train)
    return parser


def run_process(args, rank: int = 0, world: int = 1, seed: Optional[int] = None) -> int:
    stream = sys.stderr
    bar = None
    if rank == 0 and stream.isatty():
        bar = ProgressBar(1, stream)
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    with (caffe_log(stream, bar) if rank == 0 else contextlib.nullcontext()):
        if bar is not None:
            from .proto import io

            bar.total = max(io.read_solver(args.solver).max_iter, 1)
        result = train(args.solver, weights=args.weights, snapshot=args.snapshot,
                       device=device, margin_backward=args.margin_backward,
                       loss_mode=args.loss_mode, workers=args.workers, seed=seed, rank=rank,
                       world=world, progress=bar)
    if result.interrupted:
        if result.snapshot is not None:
            print(f"interrupted at iteration {result.solver.iter}: snapshot "
                  f"{result.snapshot[0]}, {result.snapshot[1]}", file=sys.stderr)
        return INTERRUPTED
    return 0


def cmd_train(args) -> int:
    """The ``train`` command: one process, or ``--nproc`` through ``torch.distributed``."""
    check_device(args.device, args.nproc)
    if args.nproc == 1:
        return run_process(args)
    return launch(args)
