"""Batches read ahead in worker processes, and the ``inputs`` callable that feeds a net.

:class:`BatchLoader` runs a :class:`~caffelayers.data.sources.Source` in ``torch``'s
``DataLoader`` workers (forked from a server process that runs nothing else), each reading
whole batches by index, so batches arrive in order and do not depend on the number of
workers. :func:`net_inputs` builds one loader per data layer
of a :class:`~caffelayers.Net` and returns a callable for ``Solver(inputs=...)``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import select
import signal
import threading
import time
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CaffeFormatError, CaffeLayersError
from ..graph import located
from .sources import ArraySource, LabelRule, Source, open_source

#: layer types whose second bottom holds class labels, and how many classes they have.
_LABEL_READERS = ("SoftmaxWithLoss", "InfogainLoss", "Accuracy", "MarginInnerProduct",
                  "MultinomialLogisticLoss", "HingeLoss")


class _Failure:
    """An error raised in a worker, carried to the main process to be raised there with its
    file and line (exceptions with their own constructors do not survive pickling)."""

    def __init__(self, error: CaffeLayersError):
        self.kind = type(error)
        self.message = str(error)
        located = isinstance(error, CaffeFormatError)
        self.args = (error.detail, error.path, error.line) if located else (self.message,)

    def raise_(self):
        try:
            error = self.kind(*self.args)
        except TypeError:
            error = CaffeLayersError(self.message)
        raise error


class _Batches(Dataset):
    """Batch ``index`` of a source, as tensors (which travel through shared memory)."""

    def __init__(self, source: Source, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world
        self.owner = os.getpid()

    def __getitem__(self, index: int):
        try:
            arrays = self.source.batch(index, self.rank, self.world)
        except CaffeLayersError as error:
            return _Failure(error)
        return {top: torch.from_numpy(np.ascontiguousarray(a)) for top, a in arrays.items()}


class _From(Sampler):
    """Batch indices ``start, start + 1, ...`` without end."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _quiet_worker(worker_id: int) -> None:
    # The trainer handles these signals (a snapshot first): a worker keeps reading, and the
    # trainer stops it. They reach a worker when a terminal or a scheduler signals the
    # whole process group or job.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _exit_with(info.dataset.owner)
    torch.set_num_threads(1)
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass


def _exit_with(owner: int) -> None:
    """End this worker as soon as process ``owner`` is gone (a pidfd becomes readable when
    its process exits; without pidfds, poll once a second)."""
    try:
        handle = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):
        handle = None

    def wait() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _alive(owner):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=wait, name="caffelayers-owner-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def default_workers(processes: int = 1) -> int:
    """Worker processes per data layer when none are asked for: half the CPUs this process
    may use, shared among the ``processes`` trainers of the machine, from 1 to 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // (2 * max(1, processes))))


def _worker_context():
    """Workers fork from a server that has imported torch but run nothing: a plain fork of a
    process whose OpenCV or OpenMP thread pools have run can deadlock in the child."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class BatchLoader:
    """Read a source's batches ahead, in ``workers`` processes (0: in the caller).

    Args:
        source: the reader.
        rank, world: this process's share of the stream (see
            :mod:`caffelayers.data.sources`).
        workers: worker processes; each keeps ``prefetch`` batches ready.
        start: the first batch index (a resumed run continues the stream).
        prefetch: batches each worker reads ahead.
        pin_memory: page-locked batches, for fast copies to a GPU.

    Calling the loader returns the next batch as ``{top: tensor}``; :meth:`close` stops the
    workers, and the next call starts them again at the next batch (a test net's loader is
    closed after each test, so that it holds no workers between tests). Workers start from a
    fork server (not a plain fork), so a script that uses them needs the
    ``if __name__ == "__main__":`` guard, as with Python's spawn start method.
    """

    def __init__(self, source: Source, rank: int = 0, world: int = 1, workers: int = 2,
                 start: int = 0, prefetch: int = 2, pin_memory: bool = False):
        self.source = source
        self.workers = int(workers)
        self.next_index = int(start)
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self._dataset = _Batches(source, rank, world)
        self._iterator = None

    def __call__(self) -> Dict[str, torch.Tensor]:
        if self.workers > 0:
            if self._iterator is None:
                self._iterator = iter(DataLoader(
                    self._dataset, batch_size=None, sampler=_From(self.next_index),
                    num_workers=self.workers, prefetch_factor=self.prefetch,
                    pin_memory=self.pin_memory, worker_init_fn=_quiet_worker,
                    multiprocessing_context=_worker_context()))
            batch = next(self._iterator)
        else:
            batch = self._dataset[self.next_index]
        self.next_index += 1
        if isinstance(batch, _Failure):
            batch.raise_()
        return batch

    def close(self) -> None:
        """Stop the workers (the batches they read ahead are read again when needed)."""
        iterator, self._iterator = self._iterator, None
        if iterator is None:
            return
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        # A worker that did not take its stop in time was sent SIGTERM, which workers ignore.
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
            worker.join()

    def __repr__(self) -> str:
        return f"BatchLoader({self.source!r}, workers={self.workers})"


def label_rules(graph, top: str) -> List[LabelRule]:
    """What every layer that reads ``top`` as class labels accepts (see
    :class:`~caffelayers.data.sources.LabelRule`)."""
    rules = []
    for node in graph.nodes:
        if node.type not in _LABEL_READERS or len(node.bottoms) < 2 or \
                node.bottoms[1] != top or node.module is None:
            continue
        module, scores = node.module, node.bottom_shapes[0]
        if node.type == "MarginInnerProduct":
            classes = module.num_output
        elif hasattr(module, "axis"):
            classes = scores[module.axis % len(scores)]
        else:  # the legacy losses: every value after the first axis is a class
            classes = int(np.prod(scores[1:]))
        rules.append(LabelRule(classes, getattr(module, "ignore_label", None),
                               f"layer {node.name!r} ({node.type})"))
    return rules


class NetInputs:
    """The ``inputs`` of a :class:`~caffelayers.Solver`: one loader per data layer of a net,
    merged into the dict of input blobs each forward pass needs.

    Attributes:
        loaders: ``{layer name: BatchLoader}``.
        last_batch: the batch most recently returned (what a diverged iteration saw).
        items_per_batch: items per call (the first data layer's batch size).
        batches: calls so far.
    """

    def __init__(self, loaders: Mapping[str, BatchLoader]):
        self.loaders = dict(loaders)
        self.last_batch: Optional[Dict[str, torch.Tensor]] = None
        first = next(iter(self.loaders.values()), None)
        self.items_per_batch = first.source.batch_size if first is not None else 0
        self.batches = 0

    def __call__(self) -> Dict[str, torch.Tensor]:
        batch: Dict[str, torch.Tensor] = {}
        for loader in self.loaders.values():
            batch.update(loader())
        self.last_batch = batch
        self.batches += 1
        return batch

    def close(self) -> None:
        """Stop the loaders' workers (a later call starts them again where they were)."""
        for loader in self.loaders.values():
            loader.close()

    def __repr__(self) -> str:
        return f"NetInputs({', '.join(self.loaders)})"


def data_sources(net, seed: int = 0, arrays: Optional[Mapping[str, np.ndarray]] = None,
                 source_dir=None) -> List[Tuple[object, Source]]:
    """``(graph node, Source)`` for every input layer of a built :class:`~caffelayers.Net`,
    checked against the shapes the net was built for, with their label rules set.
    ``source_dir`` (default: the net's ``source_dir``) is where relative names are also
    looked for."""
    graph = net.graph
    if source_dir is None:
        source_dir = getattr(net, "source_dir", None)
    pairs = []
    for node in graph.nodes:
        if not node.is_input:
            continue
        # A missing or unreadable source names the prototxt and the layer's line.
        with located(getattr(net, "source_file", None), node.name):
            source = open_source(node.param, net.phase, source_dir, seed, arrays)
            produced = source.top_shapes()
            for top, got, expected in zip(node.tops, produced, node.top_shapes):
                if expected is not None and tuple(got[1:]) != tuple(expected[1:]):
                    raise CaffeLayersError(
                        f"{source.layer}: its data gives {top!r} items of shape "
                        f"{tuple(got[1:])}, the net was built for {tuple(expected[1:])}")
        for index, top in enumerate(node.tops):
            rules = label_rules(graph, top)
            if not rules:
                continue
            if isinstance(source, ArraySource) or source.label_top_index is None:
                source.set_label_rules(rules, top)
            elif index == source.label_top_index:
                source.set_label_rules(rules)
        pairs.append((node, source))
    return pairs


def net_inputs(net, *, seed: int = 0, rank: int = 0, world: int = 1, workers: int = 2,
               start: int = 0, arrays: Optional[Mapping[str, np.ndarray]] = None,
               pin_memory: bool = False, source_dir=None) -> NetInputs:
    """The callable that feeds ``net``'s data layers from their sources.

    Args:
        net: a built :class:`~caffelayers.Net` (its phase decides crops).
        seed: seeds shuffles and augmentation (the same on every process of a run).
        rank, world: this process's share of the stream.
        workers: worker processes per file-backed data layer (arrays are always cut in
            the caller).
        start: the first batch index (``iter * iter_size`` resumes the train stream).
        arrays: ``{top: array}`` for ``MemoryData`` and ``Input`` layers.
        pin_memory: page-locked batches for a GPU.
        source_dir: the prototxt's directory, where relative file names are also looked
            for (default: ``net.source_dir`` when the net has it).

    Example::

        >>> solver = Solver("solver.prototxt")
        >>> solver.inputs = net_inputs(solver.net, seed=1)
        >>> solver.test_inputs = [net_inputs(n, seed=1) for n in solver.test_nets]
    """
    loaders = {}
    for node, source in data_sources(net, seed, arrays, source_dir):
        count = 0 if isinstance(source, ArraySource) else workers
        loaders[node.name] = BatchLoader(source, rank, world, count, start,
                                         pin_memory=pin_memory)
    return NetInputs(loaders)

