"""Source emitters for the two-stage detector layers (Faster R-CNN, R-FCN): ROIPooling,
PSROIPooling and Proposal have no PyTorch equivalent (``torchvision.ops.roi_pool`` is not a
dependency, and its ROIs are not rounded as Caffe's), so the generated file imports the
caffelayers modules and builds them from the same plain values ``from_caffe`` used.
"""

from __future__ import annotations

from caffelayers.layers.roi import Proposal, PSROIPooling, ROIPooling

from .registry import register_source_emitter
from .source import LayerSource


def _call(layer: LayerSource, handle: str) -> None:
    layer.assign(f"{handle}({', '.join(layer.bottoms)})")


@register_source_emitter("ROIPooling")
def roi_pooling(layer: LayerSource) -> None:
    m = layer.module
    _call(layer, layer.project_module(ROIPooling, m.pooled_h, m.pooled_w,
                                      spatial_scale=m.spatial_scale))


@register_source_emitter("PSROIPooling")
def psroi_pooling(layer: LayerSource) -> None:
    m = layer.module
    _call(layer, layer.project_module(PSROIPooling, m.spatial_scale, m.output_dim,
                                      m.group_size))


@register_source_emitter("Proposal")
def proposal(layer: LayerSource) -> None:
    """The RPN's proposals (a py-faster-rcnn Python layer becomes this native module)."""
    m = layer.module
    _call(layer, layer.project_module(
        Proposal, m.feat_stride, base_size=m.base_size, min_size=m.min_size,
        ratios=m.ratios, scales=m.scales, pre_nms_topn=m.pre_nms_topn,
        post_nms_topn=m.post_nms_topn, nms_thresh=m.nms_thresh, scores_top=m.scores_top))
