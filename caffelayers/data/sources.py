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
workers included). Bad data is an error
that names the file and the line, row or key.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import CaffeFormatError, CaffeLayersError, LabelError, UnsupportedParameterError
from ..limits import check_bytes, check_count
from . import files
from .databases import backend_name, open_reader, require_plyvel
from .extra import MissingExtraError, require
from .headers import declared_size
from .transform import DataTransformer

Shape = Tuple[int, ...]

#: Caffe layer types with a reader here.
SOURCE_TYPES = ("ImageData", "Data", "HDF5Data", "WindowData", "MemoryData", "Input")


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


def _check_declared_size(size: Optional[Tuple[int, int]], channels: int, is_item: bool,
                         layer: str, image: str) -> None:
    """Before decoding: the image its header declares (``(width, height)``, or None when
    unknown) fits in memory as the decoder allocates it (8 bits per channel), and, when it
    becomes an item unresized, in a Caffe blob (INT_MAX values) and in memory as float32."""
    if size is None:
        return
    width, height = size
    values = channels * height * width
    if is_item:
        check_count((channels, height, width), f"{layer}: {image} ({width} x {height} declared)")
    check_bytes(values * (5 if is_item else 1),
                f"{layer}: decoding {image} ({width} x {height} declared)")


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
        try:
            _check_declared_size(declared_size(path), 3 if self.is_color else 1,
                                 self.new_size[0] == 0, self.layer, f"image {name!r}")
        except CaffeLayersError as error:
            raise CaffeFormatError(str(error), self.list_path, int(self.lines[entry])) \
                from None
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


# --- Data (LMDB, LevelDB) -------------------------------------------------------------------

class LMDBSource(Source):
    """Caffe's ``Data`` layer on an LMDB (or LevelDB) database of serialized ``Datum``
    messages.

    A raw Datum holds ``C x H x W`` values (``data`` bytes, else ``float_data``); an encoded
    one holds an image file, decoded with OpenCV as Caffe's ``DecodeDatumToCVMat`` does: in
    its own channels (``IMREAD_ANYCOLOR``), or in colour or grayscale after
    ``transform_param.force_color``/``force_gray``. Then ``transform_param``.

    Caffe: ``data_param { source batch_size backend rand_skip }``; the keys are read in the
    database's (sorted) order, wrapping around at the end, never shuffled. ``backend:
    LEVELDB`` (Caffe's default) needs the package ``plyvel``; LevelDB lets one process at a
    time open a database, so loader workers take turns (LMDB is faster with workers).
    ``prefetch`` is the loader's business here. Every Datum must have the size of the first
    one.
    """

    def __init__(self, param, phase: str = "TRAIN", source_dir: Optional[Path] = None,
                 seed: int = 0):
        from ..proto import caffe_pb2

        p = param.data_param
        layer = _layer_text(param)
        super().__init__(layer, param.top, p.batch_size, seed)
        self.backend = backend_name(p.backend)
        if self.backend == "leveldb":
            try:
                require_plyvel(layer)
            except MissingExtraError:
                raise UnsupportedParameterError(
                    f"{layer}: backend {caffe_pb2.DataParameter.DB.Name(p.backend)} is not "
                    "supported without the package 'plyvel' (pip install plyvel); or convert "
                    "the database to LMDB and set backend: LMDB") from None
        t = param.transform_param
        if t.force_color and t.force_gray:
            raise UnsupportedParameterError(f"{layer}: force_color and force_gray exclude "
                                            "each other")
        self.force = "color" if t.force_color else "gray" if t.force_gray else None
        self.path = files.resolve(p.source, source_dir, f"{layer}: source", directory=True)
        if self.backend == "leveldb" and (self.path / "data.mdb").is_file():
            # backend: LEVELDB is Caffe's default, so an LMDB source without it is common
            raise UnsupportedParameterError(
                f"{layer}: backend LEVELDB is not supported on an LMDB database ({self.path} "
                "holds data.mdb): set backend: LMDB")
        self.transform = DataTransformer.from_caffe(param, phase, source_dir)
        self.keys = self._database().keys()
        if not self.keys:
            raise CaffeFormatError(f"{layer}: the database is empty", self.path)
        self.skip = self.rand_skip(p.rand_skip)
        self._shape: Optional[Shape] = None

    def _database(self):
        return open_reader(self.path, self.backend, self.layer)

    def __len__(self) -> int:
        return len(self.keys)

    def _key(self, position: int) -> bytes:
        return self.keys[(position + self.skip) % len(self.keys)]

    def _decode(self, key: bytes, value: Optional[bytes]):
        """A stored value as ``(C x H x W array, label)``."""
        from google.protobuf.message import DecodeError

        from ..proto import caffe_pb2

        where = f"{self.layer}: entry {key.decode(errors='replace')!r}"
        if value is None:
            raise CaffeFormatError(f"{where} vanished from the database", self.path)
        try:
            datum = caffe_pb2.Datum.FromString(value)
        except DecodeError:
            raise CaffeFormatError(f"{where} is not a Caffe Datum", self.path) from None
        if datum.encoded:
            cv2 = require("cv2", self.layer)
            try:
                _check_declared_size(declared_size(datum.data), 1 if self.force == "gray" else 3,
                                     True, where, "its encoded image")
            except CaffeLayersError as error:
                raise CaffeFormatError(str(error), self.path) from None
            flag = {"color": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE,
                    None: cv2.IMREAD_ANYCOLOR}[self.force]
            image = cv2.imdecode(np.frombuffer(datum.data, dtype=np.uint8), flag)
            if image is None:
                raise CaffeFormatError(f"{where}: its encoded image cannot be decoded",
                                       self.path)
            return _cv_image(image), datum.label
        shape = (datum.channels, datum.height, datum.width)
        size = int(np.prod(shape))
        if datum.data:
            values = np.frombuffer(datum.data, dtype=np.uint8)
        else:
            values = np.asarray(datum.float_data, dtype=np.float32)
        if values.size != size or size == 0:
            raise CaffeFormatError(f"{where} holds {values.size} values for its shape "
                                   f"{'x'.join(map(str, shape))}", self.path)
        return values.reshape(shape), datum.label

    def item_shapes(self) -> List[Shape]:
        if self._shape is None:
            self.read([0])
        shapes = [self.transform.output_shape(*self._shape)]
        return shapes + [()] * (len(self.tops) - 1)

    def read(self, positions: Sequence[int]) -> List[np.ndarray]:
        images, labels = [], []
        keys = [self._key(position) for position in positions]
        for position, key, value in zip(positions, keys, self._database().get_many(keys)):
            image, label = self._decode(key, value)
            if self._shape is None:
                self._shape = image.shape
            elif image.shape != self._shape:
                raise CaffeFormatError(
                    f"{self.layer}: entry {key.decode(errors='replace')!r} is "
                    f"{'x'.join(map(str, image.shape))} (C x H x W), the first is "
                    f"{'x'.join(map(str, self._shape))}", self.path)
            self.check_labels([label], lambda i: (
                self.path, None, f"entry {key.decode(errors='replace')!r}: "))
            rng = self.rng(position) if self.transform.random else None
            images.append(self.transform(image, rng,
                                         f"entry {key.decode(errors='replace')!r}"))
            labels.append(label)
        arrays = [np.stack(images), np.asarray(labels, dtype=np.float32)]
        return arrays[:len(self.tops)]


# --- HDF5Data -------------------------------------------------------------------------------

class HDF5Source(Source):
    """Caffe's ``HDF5Data``: every top is the dataset of the same name in a list of files.

    Caffe: ``hdf5_data_param { source batch_size shuffle }``; ``source`` is a text file
    naming one HDF5 file per line (whitespace-separated, as Caffe reads it), each looked for
    from the working directory, then next to the list. Files are read whole, in the list's
    order; ``shuffle`` draws a new file order at every pass and a new row order at every
    visit of a file. Values are read as float32 (float64 datasets stay float64). A
    ``transform_param`` is an error, as in Caffe ("does not transform data"). Every file
    must hold every top with the same rows and the same trailing shape.
    """

    label_top_index = None  # any top may hold labels; the feeder says which

    def __init__(self, param, phase: str = "TRAIN", source_dir: Optional[Path] = None,
                 seed: int = 0):
        p = param.hdf5_data_param
        layer = _layer_text(param)
        super().__init__(layer, param.top, p.batch_size, seed)
        if param.HasField("transform_param") and param.transform_param.ListFields():
            raise UnsupportedParameterError(f"{layer}: HDF5Data does not transform data; "
                                            "remove its transform_param")
        if not self.tops:
            raise CaffeLayersError(f"{layer}: HDF5Data needs at least one top (a dataset "
                                   "name)")
        self.list_path = files.resolve(p.source, source_dir, f"{layer}: source")
        self.shuffle = p.shuffle
        self.files: List[Path] = []
        self.lines: List[int] = []
        try:
            text = self.list_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CaffeFormatError(f"{layer}: cannot read the file list: {error}",
                                   self.list_path) from None
        for number, line in enumerate(text.splitlines(), start=1):
            for name in line.split():
                try:
                    self.files.append(files.resolve(name, self.list_path.parent,
                                                    f"{layer}: HDF5 file"))
                except CaffeLayersError as error:
                    raise CaffeFormatError(str(error), self.list_path, number) from None
                self.lines.append(number)
        if not self.files:
            raise CaffeFormatError(f"{layer}: the list names no HDF5 file", self.list_path)
        self.rows, self._shapes = self._scan()
        self.starts = np.concatenate([[0], np.cumsum(self.rows)])
        self.label_top: Optional[str] = None
        self._loaded: Tuple[int, Optional[List[np.ndarray]]] = (-1, None)
        self._order: Tuple[int, Optional[Tuple[np.ndarray, np.ndarray]]] = (-1, None)
        self._rows: Tuple[Tuple[int, int], Optional[np.ndarray]] = ((-1, -1), None)

    def _open(self, index: int):
        h5py = require("h5py", self.layer)
        try:
            return h5py.File(self.files[index], "r")
        except OSError as error:
            raise CaffeFormatError(f"{self.layer}: cannot open the HDF5 file "
                                   f"{str(self.files[index])!r}: {error}", self.list_path,
                                   self.lines[index]) from None

    def _scan(self):
        """Rows per file and the item shape of every top, checked across the files."""
        rows, shapes, dtypes = [], None, {}
        for index, path in enumerate(self.files):
            with self._open(index) as handle:
                found, widths = [], []
                for top in self.tops:
                    if top not in handle or not hasattr(handle[top], "shape"):
                        raise CaffeFormatError(
                            f"{self.layer}: no dataset {top!r} (the layer's tops name the "
                            f"datasets; the file has {', '.join(map(repr, handle.keys()))})",
                            path)
                    found.append(tuple(handle[top].shape))
                    wide = handle[top].dtype == np.float64
                    widths.append(8 if wide else 4)
                    dtypes[top] = np.float64 if wide or dtypes.get(top) == np.float64 \
                        else np.float32
            if any(len(shape) < 1 for shape in found):
                raise CaffeFormatError(f"{self.layer}: a dataset has no axes", path)
            self._check_file_size(path, found, widths)
            counts = {shape[0] for shape in found}
            if len(counts) != 1:
                raise CaffeFormatError(
                    f"{self.layer}: the datasets {', '.join(map(repr, self.tops))} have "
                    f"{' and '.join(str(s[0]) for s in found)} rows; they must agree", path)
            items = [shape[1:] for shape in found]
            if shapes is None:
                shapes = items
            elif items != shapes:
                raise CaffeFormatError(f"{self.layer}: item shapes {items} differ from the "
                                       f"first file's {shapes}", path)
            rows.append(found[0][0])
        if sum(rows) == 0:
            raise CaffeFormatError(f"{self.layer}: the files hold no rows", self.list_path)
        self._dtypes = [dtypes[top] for top in self.tops]
        return rows, shapes

    def _check_file_size(self, path: Path, shapes, widths) -> None:
        """What a file declares (``shapes``, and ``widths``: bytes per value as read),
        before a row is read: Caffe loads each dataset whole into one blob (at most INT_MAX
        values), and :meth:`_file` holds all of a file's datasets at once, which must fit in
        memory (a few kilobytes of HDF5 can declare terabytes of rows never written)."""
        try:
            size = 0
            for top, shape, width in zip(self.tops, shapes, widths):
                size += width * check_count(shape, f"{self.layer}: dataset {top!r}")
            check_bytes(size, f"{self.layer}: reading the file's datasets whole")
        except CaffeLayersError as error:
            raise CaffeFormatError(str(error), path) from None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def item_shapes(self) -> List[Shape]:
        return list(self._shapes)

    def set_label_rules(self, rules: Sequence[LabelRule], top: Optional[str] = None) -> None:
        """Check the dataset ``top`` (the label blob) against ``rules``."""
        super().set_label_rules(rules)
        self.label_top = top if rules else None

    def _file_order(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """The files of a pass in reading order, and where each one's rows end."""
        if self._order[0] != epoch:
            order = (self.rng(epoch, stream=1).permutation(len(self.files)) if self.shuffle
                     else np.arange(len(self.files)))
            self._order = (epoch, (order, np.cumsum(np.asarray(self.rows)[order])))
        return self._order[1]

    def _row_order(self, epoch: int, file_index: int) -> np.ndarray:
        """The rows of a file in the order of its visit in pass ``epoch``."""
        key = (epoch, file_index)
        if self._rows[0] != key:
            visit = epoch * len(self.files) + file_index
            self._rows = (key, self.rng(visit, stream=3).permutation(self.rows[file_index]))
        return self._rows[1]

    def _file(self, index: int) -> List[np.ndarray]:
        """The datasets of file ``index``, loaded whole (and checked) once per process."""
        if self._loaded[0] != index:
            with self._open(index) as handle:
                arrays = []
                for top in self.tops:
                    values = handle[top][()]
                    if values.dtype != np.float64:
                        values = values.astype(np.float32)
                    arrays.append(values)
            if self.label_top is not None:
                labels = arrays[self.tops.index(self.label_top)]
                path = self.files[index]
                self.check_labels(labels, lambda i: (
                    path, None, f"dataset {self.label_top!r} row {i}: "))
            self._loaded = (index, arrays)
        return self._loaded[1]

    def read(self, positions: Sequence[int]) -> List[np.ndarray]:
        total = len(self)
        picks: List[Tuple[int, int]] = []
        for position in positions:
            epoch, offset = divmod(position, total)
            order, ends = self._file_order(epoch)
            slot = int(np.searchsorted(ends, offset, side="right"))
            file_index = int(order[slot])
            row = offset - (int(ends[slot - 1]) if slot else 0)
            if self.shuffle:
                row = int(self._row_order(epoch, file_index)[row])
            picks.append((file_index, row))
        out = [np.empty((len(positions),) + tuple(shape), dtype=dtype)
               for shape, dtype in zip(self._shapes, self._dtypes)]
        for slot, (file_index, row) in enumerate(picks):
            arrays = self._file(file_index)
            for target, values in zip(out, arrays):
                target[slot] = values[row]
        return out


# --- MemoryData and Input -------------------------------------------------------------------

class ArraySource(Source):
    """``MemoryData`` and ``Input`` fed from arrays: batches cut in order from arrays that
    hold every item, wrapping around at the end.

    Args:
        layer: the layer's description for messages.
        arrays: ``{top: array}`` with the items along axis 0 (the same count for every top).
        batch_size: items per batch.
        item_shapes: the shape one item must have per top, where the net fixes it (None
            leaves it free).
        multiple: require the item count to be a multiple of ``batch_size``.

    Caffe: ``MemoryData``'s ``Reset(data, labels, n)``, which the Python interface's
    ``set_input_arrays`` calls: ``n`` must be a multiple of ``batch_size``, and these arrays
    are not transformed (``transform_param`` applies to ``AddDatumVector``/``AddMatVector``
    only, which read images; transform them beforehand). Labels may be ``(n,)`` or any
    shape of ``n`` values.
    """

    label_top_index = 1

    def __init__(self, layer: str, arrays: Mapping[str, np.ndarray], batch_size: int,
                 item_shapes: Optional[Sequence[Optional[Shape]]] = None,
                 multiple: bool = False, seed: int = 0):
        tops = list(arrays)
        super().__init__(layer, tops, batch_size, seed)
        self.arrays = [np.asarray(arrays[top]) for top in tops]
        counts = {len(a) if a.ndim else 0 for a in self.arrays}
        if len(counts) != 1 or 0 in counts:
            raise CaffeLayersError(f"{layer}: the arrays for {', '.join(tops)} must hold the "
                                   f"same number (> 0) of items along axis 0, got "
                                   f"{[a.shape for a in self.arrays]}")
        self.count = counts.pop()
        if multiple and self.count % self.batch_size:
            raise CaffeLayersError(f"{layer}: {self.count} items is not a multiple of "
                                   f"batch_size {self.batch_size}")
        for index, expected in enumerate(item_shapes or []):
            if expected is None:
                continue
            shape = self.arrays[index].shape[1:]
            if shape != tuple(expected):
                if int(np.prod(shape)) == int(np.prod(expected)) and len(expected) <= 1:
                    self.arrays[index] = self.arrays[index].reshape((self.count,) +
                                                                    tuple(expected))
                    continue
                raise CaffeLayersError(f"{layer}: items of {tops[index]!r} have shape "
                                       f"{shape}, the net expects {tuple(expected)}")

    def __len__(self) -> int:
        return self.count

    def item_shapes(self) -> List[Shape]:
        return [a.shape[1:] for a in self.arrays]

    def set_label_rules(self, rules: Sequence[LabelRule], top: Optional[str] = None) -> None:
        super().set_label_rules(rules)
        if rules and top is not None:
            self.check_labels(self.arrays[self.tops.index(top)], lambda i: (
                None, None, f"array {top!r} item {i}: "))

    def read(self, positions: Sequence[int]) -> List[np.ndarray]:
        start = positions[0] % self.count
        contiguous = (len(positions) == 1 or positions[1] - positions[0] == 1) and \
            start + len(positions) <= self.count
        if contiguous:
            return [a[start:start + len(positions)] for a in self.arrays]
        rows = np.asarray(positions) % self.count
        return [a[rows] for a in self.arrays]


# --- choosing a reader ----------------------------------------------------------------------

def open_source(param, phase: str = "TRAIN", source_dir: Optional[Path] = None,
                seed: int = 0, arrays: Optional[Mapping[str, np.ndarray]] = None) -> Source:
    """The reader of a data layer.

    Args:
        param: the layer's ``LayerParameter``.
        phase: ``"TRAIN"`` (random crops) or ``"TEST"`` (centre crops).
        source_dir: the prototxt's directory, where relative names are also looked for.
        seed: seeds shuffles and augmentation.
        arrays: ``{top: array}`` for ``MemoryData`` and ``Input`` layers.

    Raises:
        UnsupportedParameterError: a layer type without a reader (``DummyData``...).
    """
    kind = param.type
    layer = _layer_text(param)
    if kind == "ImageData":
        return ImageDataSource(param, phase, source_dir, seed)
    if kind == "Data":
        return LMDBSource(param, phase, source_dir, seed)
    if kind == "HDF5Data":
        return HDF5Source(param, phase, source_dir, seed)
    if kind == "WindowData":
        from .window import WindowDataSource  # it builds on this module

        return WindowDataSource(param, phase, source_dir, seed)
    if kind in ("MemoryData", "Input"):
        missing = [top for top in param.top if arrays is None or top not in arrays]
        if missing:
            raise CaffeLayersError(
                f"{layer} is fed from arrays: give arrays for {', '.join(map(repr, missing))} "
                "(caffelayers.train.train(..., arrays={...}) or caffelayers.data.net_inputs)")
        ordered = {top: arrays[top] for top in param.top}
        if kind == "MemoryData":
            p = param.memory_data_param
            shapes = [(p.channels, p.height, p.width), (1,)][:len(param.top)]
            shapes[1:] = [()] * (len(shapes) - 1)
            return ArraySource(layer, ordered, p.batch_size, shapes, multiple=True, seed=seed)
        dims = [tuple(s.dim) for s in param.input_param.shape]
        if len(dims) == 1:
            dims = dims * len(param.top)
        if len(dims) != len(param.top) or not dims[0]:
            raise CaffeLayersError(f"{layer}: input_param needs one shape per top")
        return ArraySource(layer, ordered, dims[0][0], [d[1:] for d in dims], seed=seed)
    raise UnsupportedParameterError(
        f"{layer}: caffelayers reads {', '.join(SOURCE_TYPES)} layers; feed this one's tops "
        "from your own code (Solver(inputs=...))")


def probe_top_shapes(param, source_dir: Optional[Path] = None) -> Optional[List[Shape]]:
    """The top shapes a file-backed data layer will produce, read from its first item as
    Caffe's ``DataLayerSetUp`` does; None when they cannot be known (no reader for the type,
    the ``data`` extra missing, the source absent or unreadable: :func:`probe_source` says
    why)."""
    return probe_source(param, source_dir)[0]


def probe_source(param, source_dir: Optional[Path] = None
                 ) -> Tuple[Optional[List[Shape]], Optional[CaffeLayersError]]:
    """``(top shapes, None)`` as :func:`probe_top_shapes`, or ``(None, the error)`` when the
    layer's source cannot be read, so that whoever needs the shapes can say why they are
    unknown; ``(None, None)`` for a type without a reader."""
    if param.type not in ("ImageData", "Data", "HDF5Data", "WindowData"):
        return None, None
    try:
        return open_source(param, "TEST", source_dir).top_shapes(), None
    except CaffeLayersError as error:
        return None, error
