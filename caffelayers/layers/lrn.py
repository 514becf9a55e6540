"""Caffe's ``LRN``: local response normalization across channels or within a channel."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedParameterError
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape

NORM_REGIONS = ("ACROSS_CHANNELS", "WITHIN_CHANNEL")


@register_layer("LRN")
class LRN(CaffeLayer):
    r"""Local response normalization.

    ACROSS_CHANNELS:
    :math:`y_c = x_c \,/\, (k + \frac{\alpha}{n} \sum_{c'=c-(n-1)/2}^{c+(n-1)/2} x_{c'}^2)^\beta`,
    channels outside ``[0, C)`` counting as zero.

    WITHIN_CHANNEL:
    :math:`y = x \,/\, (1 + \alpha \cdot \mathrm{avg}_{n \times n}(x^2))^\beta`, the average
    taken over an ``n x n`` window centred on the pixel, zero-padded by ``(n - 1) / 2``, and
    always divided by ``n * n`` (padding included); ``k`` is not used.

    Args:
        local_size: ``n``, odd: channels summed (ACROSS) or the window's side (WITHIN).
        alpha: scale of the sum (divided by ``n`` ACROSS, by ``n * n`` WITHIN).
        beta: exponent.
        norm_region: ``"ACROSS_CHANNELS"`` or ``"WITHIN_CHANNEL"``.
        k: additive constant of ACROSS_CHANNELS.

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H, W)`.

    Caffe: ``lrn_param { local_size alpha beta norm_region k }``. Caffe builds WITHIN_CHANNEL
    from a square, an AVE pooling (pad ``(n-1)/2``, stride 1, whose padded divisor is always
    ``n * n`` here), a power layer ``(1 + alpha * s)^-beta`` and a product, which is why ``k``
    plays no part there. ``local_size`` must be odd in both modes.
    """

    __constants__ = ["local_size", "alpha", "beta", "norm_region", "k"]

    def __init__(self, local_size: int = 5, alpha: float = 1.0, beta: float = 0.75,
                 norm_region: str = "ACROSS_CHANNELS", k: float = 1.0):
        super().__init__()
        self.local_size = int(local_size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.norm_region = norm_region
        self.k = float(k)
        _check_settings(self.local_size, norm_region, "LRN")

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.lrn_param
        region = (NORM_REGIONS[p.norm_region] if 0 <= p.norm_region < len(NORM_REGIONS)
                  else str(p.norm_region))
        _check_settings(p.local_size, region, f"layer {param.name!r} (LRN)")
        return cls(p.local_size, p.alpha, p.beta, region, p.k)

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        if len(bottom_shapes) != 1 or len(bottom_shapes[0]) != 4:
            raise self.shape_error(bottom_shapes, "one bottom of 4 axes (N x C x H x W)")
        return [tuple(bottom_shapes[0])]

    def forward(self, bottom: torch.Tensor) -> torch.Tensor:
        if bottom.dim() != 4:
            raise self.shape_error([tuple(bottom.shape)], "one bottom of 4 axes (N x C x H x W)")
        half = (self.local_size - 1) // 2
        squares = bottom * bottom
        if self.norm_region == "ACROSS_CHANNELS":
            # Sum n shifted views of the zero-padded squares: n passes over memory, faster
            # than a pooling kernel over the channel axis (on CPU by about 2x, with backward).
            channels = bottom.shape[1]
            padded = F.pad(squares, (0, 0, 0, 0, half, half))
            window = padded.narrow(1, 0, channels)
            for offset in range(1, self.local_size):
                window = window + padded.narrow(1, offset, channels)
            scale = self.k + (self.alpha / self.local_size) * window
        else:
            mean = F.avg_pool2d(squares, self.local_size, stride=1, padding=half,
                                count_include_pad=True)
            scale = 1.0 + self.alpha * mean
        return bottom * scale.pow(-self.beta)

    def extra_repr(self) -> str:
        parts = [f"local_size={self.local_size}", f"alpha={self.alpha:g}",
                 f"beta={self.beta:g}"]
        if self.norm_region != "ACROSS_CHANNELS":
            parts.append(f"norm_region={self.norm_region}")
        elif self.k != 1.0:
            parts.append(f"k={self.k:g}")
        return ", ".join(parts)


def _check_settings(local_size: int, norm_region: str, where: str) -> None:
    if norm_region not in NORM_REGIONS:
        raise UnsupportedParameterError(
            f"{where}: norm_region {norm_region!r} is not one of {', '.join(NORM_REGIONS)}")
    if local_size < 1 or local_size % 2 == 0:
        raise UnsupportedParameterError(
            f"{where}: local_size must be odd (as in Caffe), got {local_size}")
