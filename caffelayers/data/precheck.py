"""A fast pass over the data layers' sources before the first iteration.

The readers find a missing image, a label outside the classes or an image of another size
when they reach it, which may be an hour into training. :func:`check_net_data` looks at
everything it can cheaply, first, and reports every problem it finds at once (up to
``limit``) in one :class:`DataCheckError` that names the prototxt, the layer, and the
file and line of each problem:

* ``ImageData``: the list parses (the reader's own rules), every listed image is a regular
  file (one ``stat`` each, no decoding: 100,000 entries take well under a second), every
  label is in the classes of the layers that read it (:class:`~caffelayers.data.LabelRule`),
  and, when the images are not resized (``new_height``/``new_width`` unset), the size their
  headers declare is the first image's (:mod:`caffelayers.data.headers`);
* ``Data`` (LMDB, LevelDB): the database opens and holds entries; each entry parses as a
  Datum with the first one's shape (``C x H x W``; ``H x W`` from the header of an encoded
  image) and a label in the classes;
* ``HDF5Data``: every listed file opens and holds the tops' datasets with agreeing rows and
  item shapes (the reader's own checks), and the label dataset's values are in the classes,
  checked over whole datasets at once.

Reading headers and Datums costs more than a ``stat``: those passes stop after ``seconds``
(logging how far they got), so the check stays a few seconds on any data set; the readers
still check what it did not reach. ``MemoryData`` and ``Input`` arrays are checked whole by
their reader already.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CaffeLayersError
from .extra import MissingExtraError
from .headers import declared_size
from .sources import HDF5Source, ImageDataSource, LabelRule, LMDBSource, open_source

__all__ = ["DataCheckError", "check_net_data"]

logger = logging.getLogger(__name__)

#: layer types whose sources are files this check reads.
CHECKED_TYPES = ("ImageData", "Data", "HDF5Data")


class DataCheckError(CaffeLayersError):
    """The data check found problems; ``problems`` lists them all as ``(layer, text)``
    (the message shows the first ``limit``)."""

    def __init__(self, message: str, problems: List[Tuple[str, str]]):
        super().__init__(message)
        self.problems = problems


class _Problems:
    """Problems found so far, in order, each once (a test net often reads the train net's
    list), grouped by the layer that found them first."""

    def __init__(self):
        self.found: List[Tuple[str, str]] = []
        self._seen = set()

    def add(self, layer: str, text: str) -> None:
        if text not in self._seen:
            self._seen.add(text)
            self.found.append((layer, text))


def _where(path, line: Optional[int] = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _label_problems(labels: np.ndarray, rules: Sequence[LabelRule], place) -> Iterable[str]:
    """``place(i)`` and the rule broken for every label a rule rejects (vectorised)."""
    labels = np.asarray(labels).reshape(-1)
    for rule in rules:
        for index in np.flatnonzero(rule.bad(labels)):
            value = labels[index]
            shown = int(value) if float(value).is_integer() else float(value)
            yield f"{place(int(index))}label {shown} is outside the classes: {rule.describe()}"


def _check_image_list(source: ImageDataSource, rules, problems: _Problems, layer: str,
                      deadline: float) -> None:
    where = [_where(source.list_path, int(line)) for line in source.lines]
    for index, name in enumerate(source.names):
        path = source.root + source.root_folder + name
        try:
            mode = os.stat(path).st_mode
        except OSError:
            problems.add(layer, f"{where[index]}: image {name!r} not found (read as {path!r})")
            continue
        if not stat.S_ISREG(mode):
            problems.add(layer, f"{where[index]}: image {name!r} is not a regular file (read "
                                f"as {path!r})")
    for text in _label_problems(source.labels, rules,
                                lambda i: f"{where[i]}: image {source.names[i]!r}: "):
        problems.add(layer, text)
    if source.new_size[0] > 0:
        return  # resized: sizes may differ
    first: Optional[Tuple[int, int]] = None
    for index, name in enumerate(source.names):
        if time.perf_counter() > deadline:
            logger.info("%s: image sizes checked in the first %d of %d images (time budget)",
                        source.layer, index, len(source))
            return
        size = declared_size(source.root + source.root_folder + name)
        if size is None:
            continue  # unknown format or missing: the decoder (or the stat above) says
        if first is None:
            first = (index, size)
        elif size != first[1]:
            problems.add(layer, f"{where[index]}: image {name!r} is {size[0]} x {size[1]} "
                                f"(W x H, from its header), the first image "
                                f"{source.names[first[0]]!r} is {first[1][0]} x "
                                f"{first[1][1]}; set new_height and new_width to resize them")


def _check_database(source: LMDBSource, rules, problems: _Problems, layer: str,
                    deadline: float) -> None:
    from google.protobuf.message import DecodeError

    from ..proto import caffe_pb2
    from .databases import open_reader

    database = open_reader(source.path, source.backend, source.layer)
    first: Optional[Tuple[str, Tuple[int, ...]]] = None
    chunk = 256
    for start in range(0, len(source.keys), chunk):
        if time.perf_counter() > deadline:
            logger.info("%s: %d of %d entries checked (time budget)", source.layer, start,
                        len(source.keys))
            return
        keys = source.keys[start:start + chunk]
        for key, value in zip(keys, database.get_many(keys)):
            entry = f"{source.path}: entry {key.decode(errors='replace')!r}"
            try:
                datum = caffe_pb2.Datum.FromString(value or b"")
            except DecodeError:
                problems.add(layer, f"{entry} is not a Caffe Datum")
                continue
            if datum.encoded:
                size = declared_size(datum.data)
                shape = None if size is None else (size[1], size[0])
            else:
                shape = (datum.channels, datum.height, datum.width)
                values = len(datum.data) or len(datum.float_data)
                if values != int(np.prod(shape)) or values == 0:
                    problems.add(layer, f"{entry} holds {values} values for its shape "
                                        f"{'x'.join(map(str, shape))}")
                    continue
            if shape is not None:
                if first is None:
                    first = (entry, shape)
                elif shape != first[1]:
                    problems.add(layer, f"{entry} is {'x'.join(map(str, shape))}, the first "
                                        f"({first[0]}) is {'x'.join(map(str, first[1]))}")
            for text in _label_problems(np.asarray([datum.label]), rules,
                                        lambda i, entry=entry: f"{entry}: "):
                problems.add(layer, text)


def _check_hdf5(source: HDF5Source, top: Optional[str], rules, problems: _Problems,
                layer: str) -> None:
    if top is None:
        return
    for index, path in enumerate(source.files):
        with source._open(index) as handle:
            labels = handle[top][()]
        for text in _label_problems(labels, rules,
                                    lambda i, path=path: f"{path}: dataset {top!r} "
                                                         f"row {i}: "):
            problems.add(layer, text)


def check_net_data(nets: Sequence, *, limit: int = 20, seconds: float = 10.0) -> None:
    """Check the sources of every file-backed data layer of ``nets`` (built
    :class:`~caffelayers.Net` objects: a solver's train and test nets).

    Args:
        nets: the nets whose data layers to check.
        limit: problems shown in the message (all are in ``DataCheckError.problems``).
        seconds: the time the header and Datum passes may take, in all.

    Raises:
        DataCheckError: every problem found, by layer, each with its file and line.
    """
    from ..graph import layer_line
    from .loader import label_rules

    started = time.perf_counter()
    deadline = started + seconds
    problems = _Problems()
    checked = 0
    for net in nets:
        source_file = getattr(net, "source_file", None)
        source_dir = getattr(net, "source_dir", None)
        for node in net.graph.nodes:
            if not node.is_input or node.type not in CHECKED_TYPES:
                continue
            checked += 1
            line = layer_line(source_file, node.name) if source_file is not None else None
            layer = (f"{_where(source_file, line) + ': ' if source_file else ''}layer "
                     f"{node.name!r} ({node.type}) of the {net.phase} net")
            try:
                source = open_source(node.param, net.phase, source_dir)
            except MissingExtraError:
                continue  # the reader says so when the data is read
            except CaffeLayersError as error:
                problems.add(layer, str(error))
                continue
            tops = [(top, label_rules(net.graph, top)) for top in node.tops]
            labelled = [(top, rules) for index, (top, rules) in enumerate(tops) if rules and
                        (source.label_top_index is None or index == source.label_top_index)]
            top, rules = labelled[0] if labelled else (None, [])
            try:
                if isinstance(source, ImageDataSource):
                    _check_image_list(source, rules, problems, layer, deadline)
                elif isinstance(source, LMDBSource):
                    _check_database(source, rules, problems, layer, deadline)
                elif isinstance(source, HDF5Source):
                    _check_hdf5(source, top, rules, problems, layer)
            except CaffeLayersError as error:
                problems.add(layer, str(error))
    if checked:
        logger.info("Data check of %d data layer%s: %d problem%s in %.2f s", checked,
                    "" if checked == 1 else "s", len(problems.found),
                    "" if len(problems.found) == 1 else "s", time.perf_counter() - started)
    if problems.found:
        raise DataCheckError(_message(problems.found, limit), problems.found)


def _message(found: List[Tuple[str, str]], limit: int) -> str:
    count = len(found)
    lines = [(f"the data check before the first iteration found {count} problem"
              f"{'' if count == 1 else 's'} (fix them, or skip the check with "
              "--skip-data-check):")]
    shown: Dict[str, List[str]] = {}
    for layer, text in found[:limit]:
        shown.setdefault(layer, []).append(text)
    for layer, texts in shown.items():
        lines.append(f"  {layer}:")
        lines.extend(f"    {text}" for text in texts)
    if count > limit:
        lines.append(f"  ... and {count - limit} more")
    return "\n".join(lines)

