"""Source emitters for the smaller forks' layers: SegNet's Upsample and BN, PSPNet's Interp
and BN, ShuffleNet's ShuffleChannel, the MobileNet forks' depthwise convolutions and ReLU6,
SENet's Axpy.

Each becomes plain PyTorch where PyTorch computes the fork's numbers (``F.max_unpool2d``,
``nn.ChannelShuffle``, ``nn.Conv2d`` with ``groups=C``, ``nn.ReLU6``,
``F.interpolate(align_corners=True)``, ``nn.BatchNorm2d``); what has no PyTorch module is
one written-out expression (Axpy, SegNet's folded BN), and the caffelayers module is
imported only for an Upsample whose mask may name a position twice, SegNet's LEARN-mode BN
and Caffe's legacy 2-D and 3-D BN bottoms.
"""

from __future__ import annotations

import torch

from caffelayers.layers.segmentation import PSPNetBN, SegNetBN, Upsample

from .emit_layers import convolution
from .registry import register_source_emitter
from .source import Code, LayerSource, call, number, square


def _unpool_window(size: int, out: int):
    """A window (= stride) for which ``F.max_unpool2d`` accepts ``out`` from ``size``: its
    default ``size * k`` within ``k`` of ``out``; None when there is none."""
    window = max(-(-out // size), 1)
    return window if (size - 1) * window < out < (size + 1) * window else None


def _from_disjoint_max_pooling(layer: LayerSource, blob: str) -> bool:
    """Whether ``blob`` is the mask of a MAX Pooling whose windows do not overlap (so that
    no two inputs share an output position)."""
    graph = layer._writer.graph
    producer = None
    for node in graph.nodes[:graph.nodes.index(layer.node)]:
        if blob in node.tops:
            producer = node
    module = getattr(producer, "module", None)
    return (producer is not None and producer.type == "Pooling" and module.mask_top
            and not module.global_pooling
            and all(k <= s for k, s in zip(module.kernel_size, module.stride)))


@register_source_emitter("Upsample")
def upsample(layer: LayerSource) -> None:
    """``F.max_unpool2d`` (a gather backward, as Caffe's) when the mask comes from
    non-overlapping MAX pooling; otherwise the caffelayers module, whose forward keeps
    Caffe's later write where two inputs share an output position."""
    m = layer.module
    x, mask = layer.bottoms
    size, out = layer.bottom_shape()[2:], layer.top_shape()[2:]
    windows = [_unpool_window(n, o) for n, o in zip(size, out)]
    if None in windows or not _from_disjoint_max_pooling(layer, layer.node.bottoms[1]):
        handle = layer.project_module(Upsample, m.scale, pad_out=m.pad_out, size=m.size)
        layer.assign(f"{handle}({x}, {mask})")
        return
    layer.assign(call("F.max_unpool2d", Code(x), Code(f"{mask}.long()"), square(windows),
                      output_size=tuple(out)),
                 comment=f"{layer.name}: SegNet's Upsample, each value back to its pooling "
                 "argmax")


@register_source_emitter("Interp")
def interp(layer: LayerSource) -> None:
    """The crop as a slice, then ``F.interpolate(mode="bilinear", align_corners=True)``, or
    just the crop when the sizes already agree (Caffe copies)."""
    m = layer.module
    x = layer.bottoms[0]
    shape = layer.bottom_shape()
    if m.pad_beg or m.pad_end:
        rows, cols = m.crop(shape)
        x = f"{x}[:, :, {rows.start}:{rows.stop}, {cols.start}:{cols.stop}]"
    cropped = tuple(n + m.pad_beg + m.pad_end for n in shape[2:])
    size = layer.top_shape()[2:]
    if cropped == size:
        layer.assign(x)
        return
    layer.assign(call("F.interpolate", Code(x), size=size, mode="bilinear",
                      align_corners=True))


def _per_channel(blob: torch.Tensor) -> torch.Tensor:
    return blob.detach().reshape(-1)


@register_source_emitter("BN")
def bn(layer: LayerSource) -> None:
    """SegNet INFERENCE: ``x * scale + shift``; PSPNet: ``nn.BatchNorm2d`` holding its slope,
    bias and stored statistics (``eval()`` uses them: frozen layers and the TEST phase), or
    normalizing with the batch's (TRAIN). SegNet's LEARN mode (Caffe's ``E[x^2] - E[x]^2``
    variance, optional statistics tops) and Caffe's legacy 2-D and 3-D bottoms import the
    caffelayers module."""
    m = layer.module
    x = layer.bottoms[0]
    segnet = isinstance(m, SegNetBN)
    if len(layer.bottom_shape()) != 4 or segnet and m.bn_mode == "LEARN":
        if segnet:
            handle = layer.project_module(SegNetBN, m.channels, m.bn_mode,
                                          batch_tops=m.batch_tops)
        else:
            handle = layer.project_module(PSPNetBN, m.channels, eps=m.eps,
                                          momentum=m.momentum, frozen=m.frozen, phase=m.phase)
        layer.assign(f"{handle}({x})")
        return
    if segnet:
        scale = layer.parameter("scale", m.weight.detach(), init="ones")
        shift = layer.parameter("shift", m.bias.detach())
        layer.assign(f"{x} * {scale} + {shift}", comment=f"{layer.name}: SegNet's BN "
                     "(INFERENCE), the statistics folded into scale and shift")
        return
    state = {"weight": _per_channel(m.weight), "bias": _per_channel(m.bias)}
    if m.use_global_stats:
        state.update(running_mean=_per_channel(m.running_mean),
                     running_var=_per_channel(m.running_var),
                     num_batches_tracked=torch.tensor(0))
        handle = layer.submodule(call("nn.BatchNorm2d", m.channels, eps=m.eps,
                                      momentum=round(1.0 - m.momentum, 6)), state,
                                 note="PSPNet's BN: slope, bias and the stored statistics")
    else:
        handle = layer.submodule(call("nn.BatchNorm2d", m.channels, eps=m.eps,
                                      track_running_stats=False), state,
                                 note="PSPNet's BN in TRAIN: the batch's statistics")
    layer.assign(f"{handle}({x})")


@register_source_emitter("ShuffleChannel")
def shuffle_channel(layer: LayerSource) -> None:
    """``nn.ChannelShuffle``, the same permutation (a 2-D bottom written out: it needs 3)."""
    group = layer.module.group
    x = layer.bottoms[0]
    if len(layer.bottom_shape()) > 2:
        handle = layer.submodule(call("nn.ChannelShuffle", group))
        layer.assign(f"{handle}({x})")
        return
    channels = layer.bottom_shape()[1]
    layer.assign(f"{x}.view({x}.shape[0], {group}, {channels // group}).transpose(1, 2)"
                 f".reshape({x}.shape)")


register_source_emitter("DepthwiseConvolution")(convolution)
register_source_emitter("ConvolutionDepthwise")(convolution)


@register_source_emitter("ReLU6")
def relu6(layer: LayerSource) -> None:
    """``nn.ReLU6``; with a negative slope, plus ``slope * x.clamp_max(0)``."""
    slope = layer.module.negative_slope
    x = layer.bottoms[0]
    if not slope:
        handle = layer.submodule("nn.ReLU6()")
        layer.assign(f"{handle}({x})")
        return
    layer.assign(f"F.hardtanh({x}, 0.0, 6.0) + {number(slope)} * {x}.clamp_max(0.0)")


@register_source_emitter("Axpy")
def axpy(layer: LayerSource) -> None:
    """``a * x + z``, the scale viewed as ``N x C x 1 ...``."""
    scale, x, z = layer.bottoms
    ones = ", 1" * (len(layer.bottom_shape(1)) - 2)
    layer.assign(f"{scale}.view({scale}.shape[0], {scale}.shape[1]{ones}) * {x} + {z}",
                 comment=f"{layer.name}: SENet's Axpy")
