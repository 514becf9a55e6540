"""``caffelayers compute-image-mean``: Caffe's ``compute_image_mean`` tool.

The mean of every Datum of an LMDB (or LevelDB) database, written as a ``1 x C x H x W``
float BlobProto (``mean.binaryproto``, what ``transform_param { mean_file }`` reads), with
Caffe's log lines:
``Starting iteration``, ``Processed N files.`` every 10000 records and at the end,
``Write to OUT``, ``Number of channels: C`` and ``mean_value channel [c]: M`` per channel
(the values to give ``mean_value`` instead). On a terminal a progress bar with the time
left sits below the lines.

Caffe: encoded records are decoded in their own channels (``DecodeDatumNative``); raw
records hold ``data`` bytes or ``float_data``; every record must hold as many values as the
first (``Incorrect data field size``). The sum is accumulated in float32 as Caffe's
``BlobProto`` float field does, then divided by the count.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

from ..data.databases import open_reader
from ..data.extra import require
from ..errors import CaffeFormatError
from ..train_log import caffe_log, is_terminal, tool_bar

log = logging.getLogger(__name__)

#: records between two "Processed N files." lines, as Caffe logs.
LOG_EVERY = 10000


def datum_values(datum, where: str, path) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """``(values, (C, H, W))``: a Datum's values as a flat float32 array, decoding an encoded
    image in its own channels as Caffe's ``DecodeDatumNative`` does."""
    if datum.encoded:
        cv2 = require("cv2", "compute-image-mean")
        image = cv2.imdecode(np.frombuffer(datum.data, dtype=np.uint8), cv2.IMREAD_ANYCOLOR)
        if image is None:
            raise CaffeFormatError(f"{where}: its encoded image cannot be decoded", path)
        chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        return chw.reshape(-1).astype(np.float32), chw.shape
    shape = (datum.channels, datum.height, datum.width)
    if datum.data:
        return np.frombuffer(datum.data, dtype=np.uint8).astype(np.float32), shape
    return np.asarray(datum.float_data, dtype=np.float32), shape


def compute_image_mean(db, output=None, backend: str = "lmdb") -> np.ndarray:
    """The mean image of a database of Datums (``backend`` lmdb, or leveldb with the package
    ``plyvel``), ``1 x C x H x W`` float32; written as a BlobProto to ``output`` when given.

    Raises:
        CaffeFormatError: an empty database, a record that is not a Datum, or one holding
            another number of values than the first.
    """
    from google.protobuf.message import DecodeError

    from ..proto import caffe_pb2, io

    path = Path(db)
    total: Optional[np.ndarray] = None
    shape = None
    count = 0
    if not path.is_dir():
        raise CaffeFormatError("no database directory here", path)
    reader = open_reader(path, backend, "compute-image-mean")
    with tool_bar(len(reader.keys()) if is_terminal(sys.stderr) else 0, "img") as bar:
        for key, value in reader.items():
            where = f"entry {key.decode(errors='replace')!r}"
            try:
                datum = caffe_pb2.Datum.FromString(value)
            except DecodeError:
                raise CaffeFormatError(f"{where} is not a Caffe Datum", path) from None
            values, item_shape = datum_values(datum, where, path)
            if total is None:
                if datum.encoded:
                    log.info("Decoding Datum")
                shape = item_shape
                total = np.zeros(values.size, dtype=np.float32)
                log.info("Starting iteration")
            if values.size != int(np.prod(shape)):
                raise CaffeFormatError(f"{where}: Incorrect data field size {values.size} "
                                       f"(the first record holds {int(np.prod(shape))})",
                                       path)
            total += values
            count += 1
            if bar is not None:
                bar.update()
            if count % LOG_EVERY == 0:
                log.info("Processed %d files.", count)
    if total is None:
        raise CaffeFormatError("the database is empty", path)
    if count % LOG_EVERY != 0:
        log.info("Processed %d files.", count)
    mean = (total / np.float32(count)).reshape((1,) + tuple(shape))
    if output is not None:
        log.info("Write to %s", output)
        blob = caffe_pb2.BlobProto(num=1, channels=shape[0], height=shape[1], width=shape[2])
        blob.data.extend(mean.reshape(-1).tolist())
        io.write_binaryproto(blob, output)
    log.info("Number of channels: %d", shape[0])
    for channel, value in enumerate(mean[0].reshape(shape[0], -1).mean(axis=1)):
        log.info("mean_value channel [%d]: %g", channel, value)
    return mean


def cmd_compute_image_mean(args) -> int:
    with caffe_log(sys.stderr):
        compute_image_mean(args.db, args.output, args.backend)
    return 0


def add_parser(subparsers: Callable) -> None:
    """Register ``compute-image-mean`` on the ``caffelayers`` sub-command parsers."""
    p = subparsers.add_parser(
        "compute-image-mean",
        help="the mean image of an LMDB of Datums as mean.binaryproto "
             "(Caffe's compute_image_mean)")
    p.add_argument("db", help="the LMDB database directory")
    p.add_argument("output", nargs="?", metavar="mean.binaryproto", help="the mean BlobProto to write (mean.binaryproto)")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"],
                   help="the database kind (leveldb needs the package plyvel)")
    p.set_defaults(run=cmd_compute_image_mean)


__all__ = ["add_parser", "cmd_compute_image_mean", "compute_image_mean", "datum_values"]
