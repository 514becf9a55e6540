"""Emitters for the smaller forks' layers: SegNet's Upsample and BN, PSPNet's Interp and BN,
ShuffleNet's ShuffleChannel, the MobileNet forks' depthwise convolutions and ReLU6, SENet's
Axpy. Standard ONNX operators only; shapes that follow the batch are taken from the graph
(``Shape``, ``Reshape`` with 0), so the batch stays dynamic.

* Upsample: ``ScatterElements`` of each plane's values into a zero plane at the mask's
  indices. Where a mask names one position twice (overlapping pooling windows) ONNX leaves
  the order open; onnxruntime writes in order, so the later input stays, as in Caffe.
* Interp: ``Slice`` for the crop, then ``Resize`` (linear, ``align_corners``), whose
  sampling positions are Caffe's ``h (H_in - 1) / (H_o - 1)``.
* BN: PSPNet's stored statistics are ``BatchNormalization``; batch statistics (SegNet's
  LEARN, PSPNet in TRAIN) are written out with Caffe's variance formula of each fork.
"""

from __future__ import annotations

from onnx import TensorProto, helper

from ...layers.segmentation import SegNetBN
from ...registry import register_emitter
from .linear import emit_convolution


def _legacy_4d(ctx, node, x: str) -> str:
    """The bottom viewed as Caffe's N x C x H x W legacy blob (BN's top shape)."""
    if len(node.bottom_shapes[0]) == 4:
        return x
    return ctx.reshape(x, node.top_shapes[0], ctx.probe_shapes(node)[1][0])


# -- SegNet --------------------------------------------------------------------------------
@register_emitter("Upsample")
def emit_upsample(ctx, node) -> None:
    """``ScatterElements`` along the flattened plane of a zero ``N x C x (H_o W_o)`` tensor,
    the mask (floats) cast to int64 as the indices, then the top's shape."""
    (x, mask), (top,) = ctx.bottoms(node), ctx.tops(node)
    height, width = node.top_shapes[0][2:]
    rows = ctx.ints([0, 0, -1], "planes")
    indices = ctx.op("Cast", [ctx.op("Reshape", [mask, rows])], to=TensorProto.INT64)
    values = ctx.op("Reshape", [x, rows])
    leading = ctx.op("Slice", [ctx.op("Shape", [x]), ctx.ints([0], "start"),
                               ctx.ints([2], "end")])
    zero_shape = ctx.op("Concat", [leading, ctx.ints([height * width], "plane")], axis=0)
    zero = helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])
    zeros = ctx.op("ConstantOfShape", [zero_shape], value=zero)
    scattered = ctx.op("ScatterElements", [zeros, indices, values], axis=2)
    ctx.op("Reshape", [scattered, ctx.ints([0, 0, height, width], "top_shape")], top)


@register_emitter("BN")
def emit_bn(ctx, node) -> None:
    """SegNet INFERENCE: ``x * scale + shift``. SegNet LEARN: the batch's mean and
    ``E[x^2] - E[x]^2`` over N, H, W (and those two as the extra tops). PSPNet:
    ``BatchNormalization`` with the stored statistics (frozen or TEST), else the batch's mean
    and biased variance written out (the running statistics' update is not exported)."""
    module = node.module
    (x,), tops = ctx.bottoms(node), ctx.tops(node)
    x = _legacy_4d(ctx, node, x)
    if not isinstance(module, SegNetBN) and module.use_global_stats:
        vectors = [ctx.param(node, i, blob.detach().cpu().numpy().reshape(module.channels))
                   for i, blob in enumerate(module.caffe_blobs())]
        ctx.op("BatchNormalization", [x] + vectors, tops[0], epsilon=module.eps)
        return
    weight, bias = ctx.param(node, 0), ctx.param(node, 1)
    if isinstance(module, SegNetBN) and module.bn_mode == "INFERENCE":
        ctx.op("Add", [ctx.op("Mul", [x, weight]), bias], tops[0])
        return
    axes = [0, 2, 3]
    mean = ctx.reduce("ReduceMean", x, axes, keepdims=True)
    centred = ctx.op("Sub", [x, mean])
    if isinstance(module, SegNetBN):
        square_mean = ctx.reduce("ReduceMean", ctx.op("Mul", [x, x]), axes, keepdims=True)
        variance = ctx.op("Sub", [square_mean, ctx.op("Mul", [mean, mean])])
        eps = module.EPS
    else:
        variance = ctx.reduce("ReduceMean", ctx.op("Mul", [centred, centred]), axes,
                              keepdims=True)
        eps = module.eps
    deviation = ctx.op("Sqrt", [ctx.op("Add", [variance, ctx.const(eps, "eps")])])
    normalized = ctx.op("Div", [centred, deviation])
    ctx.op("Add", [ctx.op("Mul", [normalized, weight]), bias], tops[0])
    # SegNet's optional tops: the batch mean and the variance before eps.
    for top, value in zip(tops[1:], (mean, variance)):
        ctx.op("Identity", [value], top)


# -- PSPNet / DeepLab ----------------------------------------------------------------------
@register_emitter("Interp")
def emit_interp(ctx, node) -> None:
    """``Slice`` away the cropped rows and columns, then ``Resize`` to the top's size with
    linear interpolation and ``align_corners`` (Caffe copies when the sizes agree)."""
    module = node.module
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    height, width = node.bottom_shapes[0][2:]
    if module.pad_beg or module.pad_end:
        x = ctx.op("Slice", [x, ctx.ints([-module.pad_beg] * 2, "crop_start"),
                             ctx.ints([height + module.pad_end, width + module.pad_end],
                                      "crop_end"), ctx.ints([2, 3], "crop_axes")])
        height, width = height + module.pad_beg + module.pad_end, width + module.pad_beg + \
            module.pad_end
    size = list(node.top_shapes[0][2:])
    if [height, width] == size:
        ctx.op("Identity", [x], top)
        return
    leading = ctx.op("Slice", [ctx.op("Shape", [x]), ctx.ints([0], "start"),
                               ctx.ints([2], "end")])
    sizes = ctx.op("Concat", [leading, ctx.ints(size, "size")], axis=0)
    ctx.op("Resize", [x, "", "", sizes], top, mode="linear",
           coordinate_transformation_mode="align_corners")


# -- ShuffleNet, MobileNet, SENet ----------------------------------------------------------
@register_emitter("ShuffleChannel")
def emit_shuffle_channel(ctx, node) -> None:
    """``Reshape`` to ``N x g x C/g x rest``, swap the two channel axes, reshape back."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    group = node.module.group
    channels = node.bottom_shapes[0][1]
    rows = ctx.op("Reshape", [x, ctx.ints([0, group, channels // group, -1], "groups")])
    swapped = ctx.op("Transpose", [rows], perm=[0, 2, 1, 3])
    ctx.op("Reshape", [swapped, ctx.op("Shape", [x])], top)


register_emitter("DepthwiseConvolution")(emit_convolution)
register_emitter("ConvolutionDepthwise")(emit_convolution)


@register_emitter("ReLU6")
def emit_relu6(ctx, node) -> None:
    """``Clip`` to [0, 6], plus ``negative_slope * min(x, 0)`` when there is a slope."""
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    slope = node.module.negative_slope
    clipped = ctx.op("Clip", [x, ctx.const(0.0, "zero"), ctx.const(6.0, "six")],
                     None if slope else top)
    if slope:
        negative = ctx.op("Min", [x, ctx.const(0.0, "zero")])
        ctx.op("Add", [clipped, ctx.op("Mul", [negative, ctx.const(slope, "slope")])], top)


@register_emitter("Axpy")
def emit_axpy(ctx, node) -> None:
    """``a * x + z`` with ``a`` reshaped to ``N x C x 1 ...`` to broadcast over x's axes."""
    (scale, x, z), (top,) = ctx.bottoms(node), ctx.tops(node)
    rank = len(node.bottom_shapes[1])
    scale = ctx.op("Reshape", [scale, ctx.ints([0, 0] + [1] * (rank - 2), "scale_shape")])
    ctx.op("Add", [ctx.op("Mul", [scale, x]), z], top)
