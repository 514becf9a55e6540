"""Bring old Caffe net and solver definitions up to today's format, as Caffe does on load.

Caffe's ``UpgradeNetAsNeeded`` runs these steps in order, and so does :func:`upgrade_net`:

1. V0 nets (``layers { layer { type: "conv" ... } }``) become V1 layers; V0 ``padding``
   layers are folded into the ``pad`` of the convolution or pooling that reads them.
2. Data transformation fields of V1 data layers (``scale``, ``mean_file``, ``crop_size``,
   ``mirror`` inside ``data_param`` and friends) move to ``transform_param``.
3. V1 layers (``layers { type: CONVOLUTION }``) become ``layer`` entries with type strings;
   ``blobs_lr``/``weight_decay``/``param``/``blob_share_mode`` become ``param { ... }``.
   Each layer keeps its ``blobs``, so V1 weight files load by layer name.
4. Net-level ``input`` with ``input_shape``/``input_dim`` become ``Input`` layers placed first.
   Caffe makes one layer named ``input`` with every input as a top; we make one per input,
   named after its blob, the way modern prototxts write them (the blobs are the same).
5. BatchNorm layers with three ``param`` entries get ``lr_mult: 0 decay_mult: 0`` on each:
   their blobs are statistics, not learned parameters.

Solvers: the enum ``solver_type`` becomes the string ``type``.

Problems that Caffe logs and carries on from are reported with :func:`warnings.warn`; problems
that make Caffe abort raise :class:`~caffelayers.errors.CaffeFormatError`.
"""

from __future__ import annotations

import sys
import warnings

from ..errors import CaffeFormatError
from . import caffe_pb2 as pb

__all__ = [
    "V0_TYPE_TO_V1",
    "V1_TYPE_NAMES",
    "net_needs_upgrade",
    "upgrade_net",
    "upgrade_solver",
]

_V1 = pb.V1LayerParameter

#: V1 enum value -> today's layer type string (``NONE`` has no type and is rejected).
V1_TYPE_NAMES = {
    _V1.ABSVAL: "AbsVal",
    _V1.ACCURACY: "Accuracy",
    _V1.ARGMAX: "ArgMax",
    _V1.BNLL: "BNLL",
    _V1.CONCAT: "Concat",
    _V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    _V1.CONVOLUTION: "Convolution",
    _V1.DECONVOLUTION: "Deconvolution",
    _V1.DATA: "Data",
    _V1.DROPOUT: "Dropout",
    _V1.DUMMY_DATA: "DummyData",
    _V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    _V1.ELTWISE: "Eltwise",
    _V1.EXP: "Exp",
    _V1.FLATTEN: "Flatten",
    _V1.HDF5_DATA: "HDF5Data",
    _V1.HDF5_OUTPUT: "HDF5Output",
    _V1.HINGE_LOSS: "HingeLoss",
    _V1.IM2COL: "Im2col",
    _V1.IMAGE_DATA: "ImageData",
    _V1.INFOGAIN_LOSS: "InfogainLoss",
    _V1.INNER_PRODUCT: "InnerProduct",
    _V1.LRN: "LRN",
    _V1.MEMORY_DATA: "MemoryData",
    _V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    _V1.MVN: "MVN",
    _V1.POOLING: "Pooling",
    _V1.POWER: "Power",
    _V1.RELU: "ReLU",
    _V1.SIGMOID: "Sigmoid",
    _V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss",
    _V1.SILENCE: "Silence",
    _V1.SOFTMAX: "Softmax",
    _V1.SOFTMAX_LOSS: "SoftmaxWithLoss",
    _V1.SPLIT: "Split",
    _V1.SLICE: "Slice",
    _V1.TANH: "TanH",
    _V1.WINDOW_DATA: "WindowData",
    _V1.THRESHOLD: "Threshold",
}

#: V0 type string -> V1 enum value.
V0_TYPE_TO_V1 = {
    "accuracy": _V1.ACCURACY,
    "bnll": _V1.BNLL,
    "concat": _V1.CONCAT,
    "conv": _V1.CONVOLUTION,
    "data": _V1.DATA,
    "dropout": _V1.DROPOUT,
    "euclidean_loss": _V1.EUCLIDEAN_LOSS,
    "flatten": _V1.FLATTEN,
    "hdf5_data": _V1.HDF5_DATA,
    "hdf5_output": _V1.HDF5_OUTPUT,
    "im2col": _V1.IM2COL,
    "images": _V1.IMAGE_DATA,
    "infogain_loss": _V1.INFOGAIN_LOSS,
    "innerproduct": _V1.INNER_PRODUCT,
    "lrn": _V1.LRN,
    "multinomial_logistic_loss": _V1.MULTINOMIAL_LOGISTIC_LOSS,
    "pool": _V1.POOLING,
    "relu": _V1.RELU,
    "sigmoid": _V1.SIGMOID,
    "softmax": _V1.SOFTMAX,
    "softmax_loss": _V1.SOFTMAX_LOSS,
    "split": _V1.SPLIT,
    "tanh": _V1.TANH,
    "window_data": _V1.WINDOW_DATA,
}

# V0 field -> {V0 type: (V1 sub-message, field there)}; a field set on any other type is
# dropped with a warning, as Caffe does. ``None`` as sub-message means the V1 layer itself.
_V0_FIELD_TARGETS = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"),
                   "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"),
               "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "batchsize": {"data": ("data_param", "batch_size"),
                  "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "rand_skip": {"data": ("data_param", "rand_skip"),
                  "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": (None, "hdf5_output_param")},
}
# Transformation fields go to transform_param whatever the V0 type.
_V0_TRANSFORM_FIELDS = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size",
                        "mirror": "mirror"}

# Sub-messages a V1 layer carries over unchanged (the same message types as in LayerParameter).
_V1_COPIED_PARAMS = (
    "accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param",
    "convolution_param", "data_param", "dropout_param", "dummy_data_param", "eltwise_param",
    "exp_param", "hdf5_data_param", "hdf5_output_param", "hinge_loss_param",
    "image_data_param", "infogain_loss_param", "inner_product_param", "lrn_param",
    "memory_data_param", "mvn_param", "pooling_param", "power_param", "relu_param",
    "sigmoid_param", "softmax_param", "slice_param", "tanh_param", "threshold_param",
    "window_data_param", "transform_param", "loss_param",
)

# V1 data layers whose own parameter message still has the old transformation fields.
_V1_DATA_PARAMS = {_V1.DATA: "data_param", _V1.IMAGE_DATA: "image_data_param",
                   _V1.WINDOW_DATA: "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

_SOLVER_TYPE_NAMES = {
    pb.SolverParameter.SGD: "SGD",
    pb.SolverParameter.NESTEROV: "Nesterov",
    pb.SolverParameter.ADAGRAD: "AdaGrad",
    pb.SolverParameter.RMSPROP: "RMSProp",
    pb.SolverParameter.ADADELTA: "AdaDelta",
    pb.SolverParameter.ADAM: "Adam",
}


def net_needs_upgrade(net: pb.NetParameter) -> bool:
    """Whether :func:`upgrade_net` would change ``net``."""
    return (len(net.layers) > 0 or len(net.input) > 0 or len(net.input_shape) > 0
            or len(net.input_dim) > 0 or any(_is_old_batch_norm(layer) for layer in net.layer))


def copy_fields_except(source, target, skipped: str) -> None:
    """Copy every set field of ``source`` into ``target`` but ``skipped`` (the layer list
    that the caller rebuilds)."""
    for field, value in source.ListFields():
        if field.name == skipped:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def upgrade_net(net: pb.NetParameter, path=None, *, in_place: bool = False) -> pb.NetParameter:
    """Return ``net`` in today's format.

    An up-to-date net is returned as is. Otherwise ``net`` is left alone and a new message
    is returned, unless ``in_place`` allows modifying ``net`` (the readers use this so that
    a large model is not copied); always use the returned message. ``path`` only names the
    file in error messages and warnings.
    """
    if not net_needs_upgrade(net):
        return net
    if len(net.layer) and len(net.layers):
        raise CaffeFormatError(
            "the net has both 'layer' (today's format) and 'layers' (the V1 format) entries; "
            "Caffe refuses to mix them: write every layer in one format", path)
    if len(net.layers):
        # Building the new layers copies the blobs once; nothing else copies them.
        upgraded = _upgrade_v1_net(net, path)
    elif in_place:
        upgraded = net
    else:
        upgraded = pb.NetParameter()
        upgraded.CopyFrom(net)
    if len(upgraded.input) or len(upgraded.input_shape) or len(upgraded.input_dim):
        _upgrade_net_input(upgraded, path)
    for layer in upgraded.layer:
        if _is_old_batch_norm(layer):
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
    return upgraded


def upgrade_solver(solver: pb.SolverParameter, path=None) -> pb.SolverParameter:
    """Return ``solver`` with ``solver_type`` turned into ``type`` and inline nets upgraded.

    Like :func:`upgrade_net`, an up-to-date solver is returned as is.
    """
    inline_nets = ([solver.net_param] if solver.HasField("net_param") else []) + \
        ([solver.train_net_param] if solver.HasField("train_net_param") else []) + \
        list(solver.test_net_param)
    if not solver.HasField("solver_type") and not any(map(net_needs_upgrade, inline_nets)):
        return solver
    upgraded = pb.SolverParameter()
    upgraded.CopyFrom(solver)
    if upgraded.HasField("solver_type"):
        if upgraded.HasField("type"):
            raise CaffeFormatError("the solver sets both 'solver_type' (the old enum) and "
                                   "'type' (its replacement); keep only 'type'", path)
        upgraded.type = _SOLVER_TYPE_NAMES[upgraded.solver_type]
        upgraded.ClearField("solver_type")
    nets = [getattr(upgraded, field) for field in ("net_param", "train_net_param")
            if upgraded.HasField(field)] + list(upgraded.test_net_param)
    for net in nets:
        new = upgrade_net(net, path, in_place=True)
        if new is not net:
            net.CopyFrom(new)
    return upgraded


def _is_old_batch_norm(layer: pb.LayerParameter) -> bool:
    return layer.type == "BatchNorm" and len(layer.param) == 3


def _warn(path, message: str) -> None:
    warnings.warn(f"{path or '<input>'}: {message}", stacklevel=caller_stacklevel())


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(__package__):
        frame, level = frame.f_back, level + 1
    return level


# --- V0/V1 -> today -----------------------------------------------------------------------

def _upgrade_v1_net(net: pb.NetParameter, path) -> pb.NetParameter:
    """A new net with ``net``'s V0/V1 ``layers`` as ``layer`` entries (V0 goes via V1)."""
    upgraded = pb.NetParameter()
    if any(entry.HasField("layer") for entry in net.layers):
        # Caffe's V0 upgrade keeps only these net-level fields.
        if net.HasField("name"):
            upgraded.name = net.name
        upgraded.input.extend(net.input)
        upgraded.input_dim.extend(net.input_dim)
        if net.HasField("force_backward"):
            upgraded.force_backward = net.force_backward
        v1_layers = []
        for old in _fold_padding(net, path):
            v1_layers.append(pb.V1LayerParameter())
            _upgrade_v0_layer(old, v1_layers[-1], path)
    else:
        copy_fields_except(net, upgraded, "layers")
        v1_layers = net.layers
    for old in v1_layers:
        _upgrade_v1_layer(old, upgraded.layer.add(), path)
    return upgraded


def _fold_padding(net: pb.NetParameter, path) -> list:
    """V0 entries without the ``padding`` layers, whose pad moved into their reader."""
    last_producer = {name: None for name in net.input}  # blob -> index in net.layers
    kept = []
    for index, entry in enumerate(net.layers):
        v0 = entry.layer
        if v0.type != "padding":
            kept.append(entry)
        for j, blob in enumerate(entry.bottom):
            if blob not in last_producer:
                raise CaffeFormatError(f"V0 layer {v0.name!r}: bottom {blob!r} is produced by "
                                       "no earlier layer and is no net input", path)
            source_index = last_producer[blob]
            if source_index is None:
                continue
            source = net.layers[source_index]
            if source.layer.type == "padding":
                if v0.type not in ("conv", "pool"):
                    raise CaffeFormatError(
                        f"V0 layer {v0.name!r} ({v0.type}) reads the padding layer "
                        f"{source.layer.name!r}; only conv and pool layers may", path)
                if len(entry.bottom) != 1 or len(source.bottom) != 1 or len(source.top) != 1:
                    raise CaffeFormatError(
                        f"V0 padding layer {source.layer.name!r} and its reader "
                        f"{v0.name!r} must each have exactly one bottom and one top", path)
                # Copy before changing: the caller's net stays as it was.
                folded = pb.V1LayerParameter()
                folded.CopyFrom(entry)
                folded.layer.pad = source.layer.pad
                folded.bottom[j] = source.bottom[0]
                kept[-1] = folded
        for blob in entry.top:
            last_producer[blob] = index
    return kept


def _upgrade_v0_layer(old: pb.V1LayerParameter, new: pb.V1LayerParameter, path) -> None:
    new.bottom.extend(old.bottom)
    new.top.extend(old.top)
    if not old.HasField("layer"):
        return
    v0 = old.layer
    if v0.HasField("name"):
        new.name = v0.name
    kind = v0.type
    if v0.HasField("type"):
        if kind not in V0_TYPE_TO_V1:
            raise CaffeFormatError(f"V0 layer {v0.name!r} has the unknown type {kind!r}; "
                                   f"known V0 types: {', '.join(sorted(V0_TYPE_TO_V1))}", path)
        new.type = V0_TYPE_TO_V1[kind]
    new.blobs.extend(v0.blobs)
    new.blobs_lr.extend(v0.blobs_lr)
    new.weight_decay.extend(v0.weight_decay)
    for field, targets in _V0_FIELD_TARGETS.items():
        if not v0.HasField(field):
            continue
        if kind not in targets:
            _warn(path, f"V0 layer {v0.name!r} ({kind}): field {field!r} does not apply to "
                        "this type and is dropped (as Caffe does)")
            continue
        sub_name, target = targets[kind]
        owner = new if sub_name is None else getattr(new, sub_name)
        value = getattr(v0, field)
        descriptor = owner.DESCRIPTOR.fields_by_name[target]
        if descriptor.message_type is not None:
            getattr(owner, target).CopyFrom(value)
        elif descriptor.is_repeated:
            getattr(owner, target).append(value)
        elif field == "pool":
            # Both enums list MAX, AVE, STOCHASTIC in the same order.
            owner.pool = pb.PoolingParameter.PoolMethod.Value(
                pb.V0LayerParameter.PoolMethod.Name(value))
        else:
            setattr(owner, target, value)
    for field, target in _V0_TRANSFORM_FIELDS.items():
        if v0.HasField(field):
            setattr(new.transform_param, target, getattr(v0, field))


def _upgrade_v1_layer(old: pb.V1LayerParameter, new: pb.LayerParameter, path) -> None:
    new.bottom.extend(old.bottom)
    new.top.extend(old.top)
    if old.HasField("name"):
        new.name = old.name
    new.include.extend(old.include)
    new.exclude.extend(old.exclude)
    if old.type not in V1_TYPE_NAMES:
        raise CaffeFormatError(f"V1 layer {old.name!r} has no layer type "
                               f"(type: {_V1.LayerType.Name(old.type)})", path)
    new.type = V1_TYPE_NAMES[old.type]
    # The blobs move with the layer: V1 weight files load by layer name like modern ones.
    new.blobs.extend(old.blobs)

    def spec(i):
        while len(new.param) <= i:
            new.param.add()
        return new.param[i]

    for i, name in enumerate(old.param):
        spec(i).name = name
    for i, mode in enumerate(old.blob_share_mode):
        spec(i).share_mode = pb.ParamSpec.DimCheckMode.Value(_V1.DimCheckMode.Name(mode))
    for i, lr in enumerate(old.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(old.weight_decay):
        spec(i).decay_mult = decay
    new.loss_weight.extend(old.loss_weight)
    for field in _V1_COPIED_PARAMS:
        if old.HasField(field):
            getattr(new, field).CopyFrom(getattr(old, field))
    # Caffe moves these before the V1 upgrade; moving them after it gives the same layer.
    data_param = _V1_DATA_PARAMS.get(old.type)
    if data_param is not None and new.HasField(data_param):
        param = getattr(new, data_param)
        for field in _TRANSFORM_FIELDS:
            if param.HasField(field):
                setattr(new.transform_param, field, getattr(param, field))
                param.ClearField(field)
    if old.HasField("layer"):
        _warn(path, f"V1 layer {old.name!r} also holds a V0 layer, which is ignored "
                    "(as Caffe does)")


# --- net-level inputs -------------------------------------------------------------------

def _upgrade_net_input(net: pb.NetParameter, path) -> None:
    names = list(net.input)
    shapes = [list(shape.dim) for shape in net.input_shape]
    dims = list(net.input_dim)
    if not names:
        raise CaffeFormatError("the net gives 'input_shape' or 'input_dim' but no 'input' "
                               "names them", path)
    if shapes and dims:
        raise CaffeFormatError("the net gives both 'input_shape' and 'input_dim'; use one",
                               path)
    if shapes:
        if len(shapes) != len(names):
            raise CaffeFormatError(f"the net has {len(names)} 'input' names but "
                                   f"{len(shapes)} 'input_shape' entries; give one each", path)
    elif dims:
        if len(dims) != 4 * len(names):
            raise CaffeFormatError(f"the net has {len(names)} 'input' names and "
                                   f"{len(dims)} 'input_dim' values; 'input_dim' takes four "
                                   "values (num, channels, height, width) per input", path)
        shapes = [dims[4 * i:4 * i + 4] for i in range(len(names))]
    else:
        raise CaffeFormatError(f"net input {names[0]!r} has no shape: give 'input_shape' or "
                               "'input_dim' for every 'input'", path)
    inputs = []
    for name, shape in zip(names, shapes):
        layer = pb.LayerParameter(name=name, type="Input", top=[name])
        layer.input_param.shape.add().dim.extend(shape)
        inputs.append(layer)
    rest = list(net.layer)
    net.ClearField("layer")
    net.layer.extend(inputs + rest)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
