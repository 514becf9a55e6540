"""``caffelayers convert``: one entry point over the ONNX, PyTorch-source, TorchScript and
torch.export back ends.

Every back end reads the same :class:`~caffelayers.graph.NetGraph`; this module only checks
the whole net before anything is built (every layer a back end cannot convert is reported at
once), writes the output, and runs it again for a parity report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .errors import UnknownLayerError

TARGETS = ("onnx", "pytorch", "torchscript", "exported")
RUNTIMES = ("torch", "onnxruntime", "pytorch-source", "torchscript")


def check_convertible(graph, target: str) -> None:
    """Raise one :class:`UnknownLayerError` naming every layer ``target`` cannot convert."""
    if target == "onnx":
        from .converters.onnx import check_convertible as check_onnx

        check_onnx(graph)
        return
    from .converters.pytorch import missing_emitters

    missing = missing_emitters(graph)
    if missing:
        raise UnknownLayerError(missing, what="PyTorch source emitter",
                                how="register one with @caffelayers.converters.pytorch."
                                    'register_source_emitter("TYPE")')


def write(net, target: str, output: str | Path, opset: int = 17,
          static_batch: bool = False, static_shape: bool = False,
          outputs: Sequence[str] = (), class_name: Optional[str] = None) -> List[Path]:
    """Convert a built ``Net`` and write it; returns the files written.

    ``static_batch`` and ``static_shape`` fix the ONNX model's batch and its inputs' height
    and width at the prototxt's sizes; without them the batch is symbolic, and so are the
    height and width where the net is fully convolutional
    (:func:`caffelayers.converters.onnx.fixed_size_reason`). Neither option concerns the
    PyTorch targets. ``outputs`` names blobs the ONNX model also returns (besides the
    net's outputs, the blobs no layer reads). ``class_name`` names the generated PyTorch
    class (default: from the net's ``name:``).
    """
    output = Path(output)
    (output if target == "pytorch" else output.parent).mkdir(parents=True, exist_ok=True)
    if target == "onnx":
        from .converters.onnx import export_onnx

        return list(export_onnx(net, output, opset=opset, static_batch=static_batch,
                                static_shape=static_shape, outputs=outputs))
    if target == "pytorch":
        from .converters.pytorch import convert_to_pytorch

        convert_to_pytorch(net, output, class_name=class_name)
        return [output / "model.py", output / "weights.pt"]
    if target == "exported":
        from .converters.pytorch.exported import convert_to_exported

        convert_to_exported(net, output)
        return [output]
    from .converters.pytorch import convert_to_torchscript

    convert_to_torchscript(net, output)
    return [output]


def input_size_note(net, static_shape: bool = False) -> Optional[str]:
    """One line on the ONNX model's input height and width: symbolic, or fixed and why
    (None without image inputs, or when ``static_shape`` asked for fixed sizes)."""
    from .converters.onnx import fixed_size_reason

    shapes = net.graph.blob_shapes
    if static_shape or not any(len(shapes[name] or ()) >= 3 for name in net.graph.inputs):
        return None
    reason = fixed_size_reason(net)
    if reason is None:
        return ("the ONNX inputs' height and width are symbolic: the model runs at any size "
                "the net accepts (--static-shape fixes them)")
    return f"the ONNX inputs keep the prototxt's height and width: {reason}"


def runner(target: str, output: str | Path) -> Callable[[Mapping[str, np.ndarray]], Dict]:
    """A function running the written model on inputs by blob name, outputs by blob name."""
    if target == "onnx":
        from .converters.onnx import run_onnx

        return lambda inputs: run_onnx(str(output), inputs)
    from .converters.pytorch import forward_by_name, load_pytorch, load_torchscript

    if target == "pytorch":
        module, names = load_pytorch(output), ()
    elif target == "exported":
        from .converters.pytorch.exported import load_exported

        module, *names = load_exported(output)
    else:
        module, *names = load_torchscript(output)

    def run(inputs):
        with torch.no_grad():
            return forward_by_name(module, inputs, *names)

    return run


# --- deploy conversion: cutting a training net, keeping its preprocessing -------------------

#: the ONNX metadata key holding the data layer's test-time preprocessing (JSON).
PREPROCESS_METADATA = "caffelayers.preprocess"

#: Caffe data layers that carry a ``transform_param``.
TRANSFORMING_TYPES = ("Data", "ImageData", "WindowData", "MemoryData")

#: file names a layer parameter holds, resolved as the data readers resolve them.
_PATH_FIELDS = (("data_param", "source"), ("image_data_param", "source"),
                ("hdf5_data_param", "source"), ("window_data_param", "source"),
                ("transform_param", "mean_file"))


def cut_at_blobs(net_param, outputs: Sequence[str], path=None):
    """The part of a (phase-filtered) net that computes the blobs ``outputs``: every layer
    whose tops these blobs depend on, in order; loss and accuracy layers that only training
    reads fall away.

    Raises:
        CaffeFormatError: a name that no layer produces (the message lists the blobs).
    """
    from .errors import CaffeFormatError

    produced = [top for layer in net_param.layer for top in layer.top]
    missing = [name for name in outputs if name not in produced]
    if missing:
        raise CaffeFormatError(f"--outputs {', '.join(map(repr, missing))}: the net has no "
                               f"such blob (its blobs: {', '.join(dict.fromkeys(produced))})",
                               path)
    needed = set(outputs)
    kept = []
    for layer in reversed(net_param.layer):
        if needed.intersection(layer.top):
            kept.append(layer)
            needed.update(layer.bottom)
    cut = type(net_param)()
    cut.CopyFrom(net_param)
    del cut.layer[:]
    cut.layer.extend(reversed(kept))
    return cut


def anchor_paths(net_param, source_dir: Optional[Path]):
    """A copy of the net whose relative file names (data sources, mean files) that exist
    next to the prototxt, and not from the working directory, are absolute, so that the net
    still reads them when it is built from the message (which has no directory)."""
    net_param, original = type(net_param)(), net_param
    net_param.CopyFrom(original)
    if source_dir is None:
        return net_param
    for layer in net_param.layer:
        for field, name in _PATH_FIELDS:
            if not layer.HasField(field):
                continue
            param = getattr(layer, field)
            value = getattr(param, name)
            if value and not Path(value).is_absolute() and not Path(value).exists() and \
                    (Path(source_dir) / value).exists():
                setattr(param, name, str(Path(source_dir) / value))
    return net_param


def preprocess_spec(net_param, source_dir: Optional[Path] = None,
                    inputs: Sequence[str] = ()) -> Optional[dict]:
    """The test-time ``transform_param`` of the first data layer feeding ``inputs`` (any
    data layer when empty), as a JSON-ready dict, or None when there is none.

    Keys: ``input`` (the blob), ``layer``, ``type``, ``channels`` (``"BGR"`` or ``"gray"``),
    ``scale``, ``crop_size`` (0: none), ``mean_file`` (as written) with ``mean_shape`` and
    ``mean_image`` (``C x H x W`` values, row-major) when it could be read, ``mean_value``,
    ``mirror`` (Caffe mirrors at random in both phases; a deployed model does not), and
    ``value_range``. At test time Caffe computes ``(x[:, h0:h0+crop, w0:w0+crop] - mean) *
    scale`` with ``x`` the image in 0-255 and the crop centred (``h0 = (H - crop) // 2``);
    a mean image is cropped at the same place.

    Raises:
        UnsupportedParameterError: both ``mean_file`` and ``mean_value`` (Caffe refuses it).
    """
    import warnings

    from .data import files
    from .errors import CaffeLayersError, UnsupportedParameterError
    from .proto import io

    for layer in net_param.layer:
        if layer.type not in TRANSFORMING_TYPES or not layer.top or \
                (inputs and layer.top[0] not in inputs):
            continue
        t = layer.transform_param
        if not layer.HasField("transform_param") or not t.ListFields():
            continue
        if t.mean_file and t.mean_value:
            raise UnsupportedParameterError(f"layer {layer.name!r}: transform_param has both "
                                            "mean_file and mean_value; Caffe takes one")
        gray = t.force_gray or (layer.type == "ImageData" and
                                not layer.image_data_param.is_color)
        spec = {"input": layer.top[0], "layer": layer.name, "type": layer.type,
                "channels": "gray" if gray else "BGR", "value_range": [0, 255],
                "scale": float(t.scale), "crop_size": int(t.crop_size),
                "mean_value": [float(v) for v in t.mean_value], "mirror": bool(t.mirror)}
        if t.mean_file:
            spec["mean_file"] = t.mean_file
            try:
                mean = io.read_binaryproto(files.resolve(t.mean_file, source_dir,
                                                         f"layer {layer.name!r}: mean_file"))
            except CaffeLayersError as error:
                warnings.warn(f"{error}: the preprocessing record names the mean file but "
                              "holds no mean values", stacklevel=2)
            else:
                mean = mean.reshape(mean.shape[-3:]).astype(np.float32)
                spec["mean_shape"] = list(mean.shape)
                spec["mean_image"] = mean.reshape(-1).tolist()
        return spec
    return None


def preprocess_note(spec: dict, target: str) -> str:
    """One line saying what a caller must do to an image before feeding the converted
    model, as Caffe's data layer did."""
    steps = [f"{'grayscale' if spec['channels'] == 'gray' else 'BGR'} images in 0-255"]
    if spec["crop_size"]:
        steps.append(f"centre crop {spec['crop_size']}x{spec['crop_size']}")
    if spec.get("mean_file"):
        steps.append(f"minus the mean image of {spec['mean_file']}"
                     + ("" if "mean_image" in spec else " (not found: not recorded)"))
    elif spec["mean_value"]:
        steps.append(f"minus the mean {','.join(f'{v:g}' for v in spec['mean_value'])} "
                     "per channel")
    if spec["scale"] != 1:
        steps.append(f"times {spec['scale']:g}")
    where = {"onnx": f"the model's metadata {PREPROCESS_METADATA!r} records it",
             "pytorch": "model.py's preprocess() does it",
             "torchscript": "TorchScript keeps no record of it",
             "exported": "the exported program keeps no record of it"}[target]
    return (f"feed {spec['input']!r} as Caffe's data layer {spec['layer']!r} made it: "
            f"{', '.join(steps)} ({where})")


_PREPROCESS_SOURCE = '''

# --- preprocessing ------------------------------------------------------------------------

#: The test-time transform_param of Caffe's data layer {layer!r} ({type}), which fed the
#: input {input!r}; Caffe's data layer applied it, so the converted model does not.
PREPROCESS = {settings}


def preprocess(image) -> torch.Tensor:
    """Caffe's test-time DataTransformer for the input {input!r}: one image to the
    ``1 x C x H x W`` float tensor the model takes.

    ``image`` is what Caffe's data layer stored: ``H x W x C`` uint8 in BGR order (as
    ``cv2.imread`` returns it) or ``H x W`` grayscale, in 0-255. The result is
    ``(x[:, h0:h0 + crop, w0:w0 + crop] - mean) * scale`` with the crop centred
    (``h0 = (H - crop) // 2``, never mirrored) and ``mean`` the mean image
    (``mean.npy`` next to this file, cropped at the same place; it must have the image's
    size, as Caffe requires) or one value per channel.
    """
    x = torch.as_tensor(image, dtype=torch.float32)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    mean, mean_image = None, bool(PREPROCESS.get("mean_file"))
    if mean_image:
        if "mean_shape" not in PREPROCESS:
            raise FileNotFoundError(f"the mean file {{PREPROCESS['mean_file']!r}} was not "
                                    "found when the model was converted")
        import pathlib

        import numpy

        mean = torch.from_numpy(numpy.load(pathlib.Path(__file__).with_name("mean.npy")))
        if tuple(mean.shape) != tuple(x.shape):
            raise ValueError(f"the image is {{tuple(x.shape)}} (C x H x W), the mean image "
                             f"{{tuple(mean.shape)}}: Caffe needs them equal")
    elif PREPROCESS["mean_value"]:
        values = PREPROCESS["mean_value"]
        values = values * x.shape[0] if len(values) == 1 else values
        mean = torch.tensor(values, dtype=torch.float32)[:, None, None]
    crop = PREPROCESS["crop_size"]
    if crop:
        top, left = (x.shape[1] - crop) // 2, (x.shape[2] - crop) // 2
        x = x[:, top:top + crop, left:left + crop]
        if mean_image:
            mean = mean[:, top:top + crop, left:left + crop]
    if mean is not None:
        x = x - mean
    return (x * PREPROCESS["scale"])[None]
'''


def write_preprocess(spec: dict, target: str, written: Sequence[Path]) -> None:
    """Record the preprocessing with the converted model: the ONNX model's metadata
    (:data:`PREPROCESS_METADATA`, JSON), or a ``preprocess()`` function (and ``mean.npy``)
    beside the generated ``model.py``. TorchScript and exported programs get nothing (the
    caller is told)."""
    import json

    if target == "onnx":
        import onnx

        path = Path(written[0])
        model = onnx.load(str(path), load_external_data=False)
        entry = model.metadata_props.add()
        entry.key, entry.value = PREPROCESS_METADATA, json.dumps(spec)
        onnx.save(model, str(path))
    elif target == "pytorch":
        model_file = Path(written[0])
        settings = {k: v for k, v in spec.items() if k != "mean_image"}
        if "mean_image" in spec:
            mean = np.asarray(spec["mean_image"], np.float32).reshape(spec["mean_shape"])
            np.save(model_file.with_name("mean.npy"), mean)
        lines = "".join(f"    {key!r}: {value!r},\n" for key, value in settings.items())
        text = _PREPROCESS_SOURCE.format(settings="{\n" + lines + "}", **spec)
        with open(model_file, "a") as file:
            file.write(text)
