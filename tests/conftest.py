"""Shared pytest fixtures."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use tiny tensors, where torch's thread pool only adds contention: on a shared
    2-core machine one float64 gradcheck took 12 s with threads and 0.05 s without."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cases_dir() -> Path:
    """The Caffe reference cases (fixtures/caffe)."""
    return ROOT / "fixtures" / "caffe"


def _conv(name, bottom, num_output, stride, first):
    """A SphereFace 3x3 convolution + PReLU, as in the published prototxts."""
    filler = 'type: "xavier"' if first else 'type: "gaussian" std: 0.01'
    bias_lr = 2 if first else 0
    return f"""layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: {bias_lr} decay_mult: 0 }}
  convolution_param {{ num_output: {num_output} kernel_size: 3 stride: {stride} pad: 1
    weight_filler {{ {filler} }} bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "relu{name[4:]}" type: "PReLU" bottom: "{name}" top: "{name}" }}
"""


def make_sphereface_prototxt(units=(1, 2, 4, 1), widths=(64, 128, 256, 512), fc5=512,
                             classes=10572, train=True, batch=256):
    """SphereFace-4/20/36/64 as the authors' prototxts write it (units per stage: 20-layer
    (1, 2, 4, 1), 64-layer (3, 8, 16, 3), 4-layer (0, 0, 0, 0)).

    TRAIN nets read ImageData (batch 256, 112x96 images known only from the data) and end
    in MarginInnerProduct + SoftmaxWithLoss; deploy nets use net-level input_dim.
    """
    name = f"SpherefaceNet-{4 + 2 * sum(units)}"
    if train:
        text = f'''name: "{name}"
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ mean_value: 127.5 mean_value: 127.5 mean_value: 127.5 scale: 0.0078125 mirror: true }}
  image_data_param {{ source: "CASIA-WebFace-112X96.txt" batch_size: {batch} shuffle: true }} }}
'''
    else:
        text = f'name: "{name}"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 112\ninput_dim: 96\n'
    bottom = "data"
    for stage, (count_, width) in enumerate(zip(units, widths), start=1):
        head = f"conv{stage}_1"
        text += _conv(head, bottom, width, 2, True)
        bottom = head
        for unit in range(count_):
            a, b = f"conv{stage}_{2 + 2 * unit}", f"conv{stage}_{3 + 2 * unit}"
            text += _conv(a, bottom, width, 1, False) + _conv(b, a, width, 1, False)
            res = f"res{stage}_{3 + 2 * unit}"
            text += (f'layer {{ name: "{res}" type: "Eltwise" bottom: "{bottom}" bottom: "{b}" '
                     f'top: "{res}" eltwise_param {{ operation: 1 }} }}\n')
            bottom = res
    text += f'''layer {{ name: "fc5" type: "InnerProduct" bottom: "{bottom}" top: "fc5"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: {fc5} weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "constant" value: 0 }} }} }}
'''
    if train:
        text += f'''layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: "label" top: "fc6" top: "lambda"
  param {{ lr_mult: 1 decay_mult: 1 }}
  margin_inner_product_param {{ num_output: {classes} type: QUADRUPLE weight_filler {{ type: "xavier" }}
    base: 1000 gamma: 0.12 power: 1 lambda_min: 5 iteration: 0 }} }}
layer {{ name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "softmax_loss" }}
'''
    return text


@pytest.fixture
def sphereface_prototxt():
    """The generator of SphereFace prototxts (see make_sphereface_prototxt)."""
    return make_sphereface_prototxt
