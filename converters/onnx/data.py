"""Emitters for the layers where blobs enter a net: graph inputs and constants."""

from __future__ import annotations

from onnx import TensorProto, helper

from ...registry import register_emitter

#: Caffe's data layers: caffelayers feeds their tops from outside, so they are graph inputs.
INPUT_TYPES = ("Input", "Data", "ImageData", "WindowData", "MemoryData", "HDF5Data")


def emit_input(ctx, node) -> None:
    """Each top that some layer reads becomes a graph input of the same name (an unread
    one, such as the label of a deploy net, is left out so that nobody has to feed it)."""
    for top, shape in zip(node.tops, node.top_shapes):
        if ctx.is_read(top):
            ctx.add_input(top, shape)


for _type in INPUT_TYPES:
    register_emitter(_type)(emit_input)


@register_emitter("DummyData")
def emit_dummy_data(ctx, node) -> None:
    """Constant fillers become ``ConstantOfShape``; random ones have no exact ONNX form."""
    module = node.module
    for top, shape, filler in zip(ctx.tops(node), module.top_shapes, module.fillers):
        if filler is not None and filler.type != "constant":
            raise ctx.unsupported(f"a {filler.type!r} filler draws random numbers that "
                                  "ONNX cannot reproduce; only constant fillers convert")
        value = float(filler.value) if filler is not None else 0.0
        fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [value])
        ctx.op("ConstantOfShape", [ctx.ints(shape, "shape")], top, value=fill)


__all__ = ["INPUT_TYPES", "emit_dummy_data", "emit_input"]
