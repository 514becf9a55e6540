"""Size limits checked before anything is allocated, so that a hostile or mistyped file gets
one clear error instead of a multi-gigabyte allocation.

Two rules, checked where sizes are first known (shape inference, file headers):

* Caffe's own: a blob holds at most ``INT_MAX`` values (``Blob::Reshape`` checks
  ``count_ <= INT_MAX``), whatever the memory.
* This machine's: what one run would allocate may not exceed the memory limit, which is the
  physical memory (or the cgroup's limit, if lower) unless ``CAFFELAYERS_MEMORY_LIMIT``
  (bytes, or with a K/M/G/T suffix) says otherwise; in a process whose address space or data
  size is capped (``ulimit -v``/``-d``, ``RLIMIT_AS``/``RLIMIT_DATA``), never more than what
  the cap leaves free.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

from .errors import CaffeLayersError

#: Caffe's largest blob, in values.
INT_MAX = 2**31 - 1

_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def memory_limit() -> int:
    """Bytes one run may allocate: ``CAFFELAYERS_MEMORY_LIMIT``, else the machine's memory;
    at most what this process's address-space and data caps leave free."""
    setting = os.environ.get("CAFFELAYERS_MEMORY_LIMIT", "").strip().upper().removesuffix("B")
    if setting:
        number, suffix = (setting[:-1], setting[-1]) if setting[-1] in _SUFFIXES else \
            (setting, "")
        try:
            limit = int(float(number) * _SUFFIXES[suffix])
        except ValueError:
            raise CaffeLayersError(f"CAFFELAYERS_MEMORY_LIMIT={setting!r} is not a size "
                                   "(write e.g. 8G or 8589934592)") from None
    else:
        limit = _machine_memory()
    return min(limit, _headroom())


def _headroom() -> float:
    """What ``RLIMIT_AS`` and ``RLIMIT_DATA`` leave to allocate (infinite when uncapped): an
    allocation past them fails inside numpy or torch, so they are limits like the memory."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return math.inf
    free = math.inf
    for cap, field in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(cap)[0]
        if soft == resource.RLIM_INFINITY:
            continue
        free = min(free, max(0, soft - _status_bytes(field)))
    return free


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status in bytes (0 where there is no such file)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _machine_memory() -> int:
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        cgroup = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cgroup.isdigit():
            physical = min(physical, int(cgroup))
    except OSError:
        pass
    return physical


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if size < 1024 or unit == "PB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_count(shape: Sequence[int], what: str) -> int:
    """The number of values of ``shape``; an error naming ``what`` past Caffe's INT_MAX."""
    count = math.prod(shape)
    if count > INT_MAX:
        raise CaffeLayersError(f"{what} has shape {' x '.join(map(str, shape))} = {count:,} "
                               f"values; Caffe's blobs hold at most {INT_MAX:,} (INT_MAX)")
    return count


def check_bytes(size: int, what: str, limit: Optional[int] = None) -> None:
    """An error naming ``what`` when ``size`` bytes exceed the memory limit."""
    limit = memory_limit() if limit is None else limit
    if size > limit:
        raise CaffeLayersError(f"{what} needs {format_bytes(size)}, more than the "
                               f"{format_bytes(limit)} this process may allocate (the "
                               "machine's memory, its ulimit, or CAFFELAYERS_MEMORY_LIMIT)")
