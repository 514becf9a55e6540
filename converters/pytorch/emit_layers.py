"""Source emitters for layers with weights or windows: convolutions, inner products,
pooling, normalization, Scale/Bias, Softmax.

Each maps to a ``torch.nn`` module or a functional expression wherever PyTorch computes
Caffe's numbers, and spells out the difference where it does not (Caffe's pooling windows,
the BatchNorm scale factor). The caffelayers module is imported only where PyTorch has no
equivalent.
"""

from __future__ import annotations

import torch

from caffelayers.layers.normalization import BatchNorm, MVN
from caffelayers.layers.pooling import Pooling, pooled_size

from .registry import register_source_emitter
from .source import Code, LayerSource, call, canonical_axis, number, square, state_of


# -- convolutions -------------------------------------------------------------------------
def _convolution(layer: LayerSource, kind: str) -> None:
    m = layer.module
    axes = len(m.kernel_size)
    kwargs = {"kernel_size": square(m.kernel_size)}
    for name, attribute, default in (("stride", "stride", 1), ("padding", "pad", 0),
                                     ("dilation", "dilation", 1)):
        value = getattr(m, attribute)
        if value != (default,) * axes:
            kwargs[name] = square(value)
    if m.group != 1:
        kwargs["groups"] = m.group
    if not m.bias_term:
        kwargs["bias"] = False
    handle = layer.submodule(call(f"nn.{kind}{axes}d", m.in_channels, m.num_output, **kwargs),
                             state_of(weight=m.weight, bias=m.bias))
    # Several bottoms share the filters, one top each (Caffe's multi-bottom convolution).
    for bottom, top in zip(layer.bottoms, layer.tops):
        layer.line(f"{top} = {handle}({bottom})")


@register_source_emitter("Convolution")
def convolution(layer: LayerSource) -> None:
    """``nn.Conv{1,2,3}d``: Caffe's weight layout is PyTorch's."""
    _convolution(layer, "Conv")


@register_source_emitter("Deconvolution")
def deconvolution(layer: LayerSource) -> None:
    """``nn.ConvTranspose{1,2,3}d``: the same C_in x C_out/group x k layout, no output
    padding (Caffe's size is ``s (in - 1) + d (k - 1) + 1 - 2 p``)."""
    _convolution(layer, "ConvTranspose")


# -- fully connected ----------------------------------------------------------------------
@register_source_emitter("InnerProduct")
def inner_product(layer: LayerSource) -> None:
    """``nn.Linear`` after flattening from Caffe's ``axis``; a ``transpose: true`` weight
    (K x N) is transposed into Linear's N x K at conversion."""
    m = layer.module
    weight = m.weight.t() if m.transpose else m.weight
    kwargs = {} if m.bias_term else {"bias": False}
    handle = layer.submodule(call("nn.Linear", m.in_features, m.num_output, **kwargs),
                             state_of(weight=weight, bias=m.bias))
    rank = len(layer.bottom_shape())
    axis = canonical_axis(m.axis, rank)
    x = layer.bottoms[0]
    operand = x if axis == rank - 1 else f"torch.flatten({x}, {axis})"
    layer.assign(f"{handle}({operand})")


@register_source_emitter("Embed")
def embed(layer: LayerSource) -> None:
    """``nn.Embedding`` on the bottom truncated to integers (Caffe's ``static_cast``), plus
    the bias."""
    m = layer.module
    handle = layer.submodule(call("nn.Embedding", m.input_dim, m.num_output),
                             state_of(weight=m.weight))
    expression = f"{handle}({layer.bottoms[0]}.long())"
    if m.bias is not None:
        expression += " + " + layer.parameter("bias", m.bias)
    layer.assign(expression)


# -- pooling ------------------------------------------------------------------------------
#: Caffe's max pooling starts from -FLT_MAX: a window that holds no input reports it.
FLT_MAX = 3.4028234663852886e38


def _torch_windows(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """PyTorch's window count: like Caffe's, but with ceil_mode it also drops a last window
    starting at or past ``size + pad`` when there is no padding."""
    span = size + 2 * pad - kernel
    windows = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (windows - 1) * stride >= size + pad:
        windows -= 1
    return windows


@register_source_emitter("Pooling")
def pooling(layer: LayerSource) -> None:
    """``nn.MaxPool2d``/``nn.AvgPool2d`` with ``ceil_mode`` where PyTorch counts the windows as
    Caffe does (its ``count_include_pad`` divisor is Caffe's: the window clipped to
    ``in + pad``); otherwise explicit padding and, for AVE, Caffe's divisor as a buffer.
    Global pooling is adaptive pooling to 1 x 1. STOCHASTIC pooling and the MAX mask top use
    the caffelayers module."""
    m = layer.module
    x = layer.bottoms[0]
    if m.pool == "STOCHASTIC" or m.mask_top:
        handle = layer.project_module(Pooling, m.pool, kernel_size=m.kernel_size,
                                      stride=m.stride, pad=m.pad,
                                      global_pooling=m.global_pooling,
                                      round_mode=m.round_mode, phase=m.phase,
                                      mask_top=m.mask_top)
        layer.assign(f"{handle}({x})")
        return
    kind = "Max" if m.pool == "MAX" else "Avg"
    if m.global_pooling:
        handle = layer.submodule(f"nn.Adaptive{kind}Pool2d(1)", note="Caffe's global_pooling")
        layer.assign(f"{handle}({x})")
        return
    size = layer.bottom_shape()[2:]
    ceil_mode = m.round_mode == "CEIL"
    geometry = list(zip(size, m.kernel_size, m.stride, m.pad))
    windows = [pooled_size(n, k, s, p, ceil_mode) for n, k, s, p in geometry]
    native = all(p <= k // 2 and _torch_windows(n, k, s, p, ceil_mode) == w
                 for (n, k, s, p), w in zip(geometry, windows))
    if native:
        kwargs = {"stride": square(m.stride)}
        if m.pad != (0, 0):
            kwargs["padding"] = square(m.pad)
        if ceil_mode:
            kwargs["ceil_mode"] = True
        handle = layer.submodule(call(f"nn.{kind}Pool2d", square(m.kernel_size), **kwargs))
        layer.assign(f"{handle}({x})")
        return
    _explicit_pooling(layer, geometry, windows)


def _explicit_pooling(layer: LayerSource, geometry, windows) -> None:
    """Pad so that every Caffe window lies inside, then pool without padding."""
    m = layer.module
    x = layer.bottoms[0]
    extra = [max(0, (w - 1) * s + k - n - p) for (n, k, s, p), w in zip(geometry, windows)]
    pads = (m.pad[1], extra[1], m.pad[0], extra[0])
    kernel, stride = square(m.kernel_size), square(m.stride)
    where = "x".join(str(n) for n, _, _, _ in geometry)
    if m.pool == "MAX":
        layer.comment(f"{layer.name}: Caffe's {'ceil' if m.round_mode == 'CEIL' else 'floor'} "
                      f"window count for a {where} input, which nn.MaxPool2d cannot express")
        expression = call("F.max_pool2d", Code(f"F.pad({x}, {pads}, value=float(\"-inf\"))"),
                          kernel, stride)
        # An unpadded ceil window may start past the input: Caffe reports -FLT_MAX there.
        if any((w - 1) * s - p >= n for (n, _, s, p), w in zip(geometry, windows)):
            expression += f".clamp_min({number(-FLT_MAX)})"
        layer.assign(expression)
        return
    rows, cols = ([min(i * s - p + k, n + p) - (i * s - p) for i in range(w)]
                  for (n, k, s, p), w in zip(geometry, windows))
    divisor = torch.tensor(rows, dtype=torch.float32)[:, None] * torch.tensor(cols)[None, :]
    handle = layer.buffer("divisor", divisor,
                          note="Caffe's AVE divisor: each window clipped to [-pad, in + pad)")
    layer.comment(f"{layer.name}: Caffe's window count and divisor for a {where} input")
    window_sums = call("F.avg_pool2d", Code(f"F.pad({x}, {pads})"), kernel, stride,
                       divisor_override=1)
    layer.assign(f"{window_sums} / {handle}")


# -- normalization ------------------------------------------------------------------------
@register_source_emitter("LRN")
def lrn(layer: LayerSource) -> None:
    """ACROSS_CHANNELS is ``nn.LocalResponseNorm`` (the same ``k + alpha/n * sum``);
    WITHIN_CHANNEL is written out: Caffe's average always divides by ``n * n`` and has no
    ``k``."""
    m = layer.module
    x = layer.bottoms[0]
    if m.norm_region == "ACROSS_CHANNELS":
        handle = layer.submodule(call("nn.LocalResponseNorm", m.local_size, alpha=m.alpha,
                                      beta=m.beta, k=m.k))
        layer.assign(f"{handle}({x})")
        return
    half = (m.local_size - 1) // 2
    mean = call("F.avg_pool2d", Code(f"{x} * {x}"), m.local_size, stride=1, padding=half)
    layer.assign(f"{x} * (1.0 + {number(m.alpha)} * {mean}).pow({number(-m.beta)})",
                 comment="Caffe's WITHIN_CHANNEL LRN")


_BATCH_NORM = {2: "nn.BatchNorm1d", 3: "nn.BatchNorm1d", 4: "nn.BatchNorm2d",
               5: "nn.BatchNorm3d"}


@register_source_emitter("BatchNorm")
def batch_norm(layer: LayerSource) -> None:
    """``nn.BatchNorm{1,2,3}d(affine=False)`` (``affine=True`` with NVCaffe's ``scale_bias``
    blobs as its weight and bias). With ``use_global_stats`` its running statistics are
    Caffe's stored sums divided by the scale-factor blob (0 gives 0; NVCaffe's blobs as they
    are), done at conversion, and ``eval()`` uses them; without, it always normalizes with the
    batch's statistics (``track_running_stats=False``), as Caffe's forward does."""
    m = layer.module
    x = layer.bottoms[0]
    cls = _BATCH_NORM.get(len(layer.bottom_shape()))
    affine = {"affine": False} if not m.scale_bias else {}
    learned = state_of(weight=m.weight, bias=m.bias)
    if cls is None:
        handle = layer.project_module(BatchNorm, m.channels, eps=m.eps,
                                      moving_average_fraction=m.moving_average_fraction,
                                      use_global_stats=m.use_global_stats,
                                      scale_bias=m.scale_bias)
    elif m.use_global_stats:
        state = {"running_mean": m.running_mean, "running_var": m.running_var,
                 "num_batches_tracked": torch.tensor(0), **learned}
        momentum = round(1.0 - m.moving_average_fraction, 6)
        handle = layer.submodule(call(cls, m.channels, eps=m.eps, momentum=momentum,
                                      **affine), state,
                                 note="running statistics: Caffe's sums / scale factor")
    else:
        handle = layer.submodule(call(cls, m.channels, eps=m.eps, **affine,
                                      track_running_stats=False), learned,
                                 note="Caffe's use_global_stats: false")
    layer.assign(f"{handle}({x})")


@register_source_emitter("MVN")
def mvn(layer: LayerSource) -> None:
    """Written out for 4-D bottoms: subtract the mean over each plane (or each sample), then
    divide by the biased standard deviation **plus** eps, as Caffe does."""
    m = layer.module
    if len(layer.bottom_shape()) != 4:
        handle = layer.project_module(MVN, normalize_variance=m.normalize_variance,
                                      across_channels=m.across_channels, eps=m.eps)
        layer.assign(f"{handle}({layer.bottoms[0]})")
        return
    x, y = layer.bottoms[0], layer.tops[0]
    dims = (1, 2, 3) if m.across_channels else (2, 3)
    layer.line(f"{y} = {x} - {x}.mean(dim={dims}, keepdim=True)")
    if m.normalize_variance:
        layer.line(f"{y} = {y} / ({y}.square().mean(dim={dims}, keepdim=True).sqrt() + "
                   f"{number(m.eps)})")


# -- broadcasting affine ------------------------------------------------------------------
def _broadcast_view(operand_shape, rank: int, axis: int):
    """The operand's shape followed by ones for bottom[0]'s remaining axes, so that it
    broadcasts from Caffe's ``axis`` (a scalar operand applies everywhere)."""
    operand_shape = tuple(operand_shape)
    if not operand_shape:
        return operand_shape
    return operand_shape + (1,) * (rank - canonical_axis(axis, rank) - len(operand_shape))


def _bottom_operand(variable: str, operand_rank: int, rank: int, axis: int) -> str:
    if not operand_rank:
        return variable
    trailing = rank - canonical_axis(axis, rank) - operand_rank
    return f"{variable}[..., {', '.join(['None'] * trailing)}]" if trailing else variable


@register_source_emitter("Scale")
def scale(layer: LayerSource) -> None:
    """``x * weight (+ bias)``: the learned blobs are stored already shaped to broadcast
    (``C x 1 x 1`` for Caffe's ``C`` at axis 1); a scale bottom gets trailing axes."""
    m = layer.module
    x = layer.bottoms[0]
    rank = len(layer.bottom_shape())
    if m.scale_from_bottom:
        operand = _bottom_operand(layer.bottoms[1], len(layer.bottom_shape(1)), rank, m.axis)
    else:
        view = _broadcast_view(m.weight.shape, rank, m.axis)
        operand = layer.parameter("weight", m.weight.reshape(view), init="ones")
    expression = f"{x} * {operand}"
    if m.bias is not None:
        view = _broadcast_view(m.bias.shape, rank, m.axis)
        expression += " + " + layer.parameter("bias", m.bias.reshape(view))
    layer.assign(expression)


@register_source_emitter("Bias")
def bias(layer: LayerSource) -> None:
    """``x + bias``, the learned bias stored shaped to broadcast from Caffe's ``axis``."""
    m = layer.module
    x = layer.bottoms[0]
    rank = len(layer.bottom_shape())
    if m.bias_from_bottom:
        operand = _bottom_operand(layer.bottoms[1], len(layer.bottom_shape(1)), rank, m.axis)
    else:
        operand = layer.parameter("bias", m.bias.reshape(_broadcast_view(m.bias.shape, rank,
                                                                         m.axis)))
    layer.assign(f"{x} + {operand}")


@register_source_emitter("Softmax")
def softmax(layer: LayerSource) -> None:
    """``nn.Softmax(dim=axis)`` with Caffe's axis (default 1, not -1)."""
    handle = layer.submodule(call("nn.Softmax", dim=layer.module.axis))
    layer.assign(f"{handle}({layer.bottoms[0]})")
