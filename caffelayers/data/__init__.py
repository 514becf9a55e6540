"""Reading the data of Caffe's data layers: ``ImageData`` (image lists), ``Data`` (LMDB),
``HDF5Data``, ``WindowData`` (R-CNN's window files), and ``MemoryData``/``Input`` fed from
arrays.

A net built by :class:`~caffelayers.Net` takes its data layers' tops as inputs; this package
produces those inputs from the layers' sources, as Caffe's layers would, in worker
processes. Image decoding needs OpenCV, LMDB and HDF5 their packages: the optional extra
``pip install 'caffelayers[data]'``. Importing this package needs none of them.

    >>> from caffelayers import Solver
    >>> from caffelayers.data import net_inputs
    >>> solver = Solver("solver.prototxt")
    >>> solver.inputs = net_inputs(solver.net, seed=0)
"""

from .extra import MissingExtraError
from .loader import BatchLoader, NetInputs, data_sources, label_rules, net_inputs
from .sources import (SOURCE_TYPES, ArraySource, HDF5Source, ImageDataSource, LabelRule,
                      LMDBSource, Source, open_source, probe_top_shapes)
from .transform import DataTransformer
from .window import WindowDataSource

__all__ = [
    "SOURCE_TYPES", "ArraySource", "BatchLoader", "DataTransformer", "HDF5Source",
    "ImageDataSource", "LabelRule", "LMDBSource", "MissingExtraError", "NetInputs", "Source",
    "WindowDataSource", "data_sources", "label_rules", "net_inputs", "open_source",
    "probe_top_shapes",
]
