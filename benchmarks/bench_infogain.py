"""Time SoftmaxWithInfogainLoss against torch.nn.functional.cross_entropy (forward + backward).

Every row is a ratio to cross_entropy measured in the same run, on the same inputs, so the
numbers compare across machines. Targets (issue 6): <= 1.5x for the exact infogain loss in
classification (N=512, C=1000) and segmentation (N=8, C=21, 256x256).

    python benchmarks/bench_infogain.py [--device cpu|cuda] [--repeat 30] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import add_options, apply_options, median_times

from caffelayers.losses.infogain import softmax_infogain_loss, softmax_loss

SHAPES = {
    "classification N=512 C=1000": (512, 1000),
    "segmentation N=8 C=21 256x256": (8, 21, 256, 256),
}


def contenders(logits, labels, H, H_learned, ignore):
    """Name -> one forward + backward, the baseline first."""
    float_labels = labels.to(logits.dtype)  # Caffe's labels are floats; converting is ours to pay

    def backward(loss):
        loss.backward()
        logits.grad = None
        H_learned.grad = None

    return {
        "F.cross_entropy (baseline)": lambda: backward(F.cross_entropy(logits, labels)),
        "infogain exact": lambda: backward(softmax_infogain_loss(logits, float_labels, H)),
        "infogain caffe": lambda: backward(
            softmax_infogain_loss(logits, float_labels, H, mode="caffe")),
        "infogain exact, learned H": lambda: backward(
            softmax_infogain_loss(logits, float_labels, H_learned)),
        "infogain exact, ignore_label": lambda: backward(
            softmax_infogain_loss(logits, ignore, H, ignore_label=0)),
        "softmax_loss exact": lambda: backward(softmax_loss(logits, float_labels)),
        "softmax_loss caffe": lambda: backward(softmax_loss(logits, float_labels, mode="caffe")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, repeat=30)
    args = parser.parse_args()
    device, clock = apply_options(parser, args)
    generator = torch.Generator().manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, median of {args.repeat}; ratio = time / F.cross_entropy time")
    for title, shape in SHAPES.items():
        classes = shape[1]
        label_shape = (shape[0],) + shape[2:]
        logits = torch.randn(shape, generator=generator).mul_(3).to(device).requires_grad_()
        labels = torch.randint(classes, label_shape, generator=generator).to(device)
        ignore = labels.to(logits.dtype)  # about 1 in C positions carry the ignore label 0
        H = torch.rand(classes, classes, generator=generator).to(device)
        H_learned = H.clone().requires_grad_()
        results = median_times(contenders(logits, labels, H, H_learned, ignore), args.repeat,
                               device, clock)
        baseline = results["F.cross_entropy (baseline)"]
        print(f"\n{title}")
        print(f"  {'contender':32s} {'ms':>8s} {'ratio':>7s}")
        for name, seconds in results.items():
            print(f"  {name:32s} {seconds * 1e3:8.2f} {seconds / baseline:7.2f}")


if __name__ == "__main__":
    main()
