"""Caffe's ``DataTransformer``: mean subtraction, crop, mirror and scale of one image.

.. math::
    y = \\text{mirror}(\\text{crop}(x - \\mu)) \\cdot \\text{scale}

computed in float32 as Caffe computes ``(pixel - mean) * scale``, so the values are Caffe's
bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import CaffeFormatError, CaffeLayersError, UnsupportedParameterError
from . import files


class DataTransformer:
    """The ``transform_param`` of a data layer, applied to one image at a time.

    Args:
        scale: multiplies every value after the mean is subtracted.
        mirror: flip the width axis of an image with probability 1/2 (in both phases).
        crop_size: square crop side; 0 keeps the whole image. TRAIN crops at a random
            offset, TEST at the centre (``(H - crop) // 2``).
        mean: a ``C x H x W`` mean image (``mean_file``), subtracted from the whole image
            before the crop, so the crop sees the mean at the same offset.
        mean_values: one value per channel, or one for every channel.
        phase: ``"TRAIN"`` or ``"TEST"``.
        layer: the layer's description for messages (``"layer 'data' (ImageData)"``).

    Shape:
        - Input: ``(C, H, W)``, uint8 pixels or floats (a raw Datum's ``float_data``).
        - Output: ``(C, crop, crop)`` if ``crop_size`` else ``(C, H, W)``, float32.

    Caffe:
        ``transform_param { scale mirror crop_size mean_file mean_value force_color
        force_gray }``; ``force_color``/``force_gray`` choose how an encoded Datum is
        decoded (see :class:`~caffelayers.data.sources.LMDBSource`). Mirroring ignores the
        phase, as in Caffe (set ``mirror: false`` in the TEST net's data layer to test
        without it); giving both ``mean_file`` and ``mean_value`` is an error, as there. The
        random draws come from the caller's generator, not Caffe's RNG, so which images are
        flipped or where they are cropped differs from a Caffe run (the distribution does
        not).
    """

    def __init__(self, scale: float = 1.0, mirror: bool = False, crop_size: int = 0,
                 mean: Optional[np.ndarray] = None, mean_values: Sequence[float] = (),
                 phase: str = "TRAIN", layer: str = "data layer"):
        if mean is not None and len(mean_values):
            raise CaffeLayersError(f"{layer}: transform_param cannot have both mean_file and "
                                   "mean_value")
        if crop_size < 0:
            raise UnsupportedParameterError(f"{layer}: crop_size must be >= 0, got {crop_size}")
        self.scale = np.float32(scale)
        self.mirror = bool(mirror)
        self.crop_size = int(crop_size)
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.mean_values = np.asarray(mean_values, dtype=np.float32)
        self.phase = phase.upper()
        self.layer = layer

    @classmethod
    def from_caffe(cls, param, phase: str, source_dir: Optional[Path]) -> "DataTransformer":
        """From a ``LayerParameter``: its ``transform_param``, with ``mean_file`` read."""
        layer = f"layer {param.name!r} ({param.type})"
        p = param.transform_param
        mean = None
        if p.mean_file:
            path = files.resolve(p.mean_file, source_dir, f"{layer}: transform_param.mean_file")
            from ..proto import io

            mean = io.read_binaryproto(path)
            if mean.ndim == 4 and mean.shape[0] == 1:
                mean = mean[0]
            if mean.ndim != 3:
                raise CaffeFormatError(f"a mean file holds a 1 x C x H x W blob, this one is "
                                       f"{'x'.join(map(str, mean.shape))}", path)
        return cls(p.scale, p.mirror, p.crop_size, mean, list(p.mean_value), phase, layer)

    def output_shape(self, channels: int, height: int, width: int) -> Tuple[int, int, int]:
        """The ``(C, H, W)`` an image of that size becomes."""
        if self.crop_size:
            return channels, self.crop_size, self.crop_size
        return channels, height, width

    @property
    def random(self) -> bool:
        """Whether :meth:`__call__` draws from its generator (mirror, or a TRAIN crop)."""
        return self.mirror or (self.crop_size > 0 and self.phase == "TRAIN")

    def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator] = None,
                 where: str = "") -> np.ndarray:
        """Transform one ``C x H x W`` image; ``where`` names it in messages."""
        channels, height, width = image.shape
        where = f"{self.layer}: {where}" if where else self.layer
        top, left, size_h, size_w = 0, 0, height, width
        if self.crop_size:
            size_h = size_w = self.crop_size
            if height < size_h or width < size_w:
                raise CaffeLayersError(f"{where}: the image is {height}x{width}, smaller than "
                                       f"crop_size {self.crop_size}")
            if self.phase == "TRAIN":
                top = int(rng.integers(height - size_h + 1))
                left = int(rng.integers(width - size_w + 1))
            else:
                top, left = (height - size_h) // 2, (width - size_w) // 2
        window = (slice(None), slice(top, top + size_h), slice(left, left + size_w))
        out = image[window].astype(np.float32)
        if self.mean is not None:
            if self.mean.shape != image.shape:
                raise CaffeLayersError(
                    f"{where}: the mean file is {'x'.join(map(str, self.mean.shape))} (C x H x "
                    f"W), the image {channels}x{height}x{width}; they must match")
            out -= self.mean[window]
        elif self.mean_values.size:
            values = self.mean_values
            if values.size == 1:
                values = np.repeat(values, channels)
            elif values.size != channels:
                raise CaffeLayersError(f"{where}: {values.size} mean_value entries for a "
                                       f"{channels}-channel image; give 1 or {channels}")
            out -= values[:, None, None]
        if self.mirror and rng.integers(2):
            out = out[:, :, ::-1]
        if self.scale != 1:
            out *= self.scale
        return np.ascontiguousarray(out)

    def __repr__(self) -> str:
        parts = [f"phase={self.phase}"]
        if self.scale != 1:
            parts.append(f"scale={float(self.scale):g}")
        if self.mirror:
            parts.append("mirror=True")
        if self.crop_size:
            parts.append(f"crop_size={self.crop_size}")
        if self.mean is not None:
            parts.append(f"mean={'x'.join(map(str, self.mean.shape))}")
        if self.mean_values.size:
            parts.append(f"mean_values={self.mean_values.tolist()}")
        return f"DataTransformer({', '.join(parts)})"
