"""Source emitters for layers PyTorch has no equivalent of: the generated file imports the
caffelayers module and builds it from the same plain values ``from_caffe`` used.

SphereFace's MarginInnerProduct, the margin heads, ArgMax (Caffe's tie order and output layout), Accuracy, and
the loss layers (which return the unweighted loss top, as ``Net.forward`` does).
"""

from __future__ import annotations

from caffelayers.layers.accuracy import Accuracy
from caffelayers.layers.margin_head import MarginHead
from caffelayers.layers.margin_inner_product import MarginInnerProduct
from caffelayers.layers.reduction import ArgMax
from caffelayers.losses import simple
from caffelayers.losses.distribution import SoftmaxDiffLoss
from caffelayers.losses.infogain import (InfogainLossLegacy, SoftmaxWithInfogainLoss,
                                         SoftmaxWithLoss)

from .registry import register_source_emitter
from .source import Code, LayerSource, tensor_init


def _run(layer: LayerSource, handle: str, tops_returned: int) -> None:
    """Call the module on every bottom; keep the first ``len(tops)`` of its results."""
    expression = f"{handle}({', '.join(layer.bottoms)})"
    if tops_returned > 1 and len(layer.tops) == 1:
        expression += "[0]"
    layer.assign(expression)


@register_source_emitter("MarginInnerProduct")
def margin_inner_product(layer: LayerSource) -> None:
    """SphereFace's A-Softmax head; its state holds the iteration count of the lambda
    schedule, so the converted model continues it."""
    m = layer.module
    kwargs = {"base": m.base, "gamma": m.gamma, "power": m.power, "lambda_min": m.lambda_min,
              "iteration": int(m.iteration), "axis": m.axis}
    if m.backward != "caffe":
        kwargs["backward"] = m.backward
    handle = layer.project_module(MarginInnerProduct, m.in_features, m.num_output,
                                  m.margin_type, **kwargs)
    _run(layer, handle, 2)


@register_source_emitter("MarginHead")
def margin_head(layer: LayerSource) -> None:
    """A-Softmax, AM-Softmax/CosFace, ArcFace or the combined margin, from caffelayers."""
    m = layer.module
    handle = layer.project_module(MarginHead, m.in_features, m.num_classes, m.kind, s=m.s,
                                  m=m.m, easy_margin=m.easy_margin, lambda_=m.lambda_,
                                  axis=m.axis)
    _run(layer, handle, 1)


@register_source_emitter("SoftmaxDiffLoss")
def softmax_diff_loss(layer: LayerSource) -> None:
    m = layer.module
    handle = layer.project_module(SoftmaxDiffLoss, m.mode, temperature=m.temperature,
                                  style=m.style, axis=m.axis, reduction=m.reduction)
    _run(layer, handle, 1)


@register_source_emitter("ArgMax")
def argmax(layer: LayerSource) -> None:
    m = layer.module
    handle = layer.project_module(ArgMax, m.top_k, out_max_val=m.out_max_val, axis=m.axis)
    _run(layer, handle, 1)


@register_source_emitter("Accuracy")
def accuracy(layer: LayerSource) -> None:
    m = layer.module
    handle = layer.project_module(Accuracy, m.top_k, axis=m.axis, ignore_label=m.ignore_label,
                                  per_class=m.per_class)
    _run(layer, handle, 2 if m.per_class else 1)


def _softmax_loss_settings(m) -> dict:
    return {"axis": m.axis, "normalization": m.normalization, "ignore_label": m.ignore_label,
            "mode": m.mode, "return_prob": m.return_prob}


@register_source_emitter("SoftmaxWithLoss")
def softmax_with_loss(layer: LayerSource) -> None:
    m = layer.module
    handle = layer.project_module(SoftmaxWithLoss, **_softmax_loss_settings(m))
    _run(layer, handle, 2 if m.return_prob else 1)


def _cost_matrix(m) -> object:
    """A placeholder of H's shape for the constructor (``weights.pt`` holds the values), or
    None when H is the third bottom."""
    return None if m.infogain is None else Code(tensor_init("zeros", m.infogain.shape))


@register_source_emitter("InfogainLoss")
def infogain_loss(layer: LayerSource) -> None:
    m = layer.module
    handle = layer.project_module(SoftmaxWithInfogainLoss, _cost_matrix(m),
                                  **_softmax_loss_settings(m))
    _run(layer, handle, 2 if m.return_prob else 1)


@register_source_emitter("InfogainLossLegacy")
def infogain_loss_legacy(layer: LayerSource) -> None:
    m = layer.module
    handle = layer.project_module(InfogainLossLegacy, _cost_matrix(m), mode=m.mode)
    _run(layer, handle, 1)


@register_source_emitter("SigmoidCrossEntropyLoss")
def sigmoid_cross_entropy_loss(layer: LayerSource) -> None:
    m = layer.module
    handle = layer.project_module(simple.SigmoidCrossEntropyLoss, m.normalization,
                                  ignore_label=m.ignore_label)
    _run(layer, handle, 1)


@register_source_emitter("EuclideanLoss")
def euclidean_loss(layer: LayerSource) -> None:
    _run(layer, layer.project_module(simple.EuclideanLoss), 1)


@register_source_emitter("MultinomialLogisticLoss")
def multinomial_logistic_loss(layer: LayerSource) -> None:
    _run(layer, layer.project_module(simple.MultinomialLogisticLoss), 1)


@register_source_emitter("HingeLoss")
def hinge_loss(layer: LayerSource) -> None:
    _run(layer, layer.project_module(simple.HingeLoss, layer.module.norm), 1)


@register_source_emitter("ContrastiveLoss")
def contrastive_loss(layer: LayerSource) -> None:
    m = layer.module
    handle = layer.project_module(simple.ContrastiveLoss, m.margin,
                                  legacy_version=m.legacy_version)
    _run(layer, handle, 1)
