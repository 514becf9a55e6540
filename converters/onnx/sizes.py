"""Which ONNX inputs get symbolic height and width: the rule and the table behind it.

A net converts with symbolic axes after the channels (``height``, ``width``) when every
layer's shape rule still holds at another size and every layer whose blobs change size has
an emitter that writes no size into the graph (:data:`ANY_SIZE`). MTCNN's PNet, run on an
image pyramid, is the case that needs it.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from ...errors import CaffeLayersError, shape_text

Shape = Tuple[int, ...]

#: ``predicate(node, bottom_shapes, top_shapes) -> bool`` of a type's emitter: whether it
#: follows its blobs to any height and width, given the shapes at the probe size.
SizePredicate = Callable[[object, List[Shape], List[Shape]], bool]


def _second_operand_fits(node, bottoms: List[Shape], tops: List[Shape]) -> bool:
    """Scale and Bias: a second bottom that changes size must need no reshape to broadcast
    (it spans every axis from ``axis`` on)."""
    if len(bottoms) < 2 or tuple(bottoms[1]) == tuple(node.bottom_shapes[1]):
        return True
    rank = len(bottoms[0])
    return len(bottoms[1]) == rank - node.module.axis % rank


def _slice_fits(node, bottoms: List[Shape], tops: List[Shape]) -> bool:
    """Slice: equal parts, or slice points on an axis whose size is fixed."""
    axis = node.module.axis % len(bottoms[0])
    return not node.module.slice_points or bottoms[0][axis] == node.bottom_shapes[0][axis]


def _flatten_fits(node, bottoms: List[Shape], tops: List[Shape]) -> bool:
    """Flatten: ONNX's ``Flatten`` (Caffe's default axes), not a reshape to fixed dims."""
    rank = len(bottoms[0])
    return rank >= 2 and node.module.axis % rank == 1 and node.module.end_axis % rank == rank - 1


#: Caffe types whose ONNX emitters follow their blobs to any height and width: None where
#: they write no size at all, else a :data:`SizePredicate` on the layer's settings. A type
#: missing here keeps the sizes of a net whose blobs it sees change fixed. Emitter modules
#: add their own types (Pooling), and so can users' emitters.
ANY_SIZE: Dict[str, Optional[SizePredicate]] = {
    **dict.fromkeys((
        "Convolution", "Deconvolution", "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal",
        "BNLL", "Power", "Exp", "Log", "Threshold", "Dropout", "LRN", "BatchNorm", "Softmax",
        "Eltwise", "Concat", "Split", "Tile", "Silence", "Embed")),
    "Scale": _second_operand_fits,
    "Bias": _second_operand_fits,
    "Slice": _slice_fits,
    "Flatten": _flatten_fits,
}

#: The probe runs the shape rules at this many times the prototxt's height and width (a
#: multiple keeps the sizes that halve evenly halving evenly).
SIZE_PROBE_FACTOR = 2

#: Names of the symbolic axes after the channels, by the input's rank.
_SIZE_AXES = {3: ("length",), 4: ("height", "width"), 5: ("depth", "height", "width")}


def _size_axes(rank: int) -> Tuple[str, ...]:
    return _SIZE_AXES.get(rank, tuple(f"size{i}" for i in range(rank - 2)))


class SizePlan:
    """Which input axes become symbolic, the shape rules' answer at the probe size, or the
    reason the sizes stay fixed."""

    def __init__(self, graph, static_shape: bool):
        self.axes: Dict[str, Dict[int, str]] = {}
        self.probe: Dict[int, Tuple[List[Shape], List[Shape]]] = {}
        self.reason: Optional[str] = None
        read = {bottom for node in graph.nodes for bottom in node.bottoms}
        images = [(top, tuple(shape)) for node in graph.nodes if node.is_input
                  for top, shape in zip(node.tops, node.top_shapes)
                  if top in read and shape is not None and len(shape) >= 3]
        if static_shape:
            self.reason = "static_shape (--static-shape) was given"
        elif not images:
            self.reason = "the net has no input with axes after the channels"
        else:
            self.reason = self._run(graph, dict(images))
        if self.reason is None:
            prefix = len(images) > 1
            for top, shape in images:
                self.axes[top] = {2 + i: f"{top}_{name}" if prefix else name
                                  for i, name in enumerate(_size_axes(len(shape)))}
        else:
            self.probe = {}

    def _run(self, graph, images: Dict[str, Shape]) -> Optional[str]:
        blobs: Dict[str, Shape] = {}
        for node in graph.nodes:
            bottoms = [blobs[b] for b in node.bottoms]
            if node.is_input:
                tops = [images[top][:2] + tuple(SIZE_PROBE_FACTOR * d for d in images[top][2:])
                        if top in images else tuple(shape)
                        for top, shape in zip(node.tops, node.top_shapes)]
            else:
                try:
                    tops = [tuple(s) for s in node.module.output_shapes(bottoms)]
                except CaffeLayersError as error:
                    build = next(iter(images.values()))[2:]
                    probe = shape_text([SIZE_PROBE_FACTOR * d for d in build])
                    return (f"at {probe} ({SIZE_PROBE_FACTOR} times the prototxt's "
                            f"{shape_text(build)}) {error}")
                changed = (_changed(node.bottoms, bottoms, node.bottom_shapes)
                           + _changed(node.tops, tops, node.top_shapes))
                if changed and not _follows_any_size(node, bottoms, tops):
                    blob, shape = changed[0]
                    return (f"layer {node.name!r} ({node.type}) takes {blob!r} at "
                            f"{shape_text(shape)} only")
            self.probe[id(node)] = (bottoms, tops)
            blobs.update(zip(node.tops, tops))
        return None


def _changed(blobs, shapes, before) -> List[Tuple[str, Shape]]:
    """``(blob, shape before)`` of the blobs whose shape changed."""
    return [(blob, old) for blob, new, old in zip(blobs, shapes, before)
            if tuple(new) != tuple(old)]


def _follows_any_size(node, bottoms: List[Shape], tops: List[Shape]) -> bool:
    """Whether ``node``'s emitter writes nothing that depends on these new sizes."""
    if node.type not in ANY_SIZE:
        return False
    predicate = ANY_SIZE[node.type]
    return predicate is None or bool(predicate(node, bottoms, tops))
