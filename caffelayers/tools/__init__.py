"""The commands around ``caffe`` that a Caffe user reaches for, as ``caffelayers``
subcommands: ``test`` (Caffe's ``caffe test``), ``time`` (``caffe time``), ``plot``
(``tools/extra/plot_training_log.py``) and ``draw`` (``python/draw_net.py``).

Each module has ``add_parser(subparsers)``, which the CLI calls for every one of
:data:`TOOLS`.
"""

from . import caffe_test, classify, convert_imageset, draw, image_mean, plot, timing

#: the tool modules, in the order their commands are listed.
TOOLS = (caffe_test, timing, plot, draw, convert_imageset, image_mean, classify)

__all__ = ["TOOLS"]
