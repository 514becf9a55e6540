"""Caffe nets as PyTorch source (``model.py`` + ``weights.pt``) and as TorchScript.

``convert_to_pytorch(net, out_dir)`` writes readable source of an ``nn.Module`` whose
``__init__`` builds one submodule per Caffe layer (``torch.nn`` where PyTorch computes
Caffe's numbers, a caffelayers import where it has no equivalent) and whose ``forward`` takes
the net's inputs as arguments in net order and returns its output: the tensor when there is
one, else a dict keyed by Caffe blob name. ``weights.pt`` is its state_dict and loads with
``torch.load(..., weights_only=True)``.

Each Caffe type has a source emitter in ``SOURCE_EMITTERS`` (``emit_*.py``); register one for
a new type with ``@register_source_emitter("Type")``. A net with types that have none is
refused with one :class:`~caffelayers.errors.UnknownLayerError` listing them all.

``convert_to_torchscript(net, path)`` scripts the generated module (tracing it where a
caffelayers import cannot be scripted) and saves it for ``torch.jit.load``.
``ConvertedNet(net, runtime)`` runs either output like ``Net.forward``, by blob name.
"""

from .codegen import (GeneratedModel, convert_to_pytorch, forward_by_name, generate_pytorch,
                      import_model_class, load_pytorch, missing_emitters, write_pytorch)
from .registry import SOURCE_EMITTERS, register_source_emitter
from .runtime import RUNTIMES, ConvertedNet
from .source import LayerSource
from .torchscript import convert_to_torchscript, load_torchscript
from . import emit_forks  # noqa: F401  SegNet, PSPNet, ShuffleNet, MobileNet, SENet (registers)
from . import emit_ssd  # noqa: F401  Normalize, Permute, PriorBox, DetectionOutput (registers)
from . import emit_roi  # noqa: F401  ROIPooling, PSROIPooling, Proposal (registers)
from . import emit_detection_losses  # noqa: F401  SmoothL1Loss, MultiBoxLoss (registers)

__all__ = [
    "RUNTIMES", "SOURCE_EMITTERS", "ConvertedNet", "GeneratedModel", "LayerSource",
    "convert_to_pytorch", "convert_to_torchscript", "forward_by_name", "generate_pytorch",
    "import_model_class", "load_pytorch", "load_torchscript", "missing_emitters",
    "register_source_emitter", "write_pytorch",
]
