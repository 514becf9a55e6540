"""Caffe's ``WindowData`` (R-CNN): windows cut out of images, warped to ``crop_size``,
with a fixed share of foreground windows in every batch.

Window file (whitespace-separated fields, read as Caffe reads them with ``>>``, so line breaks
are a convention), repeated once per image::

    # IMAGE_INDEX          (0, 1, 2, ... in order: Caffe looks images up by this number)
    IMAGE_PATH             (root_folder + IMAGE_PATH, joined as strings)
    CHANNELS HEIGHT WIDTH  (as declared; the images are read in colour whatever they say)
    NUM_WINDOWS
    CLASS_INDEX OVERLAP X1 Y1 X2 Y2    (NUM_WINDOWS times; corners inclusive, 0-based)

A window with ``OVERLAP >= fg_threshold`` is foreground (its label ``CLASS_INDEX``, which must
be positive), one with ``OVERLAP < bg_threshold`` background (label 0), and the rest are
dropped. A batch holds ``num_fg = int(batch_size * fg_fraction)`` foreground windows after
``batch_size - num_fg`` background ones, each drawn uniformly with replacement from its set.

Warping (Caffe's ``load_batch``, in float32 as Caffe computes it): without ``context_pad``
and in ``warp`` mode the window itself is resized to ``crop x crop``. Otherwise the window is
grown about its centre by ``s = crop / (crop - 2 * context_pad)`` (in ``square`` mode first
to a square of its longer side)::

    x1' = round(cx - s * w / 2)    x2' = round(cx + s * w / 2)    (cx = x1 + w / 2, w = x2 - x1 + 1)

clipped to the image; the clipped region is resized to ``round(clipped * crop / unclipped)``
pixels per axis and placed at the scaled clipped amount (``round(pad * crop / unclipped)``,
the right-hand one when mirrored), so the part beyond the image stays 0 in the output. Then
``(pixel - mean) * scale`` where a pixel landed: ``mean_value`` per channel, or the mean
file at the same output position, offset by ``(mean_width - crop) // 2`` on both axes.
``cv2.resize`` with ``INTER_LINEAR`` does the resizing, as Caffe's ``cv::resize``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CaffeFormatError, CaffeLayersError, UnsupportedParameterError
from ..limits import check_count
from . import files
from .extra import require
from .headers import declared_size
from .sources import LabelRule, Shape, Source, _check_declared_size, _layer_text
from .transform import DataTransformer

#: Columns of the window arrays.
IMAGE, LABEL, X1, Y1, X2, Y2 = range(6)

_INTEGER = re.compile(r"[+-]?\d+\Z")


def _caffe_round(value) -> int:
    """C's ``round``: halves away from zero (Python's ``round`` rounds them to even)."""
    value = float(value)  # a float32 is exact as a double, so +0.5 cannot round up here
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def window_geometry(box: Sequence[int], rows: int, cols: int, crop_size: int,
                    context_pad: int = 0, square: bool = False, mirror: bool = False
                    ) -> Tuple[Tuple[int, int, int, int], Tuple[int, int], Tuple[int, int]]:
    """Where a window's pixels come from in its image and where they land in the crop.

    Args:
        box: ``(x1, y1, x2, y2)``, inclusive corners.
        rows, cols: the image's height and width.
        crop_size: the side of the output.
        context_pad: output pixels of context on each side.
        square: Caffe's ``crop_mode: "square"``.
        mirror: whether the window is flipped (the padding flips with it).

    Returns:
        ``((x1, y1, x2, y2), (height, width), (pad_h, pad_w))``: the inclusive rectangle
        of the image to resize, the size to resize it to, and the output row and column
        of its top-left pixel. The rectangle may lie partly or wholly outside the image
        only when neither ``context_pad`` nor ``square`` clips it (see :func:`warp_window`).
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    if not context_pad and not square:
        return (x1, y1, x2, y2), (crop_size, crop_size), (0, 0)
    f = np.float32
    context_scale = f(crop_size) / f(crop_size - 2 * context_pad)
    half_height = f((y2 - y1 + 1) / 2.0)
    half_width = f((x2 - x1 + 1) / 2.0)
    center_x = f(x1) + half_width
    center_y = f(y1) + half_height
    if square:
        if half_height > half_width:
            half_width = half_height
        else:
            half_height = half_width
    x1 = _caffe_round(center_x - half_width * context_scale)
    x2 = _caffe_round(center_x + half_width * context_scale)
    y1 = _caffe_round(center_y - half_height * context_scale)
    y2 = _caffe_round(center_y + half_height * context_scale)
    unclipped_height, unclipped_width = y2 - y1 + 1, x2 - x1 + 1
    pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
    pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
    x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
    scale_x = f(crop_size) / f(unclipped_width)
    scale_y = f(crop_size) / f(unclipped_height)
    width = _caffe_round(f(x2 - x1 + 1) * scale_x)
    height = _caffe_round(f(y2 - y1 + 1) * scale_y)
    pad_x1 = _caffe_round(f(pad_x1) * scale_x)
    pad_x2 = _caffe_round(f(pad_x2) * scale_x)
    pad_h = _caffe_round(f(pad_y1) * scale_y)
    pad_w = pad_x2 if mirror else pad_x1
    # rounding may push the warped region past the crop: Caffe shortens it
    height = min(height, crop_size - pad_h)
    width = min(width, crop_size - pad_w)
    return (x1, y1, x2, y2), (height, width), (pad_h, pad_w)


def warp_window(image: np.ndarray, box: Sequence[int], crop_size: int, context_pad: int = 0,
                square: bool = False, mirror: bool = False
                ) -> Tuple[np.ndarray, Tuple[int, int]]:
    """A window of an ``H x W x C`` uint8 image resized (and flipped) as Caffe does.

    Returns:
        ``(warped, (pad_h, pad_w))``: the ``h x w x C`` uint8 pixels and the output row and
        column where they start.

    Raises:
        ValueError: the window leaves nothing inside the image, or nothing after warping
            (Caffe stops in OpenCV there); the caller names the window.
    """
    cv2 = require("cv2", "WindowData")
    rows, cols = image.shape[:2]
    (x1, y1, x2, y2), (height, width), pad = window_geometry(
        box, rows, cols, crop_size, context_pad, square, mirror)
    if not (0 <= x1 <= x2 < cols and 0 <= y1 <= y2 < rows):
        raise ValueError(f"the region {x1} {y1} {x2} {y2} (x1 y1 x2 y2) to warp is not inside "
                         f"the image ({cols} x {rows})")
    if height <= 0 or width <= 0:
        raise ValueError(f"the window warps to {height} x {width} pixels")
    warped = cv2.resize(np.ascontiguousarray(image[y1:y2 + 1, x1:x2 + 1]), (width, height),
                        interpolation=cv2.INTER_LINEAR)
    if warped.ndim == 2:  # OpenCV drops a single channel's axis
        warped = warped[:, :, None]
    if mirror:
        warped = warped[:, ::-1]
    return warped, pad


def _tokens(handle) -> Iterator[Tuple[str, int]]:
    """The whitespace-separated fields of a text file with their 1-based line numbers."""
    for number, line in enumerate(handle, start=1):
        for token in line.split():
            yield token, number


class WindowDataSource(Source):
    """Caffe's ``WindowData``: batches of foreground and background windows of images.

    The format, the sampling and the warp are described in :mod:`caffelayers.data.window`.

    Shape:
        - data: ``(batch_size, 3, crop_size, crop_size)``, float32, BGR (OpenCV's order).
        - label: ``(batch_size,)``, float32: the class of a foreground window, 0 otherwise.

    Caffe: ``window_data_param { source batch_size fg_threshold bg_threshold fg_fraction
    context_pad crop_mode cache_images root_folder scale }`` and ``transform_param {
    crop_size mirror mean_file mean_value }``. As in Caffe, ``scale`` is read from
    ``window_data_param`` and the rest from ``transform_param`` (a ``crop_size`` found only in
    ``window_data_param`` is used, as the layer's shape rule does; the fields Caffe ignores
    are ignored with a warning). Caffe draws windows and mirrors from its prefetch RNG; here
    the window and the mirror of each stream position come from a generator seeded by the
    solver's seed, the layer and that position, so a batch does not depend on the process
    or worker reading it (the distribution is Caffe's: uniform with replacement, each set
    in its own share of the batch). The phase changes nothing, as in Caffe (both sample and
    mirror). A set must hold a window only where the batch draws from it (Caffe requires
    both). Images are read in colour; ``cache_images`` keeps each image file's bytes in
    memory once read (per process), as Caffe keeps them from the start.
    """

    def __init__(self, param, phase: str = "TRAIN", source_dir: Optional[Path] = None,
                 seed: int = 0):
        p = param.window_data_param
        layer = _layer_text(param)
        super().__init__(layer, param.top, p.batch_size, seed)
        if len(self.tops) != 2:
            raise CaffeLayersError(f"{layer}: WindowData has two tops (data and label), got "
                                   f"{len(self.tops)}")
        self.transform = DataTransformer.from_caffe(param, phase, source_dir)
        self.crop_size = self.transform.crop_size or p.crop_size
        if self.crop_size <= 0:
            raise UnsupportedParameterError(f"{layer}: WindowData needs transform_param "
                                            "{ crop_size } (the side of the warped windows)")
        check_count((self.batch_size, 3, self.crop_size, self.crop_size), f"{layer}: data")
        if 2 * p.context_pad >= self.crop_size:
            raise UnsupportedParameterError(f"{layer}: context_pad {p.context_pad} leaves no "
                                            f"window in crop_size {self.crop_size}; it must be "
                                            f"below {(self.crop_size + 1) // 2}")
        if p.crop_mode not in ("warp", "square"):
            raise UnsupportedParameterError(f"{layer}: crop_mode {p.crop_mode!r}; Caffe knows "
                                            "'warp' and 'square'")
        if not 0 <= p.fg_fraction <= 1:
            raise UnsupportedParameterError(f"{layer}: fg_fraction {p.fg_fraction:g} is not "
                                            "between 0 and 1")
        self._warn_ignored(param)
        self.context_pad = int(p.context_pad)
        self.square = p.crop_mode == "square"
        self.scale = np.float32(p.scale)
        self.cache_images = p.cache_images
        self.root_folder = p.root_folder
        self.fg_threshold, self.bg_threshold = np.float32(p.fg_threshold), \
            np.float32(p.bg_threshold)
        self.num_foreground = int(np.float32(self.batch_size) * np.float32(p.fg_fraction))
        self.num_background = self.batch_size - self.num_foreground
        self.mean = self._mean_crop()
        self.window_path = files.resolve(p.source, source_dir, f"{layer}: source")
        self.names: List[str] = []
        self.image_lines: List[int] = []
        self.windows: Dict[bool, np.ndarray] = {}
        self.window_lines: Dict[bool, np.ndarray] = {}
        self._parse()
        self.root = self._image_root(source_dir)
        self._cache: Dict[int, bytes] = {}

    def _warn_ignored(self, param) -> None:
        """Caffe's WindowData reads these fields nowhere; say so rather than drop them."""
        p, t = param.window_data_param, param.transform_param
        ignored = [f"window_data_param.{name}" for name in ("mirror", "mean_file")
                   if p.HasField(name)]
        if t.HasField("scale") and t.scale != 1:
            ignored.append("transform_param.scale (WindowData scales by "
                           "window_data_param.scale)")
        if ignored:
            warnings.warn(f"{self.layer}: Caffe's WindowData ignores {', '.join(ignored)}; "
                          "so does caffelayers", stacklevel=3)

    def _mean_crop(self) -> Optional[np.ndarray]:
        """The ``3 x crop x crop`` mean that Caffe subtracts at each output position (the
        middle of the mean file, or the mean values), or None."""
        t, crop = self.transform, self.crop_size
        if t.mean is not None:
            channels, height, width = t.mean.shape
            offset = (width - crop) // 2
            if channels != 3 or width < crop or height < offset + crop:
                raise CaffeLayersError(
                    f"{self.layer}: the mean file is {channels}x{height}x{width} (C x H x W); "
                    f"WindowData needs 3 channels and at least crop_size {crop} plus the "
                    f"offset (width - crop_size) / 2 = {max(offset, 0)} on each axis")
            return t.mean[:, offset:offset + crop, offset:offset + crop]
        if t.mean_values.size:
            if t.mean_values.size not in (1, 3):
                raise CaffeLayersError(f"{self.layer}: {t.mean_values.size} mean_value entries "
                                       "for colour windows; give 1 or 3")
            return np.broadcast_to(t.mean_values.reshape(-1, 1, 1), (3, crop, crop)).copy()
        return None

    # -- the window file -----------------------------------------------------------------
    def _error(self, message: str, line: Optional[int]) -> CaffeFormatError:
        return CaffeFormatError(f"{self.layer}: {message}", self.window_path, line)

    def _parse(self) -> None:
        """Read the window file into the image list and the two window sets."""
        found = {True: ([], []), False: ([], [])}  # foreground?: (window arrays, lines)
        channels = 0
        try:
            with open(self.window_path, encoding="utf-8") as handle:
                tokens = _tokens(handle)
                for hashtag, line in tokens:
                    channels = self._parse_image(hashtag, line, tokens, found)
        except (OSError, UnicodeDecodeError) as error:
            raise self._error(f"cannot read the window file: {error}", None) from None
        if not self.names:
            raise self._error("the window file is empty", None)
        if channels != 3:
            # Caffe sizes the data top from the last image's channels but reads every image
            # in colour, so anything but 3 writes past its blob.
            raise self._error(f"the last image declares {channels} channels; WindowData "
                              "reads images in colour (3 channels)", self.image_lines[-1])
        for foreground, (arrays, lines) in found.items():
            self.windows[foreground] = np.concatenate(arrays) if arrays else \
                np.zeros((0, 6), np.int32)
            self.window_lines[foreground] = np.concatenate(lines) if lines else \
                np.zeros(0, np.int32)
        for foreground, needed, what in ((True, self.num_foreground, "foreground"),
                                         (False, self.num_background, "background")):
            if needed and not len(self.windows[foreground]):
                threshold = (f"overlap >= fg_threshold {float(self.fg_threshold):g}"
                             if foreground else
                             f"overlap < bg_threshold {float(self.bg_threshold):g}")
                raise self._error(f"no {what} windows ({threshold}), and each batch takes "
                                  f"{needed}", None)

    def _parse_image(self, hashtag: str, line: int, tokens, found) -> int:
        """One image's block, from its ``#`` on; returns its declared channels."""
        index = len(self.names)
        if hashtag != "#":
            raise self._error(f"expected '#' to start image {index}, got {hashtag!r}", line)

        def integer(what: str) -> Tuple[int, int]:
            token, at = next(tokens, (None, line))
            if token is None or not _INTEGER.match(token):
                got = "the end of the file" if token is None else repr(token)
                raise self._error(f"image {index}: expected an integer {what}, got {got}", at)
            return int(token), at

        number, at = integer("image index after '#'")
        if number != index:
            raise self._error(f"expected image index {index} (images are numbered from 0 in "
                              f"order; Caffe looks them up by this number), got {number}", at)
        name, name_line = next(tokens, (None, at))
        if name is None:
            raise self._error(f"image {index}: the file ends before its path", at)
        channels = integer("channel count")[0]
        integer("height")
        integer("width")
        count, at = integer("window count")
        if count < 0:
            raise self._error(f"image {index}: negative window count {count}", at)
        self.names.append(name)
        self.image_lines.append(name_line)
        fields = list(itertools.islice(tokens, 6 * count))
        if len(fields) < 6 * count:
            last = fields[-1][1] if fields else at
            raise self._error(f"image {index} ({name!r}): the file ends after "
                              f"{len(fields) // 6} of its {count} windows (6 fields each: "
                              "CLASS_INDEX OVERLAP X1 Y1 X2 Y2)", last)
        if count:
            self._add_windows(index, name, fields, found)
        return channels

    def _add_windows(self, index: int, name: str, fields, found) -> None:
        """Check one image's windows and add the kept ones to their sets."""
        texts = [text for text, _ in fields]
        lines = np.asarray([at for _, at in fields[::6]], dtype=np.int32)
        names = ("CLASS_INDEX", "OVERLAP", "X1", "Y1", "X2", "Y2")
        try:
            values = np.asarray(texts, dtype=np.float64).reshape(-1, 6)
            bad = None
        except ValueError:
            values, bad = None, next((i for i, text in enumerate(texts)
                                      if not _is_number(text)), 0)
        if values is not None:
            integral = np.ones(values.shape, dtype=bool)
            integral[:, 1] = False
            wrong = ~np.isfinite(values) | (integral & ((values != np.floor(values)) |
                                                        (np.abs(values) >= 2**31)))
            bad = int(np.argmax(wrong)) if wrong.any() else None
        if bad is not None:
            window, column = divmod(bad, 6)
            kind = "a finite number" if column == 1 else "an integer"
            raise self._error(f"image {index} ({name!r}), window {window}: {names[column]} "
                              f"must be {kind}, got {texts[bad]!r}", int(lines[window]))
        overlap = values[:, 1].astype(np.float32)
        windows = np.empty(values.shape, dtype=np.int32)
        windows[:, IMAGE] = index
        windows[:, LABEL] = values[:, 0]
        windows[:, X1:] = values[:, 2:]
        foreground = overlap >= self.fg_threshold
        background = ~foreground & (overlap < self.bg_threshold)
        windows[background, LABEL] = 0
        kept = foreground | background
        for check, message in (
                (foreground & (windows[:, LABEL] <= 0),
                 ("a foreground window (overlap >= fg_threshold) needs CLASS_INDEX > 0 (0 "
                  "is the background)")),
                (kept & ((windows[:, X2] < windows[:, X1]) | (windows[:, Y2] < windows[:, Y1])),
                 "X2 < X1 or Y2 < Y1")):
            if check.any():
                window = int(np.argmax(check))
                raise self._error(f"image {index} ({name!r}), window {window} "
                                  f"({' '.join(texts[6 * window:6 * window + 6])}): {message}",
                                  int(lines[window]))
        for is_fg, mask in ((True, foreground), (False, background)):
            if mask.any():
                found[is_fg][0].append(windows[mask])
                found[is_fg][1].append(lines[mask])

    def _image_root(self, source_dir: Optional[Path]) -> str:
        """The directory ``root_folder + path`` is read from: the first of the working
        directory, the prototxt's and the window file's where the first image exists."""
        first = Path(self.root_folder + self.names[0])
        if first.is_absolute():
            return ""
        for base in (Path.cwd(), source_dir, self.window_path.parent):
            if base is not None and (Path(base) / first).is_file():
                return str(base) + os.sep
        return ""

    # -- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(windows) for windows in self.windows.values())

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}  # each process reads its own images
        return state

    def item_shapes(self) -> List[Shape]:
        return [(3, self.crop_size, self.crop_size), ()]

    def set_label_rules(self, rules: Sequence[LabelRule]) -> None:
        super().set_label_rules(rules)
        if self.num_foreground:  # background windows are 0, which every rule accepts
            windows, lines = self.windows[True], self.window_lines[True]
            self.check_labels(windows[:, LABEL], lambda i: (
                self.window_path, int(lines[i]),
                f"window of image {self.names[windows[i, IMAGE]]!r}: "))

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` of the window file, ``H x W x 3`` uint8 in BGR order."""
        cv2 = require("cv2", self.layer)
        name = self.names[index]
        path = self.root + self.root_folder + name
        line = self.image_lines[index]
        encoded = self._cache.get(index)
        if encoded is None and self.cache_images:
            try:
                encoded = self._cache[index] = Path(path).read_bytes()
            except OSError:
                pass  # reported below as the decoder's failure
        try:
            _check_declared_size(declared_size(path if encoded is None else encoded), 3,
                                 False, self.layer, f"image {name!r}")
        except CaffeLayersError as error:
            raise CaffeFormatError(str(error), self.window_path, line) from None
        if encoded is not None:
            data = cv2.imdecode(np.frombuffer(encoded, dtype=np.uint8), cv2.IMREAD_COLOR)
        else:
            data = cv2.imread(path, cv2.IMREAD_COLOR)
        if data is None:
            problem = "cannot be decoded as an image" if Path(path).is_file() else "not found"
            raise self._error(f"image {name!r} {problem} (read as {path!r})", line)
        return data

    def window(self, foreground: bool, choice: int, mirror: bool = False) -> np.ndarray:
        """Window ``choice`` of a set, warped, ``(pixel - mean) * scale``: ``3 x crop x
        crop`` float32, 0 where the window's context lies beyond its image."""
        row = self.windows[foreground][choice]
        crop = self.crop_size
        try:
            warped, (pad_h, pad_w) = warp_window(self.image(int(row[IMAGE])), row[X1:],
                                                 crop, self.context_pad, self.square, mirror)
        except ValueError as error:
            raise self._error(f"window {' '.join(map(str, row[X1:]))} (x1 y1 x2 y2) of image "
                              f"{self.names[row[IMAGE]]!r}: {error}",
                              int(self.window_lines[foreground][choice])) from None
        height, width = warped.shape[:2]
        region = (slice(None), slice(pad_h, pad_h + height), slice(pad_w, pad_w + width))
        values = warped.transpose(2, 0, 1).astype(np.float32)
        if self.mean is not None:
            values -= self.mean[region]
        out = np.zeros((3, crop, crop), dtype=np.float32)
        out[region] = values * self.scale
        return out

    def read(self, positions: Sequence[int]) -> List[np.ndarray]:
        """Slot ``j`` of a batch holds a background window for ``j < batch_size - num_fg``
        and a foreground one after, as Caffe fills its batches."""
        data = np.empty((len(positions), 3, self.crop_size, self.crop_size), np.float32)
        labels = np.empty(len(positions), np.float32)
        for slot, position in enumerate(positions):
            foreground = slot >= self.num_background
            rng = self.rng(position)
            choice = int(rng.integers(len(self.windows[foreground])))
            mirror = bool(self.transform.mirror and rng.integers(2))
            data[slot] = self.window(foreground, choice, mirror)
            labels[slot] = self.windows[foreground][choice, LABEL]
        return [data, labels]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
