"""``caffelayers train --nproc P --shard-head``: the train net's margin head split by class.

The train net's one ``MarginInnerProduct`` (or ``MarginHead``) and the ``SoftmaxWithLoss``
reading its logits are fused into a
:class:`~caffelayers.layers.sharded_head.ShardedMarginInnerProduct` (or
``ShardedMarginHead``): rank r holds the weight rows of its classes ``[start_r, end_r)``
(:func:`~caffelayers.layers.sharded_head.shard_range`), their gradient and their solver
history, and no rank holds the ``M x N`` logits. The rest of the net (the trunk) stays
data-parallel under ``DistributedDataParallel``. The test nets are not sharded: their head
layer's weight is emptied after the split, and rank 0, which alone runs them, lends them the
gathered weight during a test.

What the nodes hold. The head node's first top no longer carries the ``M x N`` logits but
the fused result, a vector ``[loss]`` (``[loss, accuracy]`` when Accuracy layers read the
logits); the SoftmaxWithLoss node passes ``loss`` through (its ``loss_weight`` applies as
before) and each Accuracy node passes ``accuracy`` through. Both are over the global batch
of all ranks' ``P * M_r`` rows, the same value on every rank: the log shows the loss of the
whole batch, where an unsharded multi-process run logs rank 0's own ``M_r`` rows.

The gradient equals that of the unsharded ``--nproc P`` run. Unsharded, rank r's loss is
``L_r`` (its own rows) and DDP averages: the update follows ``(1/P) sum_r L_r``. The sharded
loss ``L`` normalizes by the global count, so ``L = (1/P) sum_r L_r`` for the ``FULL``,
``VALID`` and ``BATCH_SIZE`` normalizations (``NONE``: ``L = sum_r L_r``, so the fused loss
is ``L / P``). The head weight's gradient ``dL/dW_shard`` is then already the unsharded
run's averaged one and DDP must leave it alone (the shard is excluded from DDP, which would
otherwise broadcast rank 0's rows and average unlike shards). The features' gradient
``dL/dx_r = (1/P) dL_r/dx_r`` is scaled by P on its way into the trunk, whose parameter
gradients DDP then averages into ``(1/P) sum_r dL_r/dtheta``, the unsharded value. With an
``ignore_label`` and ``VALID`` the global batch is normalized by its global count of valid
labels, the true batch mean, where the unsharded run averages the ranks' own means: the
two agree when every rank has as many valid labels.

Snapshots, tests and resuming. Every rank holds its shard; before a test (``iter %
test_interval == 0``) and a snapshot (``iter % snapshot == 0``, the end of the run, a
signal) the ranks send their shards to rank 0, each straight into its rows (a collective, so
the ranks above 0 keep the test and snapshot intervals that :func:`caffelayers.train.train`
clears for them, and do nothing else): rank 0 tests with the full weight and writes the
standard caffemodel and ``.solverstate`` (history of the full weight) that an unsharded run
writes, which Caffe and the converters read, and drops the full weight again. Resuming
(``--snapshot``) and fine-tuning (``--weights``) load the full weights and history on every
rank first, and the nets are built with the full head (its filler draws what an unsharded
run draws); :meth:`ShardedHeadSolver.distribute` then keeps each rank's rows. So a sharded
run resumes from an unsharded run's snapshot and the other way round, and from the first
iteration on a rank above 0 holds ``1/P`` of the head, its gradient and its history.

Class sampling (``--shard-sample-rate``): each step each rank uses the classes of its shard
that the global batch's labels name plus random others, ``ceil(rate * N_r)`` rows (see
:mod:`caffelayers.layers.sharded_head`); the other rows get a zero gradient, so the solver
still applies weight decay and momentum to them (the solver steps the whole shard, as
Caffe steps every blob). Rank r's sampling generator is seeded with the run's seed plus r;
it is not in the ``.solverstate`` (as Caffe's data order is not), so a resumed run samples
anew.

Clipping (``clip_gradients``) takes the global L2 norm over the trunk's averaged gradients
(equal on every rank) and every rank's shard (their squares summed over the ranks).

Limits: rank 0 holds the full weight (and, for a snapshot, its history) while it tests
and snapshots, and every rank holds the full head while the nets are built, before the
split; the graph's shapes of the replaced tops are those of the fused values (``(1,)`` or
``(2,)`` and ``()``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .errors import CaffeLayersError
from .layers.sharded_head import (
    ShardedMarginHead,
    ShardedMarginInnerProduct,
    gather_shards,
    take_shard,
)
from .train import _DistributedSolver

__all__ = ["ShardedHeadSolver", "find_sharded_head", "sharded_solver_class"]

logger = logging.getLogger(__name__)

#: the layer types whose weight can be split by class
HEAD_TYPES = ("MarginInnerProduct", "MarginHead")


# -- the net's head ----------------------------------------------------------------------------

@dataclass
class HeadPlan:
    """The train net's nodes that sharding replaces: the margin head, the SoftmaxWithLoss
    reading its logits, and the Accuracy layers reading them too."""

    head: object
    loss: object
    accuracies: list[object] = field(default_factory=list)


def _where(net) -> str:
    return str(net.source_file) if net.source_file is not None else f"net {net.graph.name!r}"


def _last_axis(axis: int, shape) -> bool:
    return shape is not None and axis % len(shape) == len(shape) - 1


def find_sharded_head(net) -> HeadPlan:
    """The head of a train net that ``--shard-head`` can split, checked: exactly one
    MarginInnerProduct or MarginHead with a label bottom, whose logits feed exactly one
    SoftmaxWithLoss (on the same label, softmax over the classes, one top) and otherwise
    only Accuracy layers with ``top_k`` 1 and the loss's ``ignore_label``. Anything else is
    a :class:`CaffeLayersError` naming the prototxt and the layers."""
    where = _where(net)
    nodes = net.graph.nodes
    heads = [node for node in nodes if node.type in HEAD_TYPES]
    if len(heads) != 1:
        found = ", ".join(f"{n.name!r} ({n.type})" for n in heads) or "none"
        raise CaffeLayersError(f"{where}: --shard-head splits the train net's margin head by "
                               "class and needs exactly one MarginInnerProduct or MarginHead "
                               f"layer in it; found {found}")
    head = heads[0]
    if len(head.bottoms) != 2:
        raise CaffeLayersError(f"{where}: layer {head.name!r} ({head.type}) needs a label "
                               "bottom for --shard-head (the softmax is computed with it)")
    logits, label = head.tops[0], head.bottoms[1]
    readers = [node for node in nodes if logits in node.bottoms and node is not head]
    losses = [node for node in readers if node.type == "SoftmaxWithLoss"]
    accuracies = [node for node in readers if node.type == "Accuracy"]
    others = [node for node in readers if node not in losses and node not in accuracies]
    if len(losses) != 1 or others:
        found = ", ".join(f"{n.name!r} ({n.type})" for n in readers) or "no layer"
        raise CaffeLayersError(
            f"{where}: --shard-head fuses layer {head.name!r} ({head.type}) with the "
            f"SoftmaxWithLoss reading its top {logits!r}, so that top must feed exactly one "
            f"SoftmaxWithLoss (and otherwise only Accuracy layers); it feeds {found}")
    loss = losses[0]
    module, shape = loss.module, head.top_shapes[0]
    problems = []
    if loss.bottoms != [logits, label]:
        problems.append(f"its bottoms must be {logits!r} and the head's label {label!r}, got "
                        f"{', '.join(map(repr, loss.bottoms))}")
    if len(loss.tops) != 1:
        problems.append("it must have one top (the probabilities are never formed)")
    if not _last_axis(module.axis, shape):
        problems.append(f"its softmax axis {module.axis} must be the class axis (the last "
                        f"of {tuple(shape)})")
    if loss.param.propagate_down and not loss.param.propagate_down[0]:
        problems.append("propagate_down: false on the logits would leave the head untrained")
    if problems:
        raise CaffeLayersError(f"{where}: layer {loss.name!r} (SoftmaxWithLoss) cannot be "
                               f"fused with {head.name!r} for --shard-head: "
                               + "; ".join(problems))
    for node in accuracies:
        accuracy = node.module
        if (accuracy.top_k != 1 or len(node.tops) != 1 or node.bottoms[1] != label
                or accuracy.ignore_label != module.ignore_label
                or not _last_axis(accuracy.axis, shape)):
            raise CaffeLayersError(
                f"{where}: layer {node.name!r} (Accuracy) reads {logits!r}, which --shard-head "
                "computes in shards; it is supported as the sharded head's accuracy: top_k 1, "
                f"one top, the label {label!r}, the class axis and the loss's ignore_label "
                f"({module.ignore_label})")
    weight = head.module.caffe_blobs()[0]
    sharing = [node.name for node in nodes if node is not head
               and any(blob is weight for blob in node.module.caffe_blobs())]
    if sharing:
        raise CaffeLayersError(f"{where}: layer {head.name!r} shares its weight with "
                               f"{', '.join(map(repr, sharing))}; --shard-head cannot split a "
                               "shared weight")
    return HeadPlan(head, loss, accuracies)


# -- the replacement modules -------------------------------------------------------------------

class _ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _ShardedLayer:
    """What a sharded head needs to stand in a Net's node: the node's tops and Caffe's blob.

    ``forward(features, label)`` returns the fused vector ``[loss]`` or ``[loss, accuracy]``
    (and lambda, shape ``(1,)``, when the node has that top); the features' gradient is
    multiplied by ``feature_grad_scale`` and the loss by ``loss_scale`` (see the module
    docstring). ``caffe_blobs()`` is this rank's shard, or the gathered full weight while
    ``full_weight`` is set (tests and snapshots).
    """

    full_weight: torch.Tensor | None = None

    def as_layer(self, node, with_accuracy: bool, loss_scale: float,
                 feature_grad_scale: float) -> None:
        self.layer_name, self.caffe_type = node.name, node.type
        self.lambda_top = len(node.tops) == 2
        self.with_accuracy = with_accuracy
        self.loss_scale, self.feature_grad_scale = loss_scale, feature_grad_scale

    def caffe_blobs(self) -> list[torch.Tensor]:
        return [self.weight if self.full_weight is None else self.full_weight]

    def output_shapes(self, bottom_shapes) -> list:
        fused = (2 if self.with_accuracy else 1,)
        return [fused, (1,)] if self.lambda_top else [fused]

    def forward(self, features: torch.Tensor, label: torch.Tensor):
        if features.requires_grad:
            features = _ScaleGradient.apply(features, self.feature_grad_scale)
        result = super().forward(features, label, with_accuracy=self.with_accuracy)
        loss = result.loss * self.loss_scale if self.loss_scale != 1 else result.loss
        fused = loss.reshape(1)
        if self.with_accuracy:
            fused = torch.cat([fused, result.accuracy.detach().to(loss.dtype).reshape(1)])
        if self.lambda_top:
            return fused, fused.new_full((1,), result.lambda_).detach()
        return fused


class _ShardedMarginInnerProductLayer(_ShardedLayer, ShardedMarginInnerProduct):
    """:class:`ShardedMarginInnerProduct` as a train net's MarginInnerProduct node."""


class _ShardedMarginHeadLayer(_ShardedLayer, ShardedMarginHead):
    """:class:`ShardedMarginHead` as a train net's MarginHead node."""


class _FusedPart(nn.Module):
    """A SoftmaxWithLoss (``index`` 0) or Accuracy (``index`` 1) node whose value the fused
    head computed: element ``index`` of the head's top (Accuracy's without a gradient)."""

    def __init__(self, node, index: int) -> None:
        super().__init__()
        self.layer_name, self.caffe_type, self.index = node.name, node.type, index

    def caffe_blobs(self) -> list[torch.Tensor]:
        return []

    def output_shapes(self, bottom_shapes) -> list:
        return [()]

    def forward(self, fused: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        value = fused[self.index]
        return value if self.index == 0 else value.detach()

    def extra_repr(self) -> str:
        return f"{'loss' if self.index == 0 else 'accuracy'} of the sharded head"


def _sharded_module(plan: HeadPlan, group, world: int, sample_rate: float,
                    generator: torch.Generator | None) -> nn.Module:
    """The sharded head standing for ``plan``'s head and loss, with this rank's rows."""
    old, loss = plan.head.module, plan.loss.module
    settings = {"group": group, "normalization": loss.normalization,
                "ignore_label": loss.ignore_label, "loss_mode": loss.mode,
                "sample_rate": sample_rate, "generator": generator}
    # its own filler draws from the global generator: leave that to Dropout and the rest
    with torch.random.fork_rng(devices=[]):
        if plan.head.type == "MarginInnerProduct":
            new = _ShardedMarginInnerProductLayer(
                old.in_features, old.num_output, old.margin, old.base, old.gamma, old.power,
                old.lambda_min, int(old.iteration), old.backward, **settings)
        else:
            new = _ShardedMarginHeadLayer(old.in_features, old.num_classes, old.kind, old.s,
                                          old.m, old.easy_margin, old.lambda_, **settings)
    loss_scale = 1.0 / world if loss.normalization.upper() == "NONE" else 1.0
    new.as_layer(plan.head, bool(plan.accuracies), loss_scale, float(world))
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(take_shard(old.weight.detach(), new.rank, world))
    return new


def _replace(net, node, module: nn.Module) -> None:
    """Put ``module`` in ``node``'s place in the Net (graph node and submodule)."""
    key = next(key for key, value in net.layers.items() if value is node.module)
    net.layers[key] = module
    node.module = module
    node.top_shapes = list(module.output_shapes(node.bottom_shapes))
    net.graph.blob_shapes.update(zip(node.tops, node.top_shapes))


# -- the solver --------------------------------------------------------------------------------

def sharded_solver_class(world: int):
    """The solver class of ``train(shard_head=True)`` for a group of ``world`` processes."""
    if world < 2:
        raise CaffeLayersError("--shard-head splits the margin head's classes over the "
                               "processes: it needs --nproc 2 or more (or a torchrun group "
                               f"of 2 or more), got {world} process")
    return ShardedHeadSolver


class ShardedHeadSolver(_DistributedSolver):
    """A data-parallel solver whose train net's margin head is split by class over the
    ranks (see the module docstring). Built as :class:`~caffelayers.Solver` with full
    weights; :meth:`restore` before :meth:`distribute`, which shards the head.

    Args:
        sample_rate: the fraction of each shard's classes used per step (PartialFC's
            class sampling; 1 uses every class).
        sample_seed: seeds rank r's sampling generator with ``sample_seed + r`` (None: the
            sampling draws from the global generator).
        (the rest: as :class:`~caffelayers.Solver`)

    Attributes:
        plan: the replaced nodes (:func:`find_sharded_head`, checked at construction).
        head: the sharded module after :meth:`distribute` (None before).
    """

    #: every rank calls :meth:`snapshot` (it gathers the shards; rank 0 alone writes).
    every_rank_snapshots = True
    head = None

    def __init__(self, *args, sample_rate: float = 1.0, sample_seed: int | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plan = find_sharded_head(self.net)
        self.sample_rate, self.sample_seed = sample_rate, sample_seed
        param = self.param
        # train() clears these on ranks above 0; they still take part in the gathers
        self._intervals = (param.test_interval, param.snapshot, param.snapshot_after_train)

    def distribute(self, device_ids: list[int] | None) -> None:
        from torch.nn.parallel import DistributedDataParallel

        param = self.param
        param.test_interval, param.snapshot, param.snapshot_after_train = self._intervals
        world = dist.get_world_size()
        old_weight = self.plan.head.module.caffe_blobs()[0]
        index = next(i for i, blob in enumerate(self.learnables) if blob.tensor is old_weight)
        count = len(self.learnables)
        # a group of its own: the head's collectives never interleave with DDP's buckets
        generator = None
        if self.sample_rate < 1 and self.sample_seed is not None:
            generator = torch.Generator(old_weight.device)
            generator.manual_seed(self.sample_seed + dist.get_rank())
        self.head = _sharded_module(self.plan, dist.new_group(), world, self.sample_rate,
                                    generator)
        _replace(self.net, self.plan.head, self.head)
        _replace(self.net, self.plan.loss, _FusedPart(self.plan.loss, 0))
        for node in self.plan.accuracies:
            _replace(self.net, node, _FusedPart(node, 1))
        self._history_slots = [index + slot * count for slot in range(self.rule.history_slots)]
        for slot in self._history_slots:
            self.history[slot] = take_shard(self.history[slot], self.head.rank, world)
        self.learnables = self._learnable_blobs()
        self._head_index = index
        mine = {id(value) for value in [*self.head.parameters(), *self.head.buffers()]}
        names = [name for name, value in [*self.net.named_parameters(),
                                          *self.net.named_buffers()] if id(value) in mine]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.net, names)
        self._test_heads = self._test_head_weights(old_weight.shape)
        self._empty_test_heads()
        super().distribute(device_ids)
        if self.head.rank == 0:
            sampled = (f", {self.sample_rate:g} of each shard's classes sampled per step"
                       if self.sample_rate < 1 else "")
            logger.info("Layer %r (%s): %d classes split over %d processes, rank 0 holds "
                        "[%d, %d)%s", self.plan.head.name, self.plan.head.type,
                        self.head.num_classes, world, self.head.start, self.head.end, sampled)

    def _test_head_weights(self, shape) -> list[torch.Tensor]:
        """The head's weight in the test nets (the layers of its name and shape)."""
        blobs = [node.module.caffe_blobs() for net in self.test_nets
                 for node in net.graph.nodes
                 if node.name == self.plan.head.name and node.module is not None]
        return [found[0] for found in blobs if found and tuple(found[0].shape) == tuple(shape)]

    def _empty_test_heads(self) -> None:
        """Between tests the test nets' head holds nothing: rank 0 lends it the gathered
        weight while it tests, the other ranks never test. So no rank keeps a full copy."""
        for weight in self._test_heads:
            weight.data = weight.new_empty((0, weight.shape[1]))

    # -- the full weight, gathered -------------------------------------------------------------
    @contextlib.contextmanager
    def _gathered(self, history: bool):
        """While the block runs, on rank 0, the head's blob and the test nets' head are the
        full weight (and, with ``history``, :attr:`history` holds the full rows); the other
        ranks send their shards (a collective, on every rank) and keep them."""
        head = self.head
        saved = list(self.history)
        head.full_weight = gather_shards(head.weight, head.num_classes, head.group, dst=0)
        try:
            if history:
                for slot in self._history_slots:
                    gathered = gather_shards(saved[slot], head.num_classes, head.group, dst=0)
                    if gathered is not None:
                        self.history[slot] = gathered
            if head.full_weight is not None:
                for weight in self._test_heads:
                    weight.data = head.full_weight
            yield
        finally:
            self._empty_test_heads()
            head.full_weight = None
            self.history[:] = saved

    def test_all(self):
        """Every rank gathers the head; rank 0 runs the test nets with it."""
        if self.head is None:
            return super().test_all()
        with self._gathered(history=False):
            if self.head.rank != 0:
                return self.mean_scores
            return super().test_all()

    def snapshot(self):
        """Every rank gathers the head and its history; rank 0 writes the unsharded run's
        files and returns their paths, the other ranks return None."""
        if self.head is None:
            return super().snapshot()
        with self._gathered(history=True):
            if self.head.rank != 0:
                return None
            return super().snapshot()

    def restore(self, state_file) -> None:
        if self.head is not None:
            raise CaffeLayersError("a sharded solver restores its state before distribute() "
                                   "splits the head (every rank reads the full state)")
        super().restore(state_file)

    def _squared_norm(self, diffs: Sequence[torch.Tensor]) -> float:
        """For Caffe's ``ClipGradients`` over the whole net: the shards' squares summed over
        the ranks, the trunk's (already averaged, equal everywhere) counted once."""
        if self.head is None:
            return super()._squared_norm(diffs)
        squares = self._squares(diffs)
        shard = torch.tensor([squares.pop(self._head_index)], dtype=torch.float64,
                             device=diffs[self._head_index].device)
        dist.all_reduce(shard, group=self.head.group)
        return sum(squares) + float(shard)
