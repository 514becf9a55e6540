"""Readers for Caffe's data layers: each turns a layer's source into batches of numpy arrays.

A reader sees its data as an endless stream of items (Caffe's reading order: the list, the
database or the files from the start, wrapping around at the end, reshuffled at every pass
where the layer shuffles). Batch ``b`` of a run with ``world`` processes takes, on process
``rank``, the stream positions ``(b * batch_size + j) * world + rank``: the processes share
out every position once, as Caffe's multi-GPU readers do, so ``world`` processes with
``batch_size`` each see the items of one process with ``world * batch_size``. Everything
random (shuffles, crops, mirrors) is a function of the seed and the stream position alone,
so a batch is the same whichever process or worker reads it.

Every reader is picklable and opens its files lazily in each process that uses it (loader
workers included). Bad data is an error that names the file and the line, row or key.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import CaffeFormatError, CaffeLayersError, LabelError, UnsupportedParameterError
from . import files
from .extra import require
from .transform import DataTransformer

Shape = Tuple[int, ...]

#: Caffe layer types with a reader here.
SOURCE_TYPES = ("ImageData", "Data", "HDF5Data", "MemoryData", "Input")


class LabelRule:
    """What a layer reading a label blob accepts: ``0 <= label < classes`` or the ignore label.

    Args:
        classes: the number of classes of the consumer.
        ignore_label: a value the consumer skips, or None.
        consumer: who reads the labels, for messages (``"layer 'loss' (SoftmaxWithLoss)"``).
    """

    def __init__(self, classes: int, ignore_label: Optional[int], consumer: str):
        self.classes = int(classes)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.consumer = consumer

    def bad(self, labels: np.ndarray) -> np.ndarray:
        """A mask of the labels this rule rejects."""
        labels = np.asarray(labels)
        wrong = (labels < 0) | (labels >= self.classes) | (labels != np.floor(labels))
        if self.ignore_label is not None:
            wrong &= labels != self.ignore_label
        return wrong

    def describe(self) -> str:
        allowed = f"[0, {self.classes})"
        if self.ignore_label is not None:
            allowed += f" or the ignore_label {self.ignore_label}"
        return f"{self.consumer} accepts {allowed}"

    def __repr__(self) -> str:
        return f"LabelRule({self.classes}, {self.ignore_label}, {self.consumer!r})"


class Source:
    """Base class: a data layer's items, read by stream position.

    Args:
        layer: the layer's description for messages (``"layer 'data' (ImageData)"``).
        tops: the layer's top blob names; the second, when there is one, holds labels.
        batch_size: items per batch (per process).
        seed: seeds shuffles and augmentation.

    Attributes:
        label_rules: the :class:`LabelRule` of every layer reading the label top (set by
            :meth:`set_label_rules`; empty means labels are not checked).

    Subclasses implement ``__len__`` (items per pass), :meth:`item_shapes` and
    :meth:`read` (or :meth:`item`).
    """

    #: tops after the first that hold class labels (the readers of image data).
    label_top_index: Optional[int] = 1

    def __init__(self, layer: str, tops: Sequence[str], batch_size: int, seed: int = 0):
        if batch_size <= 0:
            raise UnsupportedParameterError(f"{layer}: batch_size must be positive, got "
                                            f"{batch_size}")
        self.layer = layer
        self.tops = list(tops)
        self.batch_size = int(batch_size)
        self.seed = int(seed) & 0xFFFFFFFF
        self._salt = zlib.crc32(layer.encode())
        self.label_rules: List[LabelRule] = []

    # -- what subclasses provide -----------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def item_shapes(self) -> List[Shape]:
        """The shape of one item of every top (no batch axis)."""
        raise NotImplementedError

    def item(self, position: int) -> Tuple[np.ndarray, ...]:
        """The arrays of every top for the item at a stream position."""
        raise NotImplementedError

    def read(self, positions: Sequence[int]) -> List[np.ndarray]:
        """One array per top holding the items at ``positions``, stacked."""
        items = [self.item(p) for p in positions]
        return [np.stack([item[t] for item in items]) for t in range(len(self.tops))]

    # -- shared ----------------------------------------------------------------------------
    def top_shapes(self) -> List[Shape]:
        """Every top's shape with the batch axis: what the net's input blobs must be."""
        return [(self.batch_size,) + tuple(shape) for shape in self.item_shapes()]

    def positions(self, index: int, rank: int = 0, world: int = 1) -> List[int]:
        """The stream positions of batch ``index`` on process ``rank`` of ``world``."""
        first = index * self.batch_size
        return [(first + j) * world + rank for j in range(self.batch_size)]

    def batch(self, index: int, rank: int = 0, world: int = 1) -> Dict[str, np.ndarray]:
        """Batch ``index`` of process ``rank``: ``{top: array}``."""
        arrays = self.read(self.positions(index, rank, world))
        return dict(zip(self.tops, arrays))

    def set_label_rules(self, rules: Sequence[LabelRule]) -> None:
        """Check labels against ``rules`` from now on (readers that hold every label
        check them all at once here)."""
        self.label_rules = list(rules)

    def check_labels(self, labels, where) -> None:
        """Raise :class:`~caffelayers.LabelError` for the first label a rule rejects.

        ``where(i)`` describes the i-th label (file and line), as ``(path, line, text)``.
        """
        labels = np.asarray(labels).reshape(-1)
        for rule in self.label_rules:
            bad = np.flatnonzero(rule.bad(labels))
            if bad.size:
                path, line, text = where(int(bad[0]))
                value = labels[bad[0]]
                shown = int(value) if float(value).is_integer() else float(value)
                raise DataLabelError(f"{self.layer}: {text}label {shown} is outside the "
                                     f"classes: {rule.describe()}", path, line)

    def rng(self, position: int, stream: int = 0) -> np.random.Generator:
        """The generator of one stream position (augmentation) or pass (shuffle)."""
        return np.random.default_rng([self.seed, self._salt, stream, position])

    def rand_skip(self, limit: int) -> int:
        """Caffe's ``rand_skip``: how many items the first pass skips, below ``limit``."""
        if limit <= 0:
            return 0
        skip = int(self.rng(0, stream=2).integers(limit))
        if skip >= len(self):
            raise CaffeLayersError(f"{self.layer}: rand_skip {limit} may skip {skip} items "
                                   f"of {len(self)}")
        return skip

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.layer}, tops={self.tops}, "
                f"batch_size={self.batch_size}, items={len(self)})")


class DataLabelError(CaffeFormatError, LabelError):
    """A label outside the classes, located in its file."""


def _where_text(path, line=None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _layer_text(param) -> str:
    return f"layer {param.name!r} ({param.type})"


def _cv_image(data: np.ndarray) -> np.ndarray:
    """An OpenCV image (H x W x C in BGR, or H x W) as C x H x W."""
    return data[None] if data.ndim == 2 else data.transpose(2, 0, 1)


# --- ImageData ------------------------------------------------------------------------------

class ImageDataSource(Source):
    """Caffe's ``ImageData``: images listed as ``path label`` lines in a text file.

    Each image is read as Caffe's ``ReadImageToCVMat`` does, with OpenCV: ``imread`` in
    colour (BGR) or grayscale after ``is_color``, then ``resize`` to ``new_height x
    new_width`` with bilinear interpolation when both are set; then ``transform_param``.

    Caffe: ``image_data_param { source root_folder batch_size shuffle rand_skip new_height
    new_width is_color }``. The label is the last whitespace-separated field of a line and the
    path everything before it (so paths may contain spaces); blank lines are skipped; a line
    without an integer label is an error (Caffe reads it as 0). The image path is
    ``root_folder + path`` joined as strings, as in Caffe, looked for from the working
    directory, then the prototxt's and the list file's directories. Every image must have
    the size of the first one (use ``new_height``/``new_width`` otherwise): Caffe reshapes
    per batch, a net here keeps its input size. Shuffling draws a new order at every pass,
    from the solver's ``random_seed``, not Caffe's RNG.
    """

    def __init__(self, param, phase: str = "TRAIN", source_dir: Optional[Path] = None,
                 seed: int = 0):
        p = param.image_data_param
        layer = _layer_text(param)
        super().__init__(layer, param.top, p.batch_size, seed)
        if (p.new_height > 0) != (p.new_width > 0) or p.new_height < 0 or p.new_width < 0:
            raise UnsupportedParameterError(f"{layer}: new_height and new_width must be set "
                                            f"together, got {p.new_height} and {p.new_width}")
        self.list_path = files.resolve(p.source, source_dir, f"{layer}: source")
        self.new_size = (p.new_height, p.new_width)
        self.is_color = p.is_color
        self.shuffle = p.shuffle
        self.transform = DataTransformer.from_caffe(param, phase, source_dir)
        self.names, self.labels, self.lines = self._parse_list()
        self.root_folder = p.root_folder
        self.root = self._image_root(source_dir)
        self.skip = self.rand_skip(p.rand_skip)
        self._shape: Optional[Shape] = None
        self._order: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def _parse_list(self):
        try:
            text = self.list_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CaffeFormatError(f"{self.layer}: cannot read the image list: {error}",
                                   self.list_path) from None
        names, labels, lines = [], [], []
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.strip().rsplit(None, 1)
            if not fields:
                continue
            if len(fields) != 2:
                raise CaffeFormatError(f"{self.layer}: expected 'PATH LABEL', got "
                                       f"{line.strip()!r}", self.list_path, number)
            try:
                label = int(fields[1])
            except ValueError:
                raise CaffeFormatError(f"{self.layer}: the label {fields[1]!r} of "
                                       f"{fields[0]!r} is not an integer", self.list_path,
                                       number) from None
            names.append(fields[0])
            labels.append(label)
            lines.append(number)
        if not names:
            raise CaffeFormatError(f"{self.layer}: the image list is empty", self.list_path)
        return names, np.asarray(labels, dtype=np.int64), np.asarray(lines, dtype=np.int64)

    def _image_root(self, source_dir: Optional[Path]) -> str:
        """The directory the ``root_folder + path`` names are read from: the first of the
        working directory, the prototxt's and the list's where the first image exists."""
        first = self.root_folder + self.names[0]
        if os.path.isabs(first):
            return ""
        for base in [Path.cwd(), source_dir, self.list_path.parent]:
            if base is not None and (Path(base) / first).is_file():
                return str(base) + os.sep
        return ""

    def __len__(self) -> int:
        return len(self.names)

    def set_label_rules(self, rules: Sequence[LabelRule]) -> None:
        super().set_label_rules(rules)
        self.check_labels(self.labels, lambda i: (self.list_path, int(self.lines[i]),
                                                  f"image {self.names[i]!r}: "))

    def index(self, position: int) -> int:
        """The list entry at a stream position."""
        epoch, offset = divmod(position + self.skip, len(self))
        if not self.shuffle:
            return offset
        if self._order[0] != epoch:
            self._order = (epoch, self.rng(epoch, stream=1).permutation(len(self)))
        return int(self._order[1][offset])

    def image(self, entry: int) -> np.ndarray:
        """List entry ``entry`` decoded and resized, ``C x H x W`` uint8 in BGR order."""
        cv2 = require("cv2", self.layer)
        name = self.names[entry]
        path = self.root + self.root_folder + name
        flag = cv2.IMREAD_COLOR if self.is_color else cv2.IMREAD_GRAYSCALE
        data = cv2.imread(path, flag)
        if data is None:
            problem = ("cannot be decoded as an image" if os.path.isfile(path) else
                       "not found")
            raise CaffeFormatError(f"{self.layer}: image {name!r} {problem} (read as "
                                   f"{path!r})", self.list_path, int(self.lines[entry]))
        if self.new_size[0] > 0:
            data = cv2.resize(data, (self.new_size[1], self.new_size[0]),
                              interpolation=cv2.INTER_LINEAR)
        return _cv_image(data)

    def item_shapes(self) -> List[Shape]:
        if self._shape is None:
            self._shape = self.image(self.index(0)).shape
        shapes = [self.transform.output_shape(*self._shape)]
        return shapes + [()] * (len(self.tops) - 1)

    def item(self, position: int) -> Tuple[np.ndarray, ...]:
        entry = self.index(position)
        image = self.image(entry)
        expected = self._shape or image.shape
        if image.shape != expected:
            raise CaffeFormatError(
                f"{self.layer}: image {self.names[entry]!r} is {'x'.join(map(str, image.shape))}"
                f" (C x H x W), the layer's images are {'x'.join(map(str, expected))}; set "
                f"new_height and new_width to resize them", self.list_path,
                int(self.lines[entry]))
        self._shape = expected
        rng = self.rng(position) if self.transform.random else None
        data = self.transform(image, rng, f"image {self.names[entry]!r}")
        label = np.float32(self.labels[entry])
        return (data, label)[:len(self.tops)]
