"""Which layers a net has in a given phase, level and set of stages (Caffe's ``FilterNet``).

A layer's ``include`` and ``exclude`` rules (``NetStateRule``) are tested against the net's
``NetState``. A rule is met when every condition it sets holds: its ``phase`` equals the
state's, the state's level lies in ``[min_level, max_level]``, every ``stage`` is among the
state's stages and no ``not_stage`` is. Then:

* a layer with ``include`` rules is in the net when **any** of them is met;
* a layer without them is in the net unless **any** ``exclude`` rule is met;
* a layer may not have both kinds.

Converters that read ``exclude`` as if it were ``include[0]`` get train/test nets backwards;
the two lists are never mixed here.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

from ..errors import CaffeFormatError, CaffeLayersError
from . import caffe_pb2 as pb
from .upgrade import copy_fields_except, upgrade_net

__all__ = ["check_unique_tops", "filter_net", "layer_included", "make_state",
           "state_meets_rule"]

PhaseLike = Union[str, int, None]


def make_state(net: pb.NetParameter, phase: PhaseLike = None, level: Optional[int] = None,
               stages: Iterable[str] = ()) -> pb.NetState:
    """The NetState a net is built in, as Caffe's ``Net`` constructor sets it.

    ``phase`` and ``level`` replace the net's own ``state`` when given (``None`` keeps the
    net's, whose defaults are TEST and 0); ``stages`` are added to the net's stages.
    """
    state = pb.NetState()
    state.CopyFrom(net.state)
    if phase is not None:
        state.phase = _phase_value(phase)
    elif not state.HasField("phase"):
        state.phase = pb.TEST
    if level is not None:
        state.level = int(level)
    if isinstance(stages, str):
        stages = [stages]
    state.stage.extend(stage for stage in stages if stage not in state.stage)
    return state


def state_meets_rule(state: pb.NetState, rule: pb.NetStateRule) -> bool:
    """Whether ``state`` meets every condition ``rule`` sets (Caffe's ``StateMeetsRule``)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def layer_included(layer, state: pb.NetState, path=None) -> bool:
    """Whether ``layer`` (a LayerParameter or V1LayerParameter) is in a net in ``state``."""
    if len(layer.include) and len(layer.exclude):
        raise CaffeFormatError(f"layer {layer.name!r} has both 'include' and 'exclude' rules; "
                               "Caffe allows one kind or the other", path)
    if len(layer.include):
        return any(state_meets_rule(state, rule) for rule in layer.include)
    return not any(state_meets_rule(state, rule) for rule in layer.exclude)


def filter_net(net: pb.NetParameter, phase: PhaseLike = None, level: Optional[int] = None,
               stages: Sequence[str] = (), path=None) -> pb.NetParameter:
    """The layers of ``net`` that are in the net in the given state, as a new NetParameter.

    Args:
        net: the net definition; upgraded first if it is in an old format.
        phase: ``"TRAIN"``/``"TEST"`` (or ``caffe_pb2.TRAIN``/``TEST``); ``None`` takes the
            net's ``state.phase``, whose default is TEST.
        level: the state's level; ``None`` takes the net's ``state.level`` (default 0).
        stages: stages added to the net's ``state.stage``.
        path: the file the net came from, for error messages.

    The result's ``state`` is the state used, and every kept layer without a ``phase`` of
    its own gets the net's phase (as Caffe's ``Net::Init`` does), so that a layer that sets
    ``phase`` explicitly keeps it. Tops are checked as Caffe does when it builds the net: a
    blob may be produced once, except by an in-place layer (``top[i] == bottom[i]``).

    Raises:
        CaffeFormatError: a layer with both rule kinds, or a top produced twice.
        CaffeLayersError: a phase that is neither TRAIN nor TEST.
    """
    net = upgrade_net(net, path)
    state = make_state(net, phase, level, stages)
    filtered = pb.NetParameter()
    copy_fields_except(net, filtered, "layer")
    filtered.state.CopyFrom(state)
    for layer in net.layer:
        if layer_included(layer, state, path):
            kept = filtered.layer.add()
            kept.CopyFrom(layer)
            if not kept.HasField("phase"):
                kept.phase = state.phase
    check_unique_tops(filtered.layer, path)
    return filtered


def check_unique_tops(layers: Sequence[pb.LayerParameter], path=None,
                      positions: Optional[Sequence] = None) -> None:
    """Raise if a top blob is produced twice other than in place (Caffe's ``AppendTop``).

    ``positions``, where given, holds a ``(line, column)`` or None per layer for the error.
    """
    producer = {}
    for index, layer in enumerate(layers):
        for j, top in enumerate(layer.top):
            in_place = j < len(layer.bottom) and layer.bottom[j] == top
            if top in producer and not in_place:
                line, column = (positions[index] or (None, None)) if positions else (None, None)
                first = producer[top]
                raise CaffeFormatError(
                    f"layer {layer.name!r} ({layer.type}): top blob {top!r} is already "
                    f"produced by layer {first!r}; a blob may have one producer, or be "
                    f"rewritten in place by a layer whose bottom {j} is the same blob",
                    path, line, column)
            producer.setdefault(top, layer.name)


def _phase_value(phase) -> int:
    if isinstance(phase, str) and phase.upper() in ("TRAIN", "TEST"):
        return pb.Phase.Value(phase.upper())
    if not isinstance(phase, (str, bool)) and phase in (pb.TRAIN, pb.TEST):
        return int(phase)
    raise CaffeLayersError(f"phase must be TRAIN or TEST, got {phase!r}")
