"""Caffe forks: their prototxts parse by their own field names, their caffemodels decode by
the layer's type however the forks' field numbers collide, and what fits no field is kept
as an unknown field rather than refused.

The binary cases are built with the tiny wire writer below from each fork's own numbers
(read in the fork's caffe.proto, see caffelayers.proto.forks.SOURCES), not with our schema.
"""

import struct

import numpy as np
import pytest
from google.protobuf.unknown_fields import UnknownFieldSet

from caffelayers.errors import CaffeFormatError
from caffelayers.proto import caffe_pb2 as pb
from caffelayers.proto import forks, io

# --- a protobuf wire writer --------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def vint(number: int, value: int) -> bytes:
    """A varint field (ints, bools, enums)."""
    return varint(number << 3) + varint(value)


def f32(number: int, value: float) -> bytes:
    return varint((number << 3) | 5) + struct.pack("<f", value)


def ld(number: int, payload) -> bytes:
    """A length-delimited field: a message, a string or bytes."""
    if isinstance(payload, str):
        payload = payload.encode()
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def layer(name: str, type_: str, *fields: bytes) -> bytes:
    """A NetParameter.layer (100): name 1, type 2, then ``fields``."""
    return ld(100, ld(1, name) + ld(2, type_) + b"".join(fields))


def filler(type_: str) -> bytes:
    return ld(1, type_)  # FillerParameter.type


def blob(*dims: int, values=None) -> bytes:
    """A LayerParameter.blobs (7) entry: BlobShape 7 with packed dims, packed float data 5."""
    shape = ld(7, ld(1, b"".join(varint(d) for d in dims)))
    if values is None:
        values = np.arange(int(np.prod(dims)), dtype="<f4")
    return ld(7, shape + ld(5, np.asarray(values, "<f4").tobytes()))


def read(*layers: bytes, net_fields: bytes = b"") -> pb.NetParameter:
    return io.parse_caffemodel(ld(1, "fork net") + net_fields + b"".join(layers))


def only_layer(*layers: bytes, **kwargs) -> pb.LayerParameter:
    net = read(*layers, **kwargs)
    assert len(net.layer) == len(layers)
    return net.layer[-1]


def set_fields(message) -> set:
    return {field.name for field, _ in message.ListFields()}


def wire_numbers(data: bytes, path=()) -> list:
    """The field numbers of the message at ``path`` (field numbers, first occurrence) in
    serialized ``data``: what a fork's Caffe would see."""
    for number in path:
        data = dict(_walk(data))[number]
    return [number for number, _ in _walk(data)]


def _walk(data: bytes):
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _read_varint(data, pos)
            yield number, data[pos:end]
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            end = pos + length
            yield number, data[pos:end]
        else:
            end = pos + (4 if wire == 5 else 8)
            yield number, data[pos:end]
        pos = end


def _read_varint(data: bytes, pos: int):
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def written_layers(net: pb.NetParameter, tmp_path) -> list:
    """Each layer of ``net`` as written by io.write_caffemodel, as raw bytes."""
    path = tmp_path / "written.caffemodel"
    io.write_caffemodel(net, path)
    return [payload for number, payload in _walk(path.read_bytes()) if number == 100]


# --- text: every fork's prototxt parses by its own names ----------------------------------

SSD_PROTOTXT = """
name: "ssd"
layer {
  name: "data" type: "AnnotatedData" top: "data" top: "label"
  transform_param {
    mirror: true mean_value: 104 mean_value: 117 mean_value: 123
    resize_param { prob: 1 resize_mode: WARP height: 300 width: 300
                   interp_mode: LINEAR interp_mode: AREA interp_mode: LANCZOS4 }
    emit_constraint { emit_type: CENTER }
    distort_param { brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5
                    contrast_lower: 0.5 contrast_upper: 1.5 random_order_prob: 0 }
    expand_param { prob: 0.5 max_expand_ratio: 4 }
    noise_param { prob: 0.1 saltpepper_param { fraction: 0.01 value: 0 } }
    crop_h: 300 crop_w: 300
  }
  data_param { source: "trainval_lmdb" batch_size: 32 backend: LMDB }
  annotated_data_param {
    label_map_file: "labelmap_voc.prototxt"
    batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 }
                    sample_constraint { min_jaccard_overlap: 0.1 } max_sample: 1 max_trials: 50 }
    anno_type: BBOX
  }
}
layer { name: "norm" type: "Normalize" bottom: "data" top: "norm"
        norm_param { across_spatial: false scale_filler { type: "constant" value: 20 }
                     channel_shared: false } }
layer { name: "perm" type: "Permute" bottom: "norm" top: "perm"
        permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "prior" type: "PriorBox" bottom: "norm" bottom: "data" top: "prior"
        prior_box_param { min_size: 30 max_size: 60 aspect_ratio: 2 flip: true clip: false
                          variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2
                          step: 8 offset: 0.5 } }
layer { name: "loss" type: "MultiBoxLoss" bottom: "perm" bottom: "prior" bottom: "label"
        top: "loss" propagate_down: true propagate_down: false
        loss_param { normalization: VALID }
        multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1
                              num_classes: 21 share_location: true match_type: PER_PREDICTION
                              overlap_threshold: 0.5 neg_pos_ratio: 3 code_type: CENTER_SIZE
                              mining_type: MAX_NEGATIVE ignore_cross_boundary_bbox: false } }
layer { name: "det" type: "DetectionOutput" bottom: "perm" bottom: "prior" top: "det"
        detection_output_param {
          num_classes: 21 share_location: true background_label_id: 0
          nms_param { nms_threshold: 0.45 top_k: 400 }
          save_output_param { output_directory: "out" output_name_prefix: "comp4_det_test_"
                              output_format: "VOC" label_map_file: "labelmap.prototxt"
                              name_size_file: "test_name_size.txt" num_test_image: 4952
                              resize_param { prob: 1 resize_mode: WARP height: 500 } }
          code_type: CENTER_SIZE keep_top_k: 200 confidence_threshold: 0.01 } }
layer { name: "eval" type: "DetectionEvaluate" bottom: "det" bottom: "label" top: "eval"
        detection_evaluate_param { num_classes: 21 background_label_id: 0
                                   overlap_threshold: 0.5 evaluate_difficult_gt: false
                                   name_size_file: "test_name_size.txt" } }
layer { name: "video" type: "VideoData" top: "frames"
        video_data_param { video_type: WEBCAM device_id: 0 } }
"""

PROTOTXTS = {
    forks.SSD: SSD_PROTOTXT,
    forks.SPHEREFACE: """
layer { name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: "label" top: "fc6"
        margin_inner_product_param { num_output: 10572 type: QUADRUPLE
          weight_filler { type: "xavier" } base: 1000 gamma: 0.12 power: 1 lambda_min: 5
          iteration: 0 } }
""",
    forks.OPENCV: """
layer { name: "proposal" type: "Proposal" bottom: "cls" bottom: "bbox" bottom: "im_info"
        top: "rois"
        proposal_param { feat_stride: 16 base_size: 16 min_size: 16 ratio: 0.5 ratio: 1
                         ratio: 2 scale: 8 scale: 16 scale: 32 pre_nms_topn: 6000
                         post_nms_topn: 300 nms_thresh: 0.7 } }
layer { name: "psroi" type: "PSROIPooling" bottom: "conv" bottom: "rois" top: "ps"
        psroi_pooling_param { spatial_scale: 0.0625 output_dim: 21 group_size: 7 } }
""",
    forks.FASTER_RCNN: """
layer { name: "pool5" type: "ROIPooling" bottom: "conv5_3" bottom: "rois" top: "pool5"
        roi_pooling_param { pooled_w: 7 pooled_h: 7 spatial_scale: 0.0625 } }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6"
        dropout_param { dropout_ratio: 0.5 scale_train: false } }
layer { name: "loss_bbox" type: "SmoothL1Loss" bottom: "bbox_pred" bottom: "bbox_targets"
        bottom: "bbox_inside_weights" bottom: "bbox_outside_weights" top: "loss_bbox"
        loss_weight: 1 smooth_l1_loss_param { sigma: 3 } }
""",
    forks.RFCN: """
layer { name: "psroipooled_cls_rois" type: "PSROIPooling" bottom: "rfcn_cls" bottom: "rois"
        top: "psroipooled_cls_rois"
        psroi_pooling_param { spatial_scale: 0.0625 output_dim: 21 group_size: 7 } }
layer { name: "annotator_detector" type: "BoxAnnotatorOHEM" bottom: "rois"
        bottom: "per_roi_loss" bottom: "labels" bottom: "bbox_inside_weights"
        top: "labels_ohem" top: "bbox_loss_weights_ohem"
        box_annotator_ohem_param { roi_per_img: 128 ignore_label: -1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "cls_score" bottom: "labels_ohem"
        top: "loss" loss_param { ignore_label: -1 normalization: PRE_FIXED
                                 pre_fixed_normalizer: 128 } }
""",
    forks.SEGNET: """
layer { name: "data" type: "DenseImageData" top: "data" top: "label"
        dense_image_data_param { source: "train.txt" batch_size: 4 shuffle: true
                                 crop_width: 480 crop_height: 360 mirror: true } }
layer { name: "conv1_1_bn" type: "BN" bottom: "conv1_1" top: "conv1_1"
        bn_param { bn_mode: INFERENCE scale_filler { type: "constant" value: 1 }
                   shift_filler { type: "constant" value: 0.001 } } }
layer { name: "upsample4" type: "Upsample" bottom: "conv5" bottom: "pool4_mask"
        top: "pool4_D" upsample_param { scale: 2 upsample_w: 60 upsample_h: 45 } }
layer { name: "drop" type: "Dropout" bottom: "x" top: "x"
        dropout_param { dropout_ratio: 0.5 sample_weights_test: true } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv1_1_D" bottom: "label" top: "loss"
        loss_param { weight_by_label_freqs: true ignore_label: 11
                     class_weighting: 0.2595 class_weighting: 0.1826 } }
""",
    forks.DEEPLAB: """
layer { name: "data" type: "ImageSegData" top: "data" top: "label"
        image_data_param { source: "train_aug.txt" batch_size: 10 shuffle: true
                           label_type: PIXEL ignore_label: 255 }
        transform_param { mirror: true crop_size: 321 mean_value: 104
                          scale_factors: 0.5 scale_factors: 0.75 scale_factors: 1
                          crop_width: 321 crop_height: 321 } }
layer { name: "shrink" type: "Interp" bottom: "label" top: "label_shrink"
        interp_param { shrink_factor: 8 pad_beg: 0 pad_end: 0 } }
layer { name: "accuracy" type: "SegAccuracy" bottom: "fc8" bottom: "label_shrink"
        top: "accuracy" seg_accuracy_param { ignore_label: 255 metric: PixelIOU } }
layer { name: "crf" type: "DenseCRF" bottom: "fc8" bottom: "data_dim" bottom: "data"
        top: "crf" dense_crf_param { max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 4
                                     bi_xy_std: 121 bi_rgb_std: 5 } }
layer { name: "dt" type: "DomainTransform" bottom: "fc8" bottom: "edges" top: "dt"
        domain_transform_param { num_iter: 3 spatial_sigma: 50 range_sigma: 5 } }
layer { name: "abc" type: "AdaptiveBiasChannel" bottom: "fc8" bottom: "label" top: "abc"
        adaptive_bias_channel_param { num_iter: 1 bg_portion: 0.3 fg_portion: 0.2 } }
layer { name: "bc" type: "BiasChannel" bottom: "fc8" bottom: "label" top: "bc"
        bias_channel_param { bg_bias: 1 fg_bias: 2 label_type: IMAGE } }
layer { name: "ul" type: "UniqueLabel" bottom: "label" top: "ul"
        unique_label_param { max_labels: 5 ignore_label: 255 force_label: 0 } }
layer { name: "read" type: "MatRead" top: "x" mat_read_param { prefix: "features/" } }
layer { name: "write" type: "MatWrite" bottom: "fc8"
        mat_write_param { prefix: "out/" source: "list.txt" strip: 0 period: 1 } }
""",
    forks.PSPNET: """
layer { name: "conv1_1_3x3_s2/bn" type: "BN" bottom: "conv1_1_3x3_s2"
        top: "conv1_1_3x3_s2/bn"
        bn_param { slope_filler { type: "constant" value: 1 }
                   bias_filler { type: "constant" value: 0 } momentum: 0.95 eps: 1e-5
                   frozen: true engine: CUDNN } }
layer { name: "interp" type: "Interp" bottom: "conv6" top: "conv6_interp"
        interp_param { zoom_factor: 8 } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
        batch_norm_param { use_global_stats: false update_global_stats: true } }
""",
    forks.NVCAFFE: """
name: "nv"
default_forward_type: FLOAT16 default_backward_type: FLOAT16
default_forward_math: FLOAT global_grad_scale: 32 global_grad_scale_adaptive: true
layer { name: "data" type: "Data" top: "data" top: "label"
        data_param { source: "train_lmdb" batch_size: 64 backend: LMDB threads: 4
                     parser_threads: 2 cache: true shuffle: true }
        transform_param { crop_size: 224 use_gpu_transform: true random_seed: 7
                          img_rand_resize_lower: 256 img_rand_resize_upper: 480
                          rand_resize_ratio_lower: 0.75 vertical_stretch_lower: 0.9
                          interpolation_algo_down: INTER_LINEAR allow_upscale: true
                          forward_packing: NHWC } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        forward_type: FLOAT16 backward_type: FLOAT16 forward_math: FLOAT
        backward_math: FLOAT debug: false cudnn_math_override: 0
        convolution_param { num_output: 64 kernel_size: 7
                            cudnn_convolution_algo_seeker: GET conv_algos_override: "1,1,1" } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
        batch_norm_param { scale_bias: true scale_filler { type: "constant" value: 1 }
                           bias_filler { type: "constant" value: 0 } engine: CUDNN } }
layer { name: "elu" type: "ELU" bottom: "conv1" top: "conv1"
        elu_param { alpha: 1.67 lambda: 1.05 } }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool" pooling_param {
        pool: MAX kernel_size: 3 stride: 2 torch_pooling: true } }
layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool"
        dropout_param { dropout_ratio: 0.5 engine: CUDNN random_seed: 1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool" bottom: "label" top: "loss"
        loss_param { label_smoothing: 0.1 } }
layer { name: "trt" type: "TRT" bottom: "data" top: "out"
        trt_param { trt_mode: FP16 deploy: "deploy.prototxt" model: "m.caffemodel" } }
layer { name: "detectnet" type: "DetectNetTransformation" bottom: "data" bottom: "label"
        top: "t" top: "l"
        detectnet_groundtruth_param { stride: 16 scale_cvg: 0.4 gridbox_type: GRIDBOX_MIN
                                      object_class { src: 1 dst: 0 } }
        detectnet_augmentation_param { crop_prob: 1 flip_prob: 0.5 hue_rotation: 30 } }
""",
    forks.CAFFE_ON_SPARK: """
layer { name: "data" type: "MemoryData" top: "data" top: "label"
        source_class: "com.yahoo.ml.caffe.LMDB"
        memory_data_param { source: "file:../data/mnist_train_lmdb/" batch_size: 64
                            channels: 1 height: 28 width: 28 share_in_parallel: false
                            dataframe_column_select: "data" image_encoded: true } }
layer { name: "cos" type: "CoSData" top: "cos"
        source_class: "com.yahoo.ml.caffe.ImageDataFrame"
        cos_data_param { source: "df" batch_size: 8
                         top { name: "data" type: ENCODED_IMAGE channels: 3 height: 256
                               width: 256 transform_param { crop_size: 224 } } } }
""",
    forks.SHUFFLENET: """
layer { name: "shuffle2" type: "ShuffleChannel" bottom: "resx2_conv1" top: "shuffle2"
        shuffle_channel_param { group: 3 } }
""",
    forks.RELU6: """
layer { name: "relu6" type: "ReLU6" bottom: "x" top: "x" relu6_param { negative_slope: 0 } }
""",
    forks.MOBILENET: """
layer { name: "conv2_1/dw" type: "DepthwiseConvolution" bottom: "conv1" top: "conv2_1/dw"
        convolution_param { num_output: 32 group: 32 kernel_size: 3 pad: 1 bias_term: false
                            weight_filler { type: "msra" } } }
""",
    forks.SENET: """
layer { name: "axpy" type: "Axpy" bottom: "scale" bottom: "x" bottom: "residual" top: "y" }
""",
    forks.BVLC: """
layer { name: "swish" type: "Swish" bottom: "x" top: "y" swish_param { beta: 1.5 } }
layer { name: "clip" type: "Clip" bottom: "y" top: "z" clip_param { min: -1 max: 1 } }
""",
}


@pytest.mark.parametrize("fork", sorted(PROTOTXTS))
def test_fork_prototxt_parses(fork):
    """Without allow_unknown_fields: every field of the fork is in our schema."""
    net = io.parse_prototxt(PROTOTXTS[fork], f"{fork}.prototxt")
    assert len(net.layer) >= 1


def test_fork_prototxt_values():
    """A few values land where the fork's Caffe would read them."""
    ssd = io.parse_prototxt(SSD_PROTOTXT)
    transform = ssd.layer[0].transform_param
    assert (transform.resize_param.height, transform.crop_h) == (300, 300)
    assert list(transform.resize_param.interp_mode) == [pb.ResizeParameter.LINEAR,
                                                        pb.ResizeParameter.AREA,
                                                        pb.ResizeParameter.LANCZOS4]
    assert ssd.layer[0].annotated_data_param.batch_sampler[0].max_trials == 50
    assert list(ssd.layer[3].prior_box_param.min_size) == [30]
    detection = ssd.layer[5].detection_output_param
    assert detection.nms_param.top_k == 400
    assert detection.save_output_param.resize_param.height == 500
    assert detection.code_type == pb.PriorBoxParameter.CENTER_SIZE

    rfcn = io.parse_prototxt(PROTOTXTS[forks.RFCN])
    assert rfcn.layer[2].loss_param.normalization == pb.LossParameter.PRE_FIXED
    assert rfcn.layer[2].loss_param.pre_fixed_normalizer == 128

    segnet = io.parse_prototxt(PROTOTXTS[forks.SEGNET]).layer[1].bn_param
    pspnet = io.parse_prototxt(PROTOTXTS[forks.PSPNET]).layer[0].bn_param
    assert segnet.bn_mode == pb.BNParameter.INFERENCE and segnet.shift_filler.value == \
        pytest.approx(0.001)
    assert pspnet.momentum == pytest.approx(0.95) and pspnet.frozen

    nv = io.parse_prototxt(PROTOTXTS[forks.NVCAFFE])
    assert nv.default_forward_type == pb.FLOAT16
    assert nv.layer[1].forward_type == pb.FLOAT16 and nv.layer[1].forward_math == pb.FLOAT
    assert getattr(nv.layer[3].elu_param, "lambda") == pytest.approx(1.05)

    spark = io.parse_prototxt(PROTOTXTS[forks.CAFFE_ON_SPARK])
    assert spark.layer[0].source_class == "com.yahoo.ml.caffe.LMDB"
    assert spark.layer[0].memory_data_param.source == "file:../data/mnist_train_lmdb/"


def test_fork_solver_fields():
    solver = io.parse_solver(
        'net: "train.prototxt" base_lr: 0.001 lr_policy: "multistep" stepvalue: 80000\n'
        'eval_type: "detection" ap_version: "11point" show_per_class_result: true\n'
        'rampup_interval: 100 rampup_lr: 0.1 min_lr: 1e-5 larc: true larc_policy: "clip"\n'
        'solver_data_type: FLOAT16 store_blobs_in_old_format: true type: "SGD"\n')
    assert solver.eval_type == "detection" and solver.larc and solver.min_lr > 0


@pytest.mark.parametrize("text, fragment, line", [
    ('layer {\n  name: "p" type: "PriorBox"\n  prior_box_parm { min_size: 30 }\n}',
     r"LayerParameter has no field 'prior_box_parm' \(did you mean 'prior_box_param'\?\)", 3),
    ('layer {\n  name: "p" type: "Permute"\n  permute_param {\n    oder: 0\n  }\n}',
     r"PermuteParameter has no field 'oder' \(did you mean 'order'\?\)", 4),
    ('layer { name: "x" type: "Foo"\n  no_fork_has_this_param { a: 1 } }',
     r"LayerParameter has no field 'no_fork_has_this_param'", 2),
    ('layer { name: "b" type: "BN" bn_param {\n bn_mode: INFERENS } }',
     r"BNMode has no value 'INFERENS' \(did you mean 'INFERENCE'\?\)", 2),
])
def test_unknown_text_field_still_an_error(tmp_path, text, fragment, line):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    with pytest.raises(CaffeFormatError, match=fragment) as info:
        io.read_prototxt(path)
    assert (info.value.path, info.value.line) == (str(path), line)
    assert str(info.value).startswith(f"{path}:{line}:")


# --- binary: each fork's numbers decode into the field its layer type implies ---------------

MIP = vint(1, 10) + vint(2, 3) + ld(3, filler("xavier")) + f32(5, 1000) + f32(6, 0.12) \
    + f32(9, 5)                                          # MarginInnerProductParameter
DETECTION = vint(1, 21) + ld(4, f32(1, 0.45) + vint(2, 400)) + vint(6, 2) + vint(7, 200)
PRIOR = f32(1, 30) + f32(2, 60) + f32(3, 2) + vint(5, 1) + f32(10, 8)
NORM = vint(1, 0) + ld(2, filler("constant") + f32(2, 20)) + vint(3, 0)
PERMUTE = vint(1, 0) + vint(1, 2) + vint(1, 3) + vint(1, 1)
ROI = vint(1, 7) + vint(2, 7) + f32(3, 0.0625)
PSROI = f32(1, 0.0625) + vint(2, 21) + vint(3, 7)
OHEM = vint(1, 128) + vint(2, (1 << 64) - 1)              # ignore_label -1
SWISH = f32(1, 1.5)
CLIP = f32(1, -1) + f32(2, 1)


def check_mip(layer):
    p = layer.margin_inner_product_param
    assert (p.num_output, p.type, p.weight_filler.type, p.base, p.lambda_min) == \
        (10, pb.MarginInnerProductParameter.QUADRUPLE, "xavier", 1000, 5)


def check_detection(layer):
    p = layer.detection_output_param
    assert (p.num_classes, p.nms_param.top_k, p.code_type, p.keep_top_k) == \
        (21, 400, pb.PriorBoxParameter.CENTER_SIZE, 200)


def check_prior(layer):
    p = layer.prior_box_param
    assert (list(p.min_size), list(p.max_size), list(p.aspect_ratio), p.clip, p.step) == \
        ([30], [60], [2], True, 8)


def check_norm(layer):
    p = layer.norm_param
    assert (p.across_spatial, p.scale_filler.value, p.channel_shared) == (False, 20, False)


def check_permute(layer):
    assert list(layer.permute_param.order) == [0, 2, 3, 1]


def check_roi(layer):
    p = layer.roi_pooling_param
    assert (p.pooled_h, p.pooled_w, p.spatial_scale) == (7, 7, 0.0625)


def check_psroi(layer):
    p = layer.psroi_pooling_param
    assert (p.spatial_scale, p.output_dim, p.group_size) == (0.0625, 21, 7)


def check_ohem(layer):
    p = layer.box_annotator_ohem_param
    assert (p.roi_per_img, p.ignore_label) == (128, -1)


# (fork, layer type, the fork's number, the field's payload, our field, check)
BINARY_CASES = [
    (forks.SPHEREFACE, "MarginInnerProduct", 147, MIP, "margin_inner_product_param", check_mip),
    (forks.BVLC, "Swish", 147, SWISH, "swish_param",
     lambda layer: layer.swish_param.beta == 1.5),
    (forks.BVLC, "Clip", 148, CLIP, "clip_param",
     lambda layer: (layer.clip_param.min, layer.clip_param.max) == (-1, 1)),
    (forks.OPENCV, "DetectionOutput", 147, DETECTION, "detection_output_param",
     check_detection),
    (forks.OPENCV, "Permute", 148, PERMUTE, "permute_param", check_permute),
    (forks.OPENCV, "Normalize", 149, NORM, "norm_param", check_norm),
    (forks.OPENCV, "PriorBox", 150, PRIOR, "prior_box_param", check_prior),
    (forks.OPENCV, "PSROIPooling", 10002, PSROI, "psroi_pooling_param", check_psroi),
    (forks.OPENCV, "Proposal", 201, vint(1, 16) + f32(4, 0.5) + f32(5, 8) + f32(8, 0.7),
     "proposal_param", lambda layer: list(layer.proposal_param.scale) == [8]),
    (forks.SSD, "DetectionOutput", 204, DETECTION, "detection_output_param", check_detection),
    (forks.SSD, "Permute", 202, PERMUTE, "permute_param", check_permute),
    (forks.SSD, "Normalize", 206, NORM, "norm_param", check_norm),
    (forks.SSD, "PriorBox", 203, PRIOR, "prior_box_param", check_prior),
    (forks.SSD, "MultiBoxLoss", 201, vint(4, 21) + vint(14, 2) + f32(12, 3),
     "multibox_loss_param", lambda layer: layer.multibox_loss_param.num_classes == 21),
    (forks.SSD, "AnnotatedData", 200,
     ld(1, ld(2, f32(1, 0.3)) + vint(4, 1) + vint(5, 50)) + ld(2, "labelmap.prototxt"),
     "annotated_data_param",
     lambda layer: layer.annotated_data_param.batch_sampler[0].sampler.min_scale
     == pytest.approx(0.3)),
    (forks.SSD, "DetectionEvaluate", 205, vint(1, 21) + ld(5, "sizes.txt"),
     "detection_evaluate_param",
     lambda layer: layer.detection_evaluate_param.name_size_file == "sizes.txt"),
    (forks.SSD, "VideoData", 207, vint(1, 1) + ld(3, "v.mp4"), "video_data_param",
     lambda layer: layer.video_data_param.video_file == "v.mp4"),
    (forks.FASTER_RCNN, "ROIPooling", 8266711, ROI, "roi_pooling_param", check_roi),
    (forks.FASTER_RCNN, "SmoothL1Loss", 8266712, f32(1, 3), "smooth_l1_loss_param",
     lambda layer: layer.smooth_l1_loss_param.sigma == 3),
    (forks.RFCN, "PSROIPooling", 10001, PSROI, "psroi_pooling_param", check_psroi),
    (forks.RFCN, "BoxAnnotatorOHEM", 10000, OHEM, "box_annotator_ohem_param", check_ohem),
    (forks.PY_RFCN, "ROIPooling", 147, ROI, "roi_pooling_param", check_roi),
    (forks.PY_RFCN, "SmoothL1Loss", 148, f32(1, 3), "smooth_l1_loss_param",
     lambda layer: layer.smooth_l1_loss_param.sigma == 3),
    (forks.PY_RFCN, "PSROIPooling", 149, PSROI, "psroi_pooling_param", check_psroi),
    (forks.PY_RFCN, "BoxAnnotatorOHEM", 150, OHEM, "box_annotator_ohem_param", check_ohem),
    (forks.SEGNET, "BN", 45, vint(3, 1) + ld(1, filler("constant") + f32(2, 1))
     + ld(2, filler("constant") + f32(2, 0.001)), "bn_param",
     lambda layer: (layer.bn_param.bn_mode, layer.bn_param.scale_filler.value,
                    set_fields(layer.bn_param)) ==
     (pb.BNParameter.INFERENCE, 1, {"bn_mode", "scale_filler", "shift_filler"})),
    (forks.SEGNET, "Upsample", 137, vint(1, 2) + vint(6, 45) + vint(7, 60), "upsample_param",
     lambda layer: (layer.upsample_param.upsample_h, layer.upsample_param.upsample_w)
     == (45, 60)),
    (forks.SEGNET, "DenseImageData", 138, ld(1, "train.txt") + vint(2, 4) + vint(11, 480),
     "dense_image_data_param",
     lambda layer: layer.dense_image_data_param.crop_width == 480),
    (forks.PSPNET, "BN", 152, ld(1, filler("constant") + f32(2, 1)) + f32(3, 0.95)
     + f32(4, 1e-5) + vint(5, 1), "bn_param",
     lambda layer: (layer.bn_param.momentum == pytest.approx(0.95), layer.bn_param.frozen,
                    set_fields(layer.bn_param)) ==
     (True, True, {"slope_filler", "momentum", "eps", "frozen"})),
    (forks.DEEPLAB, "Interp", 143, vint(3, 8), "interp_param",
     lambda layer: layer.interp_param.zoom_factor == 8),
    (forks.DEEPLAB, "SegAccuracy", 144, vint(1, 2) + vint(2, 255), "seg_accuracy_param",
     lambda layer: list(layer.seg_accuracy_param.ignore_label) == [255]),
    (forks.DEEPLAB, "MatWrite", 145, ld(1, "out/"), "mat_write_param",
     lambda layer: layer.mat_write_param.prefix == "out/"),
    (forks.DEEPLAB, "DenseCRF", 146, vint(1, 10) + f32(2, 3), "dense_crf_param",
     lambda layer: layer.dense_crf_param.max_iter == 10),
    (forks.DEEPLAB, "DomainTransform", 147, vint(1, 3) + f32(2, 50), "domain_transform_param",
     lambda layer: layer.domain_transform_param.spatial_sigma == 50),
    (forks.DEEPLAB, "AdaptiveBiasChannel", 148, vint(1, 2), "adaptive_bias_channel_param",
     lambda layer: layer.adaptive_bias_channel_param.num_iter == 2),
    (forks.DEEPLAB, "BiasChannel", 149, f32(1, 1) + vint(4, 2), "bias_channel_param",
     lambda layer: layer.bias_channel_param.label_type == pb.BiasChannelParameter.PIXEL),
    (forks.DEEPLAB, "UniqueLabel", 150, vint(1, 5), "unique_label_param",
     lambda layer: layer.unique_label_param.max_labels == 5),
    (forks.DEEPLAB, "MatRead", 151, ld(1, "in/"), "mat_read_param",
     lambda layer: layer.mat_read_param.prefix == "in/"),
    (forks.NVCAFFE, "LSTM", 151, vint(1, 256), "recurrent_param",
     lambda layer: layer.recurrent_param.num_output == 256),
    (forks.NVCAFFE, "TRT", 152, vint(1, 1) + ld(3, "d.prototxt"), "trt_param",
     lambda layer: layer.trt_param.trt_mode == pb.TRTParameter.FP16),
    (forks.NVCAFFE, "Convolution", 147, None, "forward_math",
     lambda layer: layer.forward_math == pb.FLOAT16),
    (forks.NVCAFFE, "DetectNetTransformation", 6801, vint(1, 16), "detectnet_groundtruth_param",
     lambda layer: layer.detectnet_groundtruth_param.stride == 16),
    (forks.CAFFE_ON_SPARK, "MemoryData", 10001, None, "source_class",
     lambda layer: layer.source_class == "com.yahoo.ml.caffe.ImageDataFrame"),
    (forks.CAFFE_ON_SPARK, "CoSData", 10010, ld(1, "df") + ld(5, ld(1, "data") + vint(2, 5)),
     "cos_data_param",
     lambda layer: layer.cos_data_param.top[0].type == pb.CoSDataParameter.ENCODED_IMAGE),
    (forks.SHUFFLENET, "ShuffleChannel", 164, vint(1, 3), "shuffle_channel_param",
     lambda layer: layer.shuffle_channel_param.group == 3),
    (forks.RELU6, "ReLU6", 100000, f32(1, 0.1), "relu6_param",
     lambda layer: layer.relu6_param.negative_slope == pytest.approx(0.1)),
    (forks.CAFFELAYERS, "MarginHead", 27182801, vint(1, 7) + vint(2, 1), "margin_head_param",
     lambda layer: layer.margin_head_param.kind == pb.MarginHeadParameter.COS),
]
_SPECIAL = {  # fields that are not messages: their bytes as the fork writes them
    ("Convolution", 147): vint(147, pb.FLOAT16),
    ("MemoryData", 10001): ld(10001, "com.yahoo.ml.caffe.ImageDataFrame"),
}


def _field_bytes(type_, number, payload):
    return _SPECIAL.get((type_, number)) or ld(number, payload)


def _case_id(case):
    return f"{case[1]}@{case[2]}"


@pytest.mark.parametrize("case", BINARY_CASES, ids=_case_id)
def test_fork_caffemodel_decodes_by_type(case):
    fork, type_, number, payload, field, check = case
    layer_ = only_layer(layer("x", type_, _field_bytes(type_, number, payload)))
    assert set_fields(layer_) == {"name", "type", field}, fork
    assert check(layer_) is not False
    assert not forks.unknown_fork_fields(layer_)


@pytest.mark.parametrize("case", BINARY_CASES, ids=_case_id)
def test_fork_field_in_another_layer_type_stays_unknown(case):
    """The same bytes in a layer that no fork gives that field: kept, not misread."""
    _, type_, number, payload, _, _ = case
    if (type_, number) == ("Convolution", 147):
        pytest.skip("NVCaffe's precision fields belong to every layer type")
    layer_ = only_layer(layer("x", "Threshold", _field_bytes(type_, number, payload)))
    assert set_fields(layer_) == {"name", "type"}
    assert forks.unknown_fork_fields(layer_) == [(number, 2)]


@pytest.mark.parametrize("case", BINARY_CASES, ids=_case_id)
def test_fork_caffemodel_round_trip(case, tmp_path):
    """Written back at the canonical number, and read back the same."""
    _, type_, number, payload, field, _ = case
    original = read(layer("x", type_, _field_bytes(type_, number, payload)))
    io.write_caffemodel(original, tmp_path / "again.caffemodel")
    assert io.read_caffemodel(tmp_path / "again.caffemodel") == original
    written = wire_numbers(written_layers(original, tmp_path)[0])
    declared = pb.LayerParameter.DESCRIPTOR.fields_by_name[field].number
    assert forks.write_number(pb.LayerParameter.DESCRIPTOR.fields_by_name[field],
                              ())[0] in written or field == "bn_param"
    assert all(n < forks.UNKNOWN_BASE for n in written), written
    assert declared < forks.PRIVATE_BASE or declared not in written


# --- the contested numbers, both ways --------------------------------------------------------

@pytest.mark.parametrize("number, readings", [
    (147, [("MarginInnerProduct", MIP, "margin_inner_product_param"),
           ("Swish", SWISH, "swish_param"),
           ("DetectionOutput", DETECTION, "detection_output_param"),
           ("ROIPooling", ROI, "roi_pooling_param"),
           ("DomainTransform", vint(1, 3), "domain_transform_param")]),
    (148, [("Clip", CLIP, "clip_param"), ("Permute", PERMUTE, "permute_param"),
           ("SmoothL1Loss", f32(1, 3), "smooth_l1_loss_param"),
           ("AdaptiveBiasChannel", vint(1, 2), "adaptive_bias_channel_param")]),
    (149, [("Normalize", NORM, "norm_param"), ("PSROIPooling", PSROI, "psroi_pooling_param"),
           ("BiasChannel", f32(1, 1), "bias_channel_param")]),
    (150, [("PriorBox", PRIOR, "prior_box_param"),
           ("BoxAnnotatorOHEM", OHEM, "box_annotator_ohem_param"),
           ("UniqueLabel", vint(1, 5), "unique_label_param")]),
    (10001, [("PSROIPooling", PSROI, "psroi_pooling_param"),
             ("MemoryData", b"com.yahoo.ml.caffe.ImageDataFrame", "source_class")]),
    (10002, [("PSROIPooling", PSROI, "psroi_pooling_param")]),
    (201, [("MultiBoxLoss", vint(4, 21), "multibox_loss_param"),
           ("Proposal", vint(1, 16), "proposal_param")]),
])
def test_contested_number_both_ways(number, readings):
    """One net holding the number in every layer type that claims it: each layer gets its
    own field, and no other."""
    net = read(*[layer(f"l{i}", type_, ld(number, payload))
                 for i, (type_, payload, _) in enumerate(readings)])
    for layer_, (type_, _, field) in zip(net.layer, readings):
        assert set_fields(layer_) == {"name", "type", field}, type_
        assert not forks.unknown_fork_fields(layer_)


def test_contested_varint_is_nvcaffe_precision():
    """147 as a varint is NVCaffe's forward_math in any layer, even a MarginInnerProduct."""
    layer_ = only_layer(layer("fc", "MarginInnerProduct", vint(147, pb.FLOAT16),
                              vint(145, pb.FLOAT16), vint(149, 1), vint(150, 2)))
    assert (layer_.forward_math, layer_.forward_type, layer_.debug,
            layer_.cudnn_math_override) == (pb.FLOAT16, pb.FLOAT16, True, 2)
    assert not layer_.HasField("margin_inner_product_param")


@pytest.mark.parametrize("type_, number, payload", [
    ("MarginInnerProduct", 147, b"\x0a\xff\xff"),      # a truncated sub-message
    ("DetectionOutput", 147, b"\xff\xff\xff\xff"),      # not protobuf at all
    ("PSROIPooling", 10001, b"\x0a\x05\x01"),
    ("Swish", 147, b"\x0d\x00\x00"),                    # a float cut short
    ("MemoryData", 10001, b"\xff\xfe not UTF-8"),       # source_class is a string
    ("AnnotatedData", 200, b"\x0a\x09\x0a"),
])
def test_field_that_does_not_fit_is_kept_unknown(type_, number, payload, tmp_path):
    """Never a 'corrupt file': the field is kept (and written back) as it was."""
    layer_ = only_layer(layer("x", type_, ld(number, payload), ld(3, "bottom")))
    assert set_fields(layer_) == {"name", "type", "bottom"}
    assert forks.unknown_fork_fields(layer_) == [(number, 2)]
    written = written_layers(read(layer("x", type_, ld(number, payload))), tmp_path)[0]
    assert dict(_walk(written))[number] == payload


def test_wire_type_that_does_not_fit_is_kept_unknown():
    layer_ = only_layer(layer("x", "PriorBox", vint(203, 5)))   # a varint where SSD has a message
    assert not layer_.HasField("prior_box_param")
    assert forks.unknown_fork_fields(layer_) == [(203, 0)]


def test_our_old_numbers_are_not_misread():
    """Files written before our own fields moved: 10000 and 10001 are R-FCN's and
    CaffeOnSpark's now; in our layers they stay unknown."""
    net = read(layer("head", "MarginHead", ld(10000, vint(1, 7))),
               layer("loss", "SoftmaxDiffLoss", ld(10001, vint(1, 2))))
    for layer_ in net.layer:
        assert set_fields(layer_) == {"name", "type"}
    assert forks.unknown_fork_fields(net.layer[0]) == [(10000, 2)]


# --- nested numbers: read as the fork the net comes from -------------------------------------

def test_ssd_transform_param():
    """SSD's AnnotatedData: TransformationParameter 8-14 are SSD's augmentation."""
    transform = ld(8, f32(1, 1) + vint(2, 1) + vint(3, 300) + vint(4, 300)) \
        + ld(13, f32(1, 0.5) + f32(2, 32)) + ld(14, f32(1, 0.5) + f32(2, 4)) \
        + ld(10, vint(1, 0)) + vint(11, 300) + vint(12, 300)
    layer_ = only_layer(layer("data", "AnnotatedData", ld(100, transform),
                              ld(200, ld(2, "labelmap.prototxt"))))
    t = layer_.transform_param
    assert (t.resize_param.height, t.distort_param.brightness_delta,
            t.expand_param.max_expand_ratio, t.crop_h, t.crop_w) == (300, 32, 4, 300, 300)
    assert t.HasField("emit_constraint")
    assert not forks.unknown_fork_fields(t)


def test_nvcaffe_transform_param():
    """NVCaffe: 8-14 are its own fields and SSD's are at 208-214; an NVCaffe net says so
    (here by its NetParameter fields)."""
    transform = vint(8, 1) + vint(9, 7) + vint(10, 256) + vint(11, 480) + f32(12, 0.75) \
        + ld(208, f32(1, 1) + vint(3, 300)) + vint(211, 224) + vint(21, 1)
    net = read(layer("data", "Data", ld(100, transform)),
               net_fields=vint(11, pb.FLOAT16) + f32(15, 32))
    t = net.layer[0].transform_param
    assert (t.use_gpu_transform, t.random_seed, t.img_rand_resize_lower,
            t.img_rand_resize_upper, t.rand_resize_ratio_lower) == (True, 7, 256, 480, 0.75)
    assert (t.resize_param.height, t.crop_h, t.forward_packing) == (300, 224, pb.NHWC)
    assert net.default_forward_type == pb.FLOAT16 and net.global_grad_scale == 32


def test_deeplab_transform_and_image_data():
    """DeepLab's TransformationParameter 8-10 and ImageDataParameter 15-16, in a net its
    Interp layer marks."""
    net = read(layer("data", "ImageSegData",
                     ld(100, f32(8, 0.5) + f32(8, 1.0) + vint(9, 321) + vint(10, 321)),
                     ld(115, ld(1, "list.txt") + vint(15, 255) + vint(16, 2))),
               layer("shrink", "Interp", ld(143, vint(4, 8))))
    t, image = net.layer[0].transform_param, net.layer[0].image_data_param
    assert (list(t.scale_factors), t.crop_width, t.crop_height) == ([0.5, 1.0], 321, 321)
    assert (image.ignore_label, image.label_type) == (255, pb.ImageDataParameter.PIXEL)


def _opencv_numbered() -> bytes:
    """An SSD head as OpenCV's schema numbers it (DetectionOutput 147, PriorBox 150), with
    OpenCV's own sub-fields and its bool ceil_mode at PoolingParameter 13."""
    return (ld(1, "opencv")
            + layer("pool", "Pooling", ld(121, vint(1, 0) + vint(2, 3) + vint(13, 0)))
            + layer("prior", "PriorBox", ld(150, PRIOR + f32(16, 8) + f32(17, 16)))
            + layer("det", "DetectionOutput", ld(147, DETECTION + vint(10, 0) + vint(1000, 1))))


def test_opencv_numbering(tmp_path):
    net = io.parse_caffemodel(_opencv_numbered())
    pool, prior, det = net.layer
    assert pool.pooling_param.round_mode == pb.PoolingParameter.FLOOR  # ceil_mode: false
    assert (list(prior.prior_box_param.width), list(prior.prior_box_param.height)) == ([8], [16])
    check_prior(prior)
    check_detection(det)
    p = det.detection_output_param
    assert p.HasField("normalized_bbox") and not p.normalized_bbox and p.clip
    assert not p.HasField("visualize")
    # SSD's own numbering: 10 is visualize there.
    ssd = only_layer(layer("det", "DetectionOutput", ld(204, DETECTION + vint(10, 1))))
    assert ssd.detection_output_param.visualize
    assert not ssd.detection_output_param.HasField("normalized_bbox")
    # Written back: OpenCV's sub-fields keep the DetectionOutput at OpenCV's 147.
    layers = written_layers(net, tmp_path)
    assert 147 in wire_numbers(layers[2]) and 204 not in wire_numbers(layers[2])
    io.write_caffemodel(net, tmp_path / "again.caffemodel")
    assert io.read_caffemodel(tmp_path / "again.caffemodel") == net


def test_nvcaffe_ssd_transform_written_at_nvcaffe_numbers(tmp_path):
    """An NVCaffe net keeps NVCaffe's numbers for SSD's augmentation (208-214)."""
    transform = vint(8, 1) + ld(208, f32(1, 1) + vint(3, 300)) + vint(211, 224)
    net = read(layer("data", "AnnotatedData", ld(100, transform), ld(200, ld(2, "m.txt")),
                     vint(145, pb.FLOAT16)),
               net_fields=vint(11, pb.FLOAT16))
    t = net.layer[0].transform_param
    assert (t.use_gpu_transform, t.resize_param.height, t.crop_h) == (True, 300, 224)
    layer_ = written_layers(net, tmp_path)[0]
    assert sorted(wire_numbers(layer_, (100,))) == [8, 208, 211]
    io.write_caffemodel(net, tmp_path / "again.caffemodel")
    assert io.read_caffemodel(tmp_path / "again.caffemodel") == net


def test_nested_number_without_a_fork_to_tell_stays_unknown():
    """DropoutParameter 2 is a bool in Faster R-CNN, SegNet and NVCaffe alike: in a net that
    shows no fork it is kept unknown."""
    dropout = only_layer(layer("drop", "Dropout", ld(108, f32(1, 0.5) + vint(2, 1))))
    assert set_fields(dropout.dropout_param) == {"dropout_ratio"}
    assert forks.unknown_fork_fields(dropout.dropout_param) == [(2, 0)]
    # In a Faster R-CNN net (its ROIPooling layer) it is scale_train.
    net = read(layer("pool5", "ROIPooling", ld(8266711, ROI)),
               layer("drop", "Dropout", ld(108, f32(1, 0.5) + vint(2, 0))))
    assert net.layer[1].dropout_param.HasField("scale_train")
    assert not net.layer[1].dropout_param.scale_train


def test_loss_param_by_fork():
    """LossParameter 3: BVLC's normalization; in an R-FCN net R-FCN's (PRE_FIXED 3, NONE 4);
    in a SegNet net weight_by_label_freqs, with class_weighting at 4."""
    loss = layer("loss", "SoftmaxWithLoss", ld(101, vint(3, 3)))
    assert read(loss).layer[0].loss_param.normalization == pb.LossParameter.NONE
    rfcn = read(layer("ps", "PSROIPooling", ld(10001, PSROI)),
                layer("loss", "SoftmaxWithLoss", ld(101, vint(3, 3) + f32(4, 128))),
                layer("loss2", "SoftmaxWithLoss", ld(101, vint(3, 4))))
    assert rfcn.layer[1].loss_param.normalization == pb.LossParameter.PRE_FIXED
    assert rfcn.layer[1].loss_param.pre_fixed_normalizer == 128
    assert rfcn.layer[2].loss_param.normalization == pb.LossParameter.NONE
    segnet = read(layer("up", "Upsample", ld(137, vint(1, 2))),
                  layer("loss", "SoftmaxWithLoss",
                        ld(101, vint(3, 1) + f32(4, 0.25) + f32(4, 0.5))))
    loss_param = segnet.layer[1].loss_param
    assert loss_param.weight_by_label_freqs and not loss_param.HasField("normalization")
    assert list(loss_param.class_weighting) == [0.25, 0.5]


def test_rfcn_normalization_written_with_rfcn_values(tmp_path):
    """In an R-FCN net PRE_FIXED is written as R-FCN's 3 and NONE as its 4; elsewhere NONE is
    BVLC's 3."""
    text = PROTOTXTS[forks.RFCN] + (
        'layer { name: "loss2" type: "SoftmaxWithLoss" bottom: "a" bottom: "b" top: "l2"\n'
        '        loss_param { normalization: NONE } }\n')
    net = io.parse_prototxt(text)
    layers = written_layers(net, tmp_path)
    assert dict(_walk(dict(_walk(layers[2]))[101]))[3] == varint(3)      # PRE_FIXED
    assert dict(_walk(dict(_walk(layers[3]))[101]))[3] == varint(4)      # NONE
    io.write_caffemodel(net, tmp_path / "rfcn.caffemodel")
    assert io.read_caffemodel(tmp_path / "rfcn.caffemodel") == net
    bvlc = io.parse_prototxt('layer { name: "l" type: "SoftmaxWithLoss" bottom: "a" '
                             'bottom: "b" top: "l" loss_param { normalization: NONE } }')
    layer_ = written_layers(bvlc, tmp_path)[0]
    assert dict(_walk(dict(_walk(layer_))[101]))[3] == varint(3)


def test_bn_param_written_as_its_fork(tmp_path):
    """SegNet's and PSPNet's bn_param are one field of ours; each is written back at its
    fork's number with its fork's sub-field numbers."""
    segnet = read(layer("bn", "BN", ld(45, vint(3, 1) + ld(1, filler("constant")))))
    pspnet = read(layer("bn", "BN", ld(152, ld(1, filler("constant")) + f32(3, 0.95))))
    segnet_written = written_layers(segnet, tmp_path)[0]
    pspnet_written = written_layers(pspnet, tmp_path)[0]
    assert wire_numbers(segnet_written) == [1, 2, 45]
    assert wire_numbers(segnet_written, (45,)) == [1, 3]
    assert wire_numbers(pspnet_written) == [1, 2, 152]
    assert wire_numbers(pspnet_written, (152,)) == [1, 3]


def test_sphereface_written_at_147(tmp_path):
    """A SphereFace caffemodel we write has 147 in its MarginInnerProduct layers."""
    net = pb.NetParameter(name="sphereface")
    head = net.layer.add(name="fc6", type="MarginInnerProduct")
    head.margin_inner_product_param.num_output = 10
    head.margin_inner_product_param.type = pb.MarginInnerProductParameter.QUADRUPLE
    head.blobs.append(io.array_to_blob(np.ones((10, 4), np.float32)))
    written = written_layers(net, tmp_path)[0]
    assert wire_numbers(written) == [1, 2, 7, 147]
    assert wire_numbers(written, (147,)) == [1, 2]


# --- CaffeOnSpark: yahoo/open_nsfw's model -----------------------------------------------------

def _open_nsfw_like() -> bytes:
    """The shape of open_nsfw's caffemodel: a CaffeOnSpark MemoryData layer with the JVM
    source class at LayerParameter 10001, then layers with weights."""
    memory = vint(1, 64) + vint(2, 3) + vint(3, 224) + vint(4, 224) + vint(10000, 0) \
        + ld(10001, "hdfs:///nsfw/train") + ld(10002, "data") + ld(10002, "label")
    transform = f32(1, 1) + vint(2, 1) + vint(3, 224) + f32(5, 104) + f32(5, 117) \
        + f32(5, 123)
    return ld(1, "ResNet_50_1by2_nsfw") + (
        layer("data", "MemoryData", ld(4, "data"), ld(4, "label"),
              ld(8, vint(1, 0)),                                    # include { phase: TRAIN }
              ld(100, transform), ld(10001, "com.yahoo.ml.caffe.ImageDataFrame"),
              ld(119, memory))
        + layer("conv_1", "Convolution", ld(3, "data"), ld(4, "conv_1"),
                blob(2, 3, 1, 1), blob(2), ld(106, vint(1, 2) + vint(4, 1)))
        + layer("fc_nsfw", "InnerProduct", ld(3, "conv_1"), ld(4, "fc_nsfw"),
                blob(2, 2), ld(117, vint(1, 2))))


def test_open_nsfw_like_model_loads(tmp_path):
    path = tmp_path / "resnet_50_1by2_nsfw.caffemodel"
    path.write_bytes(_open_nsfw_like())
    net = io.read_caffemodel(path)
    data = net.layer[0]
    assert data.source_class == "com.yahoo.ml.caffe.ImageDataFrame"
    memory = data.memory_data_param
    assert (memory.batch_size, memory.share_in_parallel, memory.source,
            list(memory.dataframe_column_select)) == (64, False, "hdfs:///nsfw/train",
                                                      ["data", "label"])
    assert io.blob_shape(net.layer[1].blobs[0]) == (2, 3, 1, 1)
    lazy, blobs = io.read_caffemodel_blobs(path)
    assert lazy.layer[0].source_class == data.source_class
    np.testing.assert_array_equal(blobs["fc_nsfw"][0].read(), np.arange(4).reshape(2, 2))
    io.write_caffemodel(net, tmp_path / "again.caffemodel")
    again = (tmp_path / "again.caffemodel").read_bytes()
    first = [payload for number, payload in _walk(again) if number == 100][0]
    assert dict(_walk(first))[10001] == b"com.yahoo.ml.caffe.ImageDataFrame"


# --- NVCaffe's raw blobs ---------------------------------------------------------------------

def _raw_blob(values: np.ndarray, raw_type, dims=None) -> bytes:
    dims = values.shape if dims is None else dims
    shape = ld(7, ld(1, b"".join(varint(d) for d in dims)))
    return ld(7, shape + vint(10, raw_type) + ld(12, values.tobytes()))


def test_float16_raw_data(tmp_path):
    weights = (np.arange(12, dtype=np.float32).reshape(3, 4) / 8 - 0.5).astype("<f2")
    bias = np.array([0.5, -1, 2], "<f4")
    path = tmp_path / "nvcaffe.caffemodel"
    path.write_bytes(ld(1, "nv") + vint(11, pb.FLOAT16) + layer(
        "fc", "InnerProduct", _raw_blob(weights, pb.FLOAT16), _raw_blob(bias, pb.FLOAT),
        vint(145, pb.FLOAT16), ld(117, vint(1, 3))))
    net = io.read_caffemodel(path)
    array = io.blob_to_array(net.layer[0].blobs[0])
    assert array.dtype == np.float32 and array.shape == (3, 4)
    np.testing.assert_array_equal(array, weights.astype(np.float32))
    np.testing.assert_array_equal(io.blob_to_array(net.layer[0].blobs[1]), bias)

    _, blobs = io.read_caffemodel_blobs(path)
    stored = blobs["fc"][0]
    assert stored.dtype == np.float32 and stored.shape == (3, 4)
    np.testing.assert_array_equal(stored.read(), weights.astype(np.float32))
    out = np.zeros(12, np.float32)
    assert stored.read(out=out) is out
    np.testing.assert_array_equal(out, weights.astype(np.float32).ravel())
    np.testing.assert_array_equal(blobs["fc"][1].read(), bias)


def test_double_raw_data_and_binaryproto(tmp_path):
    values = np.linspace(-1, 1, 6).reshape(2, 3).astype("<f8")
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(_raw_blob(values, pb.DOUBLE)[2:])  # the BlobProto without its key
    array = io.read_binaryproto(path)
    assert array.dtype == np.float64
    np.testing.assert_array_equal(array, values)
    halves = np.array([1, 2, 3], "<f2")
    assert io.parse_binaryproto(_raw_blob(halves, pb.FLOAT16)[2:]).dtype == np.float32


@pytest.mark.parametrize("blob_bytes, fragment", [
    (ld(7, ld(7, ld(1, varint(3))) + ld(12, b"\x00" * 5) + vint(10, pb.FLOAT16)),
     "raw_data of 5 bytes is not a whole number of FLOAT16 values"),
    (ld(7, ld(7, ld(1, varint(2))) + ld(12, b"\x00" * 4)), "raw_data without raw_data_type"),
    (ld(7, ld(7, ld(1, varint(4))) + ld(12, b"\x00" * 4) + vint(10, pb.BOOL)),
     "raw_data of type BOOL, which Caffe cannot read"),
    (ld(7, ld(7, ld(1, varint(3))) + ld(12, b"\x00" * 4) + vint(10, pb.FLOAT16)),
     "shape 3 needs 3 values but the file holds 2"),
])
def test_bad_raw_data(tmp_path, blob_bytes, fragment):
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(layer("fc", "InnerProduct", blob_bytes))
    for reader in (io.read_caffemodel, io.read_caffemodel_blobs):
        with pytest.raises(CaffeFormatError, match=fr"layer 'fc' \(InnerProduct\) blob 0: "
                                                   fr"{fragment}"):
            reader(path)


# --- a truly corrupt file says where ---------------------------------------------------------

def _three_layers() -> bytes:
    return (ld(1, "net") + layer("data", "Input", ld(4, "data"))
            + layer("conv2", "Convolution", ld(3, "data"), ld(4, "conv2"), blob(2, 3),
                    ld(106, vint(1, 2)))
            + layer("relu", "ReLU", ld(3, "conv2"), ld(4, "conv2")))


def _layer_offsets(data: bytes) -> list:
    offsets, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        length, pos = _read_varint(data, pos)
        if key >> 3 == 100:
            offsets.append(start)
        pos += length
    return offsets


@pytest.mark.parametrize("reader", [io.parse_caffemodel, "blobs"])
def test_corrupt_inside_a_layer(tmp_path, reader):
    """A broken sub-message deep in layer 1: the offset of the field that breaks, the layer."""
    data = bytearray(_three_layers())
    start = _layer_offsets(bytes(data))[1]
    shape_at = data.index(ld(7, ld(1, varint(2) + varint(3))), start)
    data[shape_at + 2] = 0x7F  # the BlobShape's packed dims now claim 127 bytes
    with pytest.raises(CaffeFormatError, match="do not parse") as info:
        if reader == "blobs":
            path = tmp_path / "corrupt.caffemodel"
            path.write_bytes(bytes(data))
            io.read_caffemodel_blobs(path)
        else:
            reader(bytes(data))
    message = str(info.value)
    assert f"in layer 1 'conv2' (Convolution) (which starts at byte {start})" in message
    offset = int(message.split("stopped at byte ")[1].split(",")[0])
    assert start < offset <= shape_at


def test_truncated_in_a_layer(tmp_path):
    data = _three_layers()
    start = _layer_offsets(data)[1]
    path = tmp_path / "truncated.caffemodel"
    path.write_bytes(data[:start + 30])
    with pytest.raises(CaffeFormatError, match="do not parse") as info:
        io.read_caffemodel(path)
    assert info.value.path == str(path)
    assert f"the parse stopped at byte {start}, in layer 1 'conv2' (Convolution)" \
        in str(info.value)


# --- the tables ----------------------------------------------------------------------------

def test_fork_of_type():
    assert forks.fork_of_type("PriorBox") == "SSD (weiliu89)"
    assert forks.fork_of_type("ROIPooling") == "Faster R-CNN"
    assert forks.fork_of_type("MarginInnerProduct") == "SphereFace"
    assert forks.fork_of_type("PSROIPooling") == "R-FCN"
    assert forks.fork_of_type("ShuffleChannel") == "ShuffleNet"
    assert forks.fork_of_type("Axpy") == "SENet"
    assert forks.fork_of_type("BN") == "SegNet / PSPNet"
    assert forks.fork_of_type("Interp") == "DeepLab v2 / PSPNet"
    assert forks.fork_of_type("DepthwiseConvolution") == forks.MOBILENET
    assert forks.fork_of_type("MarginHead") == "caffelayers"
    for bvlc in ("Convolution", "Swish", "Clip", "Input", "BatchNorm", "Foo"):
        assert forks.fork_of_type(bvlc) is None


def test_every_fork_type_has_its_fields_types():
    """Every layer field of the tables names the types that read it, and those are known."""
    for messages in forks.FIELD_NUMBERS.values():
        for name in messages.get("LayerParameter", {}):
            if name in forks.ANY_TYPE:
                continue
            for type_ in forks.PARAM_TYPES[name]:
                assert type_ in forks.TYPE_FORKS or forks.fork_of_type(type_) is None, type_


def test_schema_matches_the_tables():
    """Each table field is declared at its fork's number, or (contested) at the private
    number of the fork it comes from; no two fields share a private number's origin."""
    numbers_in_use = {}
    for messages in forks.FIELD_NUMBERS.values():
        for message, fields in messages.items():
            for name, number in fields.items():
                numbers_in_use.setdefault((message, number), set()).add(name)
    for messages in forks.FIELD_NUMBERS.values():
        for message, fields in messages.items():
            descriptor = pb.DESCRIPTOR.message_types_by_name[message]
            for name in fields:
                field = descriptor.fields_by_name[name]
                if field.number < forks.PRIVATE_BASE:
                    continue
                # Private: the number is contested (or, for bn_param, forks number the
                # field differently), and the field's origin is in its range.
                origin = forks.fork_of_number(field.number)
                assert forks.FIELD_NUMBERS[origin][message][name] == \
                    forks.canonical_number(field.number), (message, name)
                contested = numbers_in_use[(message, forks.canonical_number(field.number))]
                native = descriptor.fields_by_number.get(forks.canonical_number(field.number))
                numbers = {fields_.get(message, {}).get(name)
                           for fields_ in forks.FIELD_NUMBERS.values()} - {None}
                assert len(contested) > 1 or native is not None or len(numbers) > 1, \
                    (message, name)
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            if field.number >= forks.PRIVATE_BASE:
                origin = forks.fork_of_number(field.number)
                assert origin is not None and field.name in \
                    forks.FIELD_NUMBERS[origin][message.name], (message.name, field.name)
            assert not forks.UNKNOWN_BASE <= field.number < forks.PRIVATE_BASE


def test_our_own_numbers_are_no_forks():
    ours = {pb.LayerParameter.DESCRIPTOR.fields_by_name[name].number
            for name in ("margin_head_param", "softmax_diff_loss_param")}
    assert ours == {27182801, 27182802}
    for fork, messages in forks.FIELD_NUMBERS.items():
        if fork != forks.CAFFELAYERS:
            assert not ours & set(messages.get("LayerParameter", {}).values()), fork


def test_fork_fields_are_fully_known_in_text_round_trip(tmp_path):
    """Written as text and read again, every fork prototxt gives the same messages."""
    for fork, text in PROTOTXTS.items():
        net = io.parse_prototxt(text)
        io.write_prototxt(net, tmp_path / "net.prototxt")
        assert io.read_prototxt(tmp_path / "net.prototxt") == net, fork
        io.write_caffemodel(net, tmp_path / "net.caffemodel")
        again = io.read_caffemodel(tmp_path / "net.caffemodel")
        assert again == net, fork
        stack = [again]
        while stack:
            message = stack.pop()
            assert len(UnknownFieldSet(message)) == 0, (fork, type(message).__name__)
            for field, value in message.ListFields():
                if field.message_type is not None:
                    stack.extend(value if field.is_repeated else [value])
