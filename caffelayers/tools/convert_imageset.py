"""``caffelayers convert-imageset``: Caffe's ``convert_imageset`` tool.

A list of ``path label`` lines becomes an LMDB (or LevelDB) database of serialized
``Datum`` messages, byte for byte what Caffe's tool writes, so that Caffe's ``Data`` layer
(and ours) reads it:

* the key of list line ``i`` (from 0, in the list's order after ``--shuffle``) is
  ``"%08d_%s" % (i, path)``; a line whose image cannot be read is skipped (logged) and its
  number is not reused;
* a raw Datum holds ``channels``, ``height``, ``width``, ``data`` (the ``C x H x W`` bytes
  of the BGR or grayscale image, channel-major: ``data[(c * H + h) * W + w]``), ``label``
  and ``encoded: false``;
* an encoded one (``--encoded`` or ``--encode_type``) holds ``data`` (the image file's own
  bytes when it is already in that format, in the requested colour mode and not resized;
  else the image re-encoded with OpenCV), ``label`` and ``encoded: true``.

Caffe: the path is everything before the line's last space and the label the integer after
it; images are read with OpenCV's ``imread`` in colour or grayscale (``--gray``) and resized
with bilinear interpolation when both ``--resize_height`` and ``--resize_width`` are set;
commits every 1000 records, logging ``Processed N files.`` (on a terminal a progress bar
with the time left sits below the lines). Differences: ``--shuffle`` draws the order from ``--seed``
(Caffe's own generator cannot be reproduced); a line without a label is an error (Caffe reads
it as label 0 with the whole line as the path); ``--check_size`` compares the decoded image
sizes, also for encoded records (Caffe compares encoded byte counts, which fails on any
second image). ``--backend leveldb`` (Caffe's other backend) needs the package ``plyvel``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..data.databases import Writer
from ..data.extra import require
from ..errors import CaffeFormatError, UnsupportedParameterError
from ..train_log import caffe_log, quiet_opencv, tool_bar

log = logging.getLogger(__name__)

#: records per LMDB transaction, as Caffe commits.
COMMIT_EVERY = 1000


def read_image_list(path) -> List[Tuple[str, int, int]]:
    """The ``(path, label, line number)`` entries of a Caffe image list.

    Each non-blank line is split at its last space: the path before, an integer label after.

    Raises:
        CaffeFormatError: a line without an integer label (names the file and line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CaffeFormatError(f"cannot read the image list: {error}", path) from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        name, space, label = line.rpartition(" ")
        try:
            if not space or not name:
                raise ValueError
            entries.append((name, int(label), number))
        except ValueError:
            raise CaffeFormatError(f"expected 'PATH LABEL' (the label after the last space), "
                                   f"got {line!r}", path, number) from None
    return entries


def cv_image_to_datum(image: np.ndarray, label: int):
    """Caffe's ``CVMatToDatum`` and ``set_label``: an OpenCV image (``H x W x C`` BGR or
    ``H x W``, uint8) as a raw Datum, its bytes in ``C x H x W`` order."""
    from ..proto import caffe_pb2

    chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    channels, height, width = chw.shape
    return caffe_pb2.Datum(channels=channels, height=height, width=width,
                           data=np.ascontiguousarray(chw).tobytes(), label=label,
                           encoded=False)


def _same_format(filename: str, encoding: str) -> bool:
    """Caffe's ``matchExt``: the file's extension names ``encoding`` (``jpeg`` is ``jpg``)."""
    ext = filename.rsplit(".", 1)[-1].lower()
    encoding = encoding.lower()
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def image_to_datum(filename: str, label: int, height: int = 0, width: int = 0,
                   is_color: bool = True, encoding: str = ""):
    """Caffe's ``ReadImageToDatum``: ``(datum, decoded image)``, or ``(None, None)`` when
    OpenCV cannot read the file.

    Args:
        filename: the image file.
        label: the Datum's label.
        height, width: resize to this size (bilinear) when both are positive.
        is_color: read in BGR colour, else grayscale.
        encoding: store the image encoded in this format (``"png"``, ``"jpg"``...) instead
            of raw bytes; empty for raw.
    """
    from ..proto import caffe_pb2

    cv2 = require("cv2", "convert-imageset")
    image = cv2.imread(filename, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if image is None:
        return None, None
    if height > 0 and width > 0:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if not encoding:
        return cv_image_to_datum(image, label), image
    if (image.ndim == 3) == is_color and not height and not width and \
            _same_format(filename, encoding):
        data = Path(filename).read_bytes()
    else:
        try:
            ok, buffer = cv2.imencode("." + encoding, image)
        except cv2.error:
            ok = False
        if not ok:
            raise UnsupportedParameterError(f"OpenCV cannot encode images as {encoding!r} "
                                            "(give --encode_type png or jpg)")
        data = buffer.tobytes()
    return caffe_pb2.Datum(data=data, label=label, encoded=True), image


def convert_imageset(root: str, list_file, db, resize_height: int = 0,
                     resize_width: int = 0, gray: bool = False, shuffle: bool = False,
                     seed: int = 0, encoded: bool = False, encode_type: str = "",
                     check_size: bool = False, backend: str = "lmdb") -> int:
    """Write the images of ``list_file`` (read from ``root + path``) to a new database
    ``db``, as Caffe's ``convert_imageset``; returns the number of records written.

    Args:
        root: prefix of every listed path, joined as a string (as Caffe: end it with ``/``).
        list_file: the ``path label`` list.
        db: the database directory to create.
        resize_height, resize_width: resize every image when both are positive.
        gray: read the images in grayscale.
        shuffle: write the lines in an order drawn from ``seed``.
        encoded: store encoded images (in the format of each file's extension unless
            ``encode_type``); ``encode_type`` alone implies it.
        check_size: every image must have the first one's channels, height and width.
        backend: ``"lmdb"`` or ``"leveldb"`` (with the package ``plyvel``).

    Raises:
        CaffeFormatError: a malformed list line, or an image of another size under
            ``check_size``.
        CaffeLayersError: an existing ``db``, an unknown backend, LevelDB without
            ``plyvel``.
    """
    list_path = Path(list_file)
    entries = read_image_list(list_path)
    if shuffle:
        log.info("Shuffling data")
        entries = [entries[i] for i in np.random.default_rng(seed).permutation(len(entries))]
    log.info("A total of %d images.", len(entries))
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
    resize_height, resize_width = max(0, resize_height), max(0, resize_width)
    writer = Writer(db, backend, "convert-imageset")
    count = 0
    first_shape: Optional[Tuple[int, ...]] = None
    try:
        with tool_bar(len(entries), "img") as bar:
            for index, (name, label, number) in enumerate(entries):
                if bar is not None:
                    bar.update()
                encoding = encode_type
                if encoded and not encoding:
                    if "." not in name:
                        raise CaffeFormatError(f"cannot guess the encoding of {name!r} from "
                                               "its name; give --encode_type", list_path,
                                               number)
                    encoding = name.rsplit(".", 1)[1].lower()
                datum, image = image_to_datum(root + name, label, resize_height, resize_width,
                                              not gray, encoding)
                if datum is None:
                    log.error("Could not open or find file %s", root + name)
                    continue
                if check_size:
                    if first_shape is None:
                        first_shape = image.shape
                    elif image.shape != first_shape:
                        raise CaffeFormatError(
                            f"image {name!r} is {_hwc_text(image.shape)}, the first is "
                            f"{_hwc_text(first_shape)} (--check_size)", list_path, number)
                writer.put(f"{index:08d}_{name}".encode(), datum.SerializeToString())
                count += 1
                if count % COMMIT_EVERY == 0:
                    writer.commit()
                    log.info("Processed %d files.", count)
        if count % COMMIT_EVERY != 0:
            writer.commit()
            log.info("Processed %d files.", count)
    finally:
        writer.close()
    return count


def _hwc_text(shape) -> str:
    height, width = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    return f"{channels}x{height}x{width} (C x H x W)"


def cmd_convert_imageset(args) -> int:
    quiet_opencv()
    with caffe_log(sys.stderr):
        convert_imageset(args.root, args.list, args.db, args.resize_height, args.resize_width,
                         args.gray, args.shuffle, args.seed, args.encoded, args.encode_type,
                         args.check_size, args.backend)
    return 0


def add_parser(subparsers: Callable) -> None:
    """Register ``convert-imageset`` on the ``caffelayers`` sub-command parsers."""
    p = subparsers.add_parser(
        "convert-imageset",
        help="images listed as 'path label' lines to an LMDB of Caffe Datums "
             "(Caffe's convert_imageset)")
    p.add_argument("root", metavar="ROOT/", help="folder prefix of every listed path (joined as a string: "
                                "end it with /)")
    p.add_argument("list", metavar="LIST.txt", help="the list file: one 'path label' line per image")
    p.add_argument("db", help="the database directory to create")
    p.add_argument("--gray", action="store_true", help="read the images in grayscale")
    p.add_argument("--shuffle", action="store_true",
                   help="write the lines in a random order (drawn from --seed)")
    p.add_argument("--seed", type=int, default=0, help="the --shuffle seed")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"],
                   help="the database kind (leveldb needs the package plyvel)")
    p.add_argument("--resize_width", type=int, default=0, metavar="W",
                   help="resize images to this width (with --resize_height)")
    p.add_argument("--resize_height", type=int, default=0, metavar="H",
                   help="resize images to this height (with --resize_width)")
    p.add_argument("--check_size", action="store_true",
                   help="every image must have the size of the first")
    p.add_argument("--encoded", action="store_true",
                   help="store the images encoded (the file's format) rather than raw bytes")
    p.add_argument("--encode_type", default="", metavar="png|jpg|...",
                   help="the format of encoded images (png, jpg...); implies --encoded")
    p.set_defaults(run=cmd_convert_imageset)


__all__ = ["add_parser", "cmd_convert_imageset", "convert_imageset", "cv_image_to_datum",
           "image_to_datum", "read_image_list"]
