"""SphereFace nets as prototxt text, written the way the SphereFace authors' prototxts are.

SphereFace-N has four stages; each starts with a stride-2 3x3 convolution and adds residual
units of two 3x3 convolutions summed with their input (Eltwise SUM), every convolution
followed by an in-place PReLU; an InnerProduct gives the ``fc5`` feature. Training nets add
the A-Softmax head (MarginInnerProduct, QUADRUPLE, lambda ``1000 (1 + 0.12 it)^-1`` floored at
5) and SoftmaxWithLoss. Useful for tests, benchmarks and for trying other depths and widths.
"""

from __future__ import annotations

from typing import Optional, Sequence

#: residual units per stage for the published depths.
UNITS = {4: (0, 0, 0, 0), 20: (1, 2, 4, 1), 36: (2, 4, 8, 2), 64: (3, 8, 16, 3)}
WIDTHS = (64, 128, 256, 512)
IMAGE = (3, 112, 96)


def _conv(name: str, bottom: str, width: int, stride: int, head: bool) -> str:
    # The stage heads start from xavier with a learned bias, the residual convolutions from
    # N(0, 0.01) with a frozen one, as in the published prototxts.
    filler = 'type: "xavier"' if head else 'type: "gaussian" std: 0.01'
    return f"""layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: {2 if head else 0} decay_mult: 0 }}
  convolution_param {{ num_output: {width} kernel_size: 3 stride: {stride} pad: 1
    weight_filler {{ {filler} }} bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "relu{name[4:]}" type: "PReLU" bottom: "{name}" top: "{name}" }}
"""


def _data(train: bool, data_layer: str, batch: int) -> str:
    channels, height, width = IMAGE
    if not train:
        return "".join(['input: "data"\n'] + [f"input_dim: {d}\n" for d in (batch, *IMAGE)])
    if data_layer == "Input":
        return (f'layer {{ name: "data" type: "Input" top: "data" top: "label" input_param {{ '
                f'shape {{ dim: {batch} dim: {channels} dim: {height} dim: {width} }} '
                f'shape {{ dim: {batch} }} }} }}\n')
    return f"""layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ mean_value: 127.5 mean_value: 127.5 mean_value: 127.5 scale: 0.0078125 mirror: true }}
  image_data_param {{ source: "CASIA-WebFace-112X96.txt" batch_size: {batch} shuffle: true }} }}
"""


def sphereface_prototxt(units: Sequence[int] = UNITS[20], widths: Sequence[int] = WIDTHS,
                        fc5: int = 512, classes: int = 10572, train: bool = True,
                        batch: Optional[int] = None, data_layer: str = "ImageData") -> str:
    """The prototxt text of a SphereFace net.

    Args:
        units: residual units per stage (:data:`UNITS` has SphereFace-4/20/36/64).
        widths: channels of the four stages.
        fc5: size of the face feature.
        classes: identities of the A-Softmax head (training nets only).
        train: a training net (data, head, loss) or a deploy net (net-level ``input_dim``,
            ending at fc5, batch ``batch``).
        batch: the batch size (default: 256 for training, as the authors train, 1 to deploy).
        data_layer: for training nets, ``"ImageData"`` (as the authors train on CASIA-WebFace:
            the image size is known only from the images) or ``"Input"`` (data and label fed
            by the caller, 3x112x96 images).
    """
    batch = batch if batch is not None else (256 if train else 1)
    text = f'name: "SpherefaceNet-{4 + 2 * sum(units)}"\n' + _data(train, data_layer, batch)
    bottom = "data"
    for stage, (count, width) in enumerate(zip(units, widths), start=1):
        head = f"conv{stage}_1"
        text += _conv(head, bottom, width, 2, True)
        bottom = head
        for unit in range(count):
            first, second = f"conv{stage}_{2 + 2 * unit}", f"conv{stage}_{3 + 2 * unit}"
            text += _conv(first, bottom, width, 1, False) + _conv(second, first, width, 1, False)
            residual = f"res{stage}_{3 + 2 * unit}"
            text += (f'layer {{ name: "{residual}" type: "Eltwise" bottom: "{bottom}" '
                     f'bottom: "{second}" top: "{residual}" eltwise_param {{ operation: SUM }} }}\n')
            bottom = residual
    text += f"""layer {{ name: "fc5" type: "InnerProduct" bottom: "{bottom}" top: "fc5"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: {fc5} weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "constant" value: 0 }} }} }}
"""
    if train:
        text += f"""layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: "label" top: "fc6" top: "lambda"
  param {{ lr_mult: 1 decay_mult: 1 }}
  margin_inner_product_param {{ num_output: {classes} type: QUADRUPLE weight_filler {{ type: "xavier" }}
    base: 1000 gamma: 0.12 power: 1 lambda_min: 5 iteration: 0 }} }}
layer {{ name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "softmax_loss" }}
"""
    return text
