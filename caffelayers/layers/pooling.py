"""Caffe's ``Pooling``: MAX, AVE and STOCHASTIC over 2-D windows, with Caffe's rounding.

Caffe sizes the output with ``ceil`` by default and, when padded, drops a last window that
would start in the right/bottom padding. PyTorch's ``ceil_mode`` applies the same drop rule
(always, where Caffe applies it only with padding) and its ``count_include_pad`` average uses
Caffe's divisor (the window clipped to ``in + pad``), so most layers run as one PyTorch
kernel. The rest (``pad > kernel / 2``, which PyTorch refuses, and unpadded ceil windows that
start past the input) pad explicitly and, for AVE, divide by Caffe's divisor tensor.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import UnsupportedParameterError
from ..limits import INT_MAX
from ..registry import register_layer
from .base import BuildContext, CaffeLayer, Shape

#: Caffe starts every max at -FLT_MAX (in float and double builds alike): a window with
#: nothing in it reports this value.
FLT_MAX = 3.4028234663852886e38
#: Caffe's stochastic test pooling adds FLT_MIN to the window sum so that 0 / 0 gives 0.
FLT_MIN = 1.1754943508222875e-38

POOL_METHODS = ("MAX", "AVE", "STOCHASTIC")
ROUND_MODES = ("CEIL", "FLOOR")

Pair = Union[int, Sequence[int]]


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool = True) -> int:
    """Caffe's number of windows along one axis.

    ``ceil`` (or ``floor``) of ``(size + 2 pad - kernel) / stride``, plus one; with padding, a
    last window starting at or past ``size + pad`` (entirely in the padding) is dropped.
    """
    span = size + 2 * pad - kernel
    windows = (-(-span // stride) if ceil_mode else span // stride) + 1
    if pad and (windows - 1) * stride >= size + pad:
        windows -= 1
    return windows


def _torch_pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """PyTorch's count, which drops a window starting past ``size + pad`` even without pad."""
    span = size + 2 * pad - kernel
    windows = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (windows - 1) * stride >= size + pad:
        windows -= 1
    return windows


def _pair(value: Pair, what: str) -> Tuple[int, int]:
    values = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 2:
        raise UnsupportedParameterError(f"Pooling: {what} needs one value or two (h, w), got "
                                        f"{value!r}")
    return values


def _check_settings(pool: str, kernel: Optional[Tuple[int, int]], stride: Tuple[int, int],
                    pad: Tuple[int, int], global_pooling: bool, round_mode: str,
                    where: str) -> None:
    """Caffe's ``LayerSetUp`` checks, raised as UnsupportedParameterError naming ``where``."""
    problem = ""
    if pool not in POOL_METHODS:
        problem = f"pool {pool!r} is not one of {', '.join(POOL_METHODS)}"
    elif round_mode not in ROUND_MODES:
        problem = f"round_mode {round_mode!r} is not one of {', '.join(ROUND_MODES)}"
    elif global_pooling:
        if kernel is not None:
            problem = "global_pooling takes its kernel from the bottom; give no kernel size"
        elif pad != (0, 0) or stride != (1, 1):
            problem = "global_pooling needs pad 0 and stride 1"
    elif kernel is None or min(kernel) < 1:
        problem = f"kernel size must be at least 1, got {kernel}"
    elif min(stride) < 1:
        problem = f"stride must be at least 1, got {stride}"
    elif pad != (0, 0) and pool == "STOCHASTIC":
        problem = "padding is implemented only for MAX and AVE pooling (as in Caffe)"
    elif pad[0] >= kernel[0] or pad[1] >= kernel[1]:
        problem = f"pad {pad} must be smaller than the kernel {kernel}"
    if problem:
        raise UnsupportedParameterError(f"{where}: {problem}")


def _window_lengths(size: int, windows: int, kernel: int, stride: int, pad: int,
                    device) -> torch.Tensor:
    """Caffe's AVE divisor along one axis: each window clipped to ``[-pad, size + pad)``.

    In Caffe's degenerate unpadded ceil windows that start at or past the input this is zero
    or negative, and so is Caffe's divisor (giving NaN or -0, which we reproduce).
    """
    start = torch.arange(windows, device=device) * stride - pad
    return torch.clamp(start + kernel, max=size + pad) - start


@register_layer("Pooling")
class Pooling(CaffeLayer):
    r"""2-D pooling with Caffe's output size, padding and divisor rules.

    MAX: :math:`y = \max_{window} x` (padding never wins). AVE:
    :math:`y = \sum_{window} x / |window \cap [-p, in + p)|` (padding counts, the area beyond
    ``in + p`` does not). STOCHASTIC at TEST: :math:`y = \sum x^2 / \sum x` (Caffe's GPU
    rule); at TRAIN: one element drawn with probability :math:`x / \sum x`.

    Args:
        pool: ``"MAX"``, ``"AVE"`` or ``"STOCHASTIC"``.
        kernel_size: ``k`` or ``(k_h, k_w)``; None with ``global_pooling``.
        stride: ``s`` or ``(s_h, s_w)``.
        pad: ``p`` or ``(p_h, p_w)``; must be smaller than the kernel (MAX and AVE only).
        global_pooling: pool each channel's whole plane (kernel = bottom's H x W).
        round_mode: ``"CEIL"`` (Caffe's default) or ``"FLOOR"``: how the window count rounds.
        phase: ``"TRAIN"`` or ``"TEST"``; only STOCHASTIC depends on it.
        mask_top: MAX only: also return Caffe's second top, the index ``h * W + w`` of each
            maximum in its channel plane (as floats; -1 for an empty window).

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H_o, W_o)` with
          :math:`H_o = \lceil (H + 2 p_h - k_h) / s_h \rceil + 1`, minus one when
          :math:`p_h > 0` and :math:`(H_o - 1) s_h \ge H + p_h` (``floor`` with ``FLOOR``);
          the same for ``W``. ``1 x 1`` with ``global_pooling``.

    Attributes:
        generator: the ``torch.Generator`` that STOCHASTIC pooling draws from at TRAIN
            (None: PyTorch's default generator); ``from_caffe`` sets the build's generator.

    Caffe: ``pooling_param { pool kernel_size|kernel_h,kernel_w stride|stride_h,stride_w
    pad|pad_h,pad_w global_pooling round_mode }``; forks that spell ``round_mode`` as
    ``ceil_mode: true|false`` are read by the parser. MAX backward sends each window's
    gradient to its first maximum in row-major order, as PyTorch's kernel does. A window
    whose values are all ``-inf`` reports ``-inf`` (Caffe: ``-FLT_MAX``), and a NaN wins its
    window (Caffe's ``>`` skips it).

    STOCHASTIC exists only in Caffe's GPU build (its CPU code aborts). Its TEST rule adds
    ``FLT_MIN`` to the denominator, so an all-zero window gives 0; the gradient here is the
    true derivative of that ratio (Caffe's TEST backward reuses stale TRAIN indices and is
    not meaningful). At TRAIN the draw follows Caffe's kernel: a uniform ``u`` per window,
    and the first element whose running sum reaches ``u * sum`` wins and gets the gradient;
    the random numbers come from ``generator``, not Caffe's, so draws differ from Caffe's.
    """

    __constants__ = ["pool", "kernel_size", "stride", "pad", "global_pooling", "round_mode",
                     "phase", "mask_top"]

    def __init__(self, pool: str = "MAX", kernel_size: Optional[Pair] = None,
                 stride: Pair = 1, pad: Pair = 0, global_pooling: bool = False,
                 round_mode: str = "CEIL", phase: str = "TEST", mask_top: bool = False):
        super().__init__()
        self.pool = pool
        self.kernel_size = None if kernel_size is None else _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.pad = _pair(pad, "pad")
        self.global_pooling = bool(global_pooling)
        self.round_mode = round_mode
        self.phase = phase
        self.mask_top = bool(mask_top)
        _check_settings(pool, self.kernel_size, self.stride, self.pad, self.global_pooling,
                        round_mode, "Pooling")
        if self.mask_top and pool != "MAX":
            raise UnsupportedParameterError("Pooling: only MAX pooling has a mask top")
        self.generator: Optional[torch.Generator] = None

    @classmethod
    def from_caffe(cls, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        p = param.pooling_param
        where = f"layer {param.name!r} (Pooling)"
        pool = POOL_METHODS[p.pool] if 0 <= p.pool < len(POOL_METHODS) else str(p.pool)
        kernel = cls._read_pair(p, "kernel_size", "kernel", where)
        stride = cls._read_pair(p, "stride", "stride", where)
        pad = cls._read_pair(p, "pad", "pad", where)
        round_mode = ROUND_MODES[p.round_mode] if p.round_mode < 2 else str(p.round_mode)
        _check_settings(pool, kernel, stride, pad, p.global_pooling, round_mode, where)
        tops = len(param.top)
        if tops > 2 or (tops == 2 and pool != "MAX"):
            raise UnsupportedParameterError(
                f"{where}: {tops} tops; MAX pooling takes one or two (the second is the "
                "argmax mask), AVE and STOCHASTIC one")
        layer = cls(pool, kernel, stride, pad, p.global_pooling, round_mode, ctx.phase,
                    mask_top=tops == 2)
        layer.generator = ctx.generator
        return layer

    @staticmethod
    def _read_pair(p, field: str, prefix: str, where: str) -> Optional[Tuple[int, int]]:
        """``field`` for both axes, or the ``prefix_h``/``prefix_w`` pair (not both)."""
        has_one, has_h, has_w = (p.HasField(field), p.HasField(f"{prefix}_h"),
                                 p.HasField(f"{prefix}_w"))
        if has_h or has_w:
            if has_one or not (has_h and has_w):
                raise UnsupportedParameterError(
                    f"{where}: give {field}, or both {prefix}_h and {prefix}_w")
            return (getattr(p, f"{prefix}_h"), getattr(p, f"{prefix}_w"))
        if field == "kernel_size" and not has_one:
            return None
        value = getattr(p, field)
        return (value, value)

    # -- geometry --------------------------------------------------------------------------
    def _kernel(self, height: int, width: int) -> Tuple[int, int]:
        return (height, width) if self.global_pooling else self.kernel_size

    def _geometry(self, bottom_shapes: Sequence[Shape]):
        """Kernel and window counts for a bottom shape, or the ShapeError that rejects it."""
        if len(bottom_shapes) != 1 or len(bottom_shapes[0]) != 4:
            raise self.shape_error(bottom_shapes, "one bottom of 4 axes (N x C x H x W)")
        size = tuple(bottom_shapes[0][2:])
        kernel = self._kernel(*size)
        if any(k > length + 2 * p for length, k, p in zip(size, kernel, self.pad)):
            raise self.shape_error(
                bottom_shapes, f"kernel {kernel[0]}x{kernel[1]} is larger than the padded "
                f"input {size[0] + 2 * self.pad[0]}x{size[1] + 2 * self.pad[1]}")
        ceil_mode = self.round_mode == "CEIL"
        windows = tuple(pooled_size(length, k, s, p, ceil_mode) for length, k, s, p in
                        zip(size, kernel, self.stride, self.pad))
        # Windows are computed on the input padded to hold all of them; a stride far past the
        # input (a typo) would make that a huge blob: refused before anything is allocated.
        extent = tuple(max(length + p, (n - 1) * s + k) for length, k, s, p, n in
                       zip(size, kernel, self.stride, self.pad, windows))
        padded = tuple(bottom_shapes[0][:2]) + extent
        if math.prod(padded) > INT_MAX:
            raise self.shape_error(
                bottom_shapes, f"stride {self.stride[0]}x{self.stride[1]} puts windows far past "
                f"the input; holding them takes the input padded to "
                f"{'x'.join(map(str, padded))} = {math.prod(padded):,} values, more than a blob "
                f"holds ({INT_MAX:,})")
        return size, kernel, windows

    def output_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        _, kernel, windows = self._geometry(bottom_shapes)
        shape = tuple(bottom_shapes[0][:2]) + windows
        return [shape, shape] if self.mask_top else [shape]

    # -- forward ---------------------------------------------------------------------------
    def forward(self, bottom: torch.Tensor):
        size, kernel, windows = self._geometry([tuple(bottom.shape)])
        ceil_mode = self.round_mode == "CEIL"
        # PyTorch's kernels give Caffe's numbers when they accept the padding and agree on
        # the window count; otherwise the padding (and the clip) is made explicit.
        native = all(
            p <= k // 2 and _torch_pooled_size(length, k, s, p, ceil_mode) == n
            for length, k, s, p, n in zip(size, kernel, self.stride, self.pad, windows))
        if self.pool == "MAX":
            return self._max(bottom, kernel, windows, native, ceil_mode)
        if self.pool == "AVE":
            if native:
                return F.avg_pool2d(bottom, kernel, self.stride, self.pad, ceil_mode=ceil_mode,
                                    count_include_pad=True)
            return self._window_sums(bottom, kernel, windows) / self._divisor(
                size, kernel, windows, bottom)
        if self.phase == "TRAIN":
            return self._stochastic_sample(bottom, kernel, windows)
        squares = self._window_sums(bottom * bottom, kernel, windows)
        return squares / (self._window_sums(bottom, kernel, windows) + FLT_MIN)

    def _explicit_pads(self, size: Tuple[int, int], kernel: Tuple[int, int],
                       windows: Tuple[int, int]) -> Tuple[int, int, int, int]:
        """``F.pad`` widths (left, right, top, bottom) that hold every window exactly."""
        right = [max(0, (n - 1) * s + k - length - p) for length, k, s, p, n in
                 zip(size, kernel, self.stride, self.pad, windows)]
        return (self.pad[1], right[1], self.pad[0], right[0])

    def _window_sums(self, bottom: torch.Tensor, kernel, windows) -> torch.Tensor:
        """Sum over each window with zeros outside the input."""
        pads = self._explicit_pads(bottom.shape[2:], kernel, windows)
        return F.avg_pool2d(F.pad(bottom, pads), kernel, self.stride, divisor_override=1)

    def _divisor(self, size, kernel, windows, like: torch.Tensor) -> torch.Tensor:
        rows, cols = (_window_lengths(length, n, k, s, p, like.device) for length, n, k, s, p in
                      zip(size, windows, kernel, self.stride, self.pad))
        return (rows[:, None] * cols[None, :]).to(like.dtype)

    def _max(self, bottom: torch.Tensor, kernel, windows, native: bool, ceil_mode: bool):
        if native:
            result = F.max_pool2d(bottom, kernel, self.stride, self.pad, ceil_mode=ceil_mode,
                                  return_indices=self.mask_top)
            if not self.mask_top:
                return result
            top, index = result
            return top, index.to(top.dtype)
        height, width = bottom.shape[2:]
        pads = self._explicit_pads((height, width), kernel, windows)
        padded = F.pad(bottom, pads, value=float("-inf"))
        top, index = F.max_pool2d(padded, kernel, self.stride, return_indices=True)
        # Only unpadded ceil windows can start past the input; Caffe reports -FLT_MAX there.
        if any((n - 1) * s - p >= length for n, s, p, length in
               zip(windows, self.stride, self.pad, (height, width))):
            top = top.clamp_min(-FLT_MAX)
        if not self.mask_top:
            return top
        padded_width = padded.shape[3]
        row = torch.div(index, padded_width, rounding_mode="floor") - pads[2]
        col = index % padded_width - pads[0]
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        mask = torch.where(inside, row * width + col, torch.full_like(index, -1))
        return top, mask.to(top.dtype)

    def _stochastic_sample(self, bottom: torch.Tensor, kernel, windows) -> torch.Tensor:
        num, channels = bottom.shape[:2]
        pads = self._explicit_pads(bottom.shape[2:], kernel, windows)
        # N x C x (k_h k_w) x windows, each window's elements in row-major order.
        patches = F.unfold(F.pad(bottom, pads), kernel, stride=self.stride)
        patches = patches.view(num, channels, kernel[0] * kernel[1], -1)
        running = patches.detach().cumsum(dim=2)
        device = self.generator.device if self.generator is not None else bottom.device
        uniform = torch.rand((num, channels, 1, patches.shape[3]), generator=self.generator,
                             device=device, dtype=bottom.dtype).to(bottom.device)
        reached = running >= uniform * running[:, :, -1:]
        # argmax of a 0/1 tensor is its first 1: the first element to reach the threshold.
        chosen = reached.to(torch.uint8).argmax(dim=2, keepdim=True)
        return patches.gather(2, chosen).view(num, channels, *windows)

    def extra_repr(self) -> str:
        parts = [f"pool={self.pool}"]
        if self.global_pooling:
            parts.append("global_pooling=True")
        else:
            parts.append(f"kernel_size={self.kernel_size}")
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        if self.pad != (0, 0):
            parts.append(f"pad={self.pad}")
        if self.round_mode != "CEIL":
            parts.append(f"round_mode={self.round_mode}")
        if self.pool == "STOCHASTIC":
            parts.append(f"phase={self.phase}")
        if self.mask_top:
            parts.append("mask_top=True")
        return ", ".join(parts)
