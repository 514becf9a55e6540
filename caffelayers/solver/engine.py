"""Caffe's solvers: a ``solver.prototxt`` trains a :class:`~caffelayers.Net` as Caffe would.

One iteration of :meth:`Solver.step` is Caffe's ``Solver::Step`` body:

1. clear the parameter diffs; run the test nets when ``iter % test_interval == 0``;
2. ``iter_size`` forward/backward passes, whose parameter gradients add up;
3. ``ApplyUpdate``: the learning rate of the policy at ``iter``, then ``ClipGradients`` (the
   global L2 norm of every diff against ``clip_gradients``), then for each learnable blob
   ``Normalize`` (divide by ``iter_size``), ``Regularize`` (add ``decay * w``, or
   ``decay * sign(w)`` for L1, with ``decay = weight_decay * decay_mult``) and
   ``ComputeUpdateValue`` (the solver type's rule, with ``local_rate = rate * lr_mult``),
   which leaves the update in the diff; finally ``w -= diff``;
4. ``iter += 1``; a snapshot when ``iter % snapshot == 0``.

The update rules are Caffe's, not ``torch.optim``'s: Caffe's SGD keeps ``lr * grad`` in its
momentum history (``h = momentum * h + lr * g; w -= h``), so after a learning-rate step the
old, larger steps still decay through the history, where ``torch.optim.SGD`` (``h = momentum
* h + g; w -= lr * h``) rescales the whole history at once. Nesterov's step is written on that
history too, and Adam adds ``delta`` to ``sqrt(v)`` before its bias correction (torch adds
``eps`` after it). :data:`SOLVER_TYPES` states each rule's formula.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import CaffeFormatError, CaffeLayersError, UnsupportedParameterError
from ..net import Net
from .checks import check_solver
from .counters import counters_path, load_layer_counters, read_counters, write_counters
from .learning_rate import caffe_learning_rate
from .updates import Hyper

__all__ = ["Solver"]

logger = logging.getLogger(__name__)


# --- inputs ---------------------------------------------------------------------------------

InputSource = Callable[[], Mapping]


def _input_source(source, what: str) -> Optional[InputSource]:
    """A function returning the next batch: a mapping is fed at every pass, a callable is
    called once per pass, any other iterable is consumed one batch per pass."""
    if source is None:
        return None
    if isinstance(source, Mapping):
        return lambda: source
    if callable(source):
        return source
    if not isinstance(source, Iterable) or isinstance(source, (str, bytes)):
        raise CaffeLayersError(f"{what} must be a dict of arrays, an iterable of such dicts or "
                               f"a callable returning one, got {type(source).__name__}")
    batches = iter(source)
    served = [0]

    def next_batch():
        try:
            batch = next(batches)
        except StopIteration:
            raise CaffeLayersError(f"{what} ran out of batches after {served[0]}") from None
        served[0] += 1
        return batch
    return next_batch


@dataclass
class _Learnable:
    """One of Caffe's ``learnable_params``: a blob with its multipliers."""

    layer: str
    index: int
    tensor: torch.Tensor
    lr_mult: float
    decay_mult: float

    @property
    def is_statistic(self) -> bool:
        # Buffers (BatchNorm's statistics) have no gradient; Caffe masks them with lr_mult 0.
        return not isinstance(self.tensor, nn.Parameter)


# --- the solver -----------------------------------------------------------------------------

class Solver:
    r"""Train a Caffe net with Caffe's solver semantics, from a ``solver.prototxt``.

    .. math::
        w_{t+1} = w_t - \text{update}(\text{clip}(\textstyle\sum_{i<\text{iter\_size}}
        \nabla L_i) / \text{iter\_size} + \lambda\, d\, w_t,\ \text{rate}(t)\,
        \text{lr\_mult})

    with :math:`\lambda` = ``weight_decay``, :math:`d` = ``decay_mult`` (``sign(w)`` in place
    of ``w`` for L1) and the update of the solver ``type`` (:data:`SOLVER_TYPES`).

    Args:
        solver: path to a ``solver.prototxt``, or a ``SolverParameter``.
        weights: ``.caffemodel`` file(s) to start from (a path, a comma-separated list or a
            sequence), loaded after the solver's own ``weights`` field, as ``caffe train
            --weights`` does; without any, parameters come from the fillers.
        inputs: the train net's input blobs for each forward pass: a dict of arrays (the same
            batch every pass), an iterable of such dicts (one per pass) or a callable
            returning one. ``iter_size`` passes make one iteration.
        test_inputs: the same for the test nets: one source for every test net, or a list with
            one source per test net.
        root: directory that relative names in the solver (net files, ``snapshot_prefix``) are
            read against; ``None`` is the working directory, as in Caffe. A net file missing
            there is also looked for next to the solver file.
        margin_backward, loss_mode, dtype, device, allow_unknown_fields: passed to every
            :class:`~caffelayers.Net`.
        train_state: ``(level, stages)`` written into the solver's ``train_state`` before
            the nets are built, as ``caffe train -level -stage`` do (the level replaces the
            solver's, the stages add to its own).

    Attributes:
        param: the ``SolverParameter`` (read at every iteration, like Caffe's ``param_``).
        net: the train :class:`~caffelayers.Net` (phase TRAIN).
        test_nets: the test nets (phase TEST), which take the train net's weights by layer
            name before each test.
        iter: the number of updates done (Caffe's ``iter_``).
        current_step: the step counter of the step and multistep policies.
        history: the update rule's state, one tensor per learnable blob and slot, in the
            order of Caffe's ``.solverstate``.
        learning_rate: the rate of the last update.
        smoothed_loss: the loss averaged over the last ``average_loss`` iterations of the
            current :meth:`step` call.
        mean_scores: per test net, the last test's mean of each output blob.
        on_start, on_gradients_ready: lists of callables ``f(solver)``, called before the
            forward passes and before the update of every iteration (Caffe's callbacks).
        on_test_iteration: callables ``f(solver, test_net_id, done)``, called as a test
            starts (``done`` 0) and after each of its ``test_iter`` passes (progress).
        on_iteration_end: callables ``f(solver)``, called after the update, ``iter += 1``
            and the scheduled snapshot: where Caffe acts on a signal's request.

    Example::

        >>> solver = Solver("solver.prototxt", weights="init.caffemodel",
        ...                 inputs=lambda: {"data": images(), "label": labels()})
        >>> solver.step(100)
        >>> model, state = solver.snapshot()      # PREFIX_iter_100.caffemodel, .solverstate
        >>> resumed = Solver("solver.prototxt", inputs=...)
        >>> resumed.restore(state)

    Caffe:
        ``net``/``train_net``/``net_param``/``train_net_param`` (exactly one) build the train
        net in state ``train_state``; ``test_net``/``test_net_param`` and the remaining
        ``test_iter`` entries on ``net``/``net_param`` build the test nets in ``test_state``.
        ``base_lr``, ``lr_policy``, ``gamma``, ``power``, ``stepsize``, ``stepvalue`` and
        ``max_iter`` give the rate (:func:`caffe_learning_rate`); ``momentum``,
        ``momentum2``, ``delta``, ``rms_decay``, ``weight_decay``, ``regularization_type``,
        ``clip_gradients`` and ``iter_size`` the update; ``display`` and ``average_loss`` the
        log (logger ``caffelayers.solver``); ``test_interval``, ``test_iter``,
        ``test_initialization`` and ``test_compute_loss`` the tests; ``snapshot``,
        ``snapshot_prefix`` and ``snapshot_after_train`` the snapshots; ``random_seed`` seeds
        the fillers and Dropout of every net. ``solver_mode`` and ``device_id`` are ignored
        (``device`` decides). Caffe's behaviours kept: the momentum history holds
        ``lr * grad``; gradients are clipped before the ``iter_size`` division; weight decay
        applies to blobs with ``lr_mult: 0`` too (without effect on them); ``smoothed_loss``
        restarts with every :meth:`step` call. Differences, on purpose: statistics buffers
        (BatchNorm's) are never updated, as if their ``lr_mult`` were 0 (current Caffe forces
        that); a snapshot also writes ``PREFIX_iter_N.caffelayers.json`` with the layers'
        counters (MarginInnerProduct's iteration), which :meth:`restore` reads, so a resumed
        run continues the lambda schedule where Caffe restarts it from the prototxt's
        ``iteration``; a missing ``snapshot_prefix`` is the solver file's name without its
        extension, and a prefix naming a directory gets that name appended (current Caffe's
        rules); snapshot directories are created. HDF5 snapshots and ``snapshot_diff`` are
        not supported.
    """

    def __init__(self, solver, weights=None, inputs=None, test_inputs=None, *,
                 root: Optional[str | Path] = None, margin_backward: str = "caffe",
                 loss_mode: str = "caffe", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", allow_unknown_fields: bool = False,
                 train_state: Optional[Tuple[int, Sequence[str]]] = None):
        from ..proto import caffe_pb2, io
        from ..proto.upgrade import upgrade_solver

        if isinstance(solver, caffe_pb2.SolverParameter):
            self.path: Optional[str] = None
            self.param = _copy(upgrade_solver(solver))
        else:
            self.path = str(solver)
            self.param = io.read_solver(solver, allow_unknown_fields=allow_unknown_fields)
        if train_state is not None:
            self.param.train_state.level = int(train_state[0])
            self.param.train_state.stage.extend(train_state[1])
        self.root = None if root is None else Path(root)
        self._net_options = {"margin_backward": margin_backward, "loss_mode": loss_mode,
                             "dtype": dtype, "device": device,
                             "allow_unknown_fields": allow_unknown_fields}
        self.rule = check_solver(self.param, self.path)
        self.hyper = Hyper(self.param.momentum, self.param.momentum2, self.param.delta,
                           self.param.rms_decay)
        seed = self.param.random_seed if self.param.random_seed >= 0 else None

        weight_files = list(self.param.weights) + _weight_list(weights)
        source, net_param = self._train_net_source()
        state = _merged_state("TRAIN", net_param.state,
                              self.param.train_state if self.param.HasField("train_state")
                              else None)
        self.net = Net(source, phase=state[0], level=state[1], stages=state[2], seed=seed,
                       source_file=self._inline_file(source), **self._net_options)
        self.test_nets: List[Net] = []
        for index, (test_source, test_param) in enumerate(self._test_net_sources()):
            test_state = self.param.test_state[index] if len(self.param.test_state) else None
            phase, level, stages = _merged_state("TEST", test_param.state, test_state)
            self.test_nets.append(Net(test_source, phase=phase, level=level, stages=stages,
                                      seed=None if seed is None else seed + 1 + index,
                                      source_file=self._inline_file(test_source),
                                      **self._net_options))
        for path in weight_files:
            for net in [self.net] + self.test_nets:
                net.copy_trained_layers(path)

        self.learnables = self._learnable_blobs()
        self.history: List[torch.Tensor] = [
            torch.zeros_like(blob.tensor, memory_format=torch.contiguous_format)
            for _ in range(self.rule.history_slots) for blob in self.learnables]
        self.iter = 0
        self.current_step = 0
        self.learning_rate = 0.0
        self.smoothed_loss = 0.0
        self._losses: List[float] = []
        self.mean_scores: List[Dict[str, np.ndarray]] = [{} for _ in self.test_nets]
        self.on_start: List[Callable[[Solver], None]] = []
        self.on_gradients_ready: List[Callable[[Solver], None]] = []
        self.on_test_iteration: List[Callable[[Solver, int, int], None]] = []
        self.on_iteration_end: List[Callable[[Solver], None]] = []
        self.inputs = inputs
        self.test_inputs = test_inputs

    # -- inputs ----------------------------------------------------------------------------
    @property
    def inputs(self):
        """The train net's input source (see the class Args); settable."""
        return self._inputs

    @inputs.setter
    def inputs(self, source) -> None:
        self._inputs = source
        self._next_inputs = _input_source(source, "Solver inputs")

    @property
    def test_inputs(self):
        """The test nets' input sources (see the class Args); settable."""
        return self._test_inputs

    @test_inputs.setter
    def test_inputs(self, source) -> None:
        self._test_inputs = source
        if isinstance(source, (list, tuple)):
            if len(source) != len(self.test_nets):
                raise CaffeLayersError(f"test_inputs lists {len(source)} sources for "
                                       f"{len(self.test_nets)} test nets")
            sources = list(source)
        else:
            sources = [source] * len(self.test_nets)
        self._next_test_inputs = [_input_source(s, f"test_inputs of test net #{i}")
                                  for i, s in enumerate(sources)]

    def _batch(self, net: Net, next_batch: Optional[InputSource], what: str) -> Mapping:
        if not net.inputs:
            return {}
        if next_batch is None:
            raise CaffeLayersError(
                f"the {what} reads the inputs {', '.join(net.inputs)}: give the Solver "
                f"{'test_inputs' if 'test' in what else 'inputs'} (a dict of arrays, an "
                f"iterable of dicts or a callable returning one)")
        batch = next_batch()
        if not isinstance(batch, Mapping):
            raise CaffeLayersError(f"the {what}'s input source gave a "
                                   f"{type(batch).__name__}, not a dict of arrays")
        return batch

    # -- training --------------------------------------------------------------------------
    def step(self, iters: int = 1) -> float:
        """Run ``iters`` iterations (Caffe's ``Solver::Step``); returns the smoothed loss."""
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        average_loss = self.param.average_loss
        self._losses, self.smoothed_loss = [], 0.0
        clock, iter_last = time.perf_counter(), self.iter
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            interval = self.param.test_interval
            if interval and self.iter % interval == 0 and \
                    (self.iter > 0 or self.param.test_initialization):
                self.test_all()
            for callback in self.on_start:
                callback(self)
            display = self.param.display and self.iter % self.param.display == 0
            loss = sum(self._forward_backward() for _ in range(self.param.iter_size))
            loss /= self.param.iter_size
            self._update_smoothed_loss(loss, start_iter, average_loss)
            if display:
                lapse = time.perf_counter() - clock
                logger.info("Iteration %d (%.4g iter/s, %.4gs/%d iters), loss = %.6g",
                            self.iter, (self.iter - iter_last) / (lapse or 1.0), lapse,
                            self.param.display, self.smoothed_loss)
                clock, iter_last = time.perf_counter(), self.iter
                self._log_outputs(self.net, {name: self.net.blobs[name]
                                             for name in self.net.outputs}, "Train")
            for callback in self.on_gradients_ready:
                callback(self)
            self.apply_update()
            self.iter += 1
            if self.param.snapshot and self.iter % self.param.snapshot == 0:
                self.snapshot()
            for callback in self.on_iteration_end:
                callback(self)
        return self.smoothed_loss

    def solve(self, resume_file: Optional[str | Path] = None) -> None:
        """Train to ``max_iter`` (Caffe's ``Solver::Solve``): restore ``resume_file`` if
        given, step, snapshot at the end unless the last iteration just did, then a final
        display forward and test when their intervals fall on ``max_iter``."""
        logger.info("Solving %s", self.net.graph.name)
        logger.info("Learning Rate Policy: %s", self.param.lr_policy)
        self.check_snapshot_folder()
        if resume_file is not None:
            self.restore(resume_file)
        start_iter = self.iter
        self.step(self.param.max_iter - self.iter)
        if self.param.snapshot_after_train and \
                (not self.param.snapshot or self.iter % self.param.snapshot != 0):
            self.snapshot()
        if self.param.display and self.iter % self.param.display == 0:
            with torch.no_grad():
                self.net(**self._batch(self.net, self._next_inputs, "train net"))
            self._update_smoothed_loss(self._net_loss(self.net), start_iter,
                                       self.param.average_loss)
            logger.info("Iteration %d, loss = %.6g", self.iter, self.smoothed_loss)
        if self.param.test_interval and self.iter % self.param.test_interval == 0:
            self.test_all()
        logger.info("Optimization Done.")

    def _forward_backward(self) -> float:
        with torch.enable_grad():
            self.net(**self._batch(self.net, self._next_inputs, "train net"))
            loss = self._net_loss(self.net)
            self.net.backward()
        return loss

    @staticmethod
    def _net_loss(net: Net) -> float:
        return float(sum(weight * float(value.detach().sum())
                         for _, weight, value in net.losses()))

    def _update_smoothed_loss(self, loss: float, start_iter: int, average_loss: int) -> None:
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            slot = (self.iter - start_iter) % average_loss
            self.smoothed_loss += (loss - self._losses[slot]) / average_loss
            self._losses[slot] = loss

    def apply_update(self) -> None:
        """Turn the accumulated parameter gradients into one update and apply it (Caffe's
        ``ApplyUpdate``). Afterwards each parameter's ``.grad`` holds the update subtracted,
        as Caffe's diff does. ``iter`` is not advanced (:meth:`step` does that)."""
        self.learning_rate, self.current_step = caffe_learning_rate(
            self.param, self.iter, self.current_step)
        if self.param.display and self.iter % self.param.display == 0:
            logger.info("Iteration %d, lr = %.6g", self.iter, self.learning_rate)
        diffs = []
        for blob in self.learnables:
            if blob.is_statistic:
                diffs.append(torch.zeros_like(blob.tensor))
                continue
            if blob.tensor.grad is None:
                blob.tensor.grad = torch.zeros_like(blob.tensor)
            diffs.append(blob.tensor.grad)
        self._clip_gradients(diffs)
        slots, count = self.rule.history_slots, len(self.learnables)
        with torch.no_grad():
            for index, (blob, diff) in enumerate(zip(self.learnables, diffs)):
                if self.param.iter_size != 1:
                    diff.mul_(1.0 / self.param.iter_size)
                self._regularize(blob, diff)
                lr_mult = 0.0 if blob.is_statistic else blob.lr_mult
                history = [self.history[index + slot * count] for slot in range(slots)]
                self.rule.compute(diff, history, self.learning_rate * lr_mult, self.hyper,
                                  self.iter)
            for blob, diff in zip(self.learnables, diffs):
                if not blob.is_statistic:
                    blob.tensor.sub_(diff)

    @staticmethod
    def _squares(diffs: Sequence[torch.Tensor]) -> List[float]:
        return [float(torch.sum(diff.double() * diff.double())) for diff in diffs]

    def _squared_norm(self, diffs: Sequence[torch.Tensor]) -> float:
        """The squared L2 norm of every learnable blob's diff together."""
        return sum(self._squares(diffs))

    def _clip_gradients(self, diffs: Sequence[torch.Tensor]) -> None:
        threshold = self.param.clip_gradients
        if threshold < 0 or not diffs:
            return
        norm = math.sqrt(self._squared_norm(diffs))
        if norm > threshold:
            scale = threshold / norm
            logger.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale "
                        "factor %g", norm, threshold, scale)
            with torch.no_grad():
                for diff in diffs:
                    diff.mul_(scale)

    def _regularize(self, blob: _Learnable, diff: torch.Tensor) -> None:
        decay = self.param.weight_decay * blob.decay_mult
        if not decay:
            return
        if self.param.regularization_type == "L2":
            diff.add_(blob.tensor, alpha=decay)
        else:  # "L1"; check_solver allows nothing else
            diff.add_(torch.sign(blob.tensor), alpha=decay)

    # -- testing ---------------------------------------------------------------------------
    def test_all(self) -> List[Dict[str, np.ndarray]]:
        """Run every test net (Caffe's ``TestAll``); returns :attr:`mean_scores`."""
        for index in range(len(self.test_nets)):
            self.test(index)
        return self.mean_scores

    def test(self, test_net_id: int = 0) -> Dict[str, np.ndarray]:
        """``test_iter`` forward passes of a test net with the train net's current weights;
        returns each output blob's mean over the passes (Caffe's ``Test``)."""
        net = self.test_nets[test_net_id]
        logger.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        _share_trained_layers(self.net, net)
        sums: Dict[str, np.ndarray] = {}
        loss = 0.0
        iterations = self.param.test_iter[test_net_id]
        with torch.no_grad():
            for callback in self.on_test_iteration:
                callback(self, test_net_id, 0)
            for done in range(1, iterations + 1):
                outputs = net(**self._batch(net, self._next_test_inputs[test_net_id],
                                            f"test net #{test_net_id}"))
                if self.param.test_compute_loss:
                    loss += self._net_loss(net)
                for name, value in outputs.items():
                    value = value.detach().double().cpu().numpy()
                    sums[name] = sums[name] + value if name in sums else value
                for callback in self.on_test_iteration:
                    callback(self, test_net_id, done)
        if self.param.test_compute_loss:
            logger.info("Test loss: %.6g", loss / iterations)
        means = {name: total / iterations for name, total in sums.items()}
        self.mean_scores[test_net_id] = means
        self._log_outputs(net, means, "Test")
        return means

    @staticmethod
    def _log_outputs(net: Net, outputs: Mapping, kind: str) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        weights = {blob: weight for blob, weight, _ in net.losses()}
        number = 0
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().double().cpu().numpy()
            for element in np.ravel(value):
                suffix = ""
                if weights.get(name):
                    suffix = f" (* {weights[name]:g} = {weights[name] * element:.6g} loss)"
                logger.info("    %s net output #%d: %s = %.6g%s", kind, number, name, element,
                            suffix)
                number += 1

    # -- snapshots -------------------------------------------------------------------------
    def snapshot(self) -> Tuple[str, str]:
        """Write ``PREFIX_iter_N.caffemodel`` (the train net's weights, readable by Caffe),
        ``PREFIX_iter_N.solverstate`` (Caffe's ``SolverState``: ``iter``, ``current_step``,
        ``learned_net`` and the history) and ``PREFIX_iter_N.caffelayers.json`` (layer
        counters Caffe does not save). Returns the paths of the first two.

        A trained net is never lost: when the prefix's folder cannot be written (a disk that
        filled up, a folder removed mid-run), the snapshot goes to a new folder under the
        system's temporary directory and the log says where, as an error.
        """
        prefix = self._snapshot_prefix()
        try:
            return self._write_snapshot(prefix)
        except OSError as error:
            rescue = Path(tempfile.mkdtemp(prefix="caffelayers-snapshot-")) / Path(prefix).name
            logger.error("Cannot write the snapshot to %s (%s); writing it to %s instead",
                         prefix, error.strerror or error, rescue)
            return self._write_snapshot(str(rescue))

    def _write_snapshot(self, prefix: str) -> Tuple[str, str]:
        from ..proto import caffe_pb2, io

        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        model = f"{prefix}_iter_{self.iter}.caffemodel"
        logger.info("Snapshotting to binary proto file %s", model)
        self.net.save_caffemodel(model)
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=model,
                                      current_step=self.current_step)
        for history in self.history:
            state.history.append(io.array_to_blob(history.detach().cpu().numpy()))
        state_path = f"{prefix}_iter_{self.iter}.solverstate"
        logger.info("Snapshotting solver state to binary proto file %s", state_path)
        Path(state_path).write_bytes(state.SerializeToString())
        write_counters(state_path, self.iter, self._nets_by_key())
        return model, state_path

    def check_snapshot_folder(self) -> None:
        """Before the first iteration: the folder of ``snapshot_prefix`` can be created and
        written, so that a run does not learn at its end that its weights have nowhere to go.
        Checked by writing a file, since permission bits do not bind root."""
        if not (self.param.snapshot or self.param.snapshot_after_train):
            return
        prefix = Path(self._snapshot_prefix())
        try:
            prefix.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=prefix.parent):
                pass
        except OSError as error:
            raise CaffeFormatError(f"snapshot_prefix {self.param.snapshot_prefix!r}: cannot "
                                   f"write in {prefix.parent} ({error.strerror or error})",
                                   self._where()) from None

    def restore(self, state_file: str | Path) -> None:
        """Resume from a ``.solverstate``: ``iter``, ``current_step``, the history and the
        weights of its ``learned_net`` (Caffe's ``Restore``), plus the layer counters of the
        ``.caffelayers.json`` beside it, when there is one: MarginInnerProduct's lambda
        schedule then continues, where Caffe would restart it."""
        from google.protobuf.message import DecodeError

        from ..proto import caffe_pb2, io

        state_file = Path(state_file)
        if state_file.suffix == ".h5":
            raise UnsupportedParameterError(f"{state_file}: HDF5 solver states are not "
                                            "supported; snapshot with snapshot_format: "
                                            "BINARYPROTO")
        try:
            state = caffe_pb2.SolverState.FromString(state_file.read_bytes())
        except OSError as error:
            raise CaffeFormatError(f"cannot read the solver state: {error.strerror}",
                                   state_file) from None
        except DecodeError:
            raise CaffeFormatError("not a Caffe solver state (SolverState)", state_file) \
                from None
        if len(state.history) != len(self.history):
            raise CaffeFormatError(
                f"the state has {len(state.history)} history blobs; this {self.param.type} "
                f"solver keeps {len(self.history)} ({self.rule.history_slots} per learnable "
                f"blob, {len(self.learnables)} blobs): a state of another net or solver type?",
                state_file)
        arrays = []
        for index, (blob, history) in enumerate(zip(state.history, self.history)):
            try:
                array = io.blob_to_array(blob)
            except CaffeFormatError as error:
                raise CaffeFormatError(f"history blob {index}: {error.detail}",
                                       state_file) from None
            if array.size != history.numel():
                owner = self.learnables[index % len(self.learnables)]
                raise CaffeFormatError(
                    f"history blob {index} has {array.size} values; layer {owner.layer!r} "
                    f"blob {owner.index} has {history.numel()}", state_file)
            arrays.append(array)
        sidecar = counters_path(state_file)
        counters = read_counters(sidecar, state.iter)
        if state.HasField("learned_net") and state.learned_net:
            self.net.copy_trained_layers(self._learned_net(state.learned_net, state_file))
        with torch.no_grad():
            for array, history in zip(arrays, self.history):
                history.copy_(torch.from_numpy(np.ascontiguousarray(array))
                              .reshape(history.shape))
        self.iter = state.iter
        self.current_step = state.current_step
        mips = [node.name for node in self.net.graph.nodes if node.type == "MarginInnerProduct"]
        if counters is None:
            if mips:
                logger.warning("%s not found: MarginInnerProduct layers (%s) restart their "
                               "lambda schedule from the prototxt's iteration, as in Caffe",
                               sidecar, ", ".join(mips))
            return
        for key, net in self._nets_by_key().items():
            load_layer_counters(net, counters.get(key, {}), sidecar)
        for name in mips:
            logger.info("layer %r (MarginInnerProduct): iteration counter restored to %d "
                        "(Caffe would restart it from the prototxt's iteration)", name,
                        int(self.net.layer(name).iteration))

    def _nets_by_key(self) -> Dict[str, Net]:
        """The train net and the test nets under the keys of the counters file."""
        nets = {"train": self.net}
        nets.update({f"test{i}": net for i, net in enumerate(self.test_nets)})
        return nets

    # -- files -----------------------------------------------------------------------------
    def _inline_file(self, source) -> Optional[str]:
        """The solver file, for a net written inside it (``net_param``): errors in that net
        name the solver and the layer's line there."""
        return None if isinstance(source, (str, Path)) else self.path

    def _where(self) -> str:
        return self.path or "<SolverParameter>"

    def _resolve(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() or self.root is None else self.root / path

    def _net_file(self, name: str) -> Path:
        candidates = [self._resolve(name)]
        if self.path is not None and not Path(name).is_absolute():
            candidates.append(Path(self.path).resolve().parent / name)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise CaffeFormatError(f"net file {name!r} not found (looked for "
                               f"{' and '.join(map(str, candidates))})", self.path)

    def _train_net_source(self):
        from ..proto import io

        for field in ("train_net_param", "net_param"):
            if self.param.HasField(field):
                return getattr(self.param, field), getattr(self.param, field)
        name = self.param.train_net if self.param.HasField("train_net") else self.param.net
        path = self._net_file(name)
        return path, io.read_prototxt(path, self._net_options["allow_unknown_fields"])

    def _test_net_sources(self):
        from ..proto import io

        sources = [(net, net) for net in self.param.test_net_param]
        for name in self.param.test_net:
            path = self._net_file(name)
            sources.append((path, io.read_prototxt(path,
                                                   self._net_options["allow_unknown_fields"])))
        generic = len(self.param.test_iter) - len(sources)
        if generic > 0 and self.param.HasField("net_param"):
            sources += [(self.param.net_param, self.param.net_param)] * generic
        elif generic > 0 and self.param.HasField("net"):
            path = self._net_file(self.param.net)
            net_param = io.read_prototxt(path, self._net_options["allow_unknown_fields"])
            sources += [(path, net_param)] * generic
        return sources

    def _snapshot_prefix(self) -> str:
        if self.param.snapshot_prefix:
            prefix = self._resolve(self.param.snapshot_prefix)
            if prefix.is_dir() and self.path is not None:
                prefix = prefix / Path(self.path).stem
            return str(prefix)
        if self.path is None:
            raise CaffeLayersError("the solver has no snapshot_prefix (and no file name to "
                                   "derive one from)")
        return str(Path(self.path).with_suffix(""))

    def _learned_net(self, name: str, state_file: Path) -> Path:
        candidates = [self._resolve(name), state_file.parent / Path(name).name]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise CaffeFormatError(f"its learned_net {name!r} is missing (looked for "
                               f"{' and '.join(map(str, candidates))})", state_file)

    def _learnable_blobs(self) -> List[_Learnable]:
        """Caffe's ``learnable_params``: every blob once, in net order. A blob that layers share
        by ParamSpec name (Net ties them) is learned by its first layer, with the ``lr_mult``
        and ``decay_mult`` that any of the sharing layers sets (they must agree)."""
        learnables: Dict[int, _Learnable] = {}
        explicit: Dict[Tuple[int, str], str] = {}
        for node in self.net.graph.nodes:
            specs = node.param.param
            for index, tensor in enumerate(node.module.caffe_blobs()):
                spec = specs[index] if index < len(specs) else None
                blob = learnables.setdefault(id(tensor), _Learnable(node.name, index, tensor,
                                                                    1.0, 1.0))
                for field in ("lr_mult", "decay_mult"):
                    if spec is None or not spec.HasField(field):
                        continue
                    value, key = getattr(spec, field), (id(tensor), field)
                    if key in explicit and getattr(blob, field) != value:
                        raise CaffeFormatError(
                            f"layer {node.name!r} shares parameter {spec.name!r} with layer "
                            f"{explicit[key]!r} but sets {field} {value:g} where that has "
                            f"{getattr(blob, field):g}", self._where())
                    explicit.setdefault(key, node.name)
                    setattr(blob, field, value)
        return list(learnables.values())

    def __repr__(self) -> str:
        return (f"Solver(type={self.param.type!r}, net={self.net.graph.name!r}, "
                f"iter={self.iter}, test_nets={len(self.test_nets)})")


# --- helpers --------------------------------------------------------------------------------

def _copy(message):
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


def _weight_list(weights) -> List[str]:
    if weights is None:
        return []
    if isinstance(weights, (str, Path)):
        return [part for part in str(weights).split(",") if part]
    return [str(w) for w in weights]


def _merged_state(phase: str, net_state, solver_state) -> Tuple[str, int, List[str]]:
    """Caffe's NetState precedence: the solver's phase, then the net's own ``state``, then
    ``train_state``/``test_state`` (scalars set later win, stages add up)."""
    from ..proto import caffe_pb2

    merged = caffe_pb2.NetState(phase=getattr(caffe_pb2, phase))
    merged.MergeFrom(net_state)
    if solver_state is not None:
        merged.MergeFrom(solver_state)
    return caffe_pb2.Phase.Name(merged.phase), merged.level, list(merged.stage)


def _share_trained_layers(source: Net, target: Net) -> None:
    """Give ``target`` the blobs of the layers it shares with ``source`` by name (Caffe's
    ``ShareTrainedLayersWith`` shares the memory; copying gives the same forward)."""
    targets = target.caffe_params()
    with torch.no_grad():
        for layer, blobs in source.caffe_params().items():
            if layer not in targets:
                continue
            if len(blobs) != len(targets[layer]):
                raise CaffeLayersError(f"layer {layer!r} has {len(blobs)} blobs in the train "
                                       f"net and {len(targets[layer])} in a test net")
            for index, (blob, other) in enumerate(zip(blobs, targets[layer])):
                if blob.shape != other.shape:
                    raise CaffeLayersError(
                        f"layer {layer!r} blob {index} has shape {tuple(blob.shape)} in the "
                        f"train net and {tuple(other.shape)} in a test net")
                other.copy_(blob)
