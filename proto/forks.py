"""The Caffe forks whose files caffelayers reads: which fields each adds, at which numbers, and
which layer types each defines.

Text files are read by field name, and every fork's names are in our schema
(``caffe.proto``). Binary files carry only numbers, and the forks reuse each other's
numbers (LayerParameter 147 is SphereFace's margin_inner_product_param, OpenCV's
detection_output_param, NVCaffe's forward_math, DeepLab's domain_transform_param,
py-R-FCN's roi_pooling_param and BVLC's swish_param). So our schema declares a fork's field
at the fork's number only where no other known schema uses that number in that message,
and otherwise at a private number (:func:`private_number`); :mod:`.io` translates when it
reads and writes binary files, with the rules in :func:`decide`:

* a LayerParameter field whose number is contested or belongs to a fork is read as the
  field that the layer's ``type`` implies (:data:`PARAM_TYPES`); no field fits, or its wire
  type or content does not fit the field: it is kept as an unknown field;
* a contested field inside another message (TransformationParameter, LossParameter, ...)
  is read as the field of the fork whose field it is inside (SegNet's or PSPNet's
  bn_param), else of the fork that wrote the net (guessed from its layer types and fork
  fields, :func:`net_fork`), else as BVLC's field, else as the only field that fits;
  otherwise it is kept unknown. Enum values a fork numbers otherwise are renumbered
  (:data:`VALUE_NUMBERS`);
* on writing, a LayerParameter field gets its canonical number, the number of the fork it
  comes from (or of the fork whose sub-fields it holds, :func:`write_number`); a field of
  another message the number the net's fork (as a reader will guess it) gives it, and
  that fork's enum values, else ours (:func:`nested_write_number`).

A field kept unknown stays at its number, unless our schema declares that number for
another field: then it is stored at ``UNKNOWN_BASE + number`` (so that protobuf does not
decode it as that field) and written back at its number. :func:`unknown_fork_fields`
lists them.

Every number here was read in the fork's own schema (:data:`SOURCES`).
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, NamedTuple, Optional, Tuple

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet

from . import caffe_pb2 as pb

__all__ = [
    "FIELD_NUMBERS", "FORK_INDEX", "PARAM_TYPES", "SOURCES", "TYPE_FORKS", "UNKNOWN_BASE",
    "fork_of_type", "private_number", "unknown_fork_fields",
]

BVLC = "BVLC"
SSD = "SSD (weiliu89)"
OPENCV = "OpenCV"
SPHEREFACE = "SphereFace"
FASTER_RCNN = "Faster R-CNN"
RFCN = "R-FCN"
PY_RFCN = "R-FCN (py-R-FCN's Microsoft/caffe)"
SEGNET = "SegNet"
DEEPLAB = "DeepLab v2"
PSPNET = "PSPNet"
NVCAFFE = "NVCaffe"
CAFFE_ON_SPARK = "CaffeOnSpark"
SHUFFLENET = "ShuffleNet"
RELU6 = "ReLU6 (MobileNetV2)"
MOBILENET = "MobileNet (depthwise convolution)"
SENET = "SENet"
CAFFELAYERS = "caffelayers"

#: Where each fork's numbers were read (repository, branch or commit, file).
SOURCES = {
    BVLC: "BVLC/caffe master, src/caffe/proto/caffe.proto",
    SSD: "weiliu89/caffe branch ssd, src/caffe/proto/caffe.proto",
    OPENCV: "OpenCV 4.14: the opencv-caffe.proto descriptor compiled into opencv-python's "
            "cv2 (its source: opencv/opencv modules/dnn/src/caffe/caffe.proto; "
            "psroi_pooling_param moved from R-FCN's 10001 to 10002 by opencv/opencv#10550)",
    SPHEREFACE: "wy1iu/sphereface tools/caffe-sphereface/src/caffe/proto/caffe.proto",
    FASTER_RCNN: "rbgirshick/caffe-fast-rcnn branches fast-rcnn and faster-rcnn, "
                 "src/caffe/proto/caffe.proto",
    RFCN: "daijifeng001/caffe-rfcn branch r-fcn, src/caffe/proto/caffe.proto",
    PY_RFCN: "Microsoft/caffe at 1a2be8e (the Caffe YuwenXiong/py-R-FCN names), "
             "src/caffe/proto/caffe.proto",
    SEGNET: "alexgkendall/caffe-segnet branch segnet-cleaned, src/caffe/proto/caffe.proto",
    DEEPLAB: "deeplab-public-ver2 (mirror DrSleep/deeplab-public-ver2), "
             "src/caffe/proto/caffe.proto",
    PSPNET: "hszhao/PSPNet src/caffe/proto/caffe.proto",
    NVCAFFE: "NVIDIA/caffe branch caffe-0.17, src/caffe/proto/caffe.proto",
    CAFFE_ON_SPARK: "yahoo/caffe master (CaffeOnSpark's caffe-public submodule), "
                    "src/caffe/proto/caffe.proto",
    SHUFFLENET: "farmingyard/ShuffleNet README.md",
    RELU6: "rog93/Caffe-MobileNetV2-ReLU6 README.md",
    MOBILENET: "yonghenglh6/DepthwiseConvolution (reads convolution_param)",
    SENET: "hujie-frank/SENet (Axpy has no parameters)",
    CAFFELAYERS: "this repository",
}

#: Private numbers: ``PRIVATE_BASE + PRIVATE_STRIDE * FORK_INDEX[fork] + fork's number``.
FORK_INDEX = {SSD: 1, OPENCV: 2, SPHEREFACE: 3, FASTER_RCNN: 4, RFCN: 5, PY_RFCN: 6,
              SEGNET: 7, DEEPLAB: 8, PSPNET: 9, NVCAFFE: 10, CAFFE_ON_SPARK: 11}
PRIVATE_BASE = 300_000_000
PRIVATE_STRIDE = 10_000_000
#: A field kept unknown whose number our schema declares for another field is stored here.
UNKNOWN_BASE = 200_000_000

_DEEPLAB_LAYER = {
    "interp_param": 143, "seg_accuracy_param": 144, "mat_write_param": 145,
    "dense_crf_param": 146, "domain_transform_param": 147,
    "adaptive_bias_channel_param": 148, "bias_channel_param": 149,
    "unique_label_param": 150, "mat_read_param": 151,
}
_DEEPLAB_NESTED = {
    "TransformationParameter": {"scale_factors": 8, "crop_width": 9, "crop_height": 10},
    "ImageDataParameter": {"ignore_label": 15, "label_type": 16},
    "BatchNormParameter": {"update_global_stats": 4},
}
_SSD_LAYER = {
    "annotated_data_param": 200, "multibox_loss_param": 201, "permute_param": 202,
    "prior_box_param": 203, "detection_output_param": 204, "detection_evaluate_param": 205,
    "norm_param": 206, "video_data_param": 207,
}
_RFCN_LOSS = {"normalization": 3, "pre_fixed_normalizer": 4}

#: fork -> {message -> {field name -> the fork's number}}: every field a fork adds, or
#: numbers otherwise than BVLC, and BVLC's fields at numbers that forks use too. Field
#: names are ours (the fork's own, except where a comment in caffe.proto says otherwise).
FIELD_NUMBERS: Dict[str, Dict[str, Dict[str, int]]] = {
    BVLC: {
        "LayerParameter": {
            "embed_param": 137, "tile_param": 138, "input_param": 143, "crop_param": 144,
            "parameter_param": 145, "recurrent_param": 146, "swish_param": 147,
            "clip_param": 148,
        },
        "LossParameter": {"normalization": 3},
        "SolverParameter": {"layer_wise_reduce": 41, "weights": 42},
    },
    SPHEREFACE: {"LayerParameter": {"margin_inner_product_param": 147}},
    SSD: {
        "LayerParameter": dict(_SSD_LAYER),
        "TransformationParameter": {
            "resize_param": 8, "noise_param": 9, "emit_constraint": 10, "crop_h": 11,
            "crop_w": 12, "distort_param": 13, "expand_param": 14,
        },
        "SolverParameter": {"eval_type": 41, "ap_version": 42, "plateau_winsize": 43,
                            "show_per_class_result": 44},
        "SolverState": {"minimum_loss": 5, "iter_last_event": 6},
        "DetectionOutputParameter": {"visualize": 10},
    },
    OPENCV: {
        "LayerParameter": {
            "detection_output_param": 147, "permute_param": 148, "norm_param": 149,
            "prior_box_param": 150, "proposal_param": 201, "psroi_pooling_param": 10002,
            "roi_pooling_param": 8266711,
        },
        "BlobProto": {"raw_data_type": 10, "raw_data": 12},
        "DetectionOutputParameter": {"normalized_bbox": 10, "clip": 1000},
        "PriorBoxParameter": {"offset_h": 14, "offset_w": 15, "width": 16, "height": 17},
        "BatchNormParameter": {"scale_bias": 7},
        "DropoutParameter": {"scale_train": 2},
        # bool ceil_mode = 13 [default = true]: read as round_mode (VALUE_NUMBERS).
        "PoolingParameter": {"round_mode": 13},
    },
    FASTER_RCNN: {
        "LayerParameter": {"roi_pooling_param": 8266711, "smooth_l1_loss_param": 8266712},
        "DropoutParameter": {"scale_train": 2},
    },
    RFCN: {
        "LayerParameter": {"box_annotator_ohem_param": 10000, "psroi_pooling_param": 10001,
                           "roi_pooling_param": 8266711, "smooth_l1_loss_param": 8266712},
        "LossParameter": dict(_RFCN_LOSS),
        "DropoutParameter": {"scale_train": 2},
    },
    PY_RFCN: {
        "LayerParameter": {"roi_pooling_param": 147, "smooth_l1_loss_param": 148,
                           "psroi_pooling_param": 149, "box_annotator_ohem_param": 150},
        "LossParameter": dict(_RFCN_LOSS),
        "DropoutParameter": {"scale_train": 2},
    },
    SEGNET: {
        "LayerParameter": {"bn_param": 45, "upsample_param": 137,
                           "dense_image_data_param": 138},
        "BNParameter": {"scale_filler": 1, "shift_filler": 2, "bn_mode": 3},
        "LossParameter": {"weight_by_label_freqs": 3, "class_weighting": 4},
        "DropoutParameter": {"sample_weights_test": 2},
    },
    DEEPLAB: {"LayerParameter": dict(_DEEPLAB_LAYER), **_DEEPLAB_NESTED},
    PSPNET: {
        "LayerParameter": {**_DEEPLAB_LAYER, "bn_param": 152},
        "BNParameter": {"slope_filler": 1, "bias_filler": 2, "momentum": 3, "eps": 4,
                        "frozen": 5, "engine": 6},
        **_DEEPLAB_NESTED,
    },
    NVCAFFE: {
        "LayerParameter": {
            "forward_type": 145, "backward_type": 146, "forward_math": 147,
            "backward_math": 148, "debug": 149, "cudnn_math_override": 150,
            "recurrent_param": 151, "trt_param": 152, **_SSD_LAYER,
            "detectnet_groundtruth_param": 6801, "detectnet_augmentation_param": 6802,
        },
        "BlobProto": {"raw_data_type": 10, "raw_diff_type": 11, "raw_data": 12,
                      "raw_diff": 13},
        "Datum": {"record_id": 8},
        "AnnotatedDatum": {"record_id": 4},
        "NetParameter": {
            "default_forward_type": 11, "default_backward_type": 12,
            "default_forward_math": 13, "default_backward_math": 14,
            "global_grad_scale": 15, "global_grad_scale_adaptive": 16,
            "default_conv_algos_override": 17, "reduce_buckets": 18,
            "default_cudnn_math_override": 19, "eltwise_mem_sharing": 20,
        },
        "SolverParameter": {
            "rampup_interval": 41, "rampup_lr": 42, "min_lr": 43, "solver_data_type": 44,
            "store_blobs_in_old_format": 45, "momentum_policy": 46, "max_momentum": 47,
            "momentum_power": 48, "larc": 49, "larc_policy": 50, "larc_eta": 51,
            "weight_decay_policy": 52, "weight_decay_power": 53,
            "test_and_snapshot_last_epochs": 54, "larc_turbo": 55, "max_weight_decay": 56,
            "eval_type": 241, "ap_version": 242, "plateau_winsize": 243,
            "show_per_class_result": 244,
        },
        "SolverState": {"minimum_loss": 5, "iter_last_event": 6},
        "TransformationParameter": {
            "use_gpu_transform": 8, "random_seed": 9, "img_rand_resize_lower": 10,
            "img_rand_resize_upper": 11, "rand_resize_ratio_lower": 12,
            "rand_resize_ratio_upper": 13, "vertical_stretch_lower": 14,
            "vertical_stretch_upper": 15, "horizontal_stretch_lower": 16,
            "horizontal_stretch_upper": 17, "interpolation_algo_down": 18,
            "interpolation_algo_up": 19, "allow_upscale": 20, "forward_packing": 21,
            "display": 22, "num_labels": 23, "resize_param": 208, "noise_param": 209,
            "emit_constraint": 210, "crop_h": 211, "crop_w": 212, "distort_param": 213,
            "expand_param": 214,
        },
        "LossParameter": {"label_smoothing": 4},
        "DropoutParameter": {"engine": 2, "random_seed": 3},
        "ImageDataParameter": {"short_side": 13, "threads": 14, "cache": 15, "precache": 16,
                               "dataset_share_per_node": 17},
        "BatchNormParameter": {"scale_filler": 5, "bias_filler": 6, "scale_bias": 7,
                               "engine": 15},
        "ConvolutionParameter": {"cudnn_convolution_algo_seeker": 19,
                                 "conv_algos_override": 20},
        "DataParameter": {"threads": 11, "parser_threads": 12, "cache": 13, "shuffle": 14,
                          "precache": 16},
        "ELUParameter": {"lambda": 2},
        "PoolingParameter": {"torch_pooling": 40},
        "MultiBoxLossParameter": {"ignore_difficult_gt": 24},
        "DetectionOutputParameter": {"visualize": 10},
    },
    CAFFE_ON_SPARK: {
        "LayerParameter": {"source_class": 10001, "cos_data_param": 10010},
        "MemoryDataParameter": {"share_in_parallel": 10000, "source": 10001,
                                "dataframe_column_select": 10002, "image_encoded": 10003,
                                "dataframe_format": 10004},
    },
    SHUFFLENET: {"LayerParameter": {"shuffle_channel_param": 164}},
    RELU6: {"LayerParameter": {"relu6_param": 100000}},
    CAFFELAYERS: {"LayerParameter": {"margin_head_param": 27182801,
                                     "softmax_diff_loss_param": 27182802}},
}

#: Enum values a fork numbers otherwise: (fork, message, field) -> {fork's value: ours}.
#: R-FCN's NormalizationMode is FULL, VALID, BATCH_SIZE, PRE_FIXED = 3, NONE = 4.
VALUE_NUMBERS = {
    (RFCN, "LossParameter", "normalization"): {3: pb.LossParameter.PRE_FIXED,
                                               4: pb.LossParameter.NONE},
    (PY_RFCN, "LossParameter", "normalization"): {3: pb.LossParameter.PRE_FIXED,
                                                  4: pb.LossParameter.NONE},
    # OpenCV's ceil_mode (true: 1) at round_mode's number (CEIL: 0).
    (OPENCV, "PoolingParameter", "round_mode"): {1: pb.PoolingParameter.CEIL,
                                                 0: pb.PoolingParameter.FLOOR},
}

#: The same, the other way: (fork, message, field) -> {our value: the fork's value}.
WRITE_VALUES = {key: {ours: theirs for theirs, ours in values.items()}
                for key, values in VALUE_NUMBERS.items()}

_DATA_TYPES = ("MemoryData", "CoSData", "Data", "ImageData", "HDF5Data", "WindowData",
               "DummyData", "Input", "Python")

#: The layer types that read each LayerParameter field of the tables (a field in a layer of
#: another type is kept unknown when read from a binary file). Absent: every type (NVCaffe's
#: precision fields).
PARAM_TYPES: Dict[str, Tuple[str, ...]] = {
    # BVLC, where forks use the same numbers
    "embed_param": ("Embed",),
    "tile_param": ("Tile",),
    "input_param": ("Input",),
    "crop_param": ("Crop",),
    "parameter_param": ("Parameter",),
    "recurrent_param": ("Recurrent", "RNN", "LSTM"),
    "swish_param": ("Swish",),
    "clip_param": ("Clip",),
    # forks
    "margin_inner_product_param": ("MarginInnerProduct",),
    "annotated_data_param": ("AnnotatedData",),
    "multibox_loss_param": ("MultiBoxLoss",),
    "permute_param": ("Permute",),
    "prior_box_param": ("PriorBox",),
    "detection_output_param": ("DetectionOutput",),
    "detection_evaluate_param": ("DetectionEvaluate",),
    "norm_param": ("Normalize",),
    "video_data_param": ("VideoData",),
    "proposal_param": ("Proposal",),
    "roi_pooling_param": ("ROIPooling",),
    "smooth_l1_loss_param": ("SmoothL1Loss",),
    "box_annotator_ohem_param": ("BoxAnnotatorOHEM",),
    "psroi_pooling_param": ("PSROIPooling",),
    "source_class": _DATA_TYPES,
    "cos_data_param": ("CoSData",),
    "bn_param": ("BN",),
    "upsample_param": ("Upsample",),
    "dense_image_data_param": ("DenseImageData",),
    "interp_param": ("Interp",),
    "seg_accuracy_param": ("SegAccuracy",),
    "mat_write_param": ("MatWrite",),
    "dense_crf_param": ("DenseCRF",),
    "domain_transform_param": ("DomainTransform", "DomainTransformForwardOnly"),
    "adaptive_bias_channel_param": ("AdaptiveBiasChannel",),
    "bias_channel_param": ("BiasChannel",),
    "unique_label_param": ("UniqueLabel",),
    "mat_read_param": ("MatRead",),
    "trt_param": ("TRT",),
    "detectnet_groundtruth_param": ("DetectNetTransformation",),
    "detectnet_augmentation_param": ("DetectNetTransformation",),
    "shuffle_channel_param": ("ShuffleChannel",),
    "relu6_param": ("ReLU6",),
    "margin_head_param": ("MarginHead",),
    "softmax_diff_loss_param": ("SoftmaxDiffLoss",),
}
#: LayerParameter fields of the tables that every layer type may carry.
ANY_TYPE = frozenset({"forward_type", "backward_type", "forward_math", "backward_math",
                      "debug", "cudnn_math_override"})

#: The forks that define each layer type BVLC lacks, the one it comes from first.
TYPE_FORKS: Dict[str, Tuple[str, ...]] = {
    "MarginInnerProduct": (SPHEREFACE,),
    "AnnotatedData": (SSD, NVCAFFE),
    "MultiBoxLoss": (SSD, NVCAFFE),
    "Normalize": (SSD, NVCAFFE, OPENCV),
    "Permute": (SSD, NVCAFFE, OPENCV),
    "PriorBox": (SSD, NVCAFFE, OPENCV),
    "DetectionOutput": (SSD, NVCAFFE, OPENCV),
    "DetectionEvaluate": (SSD, NVCAFFE),
    "VideoData": (SSD, NVCAFFE),
    "Proposal": (OPENCV,),
    "ROIPooling": (FASTER_RCNN, RFCN, PY_RFCN, OPENCV),
    "SmoothL1Loss": (FASTER_RCNN, RFCN, PY_RFCN, SSD, NVCAFFE),
    "PSROIPooling": (RFCN, PY_RFCN, OPENCV),
    "BoxAnnotatorOHEM": (RFCN, PY_RFCN),
    "SmoothL1LossOHEM": (PY_RFCN,),
    "SoftmaxWithLossOHEM": (PY_RFCN,),
    "BN": (SEGNET, PSPNET),
    "Upsample": (SEGNET,),
    "DenseImageData": (SEGNET,),
    "Interp": (DEEPLAB, PSPNET),
    "SegAccuracy": (DEEPLAB, PSPNET),
    "MatRead": (DEEPLAB, PSPNET),
    "MatWrite": (DEEPLAB, PSPNET),
    "DenseCRF": (DEEPLAB, PSPNET),
    "DomainTransform": (DEEPLAB, PSPNET),
    "DomainTransformForwardOnly": (DEEPLAB, PSPNET),
    "AdaptiveBiasChannel": (DEEPLAB, PSPNET),
    "BiasChannel": (DEEPLAB, PSPNET),
    "UniqueLabel": (DEEPLAB, PSPNET),
    "ImageSegData": (DEEPLAB, PSPNET),
    "SpatialProduct": (DEEPLAB, PSPNET),
    "TRT": (NVCAFFE,),
    "DetectNetTransformation": (NVCAFFE,),
    "L1Loss": (NVCAFFE,),
    "CoSData": (CAFFE_ON_SPARK,),
    "ShuffleChannel": (SHUFFLENET,),
    "ReLU6": (RELU6,),
    "DepthwiseConvolution": (MOBILENET,),
    "ConvolutionDepthwise": (MOBILENET,),
    "Axpy": (SENET, NVCAFFE),
    "MarginHead": (CAFFELAYERS,),
    "SoftmaxDiffLoss": (CAFFELAYERS,),
}
# SegNet's and PSPNet's BN layers are different layers of one name.
_TYPE_LABEL = {"BN": f"{SEGNET} / {PSPNET}", "Interp": f"{DEEPLAB} / {PSPNET}"}


def fork_of_type(type_name: str) -> Optional[str]:
    """The Caffe fork a layer type comes from (``"PriorBox"`` -> ``"SSD (weiliu89)"``), or
    ``None`` for BVLC's types and types no known fork defines."""
    if type_name in _TYPE_LABEL:
        return _TYPE_LABEL[type_name]
    forks = TYPE_FORKS.get(type_name)
    return forks[0] if forks else None


def private_number(fork: str, number: int) -> int:
    """The number our schema gives a field that ``fork`` numbers ``number``, where that
    number is contested."""
    return PRIVATE_BASE + PRIVATE_STRIDE * FORK_INDEX[fork] + number


def canonical_number(declared: int) -> int:
    """The number a field declared at ``declared`` is written with."""
    if declared >= PRIVATE_BASE:
        return declared % PRIVATE_STRIDE
    return declared


def unknown_fork_fields(message) -> List[Tuple[int, int]]:
    """``(number, wire type)`` of the fields of ``message`` (not of its sub-messages) that
    were kept unknown, by the number they have in the file."""
    out = []
    for field in UnknownFieldSet(message):
        number = field.field_number
        if UNKNOWN_BASE <= number < PRIVATE_BASE:
            number -= UNKNOWN_BASE
        out.append((number, field.wire_type))
    return out


# --- the rules, derived from the tables and the schema ------------------------------------

_WIRE = {
    FieldDescriptor.TYPE_DOUBLE: 1, FieldDescriptor.TYPE_FIXED64: 1,
    FieldDescriptor.TYPE_SFIXED64: 1, FieldDescriptor.TYPE_FLOAT: 5,
    FieldDescriptor.TYPE_FIXED32: 5, FieldDescriptor.TYPE_SFIXED32: 5,
    FieldDescriptor.TYPE_STRING: 2, FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_MESSAGE: 2,
}


def wire_types(field: FieldDescriptor) -> FrozenSet[int]:
    """The wire types a field may arrive with (repeated scalars also packed)."""
    wire = _WIRE.get(field.type, 0)
    if field.is_repeated and wire != 2:
        return frozenset({wire, 2})
    return frozenset({wire})


class Claim(NamedTuple):
    """One reading of a field number in a message."""
    target: FieldDescriptor        # our field
    forks: FrozenSet[str]          # the schemas that give the number this meaning
    types: Optional[FrozenSet[str]]  # LayerParameter: the layer types it belongs to
    wires: FrozenSet[int]
    values: Optional[Tuple[Tuple[int, int], ...]]  # enum values to renumber

    @property
    def key(self):
        return self.target.number, self.values


def _build_claims():
    """message full name -> {number on the wire -> [Claim]}, for every number whose reading
    needs a decision."""
    gathered: Dict[str, Dict[int, Dict[tuple, set]]] = {}
    for fork, messages in FIELD_NUMBERS.items():
        for message_name, fields in messages.items():
            descriptor = pb.DESCRIPTOR.message_types_by_name[message_name]
            for name, number in fields.items():
                field = descriptor.fields_by_name[name]
                values = VALUE_NUMBERS.get((fork, message_name, name))
                values = tuple(sorted(values.items())) if values else None
                per_number = gathered.setdefault(descriptor.full_name, {}).setdefault(number, {})
                per_number.setdefault((name, values), set()).add(fork)
    claims: Dict[str, Dict[int, List[Claim]]] = {}
    for full_name, numbers in gathered.items():
        descriptor = pb.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
        layer = full_name == "caffe.LayerParameter"
        for number, readings in numbers.items():
            native = descriptor.fields_by_number.get(number)
            if native is not None and (native.name, None) not in readings:
                readings[(native.name, None)] = {BVLC}
            if not layer and len(readings) == 1:
                (name, values), = readings
                if values is None and descriptor.fields_by_name[name].number == number:
                    continue  # declared at this number, and nothing else claims it
            entries = []
            for (name, values), forks in readings.items():
                field = descriptor.fields_by_name[name]
                types = None
                if layer and name not in ANY_TYPE:
                    types = frozenset(PARAM_TYPES[name])
                entries.append(Claim(field, frozenset(forks), types, wire_types(field),
                                     values))
            claims.setdefault(full_name, {})[number] = entries
    return claims


#: message full name -> {number on the wire -> [Claim]}.
CLAIMS = _build_claims()


def _layer_field_forks():
    """LayerParameter field name -> {fork: that fork's number}."""
    out: Dict[str, Dict[str, int]] = {}
    for fork, messages in FIELD_NUMBERS.items():
        for name, number in messages.get("LayerParameter", {}).items():
            out.setdefault(name, {})[fork] = number
    return out


_LAYER_FIELD_FORKS = _layer_field_forks()
_FORK_OF_INDEX = {index: fork for fork, index in FORK_INDEX.items()}


def fork_of_number(declared: int) -> Optional[str]:
    """The fork whose private range holds ``declared``, if any."""
    if declared < PRIVATE_BASE:
        return None
    return _FORK_OF_INDEX.get((declared - PRIVATE_BASE) // PRIVATE_STRIDE)


def write_number(field: FieldDescriptor, nested_numbers=()) -> Tuple[int, FrozenSet[str]]:
    """The number a LayerParameter field is written with, and the forks that number it so
    (its sub-fields are written as one of them numbers them).

    That is its canonical number; but a fork field that forks number differently (SegNet's
    bn_param 45 and PSPNet's 152, SSD's detection_output_param 204 and OpenCV's 147) goes
    to the fork most of its set sub-fields (``nested_numbers``, our numbers) belong to."""
    canonical = canonical_number(field.number)
    numbers = _LAYER_FIELD_FORKS.get(field.name)
    if not numbers:
        return canonical, frozenset()
    best, best_score = canonical, 0
    message = field.message_type
    if message is not None and len(set(numbers.values())) > 1:
        for fork, number in sorted(numbers.items(), key=lambda item: FORK_ORDER[item[0]]):
            own = FIELD_NUMBERS.get(fork, {}).get(message.name, {})
            score = sum(1 for n in nested_numbers
                        if fork_of_number(n) == fork
                        or (n in message.fields_by_number
                            and message.fields_by_number[n].name in own))
            if score > best_score:
                best, best_score = number, score
    return best, frozenset(f for f, n in numbers.items() if n == best and f != BVLC)


def nested_write_number(message_name: str, field: FieldDescriptor,
                        fork: Optional[str]) -> int:
    """The number a field of another message is written with in a net (or a fork field)
    of ``fork``: the fork's number for it, else ours (a private number stays private, so
    that no fork misreads it and we read it back)."""
    if fork is not None:
        number = FIELD_NUMBERS.get(fork, {}).get(message_name, {}).get(field.name)
        if number is not None:
            return number
    return field.number


def decide(claims: List[Claim], wire: int, layer_type: Optional[str], tiers) -> Optional[Claim]:
    """The reading of one field: ``None`` keeps it unknown.

    Args:
        claims: the number's readings (:data:`CLAIMS`).
        wire: the wire type it arrived with.
        layer_type: the layer's type, for a LayerParameter field; else ``None``.
        tiers: sets of forks the field most likely comes from, best first: the fork of
            the layer field it is inside, and the fork that wrote the net
            (:func:`net_fork`).
    """
    fitting = [claim for claim in claims if wire in claim.wires]
    if layer_type is not None:
        specific = [c for c in fitting if c.types is not None and layer_type in c.types]
        fitting = specific or [c for c in fitting if c.types is None]
        return _one(fitting, tiers)
    chosen = _one(fitting, tiers, fallback=False)
    if chosen is not None or _ambiguous(fitting, tiers):
        return chosen
    native = [c for c in fitting if BVLC in c.forks]
    if native:
        return native[0]
    return _one(fitting, ())


def _one(claims, tiers, fallback=True):
    for tier in tiers:
        in_tier = {c.key: c for c in claims if c.forks & tier}
        if len(in_tier) == 1:
            return next(iter(in_tier.values()))
        if in_tier:
            return None
    distinct = {c.key: c for c in claims}
    if fallback and len(distinct) == 1:
        return next(iter(distinct.values()))
    return None


def _ambiguous(claims, tiers) -> bool:
    for tier in tiers:
        in_tier = {c.key for c in claims if c.forks & tier}
        if in_tier:
            return len(in_tier) > 1
    return False


#: Forks in the order of FIELD_NUMBERS: where two forks share a field or a layer type, the
#: earlier is where it comes from. OpenCV comes last: it reads Caffe models and writes none.
FORK_ORDER = {fork: i for i, fork in enumerate(
    [f for f in FIELD_NUMBERS if f != OPENCV] + [MOBILENET, SENET, OPENCV])}


def signal_forks(forks) -> Tuple[str, ...]:
    """``forks`` (a claim's or a layer type's) in :data:`FORK_ORDER`, BVLC left out."""
    return tuple(sorted((f for f in forks if f not in (BVLC, CAFFELAYERS)),
                        key=FORK_ORDER.__getitem__))


def net_fork(signals) -> Optional[str]:
    """The fork whose Caffe most likely wrote a net, from what it shows: one tuple of forks
    per sign (a layer type the forks define, a fork field its layers were read with, an
    NVCaffe-only field). The fork in the most signs wins; in a tie, the one the others
    copied from (SSD over NVCaffe, DeepLab over PSPNet). ``None`` without signs."""
    counts: Dict[str, int] = {}
    for forks in signals:
        for fork in forks:
            counts[fork] = counts.get(fork, 0) + 1
    if not counts:
        return None
    return min(counts, key=lambda fork: (-counts[fork], FORK_ORDER[fork]))


def _relevant_messages(claims) -> FrozenSet[str]:
    """Messages that hold (at any depth) a number needing a decision or a private one."""
    relevant = set(claims)
    for descriptor in _all_messages():
        if any(f.number >= PRIVATE_BASE for f in descriptor.fields):
            relevant.add(descriptor.full_name)
    changed = True
    while changed:
        changed = False
        for descriptor in _all_messages():
            if descriptor.full_name in relevant:
                continue
            if any(f.message_type is not None and f.message_type.full_name in relevant
                   for f in descriptor.fields):
                relevant.add(descriptor.full_name)
                changed = True
    return frozenset(relevant)


def _all_messages():
    stack = list(pb.DESCRIPTOR.message_types_by_name.values())
    while stack:
        descriptor = stack.pop()
        yield descriptor
        stack.extend(descriptor.nested_types)


#: Messages the binary reader and writer must walk into.
RELEVANT = _relevant_messages(CLAIMS)
