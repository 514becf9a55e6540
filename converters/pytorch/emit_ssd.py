"""Source emitters for the SSD fork's layers.

Normalize and Permute are one tensor expression each; PriorBox and DetectionOutput have no
PyTorch equivalent and import the caffelayers modules (the priors follow the bottoms'
shapes, so the generated model keeps working at other image sizes).
"""

from __future__ import annotations

from caffelayers.layers.ssd import DetectionOutput, PriorBox

from .registry import register_source_emitter
from .source import LayerSource, number


@register_source_emitter("Normalize")
def normalize(layer: LayerSource) -> None:
    """``x / sqrt(sum x^2 + eps) * scale`` (the sum over every axis but the batch, or over
    the channels), the scale stored shaped to broadcast. The forward is the fork's; its
    backward (the fork scales the whole bottom gradient by each channel's own scale) is not
    reproduced when the per-channel scales differ: train with the caffelayers module."""
    m = layer.module
    x = layer.bottoms[0]
    rank = len(layer.bottom_shape())
    dims = tuple(range(1, rank)) if m.across_spatial else 1
    squares = f"({x} * {x}).sum(dim={dims}, keepdim=True)"
    norm = f"torch.sqrt({squares} + {number(m.eps)})"
    weight = m.weight.detach()
    if not m.channel_shared:
        weight = weight.reshape((-1,) + (1,) * (rank - 2))
    scale = layer.parameter("scale", weight, init="ones")
    # The fork multiplies by the reciprocal across the spatial positions, divides per position.
    unit = f"{x} * (1.0 / {norm})" if m.across_spatial else f"{x} / {norm}"
    layer.assign(f"{unit} * {scale}", comment="SSD's Normalize (L2 norm with a learned scale)")


@register_source_emitter("Permute")
def permute(layer: LayerSource) -> None:
    """``x.permute(order)`` with Caffe's completed order (the identity order: the bottom)."""
    order = layer.module.full_order(len(layer.bottom_shape()))
    x = layer.bottoms[0]
    if order == tuple(range(len(order))):
        if layer.tops[0] != x:
            layer.assign(x)
        return
    layer.assign(f"{x}.permute({', '.join(map(str, order))})")


@register_source_emitter("PriorBox")
def prior_box(layer: LayerSource) -> None:
    """caffelayers' PriorBox, called on the feature map and the image."""
    m = layer.module
    handle = layer.project_module(
        PriorBox, list(m.min_sizes), max_sizes=list(m.max_sizes),
        aspect_ratios=list(m.aspect_ratios), flip=m.flip, clip=m.clip,
        variance=list(m.variance), img_size=m.img_size, step=m.step, offset=m.offset)
    layer.assign(f"{handle}({', '.join(layer.bottoms)})")


@register_source_emitter("DetectionOutput")
def detection_output(layer: LayerSource) -> None:
    """caffelayers' DetectionOutput: the fork's decoding, NMS and output rows."""
    m = layer.module
    handle = layer.project_module(
        DetectionOutput, m.num_classes, share_location=m.share_location,
        background_label_id=m.background_label_id, nms_threshold=m.nms_threshold,
        top_k=m.top_k, eta=m.eta, code_type=m.code_type,
        variance_encoded_in_target=m.variance_encoded_in_target, keep_top_k=m.keep_top_k,
        confidence_threshold=m.confidence_threshold, clip=m.clip)
    layer.assign(f"{handle}({', '.join(layer.bottoms)})")
