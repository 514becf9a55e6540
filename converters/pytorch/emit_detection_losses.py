"""Source emitters for the detection forks' training losses: SmoothL1Loss and SSD's
MultiBoxLoss. PyTorch's ``smooth_l1_loss`` has neither the forks' weights, divisor nor
backward, and the matching and mining have no equivalent, so the generated file imports the
caffelayers modules and builds them from the same plain values ``from_caffe`` used (the
loss top unweighted, as ``Net.forward`` returns it).
"""

from __future__ import annotations

from caffelayers.losses.detection import MultiBoxLoss, SmoothL1Loss

from .registry import register_source_emitter
from .source import LayerSource


def _call(layer: LayerSource, handle: str) -> None:
    layer.assign(f"{handle}({', '.join(layer.bottoms)})")


@register_source_emitter("SmoothL1Loss")
def smooth_l1_loss(layer: LayerSource) -> None:
    m = layer.module
    _call(layer, layer.project_module(SmoothL1Loss, m.sigma, normalization=m.normalization,
                                      pre_fixed_normalizer=m.pre_fixed_normalizer,
                                      instance_loss=m.instance_loss))


@register_source_emitter("MultiBoxLoss")
def multibox_loss(layer: LayerSource) -> None:
    m = layer.module
    settings = {name: getattr(m, name) for name in MultiBoxLoss._DEFAULTS}
    _call(layer, layer.project_module(MultiBoxLoss, m.num_classes, **settings))
