"""Where a data layer's relative file names point.

Caffe opens ``source``, ``mean_file`` and the files they list relative to the working
directory. caffelayers does too, and where nothing is there it also looks next to the file
that names them (the prototxt, or the list file), as the solver does for net files.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..errors import CaffeLayersError


def candidates(name: str, base: Optional[Path]) -> List[Path]:
    """The places ``name`` may be, in the order they are tried."""
    path = Path(name)
    if path.is_absolute() or base is None:
        return [path]
    return [path, Path(base) / path]


def resolve(name: str, base: Optional[Path], what: str, directory: bool = False) -> Path:
    """The first existing candidate for ``name``.

    Args:
        name: the file name as written.
        base: the directory of the file that names it (None: the working directory only).
        what: for the message, e.g. ``"layer 'data' (ImageData): source"``.
        directory: look for a directory (an LMDB environment) rather than a file.

    Raises:
        CaffeLayersError: none exists; the message lists every place looked at.
    """
    if not name:
        raise CaffeLayersError(f"{what} is empty")
    tried = candidates(name, base)
    for path in tried:
        if (path.is_dir() if directory else path.is_file()):
            return path
    kind = "directory" if directory else "file"
    raise CaffeLayersError(f"{what}: {kind} {name!r} not found (looked for "
                           f"{' and '.join(str(p) for p in tried)})")
