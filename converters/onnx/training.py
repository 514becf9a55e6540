"""Emitters for TRAIN nets: SphereFace's MarginInnerProduct, the softmax and infogain losses,
EuclideanLoss, SigmoidCrossEntropyLoss, MultinomialLogisticLoss, HingeLoss, ContrastiveLoss
and Accuracy, as subgraphs of standard ops.

Their forward values are Caffe's (the Net's ``loss_mode="caffe"``, its default): the same
log floors (``FLT_MIN`` for SoftmaxWithLoss, 1e-20 for the infogain losses and
MultinomialLogisticLoss), normalization modes and ``ignore_label``. A loss top is a 0-d
tensor, not scaled by ``loss_weight`` (Caffe records the unscaled value in the top too).

Graph inputs:
    * Labels (ContrastiveLoss's similarity too, and an infogain ``H`` given as a third
      bottom) are the graph inputs of their Caffe blobs, by the blob's name, float as Caffe
      stores them; they are truncated to integers inside the graph (Caffe's
      ``static_cast<int>``).
    * Each MarginInnerProduct layer ``L`` with a margin (or a lambda top) adds the graph
      input ``L/lambda``, shape ``[1]``. It is also an initializer, so it has a default and
      feeding it is optional: the lambda the layer would use on its *next* forward,
      ``lambda_at(iteration + 1)``, with ``iteration`` the layer's count when converted (the
      prototxt's ``iteration`` for a fresh net, hence Caffe's first forward). To replay
      forward ``f`` (0-based) after conversion, feed ``lambda_at(iteration + f + 1)``:
      :func:`lambda_feed` computes it.

The exported MarginInnerProduct weight is the normalized one (unit rows), as Caffe's
forward leaves the stored weight. What ONNX cannot do here: advance the iteration count
itself (a graph has no state), and backward (an ONNX model is a forward).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from onnx import TensorProto

from ...losses.infogain import FLT_MIN, INFOGAIN_LOG_FLOOR
from ...losses.simple import LOG_THRESHOLD
from ...registry import register_emitter

Shape = Tuple[int, ...]


# -- shared pieces --------------------------------------------------------------------------

def lambda_input_name(layer: str) -> str:
    """The graph input holding MarginInnerProduct layer ``layer``'s lambda."""
    return f"{layer}/lambda"


def lambda_feed(net, forwards: int = 0) -> Dict[str, np.ndarray]:
    """``{lambda input: value}`` replaying forward number ``forwards`` (0-based) of a net
    converted in its current state: every MarginInnerProduct's ``lambda_at(iteration +
    forwards + 1)`` as a float32 ``[1]`` array (only layers whose model takes lambda)."""
    feed = {}
    for node in getattr(net, "graph", net).nodes:
        module = node.module
        if node.type == "MarginInnerProduct" and _takes_lambda(module):
            value = module.lambda_at(int(module.iteration) + forwards + 1, torch.float32)
            feed[lambda_input_name(node.name)] = np.array([value], np.float32)
    return feed


def _takes_lambda(module) -> bool:
    return module.margin > 1 or module.lambda_top


def _scalar(ctx, value: float, hint: str) -> str:
    """A 0-d float32 constant (0-d keeps a loss top 0-d through broadcasting)."""
    return ctx.const(np.float32(value), hint)


def _int_labels(ctx, label: str) -> str:
    """Float labels as int64, truncated toward zero as Caffe's ``static_cast<int>``."""
    return ctx.op("Cast", [label], to=TensorProto.INT64)


def _probe_bottom(ctx, node) -> Shape:
    """Bottom 0's shape at the probe batch size: the axes that differ follow the batch."""
    return tuple(ctx.probe_shapes(node)[0][0])


def _count(ctx, value: str, static: int, dynamic: bool, rows_only: bool = False,
           floor: bool = True) -> str:
    """A float32 0-d divisor: ``value``'s element count (or its axis 0 with ``rows_only``),
    a constant unless it follows the batch; floored at 1 as Caffe's ``get_normalizer``."""
    if not dynamic:
        return _scalar(ctx, max(1, static) if floor else static, "count")
    if rows_only:
        shape = ctx.op("Shape", [value])
        size = ctx.op("Gather", [shape, ctx.const(np.int64(0), "axis0", np.int64)], axis=0)
    else:
        size = ctx.op("Size", [value])
    size = ctx.op("Cast", [size], to=TensorProto.FLOAT)
    return ctx.op("Max", [size, _scalar(ctx, 1.0, "one")]) if floor else size


def _loss(ctx, total: str, divisor: str, top: str) -> None:
    """``(0 - total) / divisor``: +0 rather than -0 when nothing counts, as the Net."""
    ctx.op("Div", [ctx.op("Sub", [_scalar(ctx, 0.0, "zero"), total]), divisor], top)


def _sum_all(ctx, value: str) -> str:
    """The sum of every element, 0-d."""
    return ctx.op("ReduceSum", [value], keepdims=0)


def _positions(ctx, node, axis: int) -> Tuple[str, str, Shape, Shape]:
    """Scores as ``(outer, C, inner)`` around the class axis, int64 labels as
    ``(outer, 1, inner)``, and ``(outer, C, inner)`` at the build and the probe batch."""
    x, label = ctx.bottoms(node)[:2]
    build, probe = ((math.prod(s[:axis]), s[axis], math.prod(s[axis + 1:]))
                    for s in (tuple(node.bottom_shapes[0]), _probe_bottom(ctx, node)))
    scores = ctx.reshape(x, build, probe)
    labels = ctx.reshape(_int_labels(ctx, label), (build[0], 1, build[2]),
                         (probe[0], 1, probe[2]))
    return scores, labels, build, probe


def _ignore(ctx, labels: str, ignore_label: Optional[int]):
    """``(labels with ignored positions moved to class 0, float mask of kept ones)``; the
    mask is None when no label is ignored."""
    if ignore_label is None:
        return labels, None
    keep = ctx.op("Not", [ctx.op("Equal", [labels, ctx.const(np.int64(ignore_label),
                                                               "ignore_label", np.int64)])])
    safe = ctx.op("Where", [keep, labels, ctx.const(np.int64(0), "class0", np.int64)])
    return safe, ctx.op("Cast", [keep], to=TensorProto.FLOAT)


# -- MarginInnerProduct ---------------------------------------------------------------------

def margin_psi(ctx, cos: str, margin: int) -> str:
    """``psi(cos) = (-1)^k cos(m theta) - 2k`` as Chebyshev polynomials, ``k`` and the sign
    from ``Sign`` tests on ``cos`` (0 at 0), as Caffe derives them (no ``acos``)."""
    def c(value, hint):
        return _scalar(ctx, value, hint)

    def mul(*values):
        out = values[0]
        for value in values[1:]:
            out = ctx.op("Mul", [out, value])
        return out

    def add(a, b):
        return ctx.op("Add", [a, b])

    sign_0 = ctx.op("Sign", [cos])
    cos_2 = mul(cos, cos)
    if margin == 2:
        return add(mul(c(2.0, "two"), sign_0, cos_2), c(-1.0, "minus_one"))
    if margin == 3:
        cos_3 = mul(cos_2, cos)
        # -1 inside (pi/3, 2pi/3); -2k = sign_0 (1 + sign_1) - 2
        sign_1 = ctx.op("Sign", [add(ctx.op("Abs", [cos]), c(-0.5, "minus_half"))])
        sign_2 = add(mul(sign_0, add(sign_1, c(1.0, "one"))), c(-2.0, "minus_two"))
        cheb = ctx.op("Sub", [mul(c(4.0, "four"), cos_3), mul(c(3.0, "three"), cos)])
        return add(mul(sign_1, cheb), sign_2)
    # m = 4: (-1)^k = sign_0 sign(2 cos^2 - 1); -2k = 2 sign_0 + (-1)^k - 3
    cos_4 = mul(cos_2, cos_2)
    sign_3 = mul(sign_0, ctx.op("Sign", [add(mul(c(2.0, "two"), cos_2), c(-1.0, "minus_one"))]))
    sign_4 = add(add(mul(c(2.0, "two"), sign_0), sign_3), c(-3.0, "minus_three"))
    cheb = add(ctx.op("Sub", [mul(c(8.0, "eight"), cos_4), mul(c(8.0, "eight"), cos_2)]),
               c(1.0, "one"))
    return add(mul(sign_3, cheb), sign_4)


@register_emitter("MarginInnerProduct")
def emit_margin_inner_product(ctx, node) -> None:
    """A-Softmax logits: ``Gemm`` with the unit-row weight, then the label column replaced
    by ``(|x| psi(cos) + lambda x . w_y) / (1 + lambda)`` (``GatherElements``, per-row
    arithmetic, ``ScatterElements``). Lambda is the graph input ``<layer>/lambda`` (see the
    module docstring); the lambda top is that value. A zero input row gets ``cos = 0``, so
    zero logits, as the PyTorch module (Caffe gives NaN).
    """
    module = node.module
    x, label = ctx.bottoms(node)
    tops = ctx.tops(node)
    shape = tuple(node.bottom_shapes[0])
    axis = module.axis % len(shape)

    weight = module.weight.detach()
    unit = weight * torch.linalg.vector_norm(weight, dim=1, keepdim=True).reciprocal()
    flat = ctx.op("Flatten", [x], axis=axis) if (len(shape), axis) != (2, 1) else x
    logits = ctx.op("Gemm", [flat, ctx.param(node, 0, unit.cpu().numpy())], transB=1)

    lambda_ = None
    if _takes_lambda(module):
        value = module.lambda_at(int(module.iteration) + 1, torch.float32)
        lambda_ = ctx.initializer(lambda_input_name(node.name), np.array([value], np.float32))
        ctx.add_input(lambda_, (1,), batched=False)
    if module.margin > 1:
        labels = ctx.op("Reshape", [_int_labels(ctx, label), ctx.ints([-1, 1], "column")])
        product = ctx.op("GatherElements", [logits, labels], axis=1)         # x . w_y
        x_norm = ctx.reduce("ReduceL2", flat, [1], keepdims=True)
        nonzero = ctx.op("Greater", [x_norm, _scalar(ctx, 0.0, "zero")])
        safe_norm = ctx.op("Where", [nonzero, x_norm, _scalar(ctx, 1.0, "one")])
        cos = ctx.op("Div", [product, safe_norm])
        psi = margin_psi(ctx, cos, module.margin)
        mixed = ctx.op("Add", [ctx.op("Mul", [x_norm, psi]), ctx.op("Mul", [lambda_, product])])
        scale = ctx.op("Reciprocal", [ctx.op("Add", [lambda_, _scalar(ctx, 1.0, "one")])])
        label_logit = ctx.op("Mul", [mixed, scale])
        logits = ctx.op("ScatterElements", [logits, labels, label_logit], axis=1)
    top_shape = tuple(node.top_shapes[0])
    if len(top_shape) == 2:
        ctx.op("Identity", [logits], tops[0])
    else:
        ctx.reshape(logits, top_shape, ctx.probe_shapes(node)[1][0], tops[0])
    if len(tops) > 1:
        ctx.op("Identity", [lambda_], tops[1])


# -- softmax losses -------------------------------------------------------------------------

def _softmax_loss(ctx, node, H: Optional[str], floor: float) -> None:
    """SoftmaxWithLoss (``H`` None) and InfogainLoss: log-softmax over the class axis, the
    label's entry (or ``H``'s label row against every class) summed over kept positions,
    over Caffe's normalizer; the probability top is ``Softmax``. ``floor`` is Caffe's
    probability floor, applied in the layer's ``"caffe"`` mode."""
    module = node.module
    tops = ctx.tops(node)
    shape = tuple(node.bottom_shapes[0])
    axis = module.axis % len(shape)
    scores, labels, (outer, classes, inner), probe = _positions(ctx, node, axis)
    labels, keep = _ignore(ctx, labels, module.ignore_label)
    log_prob = ctx.op("LogSoftmax", [scores], axis=1)
    if module.mode == "caffe":  # log(max(p, floor)) = max(log p, log floor)
        log_prob = ctx.op("Max", [log_prob, _scalar(ctx, math.log(floor), "log_floor")])
    if H is None:
        terms = ctx.op("GatherElements", [log_prob, labels], axis=1)
    else:
        square = ctx.op("Reshape", [H, ctx.ints([classes, classes], "H_shape")])
        rows = ctx.op("Gather", [square, ctx.op("Squeeze", [labels, ctx.ints([1], "axis1")])],
                      axis=0)                                        # (outer, inner, C)
        terms = ctx.op("Mul", [ctx.op("Transpose", [rows], perm=[0, 2, 1]), log_prob])
    if keep is not None:
        terms = ctx.op("Mul", [terms, keep])
    total = _sum_all(ctx, terms)

    mode = module.normalization
    if mode == "valid" and keep is not None:
        divisor = ctx.op("Max", [_sum_all(ctx, keep), _scalar(ctx, 1.0, "one")])
    elif mode in ("valid", "full"):
        dynamic = outer * inner != probe[0] * probe[2]
        divisor = _count(ctx, labels, outer * inner, dynamic)
    elif mode == "batch_size":
        divisor = _count(ctx, labels, outer, outer != probe[0], rows_only=True)
    else:
        divisor = _scalar(ctx, 1.0, "one")
    _loss(ctx, total, divisor, tops[0])
    if len(tops) > 1:
        ctx.op("Softmax", [ctx.bottoms(node)[0]], tops[1], axis=axis)


@register_emitter("SoftmaxWithLoss")
def emit_softmax_with_loss(ctx, node) -> None:
    """``-sum log softmax(x)[label] / normalizer`` (see :func:`_softmax_loss`)."""
    _softmax_loss(ctx, node, None, FLT_MIN)


@register_emitter("InfogainLoss")
def emit_infogain_loss(ctx, node) -> None:
    """``-sum_l H[label, l] log softmax(x)_l / normalizer``; ``H`` is the third bottom, or
    the layer's stored matrix (from ``infogain_loss_param.source``) as the initializer
    ``<layer>/H``."""
    bottoms = ctx.bottoms(node)
    H = bottoms[2] if len(bottoms) > 2 else _stored_H(ctx, node)
    _softmax_loss(ctx, node, H, INFOGAIN_LOG_FLOOR)


def _stored_H(ctx, node) -> str:
    return ctx.const(node.module.infogain.detach().cpu().numpy(), "H")


@register_emitter("InfogainLossLegacy")
def emit_infogain_loss_legacy(ctx, node) -> None:
    """Pre-2017 InfogainLoss on probabilities:
    ``-sum_j H[label, j] log max(p_j, 1e-20) / N`` with ``p`` flattened to ``N x C``."""
    bottoms, (top,) = ctx.bottoms(node), ctx.tops(node)
    prob, label = bottoms[:2]
    shape = tuple(node.bottom_shapes[0])
    num = shape[0] if shape else 1
    classes = math.prod(shape) // max(num, 1)
    H = bottoms[2] if len(bottoms) > 2 else _stored_H(ctx, node)
    rows_of_prob = ctx.op("Flatten", [prob], axis=1)
    labels = ctx.op("Reshape", [_int_labels(ctx, label), ctx.ints([-1], "flat")])
    square = ctx.op("Reshape", [H, ctx.ints([classes, classes], "H_shape")])
    rows = ctx.op("Gather", [square, labels], axis=0)
    floored = ctx.op("Max", [rows_of_prob, _scalar(ctx, INFOGAIN_LOG_FLOOR, "floor")])
    total = _sum_all(ctx, ctx.op("Mul", [rows, ctx.op("Log", [floored])]))
    dynamic = num != (_probe_bottom(ctx, node) or (1,))[0]
    _loss(ctx, total, _count(ctx, rows_of_prob, num, dynamic, rows_only=True, floor=False), top)


# -- other losses and Accuracy --------------------------------------------------------------

@register_emitter("EuclideanLoss")
def emit_euclidean_loss(ctx, node) -> None:
    """``sum (a - b)^2 / N / 2``, ``b`` reshaped to ``a``'s shape (elements pair up in
    memory order)."""
    (a, b), (top,) = ctx.bottoms(node), ctx.tops(node)
    num = node.bottom_shapes[0][0]
    difference = ctx.op("Sub", [a, ctx.op("Reshape", [b, ctx.op("Shape", [a])])])
    total = _sum_all(ctx, ctx.op("Mul", [difference, difference]))
    rows = _count(ctx, a, num, num != _probe_bottom(ctx, node)[0], rows_only=True, floor=False)
    ctx.op("Div", [ctx.op("Div", [total, rows]), _scalar(ctx, 2.0, "two")], top)


@register_emitter("SigmoidCrossEntropyLoss")
def emit_sigmoid_cross_entropy_loss(ctx, node) -> None:
    """``sum max(x, 0) - x t + log(1 + exp(-|x|))`` over positions whose truncated target is
    not ``ignore_label``, over the normalizer (Caffe 1.0's default BATCH_SIZE)."""
    module = node.module
    (x, target), (top,) = ctx.bottoms(node), ctx.tops(node)
    target = ctx.op("Reshape", [target, ctx.op("Shape", [x])])
    tail = ctx.op("Log", [ctx.op("Add", [ctx.op("Exp", [ctx.op("Neg", [ctx.op("Abs", [x])])]),
                                         _scalar(ctx, 1.0, "one")])])
    losses = ctx.op("Add", [ctx.op("Sub", [ctx.op("Relu", [x]), ctx.op("Mul", [x, target])]),
                            tail])
    keep = None
    if module.ignore_label is not None:
        _, keep = _ignore(ctx, _int_labels(ctx, target), module.ignore_label)
        losses = ctx.op("Mul", [losses, keep])
    total = _sum_all(ctx, losses)
    shape, probe = tuple(node.bottom_shapes[0]), _probe_bottom(ctx, node)
    mode = module.normalization
    if mode == "VALID" and keep is not None:
        divisor = ctx.op("Max", [_sum_all(ctx, keep), _scalar(ctx, 1.0, "one")])
    elif mode in ("VALID", "FULL"):
        dynamic = math.prod(shape) != math.prod(probe)
        divisor = _count(ctx, x, math.prod(shape), dynamic)
    elif mode == "BATCH_SIZE":
        divisor = _count(ctx, x, shape[0], shape[0] != probe[0], rows_only=True)
    else:
        divisor = _scalar(ctx, 1.0, "one")
    ctx.op("Div", [total, divisor], top)


def _samples(ctx, node) -> str:
    """Caffe's ``num()`` (bottom 0's axis 0) as a float32 0-d divisor, unfloored."""
    x = ctx.bottoms(node)[0]
    num = node.bottom_shapes[0][0]
    return _count(ctx, x, num, num != _probe_bottom(ctx, node)[0], rows_only=True,
                  floor=False)


def _per_sample(ctx, node) -> Tuple[str, str, int]:
    """Bottom 0 as ``N x D`` (each sample's elements are its classes), the int64 labels as
    an ``N x 1`` column, and ``D``."""
    x, label = ctx.bottoms(node)[:2]
    classes = math.prod(tuple(node.bottom_shapes[0])[1:])
    rows = ctx.op("Flatten", [x], axis=1)
    labels = ctx.op("Reshape", [_int_labels(ctx, label), ctx.ints([-1, 1], "column")])
    return rows, labels, classes


@register_emitter("MultinomialLogisticLoss")
def emit_multinomial_logistic_loss(ctx, node) -> None:
    """``-sum_n log max(p[n, label_n], 1e-20) / N`` on probabilities flattened to ``N x D``
    (Caffe's ``kLOG_THRESHOLD`` floor)."""
    (top,) = ctx.tops(node)
    rows, labels, _ = _per_sample(ctx, node)
    picked = ctx.op("GatherElements", [rows, labels], axis=1)
    floored = ctx.op("Max", [picked, _scalar(ctx, LOG_THRESHOLD, "floor")])
    _loss(ctx, _sum_all(ctx, ctx.op("Log", [floored])), _samples(ctx, node), top)


@register_emitter("HingeLoss")
def emit_hinge_loss(ctx, node) -> None:
    """``sum_{n,k} max(0, 1 + s_nk x_nk)^p / N`` on scores flattened to ``N x D``, with
    ``s = -1`` for the label's class and +1 elsewhere (Caffe negates the label's score), and
    ``p`` 1 (L1) or 2 (L2, not halved)."""
    (top,) = ctx.tops(node)
    rows, labels, classes = _per_sample(ctx, node)
    class_index = ctx.const(np.arange(classes, dtype=np.int64).reshape(1, classes), "classes",
                            np.int64)
    is_label = ctx.op("Cast", [ctx.op("Equal", [labels, class_index])], to=TensorProto.FLOAT)
    one = _scalar(ctx, 1.0, "one")
    signs = ctx.op("Sub", [one, ctx.op("Add", [is_label, is_label])])   # (N, D)
    margins = ctx.op("Relu", [ctx.op("Add", [one, ctx.op("Mul", [signs, rows])])])
    if node.module.norm == "L2":
        margins = ctx.op("Mul", [margins, margins])
    ctx.op("Div", [_sum_all(ctx, margins), _samples(ctx, node)], top)


@register_emitter("ContrastiveLoss")
def emit_contrastive_loss(ctx, node) -> None:
    """``sum_n (y_n ? d_n^2 : max(m - d_n, 0)^2) / N / 2`` with ``d_n = |a_n - b_n|``, or
    ``max(m - d_n^2, 0)`` for dissimilar pairs with ``legacy_version``; a pair is similar
    when its truncated label is nonzero (Caffe's ``static_cast<int>``)."""
    module = node.module
    (a, b, similar), (top,) = ctx.bottoms(node), ctx.tops(node)
    difference = ctx.op("Sub", [ctx.op("Flatten", [a], axis=1), ctx.op("Flatten", [b], axis=1)])
    distance_sq = ctx.reduce("ReduceSum", ctx.op("Mul", [difference, difference]), [1],
                             keepdims=False)                                          # (N,)
    labels = ctx.op("Reshape", [_int_labels(ctx, similar), ctx.ints([-1], "flat")])
    is_similar = ctx.op("Not", [ctx.op("Equal", [labels, ctx.const(np.int64(0), "dissimilar",
                                                                    np.int64)])])
    margin = _scalar(ctx, module.margin, "margin")
    if module.legacy_version:
        dissimilar = ctx.op("Relu", [ctx.op("Sub", [margin, distance_sq])])
    else:
        shortfall = ctx.op("Relu", [ctx.op("Sub", [margin, ctx.op("Sqrt", [distance_sq])])])
        dissimilar = ctx.op("Mul", [shortfall, shortfall])
    losses = ctx.op("Where", [is_similar, distance_sq, dissimilar])
    per_sample = ctx.op("Div", [_sum_all(ctx, losses), _samples(ctx, node)])
    ctx.op("Div", [per_sample, _scalar(ctx, 2.0, "two")], top)


@register_emitter("Accuracy")
def emit_accuracy(ctx, node) -> None:
    """The fraction of kept positions whose label ranks among the ``top_k`` scores; a class
    ranks before the label's when its score is higher, or equal with a higher index
    (Caffe 1.0's tie rule). No kept position gives 0/0 = NaN, as Caffe 1.0. The per-class
    top counts labels and hits per class with a one-hot comparison (0 for absent classes).
    """
    module = node.module
    tops = ctx.tops(node)
    shape = tuple(node.bottom_shapes[0])
    axis = module.axis % len(shape)
    scores, labels, (_, classes, _), _ = _positions(ctx, node, axis)
    labels, keep = _ignore(ctx, labels, module.ignore_label)
    true_score = ctx.op("GatherElements", [scores, labels], axis=1)
    class_index = ctx.const(np.arange(classes, dtype=np.int64).reshape(1, classes, 1),
                            "class_index", np.int64)
    tie_after = ctx.op("And", [ctx.op("Equal", [scores, true_score]),
                               ctx.op("Greater", [class_index, labels])])
    before = ctx.op("Or", [ctx.op("Greater", [scores, true_score]), tie_after])
    rank = ctx.reduce("ReduceSum", ctx.op("Cast", [before], to=TensorProto.FLOAT), [1],
                      keepdims=True)
    hits = ctx.op("Cast", [ctx.op("Less", [rank, _scalar(ctx, module.top_k, "top_k")])],
                  to=TensorProto.FLOAT)
    if keep is None:
        counted = ctx.op("Cast", [ctx.op("Size", [labels])], to=TensorProto.FLOAT)
    else:
        hits = ctx.op("Mul", [hits, keep])
        counted = _sum_all(ctx, keep)
    ctx.op("Div", [_sum_all(ctx, hits), counted], tops[0])
    if len(tops) < 2:
        return
    column = ctx.ints([-1, 1], "column")
    all_classes = ctx.const(np.arange(classes, dtype=np.int64).reshape(1, classes), "classes",
                            np.int64)
    one_hot = ctx.op("Cast", [ctx.op("Equal", [ctx.op("Reshape", [labels, column]),
                                               all_classes])],
                     to=TensorProto.FLOAT)                               # (positions, C)
    if keep is not None:
        one_hot = ctx.op("Mul", [one_hot, ctx.op("Reshape", [keep, column])])
    per_label = ctx.reduce("ReduceSum", one_hot, [0], keepdims=False)
    per_hit = ctx.reduce("ReduceSum", ctx.op("Mul", [one_hot, ctx.op("Reshape", [hits, column])]),
                         [0], keepdims=False)
    ratio = ctx.op("Div", [per_hit, ctx.op("Max", [per_label, _scalar(ctx, 1.0, "one")])])
    absent = ctx.op("Equal", [per_label, _scalar(ctx, 0.0, "zero")])
    ctx.op("Where", [absent, _scalar(ctx, 0.0, "zero"), ratio], tops[1])


__all__ = ["emit_accuracy", "emit_contrastive_loss", "emit_euclidean_loss", "emit_hinge_loss",
           "emit_infogain_loss", "emit_infogain_loss_legacy", "emit_margin_inner_product",
           "emit_multinomial_logistic_loss", "emit_sigmoid_cross_entropy_loss",
           "emit_softmax_with_loss", "lambda_feed", "lambda_input_name"]
