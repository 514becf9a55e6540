"""The Caffe schema and its files.

``caffe_pb2`` is generated from ``caffe.proto`` (BVLC Caffe's messages, field names and
numbers, and the fields of every Caffe fork we read: SphereFace, SSD, OpenCV, Faster R-CNN,
R-FCN, SegNet, DeepLab, PSPNet, NVCaffe, CaffeOnSpark, ShuffleNet, MobileNet forks);
:mod:`.forks` holds the forks' field numbers and which fork a layer type comes from;
:mod:`.io` reads and writes .prototxt, .caffemodel and .binaryproto files, through
:mod:`.text` (the text format with its checks) and :mod:`.wire` (binary files at the wire
level, fork fields decoded by layer type); :mod:`.upgrade` brings V0/V1 nets and old fields
up to date, and :mod:`.netstate` keeps the layers of one phase, level and stage set.
"""

from .io import (array_to_blob, blob_shape, blob_to_array, read_binaryproto, read_caffemodel,
                 read_net, read_prototxt, read_solver, write_binaryproto, write_caffemodel,
                 write_prototxt, write_solver)
from .netstate import filter_net
from .upgrade import upgrade_net

__all__ = [
    "array_to_blob", "blob_shape", "blob_to_array", "filter_net", "read_binaryproto",
    "read_caffemodel", "read_net", "read_prototxt", "read_solver", "upgrade_net",
    "write_binaryproto", "write_caffemodel", "write_prototxt", "write_solver",
]
