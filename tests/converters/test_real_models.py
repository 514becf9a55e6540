"""Real models: BVLC Caffe's model-zoo deploy nets and SphereFace's 20- and 64-layer deploy
nets convert to ONNX and to PyTorch source, and onnxruntime, the generated source and ``Net``
agree on a random input.

The prototxts come from the generators in ``conftest.py`` (the published topology; hidden
channels scaled by ``width``), the weights from their fillers with a fixed seed. ONNX is
compared on every blob of the net (each as its last value, after in-place layers), the
generated source on the net's outputs; where a softmax ends the net, its logits are checked to
spread, so that the probabilities are not a uniform or one-hot comparison.
"""

import numpy as np
import pytest
import torch
from caffelayers.converters.onnx import convert_to_onnx, run_onnx
from caffelayers.converters.pytorch import ConvertedNet

from caffelayers import Net
from caffelayers.graph import build_graph, load_net_param
from caffelayers.verify import compare

BVLC_MODELS = ("bvlc_alexnet", "bvlc_reference_caffenet", "bvlc_googlenet",
               "bvlc_reference_rcnn_ilsvrc13", "finetune_flickr_style")
# The classifier's blob, and the softmax's where the net has one.
HEADS = {
    "bvlc_alexnet": ("fc8", "prob"),
    "bvlc_reference_caffenet": ("fc8", "prob"),
    "bvlc_googlenet": ("loss3/classifier", "prob"),
    "bvlc_reference_rcnn_ilsvrc13": ("fc-rcnn", None),
    "finetune_flickr_style": ("fc8_flickr", "prob"),
}
REDUCED_WIDTH = 1 / 8
PIXEL_STD = 60.0  # BVLC nets read mean-subtracted 0..255 pixels; LRN is tuned to that scale


def build_net(tmp_path, text) -> Net:
    path = tmp_path / "deploy.prototxt"
    path.write_text(text)
    return Net(path, seed=0)


def random_input(net, scale, seed=1, uniform=False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = net.graph.blob_shapes["data"]
    if uniform:
        return (torch.rand(shape, generator=generator) * 2 - 1) * scale
    return torch.randn(shape, generator=generator) * scale


def assert_checks_pass(checks):
    failed = [str(check) for check in checks if check.error > check.tolerance or check.problem]
    assert not failed, "\n".join(failed)


def check_conversions(net, data):
    """Net against onnxruntime on every blob and against the generated source on the
    outputs; returns Net's blobs."""
    with torch.no_grad():
        expected = net(data=data)
    blobs = {name: value.clone() for name, value in net.blobs.items() if name != "data"}
    assert set(expected) <= set(blobs)

    model = convert_to_onnx(net, outputs=list(blobs))
    from_onnx = run_onnx(model, {"data": data.numpy()}, threads=1)
    assert set(from_onnx) == set(blobs)
    assert_checks_pass(compare(f"onnx {name}", from_onnx[name], blobs[name].numpy())
                       for name in blobs)

    with torch.no_grad():
        from_source = ConvertedNet(net, "pytorch-source")(data=data)
    assert set(from_source) == set(expected)
    assert_checks_pass(compare(f"source {name}", from_source[name], expected[name].numpy())
                       for name in expected)
    return blobs


def assert_informative_head(blobs, logits, prob):
    """Logits that vary over the classes, and a softmax that is neither uniform nor one-hot
    (either would hide a wrong logit in the probabilities)."""
    scores = blobs[logits]
    assert float(scores.std(dim=1).min()) > 0.5
    if prob is not None:
        top = blobs[prob].max(dim=1).values
        classes = scores.shape[1]
        assert float(top.min()) > 2.0 / classes and float(top.max()) < 0.99


@pytest.mark.parametrize("model", BVLC_MODELS)
def test_bvlc_deploy_reduced_width(model, bvlc_prototxt, tmp_path):
    """Published spatial sizes and topology, 1/8 of the channels, a batch of 2."""
    net = build_net(tmp_path, bvlc_prototxt(model, width=REDUCED_WIDTH, batch=2))
    blobs = check_conversions(net, random_input(net, PIXEL_STD))
    assert_informative_head(blobs, *HEADS[model])


def test_googlenet_full_size(bvlc_prototxt, tmp_path):
    """GoogLeNet at its published widths, one image (about 2.5 s; full-size AlexNet would take
    about 10 s, mostly serialising its 240 MB of weights for onnxruntime)."""
    net = build_net(tmp_path, bvlc_prototxt("bvlc_googlenet", batch=1))
    blobs = check_conversions(net, random_input(net, PIXEL_STD))
    assert blobs["inception_5b/output"].shape == (1, 1024, 7, 7)
    assert_informative_head(blobs, *HEADS["bvlc_googlenet"])


# Blob shapes of the published nets (batch 10) that Caffe reports, and their parameter counts
# (AlexNet's caffemodel holds 60,965,224 values); ceil-mode pooling makes GoogLeNet's 112 -> 56
# -> 28 -> 14 -> 7 chain, a floor would lose a row and column at each step.
PUBLISHED_SHAPES = {
    "bvlc_alexnet": {"conv1": (10, 96, 55, 55), "pool1": (10, 96, 27, 27),
                     "pool2": (10, 256, 13, 13), "pool5": (10, 256, 6, 6),
                     "fc8": (10, 1000), "prob": (10, 1000)},
    "bvlc_googlenet": {"pool1/3x3_s2": (10, 64, 56, 56), "pool2/3x3_s2": (10, 192, 28, 28),
                       "inception_3a/output": (10, 256, 28, 28),
                       "inception_3b/output": (10, 480, 28, 28),
                       "pool3/3x3_s2": (10, 480, 14, 14),
                       "inception_4e/output": (10, 832, 14, 14),
                       "pool4/3x3_s2": (10, 832, 7, 7),
                       "inception_5b/output": (10, 1024, 7, 7),
                       "pool5/7x7_s1": (10, 1024, 1, 1), "prob": (10, 1000)},
    "bvlc_reference_rcnn_ilsvrc13": {"norm1": (10, 96, 27, 27), "fc-rcnn": (10, 200)},
    "finetune_flickr_style": {"fc7": (10, 4096), "prob": (10, 20)},
}
PUBLISHED_PARAMETERS = {"bvlc_alexnet": 60_965_224, "bvlc_reference_caffenet": 60_965_224,
                        "bvlc_reference_rcnn_ilsvrc13": 60_965_224 - 4_097_000 + 819_400,
                        "finetune_flickr_style": 60_965_224 - 4_097_000 + 81_940,
                        "bvlc_googlenet": 6_998_552}


@pytest.mark.parametrize("model", BVLC_MODELS)
def test_generators_write_the_published_nets(model, bvlc_prototxt, tmp_path):
    """At full width the generated nets have the published shapes and parameter counts
    (built on the meta device: no memory, no fillers)."""
    path = tmp_path / "deploy.prototxt"
    path.write_text(bvlc_prototxt(model))
    net_param, _ = load_net_param(path, "TEST", 0, ())
    graph = build_graph(net_param)
    for blob, shape in PUBLISHED_SHAPES.get(model, {}).items():
        assert graph.blob_shapes[blob] == shape, blob
    parameters = sum(blob.numel() for node in graph.nodes for blob in node.module.caffe_blobs())
    assert parameters == PUBLISHED_PARAMETERS[model]
    assert graph.outputs == [HEADS[model][1] or HEADS[model][0]]


@pytest.mark.parametrize("units", [(1, 2, 4, 1), (3, 8, 16, 3)], ids=["sphereface20",
                                                                     "sphereface64"])
def test_sphereface_deploy(units, sphereface_prototxt, tmp_path):
    """SphereFace-20 and -64 deploy nets (PReLU, residual Eltwise sums, the fc5 feature) at a
    quarter of the published widths, on pixels scaled to [-1, 1] as the authors feed them."""
    text = sphereface_prototxt(units=units, widths=(16, 32, 64, 128), fc5=128, train=False)
    net = build_net(tmp_path, text)
    blobs = check_conversions(net, random_input(net, 1.0, uniform=True))
    feature = blobs["fc5"]
    assert feature.shape == (1, 128)
    assert float(feature.std()) > 1e-3 * float(np.abs(feature.numpy()).max())
