"""Margin softmax heads split by class over the processes of a ``torch.distributed`` group.

With N classes on P processes, rank r holds the weight rows of the classes
``[start_r, end_r)`` (:func:`shard_range`: Caffe's even split, the first ``N % P`` ranks one
row more), their gradient and so their solver history. One step:

1. every rank's ``M_r x K`` features and labels are all-gathered into ``M x K``
   (``M = sum_r M_r``; all ranks pass the same ``M_r``);
2. each rank computes its ``M x N_r`` logits, with the label margin on the rows whose label
   falls in its shard (:func:`~caffelayers.layers.margin_inner_product.margin_terms` or
   :func:`~caffelayers.layers.margin_head.label_margin`);
3. the softmax with loss runs across shards: ``max_j z_ij`` is all-reduced with MAX, then
   ``sum_j exp(z_ij - max)`` and the label logit with SUM, so that
   ``loss = -1/n sum_i [z_{i,y_i} - max_i - log sum_j exp(z_ij - max_i)]``;
4. the backward turns the same buffer into ``softmax - onehot`` in place and returns each
   shard's contribution to the gathered features' gradient, which is summed over the ranks
   (all-reduce) and sliced back to each rank's own rows.

No rank ever holds ``M x N`` logits: the largest temporary is the ``M x N_r`` buffer, so
the memory per rank falls as ``1/P``. The results equal :class:`MarginInnerProduct` (or
:class:`MarginHead`) followed by ``SoftmaxWithLoss`` on one process.

Class sampling (``sample_rate < 1``, as insightface's PartialFC): each step, each rank keeps
the classes of the labels in its shard plus random others, ``ceil(rate * N_r)`` rows in all
(or every positive when there are more), and computes logits, softmax and gradient on those
rows only; the other rows get a zero gradient. The label column is always kept, so every
margin works, A-Softmax's m = 2..4 included.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import CaffeLayersError, LabelError, ShapeError, UnsupportedParameterError
from ..losses.common import FLT_MIN, LOSS_MODES, NORMALIZATIONS, normalizer
from .base import as_labels
from .margin_head import MarginHead, _ScaledUnitRows, label_margin
from .margin_inner_product import (MarginInnerProduct, _normalized_logits,
                                   _product_with_unit_rows, _through_unit_rows_, margin_terms)

__all__ = ["ShardedLoss", "ShardedMarginHead", "ShardedMarginInnerProduct", "gather_shards",
           "shard_range", "take_shard"]



# -- the split -------------------------------------------------------------------------------

def shard_range(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, end)``: the classes rank ``rank`` of ``world`` holds. The first
    ``num_classes % world`` ranks hold one class more than the others."""
    if not 0 <= rank < world:
        raise UnsupportedParameterError(f"rank {rank} is not in [0, {world})")
    if num_classes < world:
        raise UnsupportedParameterError(f"{num_classes} classes cannot be split over {world} "
                                        "processes: every rank needs at least one")
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def take_shard(full_weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of an unsharded ``N x K`` weight (a copy): resuming a sharded run
    from an unsharded snapshot."""
    if full_weight.dim() != 2:
        raise ShapeError("take_shard", "sharded head", [tuple(full_weight.shape)],
                         "an N x K weight")
    start, end = shard_range(full_weight.shape[0], world, rank)
    return full_weight[start:end].clone()


def _group_size(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise CaffeLayersError("a sharded head needs torch.distributed: call "
                               "torch.distributed.init_process_group first (torchrun sets "
                               "RANK, WORLD_SIZE and MASTER_ADDR for it)")
    return dist.get_rank(group), dist.get_world_size(group)


def gather_shards(weight_shard: torch.Tensor, num_classes: int, group=None,
                  dst: int | None = None) -> torch.Tensor | None:
    """The full ``N x K`` weight from each rank's shard (a collective: every rank calls it).

    With ``dst`` None every rank gets the full weight (``all_gather``); with ``dst`` a rank
    of ``group``, that rank alone gets it and the others return None: each sends its rows
    straight into their place, so the full weight exists once, on ``dst`` (a snapshot on
    rank 0 holds no second copy, and the other ranks never hold more than their shard).
    """
    rank, world = _group_size(group)
    start, end = shard_range(num_classes, world, rank)
    if weight_shard.dim() != 2 or weight_shard.shape[0] != end - start:
        raise ShapeError("gather_shards", "sharded head", [tuple(weight_shard.shape)],
                         f"rank {rank}'s shard of {num_classes} classes: {end - start} rows")
    if dst is not None:
        if not 0 <= dst < world:
            raise UnsupportedParameterError(f"gather_shards: dst {dst} is not a rank of the "
                                            f"group of {world}")
        if rank != dst:
            dist.send(weight_shard.detach().contiguous(), _global_rank(group, dst),
                      group=group)
            return None
        full = weight_shard.new_empty((num_classes, weight_shard.shape[1]))
        for other in range(world):
            first, last = shard_range(num_classes, world, other)
            if other == rank:
                full[first:last] = weight_shard.detach()
            else:
                dist.recv(full[first:last], _global_rank(group, other), group=group)
        return full
    # all_gather wants equal sizes: pad every shard to the largest (rank 0's)
    rows = shard_range(num_classes, world, 0)[1]
    padded = weight_shard.new_zeros((rows, weight_shard.shape[1]))
    padded[:end - start] = weight_shard.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    sizes = [shard_range(num_classes, world, r) for r in range(world)]
    return torch.cat([part[:e - s] for part, (s, e) in zip(parts, sizes)])


def _global_rank(group, rank: int) -> int:
    """The global rank of ``group``'s rank ``rank`` (what send and recv address)."""
    return rank if group is None else dist.get_global_rank(group, rank)


# -- collectives with a gradient ---------------------------------------------------------------

class _GatherRows(torch.autograd.Function):
    """All ranks' ``M_r x K`` rows stacked in rank order; the backward sums the gradient
    over the ranks (each holds its shard's contribution) and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None


# -- the sharded softmax with loss -------------------------------------------------------------

class _Step(NamedTuple):
    """What one step of the sharded loss needs besides the features and the weight rows.

    ``columns``: per gathered row, the local column of its label, -1 where the label is
    another rank's. ``class_ids``: the global class of every local column (accuracy ties).
    ``margin``: m (int) or a ``cos -> (f, f', f - cos f')`` callable; 1 for none.
    ``keep``: the rows counted in the loss (None: all). ``norm``: the loss divisor.
    """
    columns: torch.Tensor
    labels: torch.Tensor
    class_ids: torch.Tensor
    margin: object
    lambda_: float
    exact: bool
    keep: torch.Tensor | None
    norm: float
    log_floor: float | None
    with_accuracy: bool
    group: object


class _ShardedMarginSoftmaxLoss(torch.autograd.Function):
    """Loss of the margin logits ``x W_r^T`` (label column replaced) under a softmax over all
    shards; returns ``(loss, hits)`` where hits counts the kept rows whose label ranks first
    (Caffe's Accuracy, ties to the higher class). ``exact`` False: the weight rows are
    already unit (Caffe normalized them in place) and the backward is Caffe's trick."""

    @staticmethod
    def forward(ctx, x, weight, step: _Step):
        if step.exact:
            # M x N_r; the unit rows exist a block at a time (as in MarginInnerProduct)
            logits, inverse_weight_norm = _normalized_logits(x, weight, in_place=False)
        else:
            logits, inverse_weight_norm = torch.mm(x, weight.t()), None
        rows = (step.columns >= 0).nonzero().squeeze(1)                  # labels held here
        cols = step.columns.index_select(0, rows)
        x_norm = torch.linalg.vector_norm(x, dim=1)
        nonzero = x_norm > 0
        has_margin = callable(step.margin) or step.margin > 1
        slope = radial = inverse_x_norm = None
        if has_margin:
            # a zero row gets cos = 0 (as MarginInnerProduct), hence a zero label logit
            inverse_x_norm = torch.where(nonzero, x_norm, torch.ones_like(x_norm))
            inverse_x_norm = inverse_x_norm.index_select(0, rows).reciprocal_()
            product = logits[rows, cols]
            cos = product * inverse_x_norm
            terms = step.margin(cos) if callable(step.margin) else margin_terms(cos,
                                                                                step.margin)
            psi, slope, radial = terms
            label_logit = ((x_norm.index_select(0, rows) * psi + step.lambda_ * product)
                           * (1.0 / (1.0 + step.lambda_)))
            logits[rows, cols] = label_logit
        # softmax across the shards: one MAX and two SUM all-reduces of M values each
        row_max = logits.amax(dim=1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=step.group)
        label_value = logits.new_zeros(logits.shape[0])
        label_value[rows] = logits[rows, cols]
        dist.all_reduce(label_value, group=step.group)
        if step.with_accuracy:
            ahead = _ranked_ahead(logits, label_value, step.labels, step.class_ids)
        logits.sub_(row_max.unsqueeze(1)).exp_()
        sums = logits.sum(dim=1)
        if step.with_accuracy:
            sums = torch.cat([sums, ahead.to(sums.dtype)])
        dist.all_reduce(sums, group=step.group)
        rows_total = logits.shape[0]
        exp_sum, ahead = sums[:rows_total], sums[rows_total:]
        picked = label_value - row_max - exp_sum.log()                  # log p(label)
        if step.log_floor is not None:
            picked.clamp_(min=step.log_floor)
        if step.keep is not None:
            picked.mul_(step.keep)
        loss = (0.0 - picked.sum()) / step.norm
        hits = logits.new_zeros(())
        if step.with_accuracy:
            hit = ahead < 1
            hits = (hit if step.keep is None else hit & step.keep.bool()).sum().to(x.dtype)
        ctx.mark_non_differentiable(hits)
        ctx.save_for_backward(x, weight, logits, exp_sum, rows, cols, slope, radial,
                              inverse_x_norm, nonzero, inverse_weight_norm)
        ctx.step, ctx.has_margin = step, has_margin
        return loss, hits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_hits):
        (x, weight, probs, exp_sum, rows, cols, slope, radial, inverse_x_norm, nonzero,
         inverse_weight_norm) = ctx.saved_tensors
        step = ctx.step
        # (softmax - onehot) * grad / norm, in the buffer of the exponentials
        row_weight = (grad_loss / step.norm).expand(probs.shape[0])
        if step.keep is not None:
            row_weight = row_weight * step.keep
        grad_logits = probs.div_(exp_sum.unsqueeze(1)).mul_(row_weight.unsqueeze(1))
        grad_logits[rows, cols] -= row_weight.index_select(0, rows)
        grad_x = grad_weight = None
        if ctx.has_margin:
            grad_label = grad_logits[rows, cols] * (1.0 / (1.0 + step.lambda_))
            rows_x = x.index_select(0, rows)
        if ctx.needs_input_grad[0]:
            grad_x = (torch.mm(grad_logits, weight) if inverse_weight_norm is None else
                      _product_with_unit_rows(grad_logits, weight, inverse_weight_norm))
            if ctx.has_margin:
                # d(label logit)/dx = (coef_w w_y + coef_x x + lambda w_y) / (1 + lambda);
                # the product above already added w_y once
                coef_w, coef_x = slope, radial * inverse_x_norm
                if not step.exact:
                    length = torch.hypot(coef_w, coef_x)         # Caffe's trick: unit length
                    coef_w, coef_x = coef_w / length, coef_x / length
                label_rows = weight.index_select(0, cols)                # unit w_y
                if inverse_weight_norm is not None:
                    label_rows.mul_(inverse_weight_norm.index_select(0, cols).unsqueeze(1))
                correction = label_rows.mul_((grad_label * (coef_w - 1)).unsqueeze(1))
                correction.addcmul_(rows_x, (grad_label * coef_x).unsqueeze(1))
                grad_x.index_add_(0, rows, correction)
                grad_x.mul_(nonzero.unsqueeze(1))
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_logits.t(), x)          # Caffe's: top_diff^T x
            if step.exact:
                if ctx.has_margin:
                    grad_weight.index_add_(0, cols,
                                           rows_x * (grad_label * (slope - 1)).unsqueeze(1))
                _through_unit_rows_(grad_weight, weight, inverse_weight_norm)
        return grad_x, grad_weight, None


def _ranked_ahead(logits, label_value, labels, class_ids):
    """Per row, the local classes Caffe's Accuracy ranks before the label: a higher score,
    or an equal one with a higher class index."""
    value = label_value.unsqueeze(1)
    ahead = (logits > value).sum(dim=1)
    ties = (logits == value) & (class_ids.unsqueeze(0) > labels.unsqueeze(1))
    return ahead + ties.sum(dim=1)


# -- the modules -----------------------------------------------------------------------------

class ShardedLoss(NamedTuple):
    """A sharded head's result: the loss (0-d, the same on every rank), the top-1 accuracy
    of the margin logits as Caffe's Accuracy (0-d, or None when not asked for; with class
    sampling, among the sampled classes) and the lambda used (A-Softmax's, else the fixed
    one)."""
    loss: torch.Tensor
    accuracy: torch.Tensor | None
    lambda_: float


class _ShardedHead(nn.Module):
    """What both sharded heads share: the shard, the gather, class sampling, the loss."""

    def __init__(self, in_features: int, num_classes: int, group, sample_rate: float,
                 normalization: str, ignore_label: int | None, loss_mode: str,
                 generator: torch.Generator | None) -> None:
        super().__init__()
        self.group = group
        self.rank, self.world = _group_size(group)
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.start, self.end = shard_range(self.num_classes, self.world, self.rank)
        if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise UnsupportedParameterError(f"sample_rate must lie in (0, 1], got "
                                            f"{sample_rate!r}")
        if loss_mode not in LOSS_MODES:
            raise UnsupportedParameterError(f"loss_mode must be one of {', '.join(LOSS_MODES)}"
                                            f", got {loss_mode!r}")
        if not isinstance(normalization, str) or normalization.upper() not in NORMALIZATIONS:
            raise UnsupportedParameterError(f"normalization must be one of "
                                            f"{', '.join(NORMALIZATIONS)}, got "
                                            f"{normalization!r}")
        self.sample_rate = float(sample_rate)
        self.normalization = normalization.upper()
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.loss_mode = loss_mode
        self.generator = generator
        self.weight = nn.Parameter(torch.empty(self.end - self.start, self.in_features))
        bound = math.sqrt(3.0 / self.in_features)    # Caffe's xavier, as the unsharded heads
        nn.init.uniform_(self.weight, -bound, bound)
        #: global class ids of the rows used by the last forward (all of them unsampled)
        self.last_classes: torch.Tensor | None = None

    def _gather(self, features: torch.Tensor, label: torch.Tensor):
        """The gathered ``M x K`` features and ``M`` labels, checked."""
        flat = features.reshape(-1, self.in_features) if features.dim() != 2 else features
        labels = as_labels(label).reshape(-1).to(self.weight.device)
        if flat.shape[1] != self.in_features or labels.numel() != flat.shape[0]:
            raise ShapeError(type(self).__name__, "sharded head",
                             [tuple(features.shape), tuple(label.shape)],
                             f"M x {self.in_features} features and M labels")
        counts = [torch.zeros(1, dtype=torch.long, device=flat.device)
                  for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor([flat.shape[0]], device=flat.device),
                        group=self.group)
        if any(int(c) != flat.shape[0] for c in counts):
            raise ShapeError(type(self).__name__, "sharded head",
                             [tuple(features.shape)], "the same number of rows on every "
                             f"rank, got {[int(c) for c in counts]}")
        gathered = _GatherRows.apply(flat, self.group, self.rank, self.world)
        all_labels = [torch.empty_like(labels) for _ in range(self.world)]
        dist.all_gather(all_labels, labels, group=self.group)
        labels = torch.cat(all_labels)
        bad = (labels < 0) | (labels >= self.num_classes)
        if self.ignore_label is not None:
            bad &= labels != self.ignore_label
        if bool(bad.any()):
            raise LabelError(f"{type(self).__name__}: labels must lie in [0, "
                             f"{self.num_classes}), got {labels[bad].unique().tolist()[:10]}")
        return gathered, labels

    def _sampled_rows(self, columns: torch.Tensor) -> torch.Tensor | None:
        """PartialFC's choice: every class labelled in this shard plus random others,
        ``ceil(rate * N_r)`` rows in all; sorted local indices, or None for all rows."""
        rows = self.end - self.start
        keep = math.ceil(self.sample_rate * rows)
        if self.sample_rate >= 1:
            return None
        positive = columns[columns >= 0].unique()
        device = "cpu" if self.generator is None else self.generator.device
        score = torch.rand(rows, generator=self.generator, device=device).to(columns.device)
        score[positive] = 2.0                                # positives sort first
        keep = max(keep, positive.numel())
        return torch.topk(score, keep).indices.sort().values

    def _loss(self, x: torch.Tensor, labels: torch.Tensor, margin, lambda_: float,
              exact: bool, with_accuracy: bool) -> ShardedLoss:
        """The sharded softmax loss of the gathered features ``x`` and labels."""
        here = (labels >= self.start) & (labels < self.end)
        columns = torch.where(here, labels - self.start, torch.full_like(labels, -1))
        chosen = self._sampled_rows(columns)
        if chosen is None:
            class_ids = torch.arange(self.start, self.end, device=labels.device)
        else:
            class_ids = chosen + self.start
            columns = torch.where(here, torch.searchsorted(chosen, columns.clamp(min=0)),
                                  columns)
        if not exact:
            # Caffe normalizes the stored weight in place on every forward (only the rows
            # used when sampling: the others keep what the solver gave them)
            with torch.no_grad():
                if chosen is None:
                    inverse_norm = torch.linalg.vector_norm(self.weight, dim=1).reciprocal_()
                    self.weight.mul_(inverse_norm.unsqueeze(1))
                else:
                    used = self.weight[chosen]
                    inverse_norm = torch.linalg.vector_norm(used, dim=1).reciprocal_()
                    self.weight[chosen] = used.mul_(inverse_norm.unsqueeze(1))
        weight = self.weight if chosen is None else self.weight.index_select(0, chosen)
        self.last_classes = class_ids
        keep = None
        valid = None
        if self.ignore_label is not None:
            keep = (labels != self.ignore_label).to(x.dtype)
            valid = keep.sum()
        norm = normalizer(self.normalization, labels.numel(), 1, valid,
                          self.ignore_label is not None)
        step = _Step(columns, labels, class_ids, margin, float(lambda_), exact, keep,
                     float(norm), math.log(FLT_MIN) if self.loss_mode == "caffe" else None,
                     with_accuracy, self.group)
        loss, hits = _ShardedMarginSoftmaxLoss.apply(x, weight, step)
        accuracy = None
        if with_accuracy:
            counted = labels.numel() if valid is None else valid
            accuracy = hits / counted
        return ShardedLoss(loss, accuracy, float(lambda_))


class ShardedMarginInnerProduct(_ShardedHead):
    r""":class:`MarginInnerProduct` followed by ``SoftmaxWithLoss``, split by class over the
    ranks of ``group`` (see the module docstring for the algorithm).

    .. math::
        \ell = -\frac{1}{n} \sum_i \log \frac{e^{z_{i y_i}}}{\sum_j e^{z_{ij}}},\qquad
        z_{ij} = x_i \cdot \hat w_j,\quad
        z_{i y_i} = \frac{|x_i|\,\psi(\cos\theta_i) + \lambda\, x_i \cdot \hat w_{y_i}}
                         {1 + \lambda}

    with :math:`\lambda` on MarginInnerProduct's schedule (:meth:`lambda_at`).

    Args:
        in_features: K.
        num_output: N, all classes (not this rank's share).
        margin_type, base, gamma, power, lambda_min, iteration, backward: as
            :class:`MarginInnerProduct` (``"caffe"``: in-place normalization and Caffe's
            trick gradient; ``"exact"``: the true derivative).
        group: the process group (None: the default one).
        sample_rate: the fraction of each shard's classes used per step (PartialFC); 1
            uses all of them.
        normalization, ignore_label, loss_mode: as ``SoftmaxWithLoss`` (``"valid"``;
            ``loss_mode`` is its ``mode``: ``"exact"`` or ``"caffe"``).
        generator: the random source of class sampling (per rank).

    Shape:
        - features: :math:`(M_r, K)` on every rank, the same :math:`M_r` everywhere.
        - label: :math:`M_r` class indices in ``[0, N)``.
        - output: :class:`ShardedLoss`, the loss over all :math:`P M_r` rows.

    Attributes:
        weight: this rank's ``(end - start) x K`` rows (:func:`take_shard`,
            :func:`gather_shards` convert from and to the full weight).
        iteration: t, advanced by every forward as MarginInnerProduct's.
        start, end: the classes held.

    Example (``torchrun --nproc_per_node 2 train.py``; torchrun sets the environment that
    ``init_process_group`` reads)::

        >>> dist.init_process_group("gloo")          # "nccl" on GPUs
        >>> head = ShardedMarginInnerProduct(512, 1_000_000, "QUADRUPLE", base=1000,
        ...                                  gamma=0.12, power=1, lambda_min=5)
        >>> head.weight.data = take_shard(full_weight, head.rank, head.world)
        >>> head(features, labels).loss.backward()   # features: this rank's M_r x 512
        >>> snapshot = gather_shards(head.weight, head.num_output)
    """

    lambda_at = MarginInnerProduct.lambda_at

    def __init__(self, in_features: int, num_output: int, margin_type="QUADRUPLE",
                 base: float = 1.0, gamma: float = 0.0, power: float = 1.0,
                 lambda_min: float = 0.0, iteration: int = 0, backward: str = "caffe",
                 group=None, sample_rate: float = 1.0, normalization: str = "valid",
                 ignore_label: int | None = None, loss_mode: str = "exact",
                 generator: torch.Generator | None = None) -> None:
        # the unsharded layer checks and canonicalizes the settings
        settings = MarginInnerProduct(in_features, 1, margin_type, base, gamma, power,
                                      lambda_min, iteration, backward=backward)
        super().__init__(in_features, num_output, group, sample_rate, normalization,
                         ignore_label, loss_mode, generator)
        self.num_output = self.num_classes
        self.margin = settings.margin
        self.base, self.gamma, self.power = settings.base, settings.gamma, settings.power
        self.lambda_min = settings.lambda_min
        self.backward = settings.backward
        self.register_buffer("iteration", torch.tensor(int(iteration), dtype=torch.long))

    def forward(self, features: torch.Tensor, label: torch.Tensor,
                with_accuracy: bool = False) -> ShardedLoss:
        x, labels = self._gather(features, label)
        with torch.no_grad():
            self.iteration += 1
        lambda_ = self.lambda_at(int(self.iteration), x.dtype)
        return self._loss(x, labels, self.margin, lambda_, self.backward == "exact",
                          with_accuracy)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_output={self.num_output}, "
                f"margin={self.margin}, backward={self.backward!r}, classes=[{self.start}, "
                f"{self.end}), sample_rate={self.sample_rate}")


class ShardedMarginHead(_ShardedHead):
    r""":class:`MarginHead` followed by ``SoftmaxWithLoss``, split by class over the ranks of
    ``group``: ``z_ij = s cos theta_ij``, ``z_{i y_i} = s f(cos theta_{i y_i})`` (a sphere
    head without ``s``: ``|x_i|`` instead of ``s``), always with the true gradient.

    Args:
        in_features, num_classes, kind, s, m, easy_margin, lambda\_: as :class:`MarginHead`.
        group, sample_rate, normalization, ignore_label, loss_mode, generator: as
            :class:`ShardedMarginInnerProduct`.

    Shape and attributes as :class:`ShardedMarginInnerProduct` (no iteration).
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "arc",
                 s: float | None = None, m=None, easy_margin: bool = False,
                 lambda_: float = 0.0, group=None, sample_rate: float = 1.0,
                 normalization: str = "valid", ignore_label: int | None = None,
                 loss_mode: str = "exact", generator: torch.Generator | None = None
                 ) -> None:
        settings = MarginHead(in_features, 1, kind, s, m, easy_margin, lambda_)
        super().__init__(in_features, num_classes, group, sample_rate, normalization,
                         ignore_label, loss_mode, generator)
        self.kind, self.s, self.m = settings.kind, settings.s, settings.m
        self.easy_margin, self.lambda_ = settings.easy_margin, settings.lambda_
        identity = {"sphere": 1, "cos": 0.0, "arc": 0.0, "combined": (1.0, 0.0, 0.0)}
        if self.m == identity[self.kind]:
            self._margin = 1            # no margin: the label column stays the plain logit
        elif self.kind == "sphere":
            self._margin = self.m
        else:
            self._margin = label_margin(self.kind, self.m, self.easy_margin)

    def forward(self, features: torch.Tensor, label: torch.Tensor,
                with_accuracy: bool = False) -> ShardedLoss:
        if self.s is not None:
            # normalizing before the gather: each rank scales only its own rows
            features = _ScaledUnitRows.apply(features.reshape(-1, self.in_features), self.s)
        x, labels = self._gather(features, label)
        return self._loss(x, labels, self._margin, self.lambda_, True, with_accuracy)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"kind={self.kind!r}, s={self.s!r}, m={self.m!r}, classes=[{self.start}, "
                f"{self.end}), sample_rate={self.sample_rate}")
