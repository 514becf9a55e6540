"""Generators of the deploy nets of BVLC Caffe's model zoo (``models/*/deploy.prototxt``).

Each generator writes the published topology and layer settings (layer and blob names,
kernels, strides, pads, groups, LRN, pooling, Dropout, Concat, in-place ReLUs, the Input
layer with the published 10 x 3 x H x W shape) so that the tests need no download. Two
things differ on purpose:

- ``width`` scales every hidden channel count (a classifier keeps its class count), so a test
  can run the real spatial sizes and topology at a fraction of the cost; counts are rounded to
  a multiple of the layer's ``group``.
- Every learned layer gets the same fillers, because most deploy files have none (Caffe's
  default is a constant 0) and the others' would leave the output independent of the input:
  ``msra`` weights (variance ``2 / fan_in``, which keeps the activations of a ReLU net at the
  input's scale, so LRN sees the magnitudes of mean-subtracted pixels) and ``gaussian`` biases;
  the classifier's weights are a small ``gaussian`` so the logits spread over a few units and
  the softmax is neither uniform nor one-hot.
"""

import pytest

HIDDEN_FILLERS = ('weight_filler { type: "msra" } '
                  'bias_filler { type: "gaussian" std: 1 }')
CLASSIFIER_STD = 0.001  # tuned on inputs of standard deviation 60: logits spread by 1 to 3


def _channels(count, width, group=1):
    """``count * width`` rounded to a positive multiple of ``group``."""
    return max(group, round(count * width / group) * group)


def _params(lr_mults):
    """The ``param`` blocks of a weight and bias with these lr_mults (Caffe's bias decay 0)."""
    if lr_mults is None:
        return ""
    weight, bias = lr_mults
    return (f"param {{ lr_mult: {weight} decay_mult: 1 }} "
            f"param {{ lr_mult: {bias} decay_mult: 0 }} ")


def _input(height, width, batch):
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: {batch} dim: 3 dim: {height} dim: {width} }} }} }}\n')


def _conv(name, bottom, num_output, kernel, stride=1, pad=0, group=1, lr_mults=(1, 2),
          top=None):
    settings = f"num_output: {num_output} kernel_size: {kernel}"
    settings += f" stride: {stride}" if stride != 1 else ""
    settings += f" pad: {pad}" if pad else ""
    settings += f" group: {group}" if group != 1 else ""
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" '
            f'top: "{top or name}" {_params(lr_mults)}'
            f'convolution_param {{ {settings} {HIDDEN_FILLERS} }} }}\n')


def _fc(name, bottom, num_output, lr_mults=(1, 2), classifier=False):
    fillers = (f'weight_filler {{ type: "gaussian" std: {CLASSIFIER_STD} }} '
               f'bias_filler {{ type: "gaussian" std: 1 }}' if classifier else HIDDEN_FILLERS)
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
            f'{_params(lr_mults)}inner_product_param {{ num_output: {num_output} {fillers} }} }}\n')


def _relu(name, blob):
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'


def _lrn(name, bottom):
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}" '
            f'lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}\n')


def _pool(name, bottom, kernel, stride, pad=0, method="MAX"):
    padding = f" pad: {pad}" if pad else ""
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
            f'pooling_param {{ pool: {method} kernel_size: {kernel} stride: {stride}{padding} }} }}\n')


def _dropout(name, blob, ratio):
    return (f'layer {{ name: "{name}" type: "Dropout" bottom: "{blob}" top: "{blob}" '
            f'dropout_param {{ dropout_ratio: {ratio} }} }}\n')


def _softmax(bottom):
    return f'layer {{ name: "prob" type: "Softmax" bottom: "{bottom}" top: "prob" }}\n'


def _alexnet_family(name, width, batch, *, norm_after_pool, lr_mults, classifier, classes,
                    classifier_lr=(1, 2), softmax=True):
    """AlexNet and the CaffeNet variants: five convolutions (2, 4 and 5 in two groups), LRN
    after the first two (AlexNet normalises before pooling, CaffeNet after), three
    InnerProducts with ReLU and Dropout 0.5 between them."""
    lr = (1, 2) if lr_mults else None
    text = f'name: "{name}"\n' + _input(227, 227, batch)

    def norm_and_pool(stage, conv):
        if norm_after_pool:
            return (_pool(f"pool{stage}", conv, 3, 2) + _lrn(f"norm{stage}", f"pool{stage}"),
                    f"norm{stage}")
        return _lrn(f"norm{stage}", conv) + _pool(f"pool{stage}", f"norm{stage}", 3, 2), \
            f"pool{stage}"

    text += _conv("conv1", "data", _channels(96, width), 11, stride=4, lr_mults=lr)
    text += _relu("relu1", "conv1")
    block, bottom = norm_and_pool(1, "conv1")
    text += block
    text += _conv("conv2", bottom, _channels(256, width, 2), 5, pad=2, group=2, lr_mults=lr)
    text += _relu("relu2", "conv2")
    block, bottom = norm_and_pool(2, "conv2")
    text += block
    text += _conv("conv3", bottom, _channels(384, width, 2), 3, pad=1, lr_mults=lr)
    text += _relu("relu3", "conv3")
    text += _conv("conv4", "conv3", _channels(384, width, 2), 3, pad=1, group=2, lr_mults=lr)
    text += _relu("relu4", "conv4")
    text += _conv("conv5", "conv4", _channels(256, width, 2), 3, pad=1, group=2, lr_mults=lr)
    text += _relu("relu5", "conv5")
    text += _pool("pool5", "conv5", 3, 2)
    bottom = "pool5"
    for stage in (6, 7):
        text += _fc(f"fc{stage}", bottom, _channels(4096, width), lr_mults=lr)
        text += _relu(f"relu{stage}", f"fc{stage}") + _dropout(f"drop{stage}", f"fc{stage}", 0.5)
        bottom = f"fc{stage}"
    text += _fc(classifier, bottom, classes, lr_mults=classifier_lr if lr_mults else None,
                classifier=True)
    return text + (_softmax(classifier) if softmax else "")


def make_alexnet(width=1.0, batch=10):
    """``bvlc_alexnet``: LRN before pooling, param blocks on every learned layer."""
    return _alexnet_family("AlexNet", width, batch, norm_after_pool=False, lr_mults=True,
                           classifier="fc8", classes=1000)


def make_caffenet(width=1.0, batch=10):
    """``bvlc_reference_caffenet``: AlexNet with pooling before LRN, no param blocks."""
    return _alexnet_family("CaffeNet", width, batch, norm_after_pool=True, lr_mults=False,
                           classifier="fc8", classes=1000)


def make_rcnn_ilsvrc13(width=1.0, batch=10):
    """``bvlc_reference_rcnn_ilsvrc13``: CaffeNet ending in ``fc-rcnn`` (200 scores, the
    detector's SVMs), with no softmax."""
    return _alexnet_family("R-CNN-ilsvrc13", width, batch, norm_after_pool=True,
                           lr_mults=False, classifier="fc-rcnn", classes=200, softmax=False)


def make_flickr_style(width=1.0, batch=10):
    """``finetune_flickr_style``: CaffeNet with param blocks and ``fc8_flickr`` (20 styles,
    lr_mult 10/20)."""
    return _alexnet_family("FlickrStyleCaffeNet", width, batch, norm_after_pool=True,
                           lr_mults=True, classifier="fc8_flickr", classes=20,
                           classifier_lr=(10, 20))


# GoogLeNet's inception modules: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTIONS = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}


def _inception(module, bottom, counts, width):
    """One inception module: four branches (1x1; 1x1 then 3x3; 1x1 then 5x5; 3x3 max pool
    with stride 1 then 1x1), each conv followed by an in-place ReLU, concatenated."""
    one, reduce3, three, reduce5, five, proj = (_channels(c, width) for c in counts)
    prefix = f"inception_{module}/"
    text = ""
    for conv, source, outputs, kernel in (("1x1", bottom, one, 1),
                                          ("3x3_reduce", bottom, reduce3, 1),
                                          ("3x3", prefix + "3x3_reduce", three, 3),
                                          ("5x5_reduce", bottom, reduce5, 1),
                                          ("5x5", prefix + "5x5_reduce", five, 5)):
        text += _conv(prefix + conv, source, outputs, kernel, pad=kernel // 2)
        text += _relu(f"{prefix}relu_{conv}", prefix + conv)
    text += _pool(prefix + "pool", bottom, 3, 1, pad=1)
    text += _conv(prefix + "pool_proj", prefix + "pool", proj, 1)
    text += _relu(prefix + "relu_pool_proj", prefix + "pool_proj")
    branches = " ".join(f'bottom: "{prefix}{b}"' for b in ("1x1", "3x3", "5x5", "pool_proj"))
    return text + (f'layer {{ name: "{prefix}output" type: "Concat" {branches} '
                   f'top: "{prefix}output" }}\n')


def make_googlenet(width=1.0, batch=10):
    """``bvlc_googlenet``: the stem (7x7/2 conv, ceil-mode 3x3/2 max pools whose last window
    hangs over the edge, LRN), nine inception modules, 7x7 average pool, Dropout 0.4, a
    1000-way classifier and softmax."""
    text = 'name: "GoogleNet"\n' + _input(224, 224, batch)
    text += _conv("conv1/7x7_s2", "data", _channels(64, width), 7, stride=2, pad=3)
    text += _relu("conv1/relu_7x7", "conv1/7x7_s2")
    text += _pool("pool1/3x3_s2", "conv1/7x7_s2", 3, 2)
    text += _lrn("pool1/norm1", "pool1/3x3_s2")
    text += _conv("conv2/3x3_reduce", "pool1/norm1", _channels(64, width), 1)
    text += _relu("conv2/relu_3x3_reduce", "conv2/3x3_reduce")
    text += _conv("conv2/3x3", "conv2/3x3_reduce", _channels(192, width), 3, pad=1)
    text += _relu("conv2/relu_3x3", "conv2/3x3")
    text += _lrn("conv2/norm2", "conv2/3x3")
    text += _pool("pool2/3x3_s2", "conv2/norm2", 3, 2)
    bottom = "pool2/3x3_s2"
    for module, counts in INCEPTIONS.items():
        if module in ("4a", "5a"):  # a 3x3/2 max pool between the stages
            pool = "pool3/3x3_s2" if module == "4a" else "pool4/3x3_s2"
            text += _pool(pool, bottom, 3, 2)
            bottom = pool
        text += _inception(module, bottom, counts, width)
        bottom = f"inception_{module}/output"
    text += _pool("pool5/7x7_s1", bottom, 7, 1, method="AVE")
    text += _dropout("pool5/drop_7x7_s1", "pool5/7x7_s1", 0.4)
    text += _fc("loss3/classifier", "pool5/7x7_s1", 1000, classifier=True)
    return text + _softmax("loss3/classifier")


GENERATORS = {
    "bvlc_alexnet": make_alexnet,
    "bvlc_reference_caffenet": make_caffenet,
    "bvlc_googlenet": make_googlenet,
    "bvlc_reference_rcnn_ilsvrc13": make_rcnn_ilsvrc13,
    "finetune_flickr_style": make_flickr_style,
}


def make_bvlc_prototxt(model, width=1.0, batch=10):
    """The deploy prototxt text of BVLC model ``model`` (a directory name of Caffe's
    ``models/``, a key of ``GENERATORS``) with hidden channels scaled by ``width``."""
    return GENERATORS[model](width=width, batch=batch)


@pytest.fixture
def bvlc_prototxt():
    """The generator of BVLC model-zoo deploy prototxts (see make_bvlc_prototxt)."""
    return make_bvlc_prototxt
