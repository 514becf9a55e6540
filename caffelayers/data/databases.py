"""Caffe's key-value databases (``db::DB``): LMDB through py-lmdb, LevelDB through plyvel.

Both hold serialized ``Datum`` messages under byte-string keys read in sorted (bytewise)
order. LMDB is what ``caffelayers[data]`` installs; LevelDB (Caffe's default ``backend``) is
read and written when the ``plyvel`` package is installed (``pip install plyvel``).

LevelDB lets one process at a time open a database (its ``LOCK`` file), so a
:class:`LevelDBReader` opens it only for the duration of one read and, while another process
(a loader worker) holds it, waits for it; LMDB environments stay open per process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import CaffeFormatError, CaffeLayersError
from .extra import MissingExtraError, require

#: Caffe's backend names, as ``DataParameter.DB`` and the tools' ``--backend`` spell them.
BACKENDS = ("lmdb", "leveldb")

#: seconds a LevelDB reader waits for another process to release the database.
LOCK_WAIT = 120.0

#: open LMDB environments by (path, process): py-lmdb opens a path once per process.
_LMDB_ENVIRONMENTS: Dict[Tuple[str, int], object] = {}


def require_plyvel(what: str):
    """Import plyvel or say how to do without it."""
    try:
        import plyvel
    except ImportError:
        raise MissingExtraError(
            f"{what}: LevelDB needs the package 'plyvel' (pip install plyvel); or convert the "
            "images to LMDB ('caffelayers convert-imageset ... --backend lmdb') and set "
            "'backend: LMDB'") from None
    return plyvel


def backend_name(backend) -> str:
    """``"lmdb"`` or ``"leveldb"`` from a tool's ``--backend`` or a ``DataParameter.DB``."""
    if isinstance(backend, int):
        from ..proto import caffe_pb2

        backend = caffe_pb2.DataParameter.DB.Name(backend)
    name = str(backend).lower()
    if name not in BACKENDS:
        raise CaffeLayersError(f"unknown backend {backend!r}: give lmdb or leveldb")
    return name


class LMDBReader:
    """Read access to an LMDB environment (a directory holding ``data.mdb``)."""

    def __init__(self, path, what: str):
        self.path, self.what = Path(path), what

    def _environment(self):
        key = (str(self.path.resolve()), os.getpid())
        if key not in _LMDB_ENVIRONMENTS:
            lmdb = require("lmdb", self.what)
            try:
                _LMDB_ENVIRONMENTS[key] = lmdb.open(key[0], readonly=True, lock=False,
                                                    readahead=False, max_readers=1024)
            except lmdb.Error as error:
                raise CaffeFormatError(f"{self.what}: cannot open the LMDB database: {error}",
                                       self.path) from None
        return _LMDB_ENVIRONMENTS[key]

    def keys(self) -> List[bytes]:
        with self._environment().begin() as txn:
            return list(txn.cursor().iternext(keys=True, values=False))

    def get_many(self, keys: Sequence[bytes]) -> List[Optional[bytes]]:
        with self._environment().begin(buffers=False) as txn:
            return [txn.get(key) for key in keys]

    def items(self):
        """Every ``(key, value)`` in key order."""
        with self._environment().begin(buffers=False) as txn:
            yield from txn.cursor()


class LevelDBReader:
    """Read access to a LevelDB database, opened per read (see the module's note)."""

    def __init__(self, path, what: str):
        self.path, self.what = Path(path), what

    def _open(self):
        plyvel = require_plyvel(self.what)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                return plyvel.DB(str(self.path), create_if_missing=False)
            except plyvel.Error as error:
                text = str(error.args[0].decode(errors="replace")
                           if error.args and isinstance(error.args[0], bytes) else error)
                if "lock" in text.lower() and time.monotonic() < deadline:
                    time.sleep(0.01)  # another process reads it now
                    continue
                hint = ("; it is an LMDB database: set 'backend: LMDB'"
                        if (self.path / "data.mdb").exists() else "")
                raise CaffeFormatError(f"{self.what}: cannot open the LevelDB database: "
                                       f"{text}{hint}", self.path) from None

    def keys(self) -> List[bytes]:
        db = self._open()
        try:
            return list(db.iterator(include_value=False))
        finally:
            db.close()

    def get_many(self, keys: Sequence[bytes]) -> List[Optional[bytes]]:
        db = self._open()
        try:
            return [db.get(key) for key in keys]
        finally:
            db.close()

    def items(self):
        db = self._open()
        try:
            yield from db.iterator()
        finally:
            db.close()


def open_reader(path, backend, what: str):
    """A reader (``keys()``, ``get_many(keys)``, ``items()``) of the database at ``path``."""
    return (LMDBReader if backend_name(backend) == "lmdb" else LevelDBReader)(path, what)


class Writer:
    """A new database written in batches (Caffe commits every 1000 records).

    Caffe's ``db::NEW`` refuses an existing path; so does this. LMDB's map grows whenever it
    fills up.
    """

    def __init__(self, path, backend, what: str):
        self.path, self.what = Path(path), what
        self.backend = backend_name(backend)
        if self.path.exists():
            raise CaffeLayersError(f"{self.path}: the database already exists; remove it or "
                                   "choose another name")
        self.pending: List[Tuple[bytes, bytes]] = []
        if self.backend == "lmdb":
            self.lmdb = require("lmdb", what)
            self.map_size = 1 << 26
            self.db = self.lmdb.open(str(self.path), map_size=self.map_size, subdir=True,
                                     meminit=False)
        else:
            plyvel = require_plyvel(what)
            self.db = plyvel.DB(str(self.path), create_if_missing=True, error_if_exists=True)

    def put(self, key: bytes, value: bytes) -> None:
        self.pending.append((key, value))

    def commit(self) -> None:
        if self.backend == "leveldb":
            with self.db.write_batch() as batch:
                for key, value in self.pending:
                    batch.put(key, value)
        else:
            while True:
                try:
                    with self.db.begin(write=True) as txn:
                        for key, value in self.pending:
                            txn.put(key, value)
                    break
                except self.lmdb.MapFullError:
                    self.map_size *= 2
                    self.db.set_mapsize(self.map_size)
        self.pending = []

    def close(self) -> None:
        self.db.close()


__all__ = ["BACKENDS", "LMDBReader", "LevelDBReader", "Writer", "backend_name",
           "open_reader", "require_plyvel"]
