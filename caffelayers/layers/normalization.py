"""Caffe's normalization layers: ``BatchNorm`` (statistics only, or NVCaffe's with a scale and
shift) and ``MVN``."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .. import fillers
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape, count

#: NVCaffe's floor on BatchNorm's eps (cuDNN's CUDNN_BN_MIN_EPSILON).
NVCAFFE_MIN_EPS = 1e-5


def _is_default(value: float, default: float) -> bool:
    """Equal up to float32 rounding: proto floats arrive as float32 values (1e-5 -> 9.99e-6)."""
    return abs(value - default) <= 1e-6 * abs(default)


@register_layer("BatchNorm")
class BatchNorm(CaffeLayer):
    r"""Normalizes each channel by its mean and variance, as Caffe's ``BatchNorm``.

    .. math::
        y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}

    with :math:`\mu_c, \sigma^2_c` the batch statistics of channel ``c`` over the batch and
    every spatial position (``use_global_stats=False``), or the stored ones
    (``use_global_stats=True``). There is no learned scale or shift in BVLC Caffe, which puts
    those in a separate ``Scale`` layer; NVCaffe's ``scale_bias`` adds them to the layer:
    :math:`y = \gamma_c \hat x + \beta_c`.

    Args:
        channels: the size of axis 1.
        eps: added to the variance before the square root.
        moving_average_fraction: how much of the running sums each batch keeps.
        use_global_stats: normalize with the stored statistics instead of the batch's.
        scale_bias: NVCaffe's layer: a learned scale and shift per channel, and NVCaffe's
            statistics rules (below).

    Shape:
        - Input: :math:`(N, C, *)`, two axes or more.
        - Output: :math:`(N, C, *)`, the input's shape.

    Attributes:
        mean_sum: buffer ``(C,)``, Caffe's blob 0: the decayed sum of batch means.
        variance_sum: buffer ``(C,)``, Caffe's blob 1: the decayed sum of unbiased batch
            variances.
        scale_factor: buffer ``(1,)``, Caffe's blob 2: the decayed count the sums divide by.
        running_mean, running_var: the stored statistics, ``sum / scale_factor`` (the blobs
            themselves with ``scale_bias``).
        weight, bias: ``(C,)``, NVCaffe's blobs 3 and 4 with ``scale_bias``; else None.

    Caffe: ``batch_norm_param { use_global_stats moving_average_fraction eps }``.
    ``use_global_stats`` defaults to ``phase == TEST``. The stored statistics are
    ``blob / blob2``, with a scale factor of 0 meaning statistics of 0 (a fresh net). Each
    forward with batch statistics updates the blobs even at test time:
    ``s = s * maf + 1``, ``blob0 = blob0 * maf + mean``, ``blob1 = blob1 * maf + m/(m-1) var``
    with ``m = count / C`` (the bias correction). The normalizing variance is the biased
    one. The three blobs are buffers here (Caffe pins their ``lr_mult`` to 0).

    NVCaffe (NVIDIA/caffe 0.17): ``batch_norm_param { scale_bias scale_filler bias_filler }``;
    either filler alone also turns ``scale_bias`` on. The blobs are then mean, variance,
    NVCaffe's "variance correction" (``(1,)``, always 1, never read), scale and shift, the
    fillers defaulting to 1 and 0. NVCaffe's forward differs from BVLC's and is followed
    when ``scale_bias`` is on: the stored statistics are blobs 0 and 1 themselves, ``eps`` is
    at least 1e-5, the phase alone chooses the statistics (``use_global_stats`` is not
    read), and each TRAIN forward stores ``blob = maf * blob + (1 - maf) * batch`` with the
    biased batch variance, the first two forwards copying the batch's statistics instead
    (NVCaffe's CPU rule; its cuDNN engine keeps the unbiased variance). The scale's and
    shift's gradients are ``sum(dy * x_hat)`` and ``sum(dy)``.
    """

    __constants__ = ["channels", "eps", "moving_average_fraction", "use_global_stats",
                     "scale_bias"]

    def __init__(self, channels: int, eps: float = 1e-5, moving_average_fraction: float = 0.999,
                 use_global_stats: bool = False, scale_bias: bool = False):
        super().__init__()
        self.channels = int(channels)
        self.eps = float(eps)
        self.moving_average_fraction = float(moving_average_fraction)
        self.use_global_stats = bool(use_global_stats)
        self.scale_bias = bool(scale_bias)
        self.register_buffer("mean_sum", torch.zeros(self.channels))
        self.register_buffer("variance_sum", torch.zeros(self.channels))
        self.register_buffer("scale_factor", torch.zeros(1) if not self.scale_bias
                             else torch.ones(1))
        if self.scale_bias:
            self.weight = nn.Parameter(torch.ones(self.channels))
            self.bias = nn.Parameter(torch.zeros(self.channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # NVCaffe's per-layer forward count (iter_): its first two TRAIN forwards copy.
        self.train_forwards = 0

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "BatchNorm":
        p = param.batch_norm_param
        shape = bottom_shapes[0]
        channels = shape[1] if len(shape) > 1 else 1  # output_shapes rejects 1-axis bottoms
        given = {field.name for field, _ in p.ListFields()}
        scale_bias = ("scale_bias" in given and p.scale_bias) or "scale_filler" in given or \
            "bias_filler" in given
        if not scale_bias:
            use_global = (p.use_global_stats if p.HasField("use_global_stats")
                          else ctx.phase == "TEST")
            return cls(channels, eps=p.eps, moving_average_fraction=p.moving_average_fraction,
                       use_global_stats=use_global)
        # NVCaffe: the phase decides, and eps has cuDNN's floor.
        layer = cls(channels, eps=max(p.eps, NVCAFFE_MIN_EPS),
                    moving_average_fraction=p.moving_average_fraction,
                    use_global_stats=ctx.phase == "TEST", scale_bias=True)
        # Without a filler NVCaffe starts the scale at 1 and the shift at 0, as __init__ does.
        for blob, name in ((layer.weight, "scale_filler"), (layer.bias, "bias_filler")):
            if ctx.fill and name in given:
                fillers.fill(blob, getattr(p, name), ctx.generator, param.name)
        return layer

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        shape = bottom_shapes[0]
        # Caffe's Reshape reads shape(1) of every bottom, so a 1-axis bottom fails there.
        if len(shape) < 2 or shape[1] != self.channels:
            raise self.shape_error(bottom_shapes, f"a bottom of 2 or more axes with "
                                   f"{self.channels} channels on axis 1")
        return [tuple(shape)]

    @property
    def running_mean(self) -> torch.Tensor:
        if self.scale_bias:
            return self.mean_sum
        return self.mean_sum * self._inverse_scale_factor()

    @property
    def running_var(self) -> torch.Tensor:
        if self.scale_bias:
            return self.variance_sum
        return self.variance_sum * self._inverse_scale_factor()

    def _inverse_scale_factor(self) -> torch.Tensor:
        s = self.scale_factor
        # Caffe: a scale factor of 0 (nothing accumulated yet) gives statistics of 0.
        return torch.where(s == 0, torch.zeros_like(s), 1.0 / s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise self.shape_error([tuple(x.shape)], f"a bottom of 2 or more axes with "
                                   f"{self.channels} channels on axis 1")
        per_channel = (1, self.channels) + (1,) * (x.dim() - 2)
        if self.use_global_stats:
            mean = self.running_mean.to(x.dtype)
            var = self.running_var.to(x.dtype)
        else:
            reduce_axes = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=reduce_axes)
            var = (x - mean.view(per_channel)).square().mean(dim=reduce_axes)
            if self.scale_bias:
                self._nvcaffe_accumulate(mean.detach(), var.detach())
            else:
                self._accumulate(mean.detach(), var.detach(), x.numel() // self.channels)
        top = (x - mean.view(per_channel)) / torch.sqrt(var + self.eps).view(per_channel)
        if self.scale_bias:
            top = top * self.weight.view(per_channel) + self.bias.view(per_channel)
        return top

    @torch.no_grad()
    def _nvcaffe_accumulate(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        maf = self.moving_average_fraction
        for stored, batch in ((self.mean_sum, mean), (self.variance_sum, var)):
            batch = batch.to(stored.dtype)
            if self.train_forwards > 1:
                stored.mul_(maf).add_(batch * (1.0 - maf))
            else:
                stored.copy_(batch)
        self.train_forwards += 1

    @torch.no_grad()
    def _accumulate(self, mean: torch.Tensor, var: torch.Tensor, samples: int) -> None:
        maf = self.moving_average_fraction
        bias_correction = samples / (samples - 1) if samples > 1 else 1.0
        self.scale_factor.mul_(maf).add_(1.0)
        self.mean_sum.mul_(maf).add_(mean.to(self.mean_sum.dtype))
        self.variance_sum.mul_(maf).add_(var.to(self.variance_sum.dtype) * bias_correction)

    def caffe_blobs(self) -> List[torch.Tensor]:
        blobs = [self.mean_sum, self.variance_sum, self.scale_factor]
        return blobs + [self.weight, self.bias] if self.scale_bias else blobs

    def extra_repr(self) -> str:
        parts = [str(self.channels)]
        if not _is_default(self.eps, 1e-5):
            parts.append(f"eps={self.eps:g}")
        if not _is_default(self.moving_average_fraction, 0.999):
            parts.append(f"moving_average_fraction={self.moving_average_fraction:g}")
        parts.append(f"use_global_stats={self.use_global_stats}")
        if self.scale_bias:
            parts.append("scale_bias=True")
        return ", ".join(parts)


class _MVNNormalize(torch.autograd.Function):
    """Rows divided by ``std + eps``, with Caffe's backward.

    Caffe's MVN backward is ``(dy - mean(dy) - y * mean(dy * y)) / (std + eps)``. The exact
    gradient of its forward ``(x - mean) / (std + eps)`` has a factor ``(std + eps) / std``
    on the last term, which Caffe leaves out; the two agree only at ``eps = 0``.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, eps: float) -> torch.Tensor:
        centred = rows - rows.mean(dim=1, keepdim=True)
        denominator = centred.square().mean(dim=1, keepdim=True).sqrt() + eps
        normalized = centred / denominator
        ctx.save_for_backward(normalized, denominator)
        return normalized

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        normalized, denominator = ctx.saved_tensors
        projection = (grad * normalized).mean(dim=1, keepdim=True)
        centred_grad = grad - grad.mean(dim=1, keepdim=True)
        return (centred_grad - normalized * projection) / denominator, None


def _legacy_shape(shape: Sequence[int]) -> Shape:
    """Caffe's num/channels/height/width view of a blob of at most 4 axes (1 where absent)."""
    return tuple(shape) + (1,) * (4 - len(shape))


@register_layer("MVN")
class MVN(CaffeLayer):
    r"""Mean-variance normalization per sample and channel (or per sample), as Caffe's ``MVN``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x]} + \epsilon}

    over each ``(n, c)`` plane (or over each sample with ``across_channels``); with
    ``normalize_variance=False`` only the mean is subtracted.

    Args:
        normalize_variance: divide by the standard deviation after subtracting the mean.
        across_channels: take the statistics over ``C x H x W`` instead of ``H x W``.
        eps: added to the standard deviation (not to the variance).

    Shape:
        - Input: :math:`(N, C, H, W)`, or fewer axes, read as Caffe's legacy 4-D view.
        - Output: :math:`(N, C, H, W)`, always 4 axes: missing trailing axes become 1.

    Caffe: ``mvn_param { normalize_variance across_channels eps }``, eps default 1e-9.
    Caffe adds ``eps`` to the standard deviation, uses the biased variance, and its
    backward drops a factor ``(std + eps) / std`` from the exact gradient (reproduced here).
    Its shape rule goes through the legacy ``num/channels/height/width`` accessors, so a
    bottom of more than 4 axes is rejected and a 2-D bottom ``N x C`` gives an ``N x C x 1 x 1``
    top (every plane then holds one value, which normalizes to 0).
    """

    __constants__ = ["normalize_variance", "across_channels", "eps"]

    def __init__(self, normalize_variance: bool = True, across_channels: bool = False,
                 eps: float = 1e-9):
        super().__init__()
        self.normalize_variance = bool(normalize_variance)
        self.across_channels = bool(across_channels)
        self.eps = float(eps)

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext) -> "MVN":
        p = param.mvn_param
        return cls(p.normalize_variance, p.across_channels, p.eps)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        shape = bottom_shapes[0]
        if len(shape) > 4:
            raise self.shape_error(bottom_shapes, "at most 4 axes (Caffe's MVN uses the legacy "
                                   "num/channels/height/width accessors)")
        return [_legacy_shape(shape)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.output_shapes([tuple(x.shape)])[0]
        groups = shape[0] if self.across_channels else shape[0] * shape[1]
        rows = x.reshape(groups, count(shape) // groups if groups else 0)
        if self.normalize_variance:
            rows = _MVNNormalize.apply(rows, self.eps)
        else:
            rows = rows - rows.mean(dim=1, keepdim=True)
        return rows.reshape(shape)

    def extra_repr(self) -> str:
        parts = []
        if not self.normalize_variance:
            parts.append("normalize_variance=False")
        if self.across_channels:
            parts.append("across_channels=True")
        if not _is_default(self.eps, 1e-9):
            parts.append(f"eps={self.eps:g}")
        return ", ".join(parts)
