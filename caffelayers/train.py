"""``caffelayers train``: Caffe's ``caffe train``, reading the data layers' own sources.

    caffelayers train SOLVER.prototxt [--weights W.caffemodel] [--snapshot S.solverstate]
        [--device cpu|cuda] [--margin-backward caffe|exact] [--nproc N] [--workers N] ...

The solver is :class:`~caffelayers.Solver`; the data layers are read by
:mod:`caffelayers.data` in worker processes, after a fast check of their files and labels
(:mod:`caffelayers.data.precheck`). The log is Caffe's (glog-style lines such as
``Iteration 100 (...), loss = 2.3`` and ``Test net output #0: accuracy = 0.9``, which Caffe's
``parse_log.py`` reads) on stderr and in ``--log FILE``; on a terminal a progress bar sits
below it, otherwise plain progress lines (:mod:`caffelayers.train_log`). A non-finite loss
stops with an error naming the first layer whose output became non-finite.

Signals, as Caffe's ``-sigint_effect``/``-sighup_effect``: each of SIGINT, SIGTERM and SIGHUP
has an effect, ``stop``, ``snapshot`` or ``none``, acted on after the update of the
iteration under way, where Caffe's ``Solver::Step`` asks for it: ``snapshot`` writes one and
goes on, ``stop`` ends the run with the snapshot of ``snapshot_after_train`` and exit status
130. SIGINT stops and SIGHUP snapshots, as in Caffe; SIGTERM, what schedulers send, does
what SIGINT does unless ``--sigterm-effect`` says otherwise. A second stop signal aborts at
once (one within a second of the first is the same request arriving twice). No process
outlives the run, however it ends: the loader workers exit with the process that owns them
(see :mod:`caffelayers.data.loader`).

``--nproc N`` trains with N processes on this machine through ``torch.distributed``
(``DistributedDataParallel``; gloo on CPU, NCCL on GPUs), each reading ``batch_size`` items
and the gradients averaged, as Caffe's multi-GPU training does; ``torchrun`` runs the same
across machines (``torchrun --nnodes 2 --nproc-per-node 4 -m caffelayers train ...``),
each process one rank (see :mod:`caffelayers.launch`). The ranks agree on every signal's
iteration; rank 0 alone tests, logs and snapshots. ``--shard-head`` also splits the train
net's margin head (MarginInnerProduct or MarginHead with its SoftmaxWithLoss) by class over
the processes, and snapshots gather it into a standard caffemodel (see
:mod:`caffelayers.shard_training`).

The log gives Caffe's ``Use CPU.`` or ``Using GPUs ...``, ``Finetuning from ...`` and
``Resuming from ...`` lines, and the data seed when the solver sets no ``random_seed``
(``--seed`` gives it back, repeating the run). ``--stage`` and ``--level`` set the solver's
``train_state``, as ``caffe train -stage -level`` do.
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

from . import launch as launcher
from .errors import CaffeLayersError
from .launch import INTERRUPTED
from .options import add_net_state_options
from .solver import Solver
from .train_log import ProgressBar, add_log_options, train_output

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
    """What :func:`train` leaves: the solver, whether a stop signal ended it, and the
    ``(caffemodel, solverstate)`` of its state then (``None`` without
    ``snapshot_after_train``, and on ranks other than 0)."""

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
                 device: torch.device, rank: int = 0,
                 effects: Optional[Mapping[int, str]] = None):
        self.solver, self.inputs, self.bar = solver, inputs, bar
        self.world, self.device, self.rank = world, device, rank
        self.effects = dict(_CAFFE_EFFECTS if effects is None else effects)
        self.stop_requested = False
        self._stop_time = 0.0
        self.snapshot_requested = False
        self._snapshot_due = False
        self._stop_due = False
        #: ``(iteration, (caffemodel, solverstate))`` of the last snapshot a signal asked for
        self.requested_snapshot: Optional[Tuple[int, Tuple[str, str]]] = None
        self._margin = next((node.module for node in solver.net.graph.nodes
                             if node.type == "MarginInnerProduct"), None)

    def on_signal(self, signum, frame=None) -> None:
        """The handler of every signal in ``effects``: note what it asks for, to be done at
        the end of the iteration under way."""
        effect = self.effects.get(signum, "none")
        name = signal.Signals(signum).name
        if signum in (signal.SIGUSR1, signal.SIGUSR2):
            name += " from the launcher"
        if effect == "snapshot":
            self.snapshot_requested = True
            logger.info("%s: snapshotting after this iteration", name)
        elif effect == "stop":
            self.request_stop(name)

    def request_stop(self, name: str = "SIGINT") -> None:
        now = time.monotonic()
        if self.stop_requested:
            # One request can arrive twice at once (a terminal signals the process group,
            # torchrun's agent passes it on): only a later one aborts.
            if now - self._stop_time >= launcher.SAME_REQUEST_S:
                raise KeyboardInterrupt
            return
        self.stop_requested, self._stop_time = True, now
        logger.info("%s: stopping after this iteration (again to abort)", name)

    def gradients_ready(self, solver: Solver) -> None:
        """Agree on the iteration's outcome before its update: a non-finite loss (nothing is
        updated with it), or a snapshot or stop, done after the update as Caffe's
        ``Solver::Step`` does."""
        diverged = not math.isfinite(solver.smoothed_loss)
        stop, snap = self.stop_requested, self.snapshot_requested
        self.snapshot_requested = False
        if self.world > 1:
            import torch.distributed as dist

            flags = torch.tensor([float(diverged), float(stop), float(snap)],
                                 device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, snap = bool(flags[1]), bool(flags[2])
            if bool(flags[0]) and not diverged:
                raise NonFiniteLossError(f"iteration {solver.iter}: the loss of another "
                                         "process became non-finite", solver.iter, None)
        if diverged:
            batch = self.inputs.last_batch if self.inputs is not None else {}
            where, layer = describe_divergence(solver.net, batch or {})
            raise NonFiniteLossError(f"the loss became {solver.smoothed_loss} at iteration "
                                     f"{solver.iter}: {where}", solver.iter, layer)
        self.stop_requested = self.stop_requested or stop
        self._stop_due = stop
        self._snapshot_due = self._snapshot_due or snap

    def iteration_end(self, solver: Solver) -> None:
        """After the update (an ``on_iteration_end`` callback): the snapshot, then the stop
        that a signal asked for. One process reads the requests here, where Caffe's
        ``GetRequestedAction`` does; several agreed on them before the update."""
        if self.world == 1:
            self._snapshot_due = self._snapshot_due or self.snapshot_requested
            self._stop_due = self.stop_requested
            self.snapshot_requested = False
        self.snapshot_if_due(solver)
        if self._stop_due:
            raise _Stop

    def snapshot_if_due(self, solver: Solver, finished: bool = False) -> None:
        """The snapshot a signal asked for, after the update, unless Caffe's own snapshots
        just wrote this state."""
        if not self._snapshot_due:
            return
        self._snapshot_due = False
        param = solver.param
        written = (param.snapshot and solver.iter % param.snapshot == 0) or \
            (finished and param.snapshot_after_train)
        if not written and (self.rank == 0 or solver.every_rank_snapshots):
            self.requested_snapshot = (solver.iter, solver.snapshot())

    def progress(self, solver: Solver) -> None:
        """Show the state after the last update (an ``on_start`` callback): the bar counts
        the images read by every process for its images per second."""
        if self.bar is None:
            return
        images = self.inputs.batches * self.inputs.items_per_batch * self.world \
            if self.inputs is not None else None
        lambda_ = None
        if self._margin is not None:
            lambda_ = self._margin.lambda_at(int(self._margin.iteration))
        self.bar.update(solver.iter, solver.smoothed_loss, solver.learning_rate, lambda_,
                        images)

    def test_progress(self, solver: Solver, test_net_id: int, done: int) -> None:
        """Show the test under way (an ``on_test_iteration`` callback)."""
        if self.bar is not None:
            self.bar.testing(test_net_id, done, solver.param.test_iter[test_net_id],
                             solver.iter)


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
    #: whether every rank calls ``snapshot()`` (a collective in a sharded run)
    every_rank_snapshots = False
    _passes = 0

    def distribute(self, device_ids: Optional[List[int]]) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # Every parameter is broadcast from rank 0 here, as Caffe's root solver does. The
        # search for parameters without gradients costs a graph walk per pass (and a warning
        # line in the log), so it is asked for only when the net has such parameters. The
        # gradients are views of DDP's buckets: no second copy of them.
        self.ddp = DistributedDataParallel(
            self.net, device_ids=device_ids, gradient_as_bucket_view=True,
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

#: Caffe's signal effects (``caffe train``'s defaults), SIGTERM as SIGINT.
_CAFFE_EFFECTS = {signal.SIGINT: "stop", signal.SIGTERM: "stop", signal.SIGHUP: "snapshot"}


def _data_seed(param, seed: Optional[int], world: int, device: torch.device) -> int:
    """The solver's ``random_seed``, else ``seed``, else a drawn one; rank 0's on every
    process (each process of a ``torchrun`` group draws its own)."""
    if param.random_seed >= 0:
        return int(param.random_seed)
    value = int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little")
    if world > 1:
        import torch.distributed as dist

        shared = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(shared, 0)
        value = int(shared)
    return value


def _log_devices(device: torch.device, rank: int, world: int) -> None:
    """Caffe's ``Use CPU.``, or ``Using GPUs 0, 1`` and a ``GPU 0: <name>`` line per GPU
    (every process's, gathered: a collective call)."""
    if device.type != "cuda":
        if rank == 0:
            logger.info("Use CPU.")
        return
    gpus = [(device.index, torch.cuda.get_device_name(device))]
    if world > 1:
        import torch.distributed as dist

        gpus = [None] * world
        dist.all_gather_object(gpus, (device.index, torch.cuda.get_device_name(device)))
    if rank == 0:
        logger.info("Using GPUs %s", ", ".join(str(index) for index, _ in gpus))
        for index, name in dict.fromkeys(gpus):
            logger.info("GPU %d: %s", index, name)


def _weight_files(param, weights) -> List[str]:
    listed = list(param.weights) + ([weights] if isinstance(weights, str)
                                    else [str(w) for w in weights or ()])
    return [name.strip() for entry in listed for name in entry.split(",") if name.strip()]


def _stop_snapshot(solver: Solver, monitor: _Monitor) -> Optional[Tuple[str, str]]:
    """Caffe's snapshot on a stop: ``snapshot_after_train``'s, unless a snapshot of this
    iteration holds this state already (its files are returned then)."""
    param = solver.param
    if (monitor.rank > 0 and not solver.every_rank_snapshots) or \
            not param.snapshot_after_train:
        return None
    if monitor.requested_snapshot is not None and monitor.requested_snapshot[0] == solver.iter:
        return monitor.requested_snapshot[1]
    if param.snapshot and solver.iter % param.snapshot == 0 and solver.iter > 0:
        prefix = f"{solver._snapshot_prefix()}_iter_{solver.iter}"
        return f"{prefix}.caffemodel", f"{prefix}.solverstate"
    return solver.snapshot()


def train(solver, *, weights=None, snapshot=None, device: str = "cpu",
          margin_backward: str = "caffe", loss_mode: str = "caffe",
          workers: Optional[int] = None, arrays: Optional[Mapping[str, np.ndarray]] = None,
          test_arrays: Optional[Mapping[str, np.ndarray]] = None, seed: Optional[int] = None,
          rank: int = 0, world: int = 1, progress: Optional[ProgressBar] = None,
          callbacks: Sequence = (), data_check: bool = True, stages: Sequence[str] = (),
          level: Optional[int] = None,
          signal_effects: Optional[Mapping[int, str]] = None,
          shard_head: bool = False, shard_sample_rate: float = 1.0) -> TrainResult:
    """Train a ``solver.prototxt`` to ``max_iter``, reading its data layers.

    Args:
        solver: path to the ``solver.prototxt``.
        weights: caffemodel(s) to start from (``--weights``).
        snapshot: a ``.solverstate`` to resume from (``--snapshot``); the train data
            continues where that iteration left it.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        margin_backward, loss_mode: passed to the nets (see :class:`~caffelayers.Net`).
        workers: loader processes per file-backed data layer (0 reads in this process;
            ``None``: :func:`~caffelayers.data.loader.default_workers`). The test nets'
            workers run during tests only.
        arrays, test_arrays: ``{top: array}`` for ``MemoryData``/``Input`` layers of the
            train and test nets (``test_arrays`` defaults to ``arrays``).
        seed: the seed of the data and of the global ``torch`` generator (fillers,
            Dropout) when the solver has no ``random_seed``; drawn, and logged, when
            ``None``.
        rank, world: this process among ``world`` in an initialized ``torch.distributed``
            group (see :func:`cmd_train`); only rank 0 tests, logs and snapshots.
        progress: a :class:`ProgressBar` to update after every iteration and test pass (its
            total becomes the solver's ``max_iter``).
        callbacks: extra ``on_gradients_ready`` callbacks ``f(solver)``.
        data_check: check every file-backed data layer's files and labels first (on rank
            0; see :mod:`caffelayers.data.precheck`).
        stages, level: added to / set in the solver's ``train_state`` (``caffe train
            -stage -level``; the command line always sets the level, as Caffe does).
        signal_effects: ``{signal number: "stop" | "snapshot" | "none"}``; default Caffe's:
            SIGINT and SIGTERM stop, SIGHUP snapshots. Installed when this runs in the main
            thread.
        shard_head: split the train net's margin head by class over the ``world`` ranks
            (:class:`~caffelayers.shard_training.ShardedHeadSolver`; ``world`` >= 2).
        shard_sample_rate: with ``shard_head``, the fraction of each shard's classes used
            per step (PartialFC's class sampling, in ``(0, 1]``; 1 uses them all), drawn
            from the data seed plus the rank.

    Returns:
        a :class:`TrainResult`. A stop signal ends the run at an iteration boundary with
        the snapshot of ``snapshot_after_train``; the result says so. A second one raises
        ``KeyboardInterrupt`` at once.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (nothing is updated with it).
    """
    if weights and snapshot:
        raise CaffeLayersError("give a snapshot to resume training or weights to fine-tune, "
                               "not both")
    from .data import net_inputs
    from .data.loader import default_workers
    from .data.precheck import check_net_data
    from .proto import caffe_pb2, io

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _log_devices(device, rank, world)
    param = solver if isinstance(solver, caffe_pb2.SolverParameter) else io.read_solver(solver)
    if progress is not None:
        progress.total = max(int(param.max_iter), 1)
    data_seed = _data_seed(param, seed, world, device)
    if param.random_seed < 0:
        torch.manual_seed(data_seed)
        if rank == 0:
            logger.info("Data seed %d (the solver sets no random_seed; --seed %d repeats "
                        "this run)", data_seed, data_seed)
    if rank == 0:
        for name in _weight_files(param, weights):
            logger.info("Finetuning from %s", name)
    solver_class = _DistributedSolver if world > 1 else Solver
    options = {}
    if shard_head:
        from .shard_training import sharded_solver_class

        solver_class = sharded_solver_class(world)
        options = {"sample_rate": shard_sample_rate, "sample_seed": data_seed}
    elif shard_sample_rate != 1:
        raise CaffeLayersError("a class sampling rate applies to a sharded head: give "
                               "--shard-head with it")
    state = None if level is None and not stages else (level or 0, list(stages))
    solver = solver_class(solver, weights, device=device, margin_backward=margin_backward,
                          loss_mode=loss_mode, train_state=state, **options)
    if rank > 0:
        # Caffe's root solver alone tests and snapshots.
        solver.param.test_interval = 0
        solver.param.snapshot = 0
        solver.param.snapshot_after_train = False
    if snapshot:
        if rank == 0:
            logger.info("Resuming from %s", snapshot)
        solver.restore(snapshot)
    if workers is None:
        workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    pin = device.type == "cuda"

    if data_check and rank == 0:
        check_net_data([solver.net] + solver.test_nets)
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
    monitor = _Monitor(solver, inputs if inputs.loaders else None, progress, world, device,
                       rank, signal_effects)

    def release_test_workers(_solver: Solver) -> None:
        # Tests run before on_start: the test loaders' workers leave until the next test.
        for feeder in tests:
            feeder.close()

    solver.on_start.append(monitor.progress)
    solver.on_start.append(release_test_workers)
    solver.on_test_iteration.append(monitor.test_progress)
    solver.on_gradients_ready.append(monitor.gradients_ready)
    solver.on_gradients_ready.extend(callbacks)
    solver.on_iteration_end.append(monitor.iteration_end)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, monitor.on_signal)
                for signum in monitor.effects} if in_main else {}
    result = TrainResult(solver)
    try:
        solver.solve()
        monitor.snapshot_if_due(solver, finished=True)
        monitor.progress(solver)
    except _Stop:
        result.interrupted = True
        result.snapshot = _stop_snapshot(solver, monitor)
        logger.info("Optimization stopped early.")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
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
    parser.add_argument("solver", metavar="SOLVER.prototxt", help="solver .prototxt")
    parser.add_argument("--weights", metavar="W.caffemodel",
                        help="caffemodel(s) to fine-tune from (comma-separated)")
    parser.add_argument("--snapshot", metavar="S.solverstate",
                        help=".solverstate to resume from")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--margin-backward", choices=["caffe", "exact"], default="caffe")
    parser.add_argument("--loss-mode", choices=["caffe", "exact"], default="caffe")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (one GPU each with --device cuda); batch_size is per "
                             "process and the gradients are averaged")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="data loading processes per data layer and process (0: none; "
                             "default: half the CPUs, shared among the processes, at most 8)")
    parser.add_argument("--seed", type=int, metavar="N",
                        help="the data and filler seed when the solver sets no random_seed "
                             "(the log gives the one drawn otherwise)")
    add_net_state_options(parser, inputs=False)
    parser.add_argument("--shard-head", action="store_true",
                        help="with --nproc 2 or more: split the margin head's classes (and "
                             "its softmax loss) over the processes; snapshots stay standard")
    parser.add_argument("--shard-sample-rate", type=_sample_rate, default=1.0, metavar="RATE",
                        help="with --shard-head: use this fraction of each process's classes "
                             "per step, those of the batch's labels always among them "
                             "(PartialFC's class sampling; default 1, every class)")
    parser.add_argument("--sigint-effect", choices=launcher.EFFECTS, default="stop",
                        help="what SIGINT (Ctrl-C) does: stop after the iteration (with "
                             "the snapshot of snapshot_after_train), snapshot and go on, or "
                             "nothing (Caffe's)")
    parser.add_argument("--sighup-effect", choices=launcher.EFFECTS, default="snapshot",
                        help="what SIGHUP does (Caffe's)")
    parser.add_argument("--sigterm-effect", choices=launcher.EFFECTS,
                        help="what SIGTERM (a scheduler's stop) does (default: as SIGINT)")
    add_log_options(parser)
    parser.set_defaults(run=cmd_train)
    return parser


def run_process(args, rank: int = 0, world: int = 1, seed: Optional[int] = None) -> int:
    """Process ``rank`` of a run: the log and progress of ``--log``, ``--quiet`` and
    ``--log-level`` (rank 0 alone prints), the data check unless ``--skip-data-check``."""
    device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}" if args.device == "cuda" else "cpu"
    with train_output(args, rank=rank) as bar:
        result = train(args.solver, weights=args.weights, snapshot=args.snapshot,
                       device=device, margin_backward=args.margin_backward,
                       loss_mode=args.loss_mode, workers=args.workers, seed=seed, rank=rank,
                       world=world, progress=bar, data_check=not args.skip_data_check,
                       **_train_options(args))
    if result.interrupted:
        if result.snapshot is not None:
            print(f"interrupted at iteration {result.solver.iter}: snapshot "
                  f"{result.snapshot[0]}, {result.snapshot[1]}", file=sys.stderr)
        return INTERRUPTED
    return 0


def _train_options(args) -> dict:
    """What the command line adds to :func:`train`: the net state and the signals."""
    return {"stages": args.stage, "level": args.level,
            "signal_effects": launcher.signal_effects(args), "shard_head": args.shard_head,
            "shard_sample_rate": args.shard_sample_rate}


def _sample_rate(text: str) -> float:
    """``--shard-sample-rate``: a number in ``(0, 1]``."""
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0 < rate <= 1:
        raise argparse.ArgumentTypeError(f"a class sampling rate lies in (0, 1], got {text!r}")
    return rate


def cmd_train(args) -> int:
    """The ``train`` command: one process, ``--nproc`` ranks, or one rank of ``torchrun``."""
    if args.shard_sample_rate != 1 and not args.shard_head:
        raise CaffeLayersError("--shard-sample-rate samples the classes of a sharded head: "
                               "give --shard-head with it")
    status = launcher.torchrun_rank(args)
    if status is not None:
        return status
    launcher.check_device(args.device, args.nproc)
    if args.nproc == 1:
        return run_process(args, seed=args.seed)
    return launcher.launch(args)
