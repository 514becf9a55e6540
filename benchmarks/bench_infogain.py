"""Time SoftmaxWithInfogainLoss against torch.nn.functional.cross_entropy (forward + backward),
at each thread count asked for.

Every row is a ratio to ``F.cross_entropy`` (integer labels) measured in the same run, in
interleaved rounds, on the same logits, so the numbers compare across machines. The
infogain loss runs with integer labels and with float labels (Caffe's: the label blob holds
floats), in both modes. Goal (issue 18): <= 1.5x for the exact loss with a dense H in
classification (N=512, C=1000), both label dtypes, at one thread and at all cores.

The floor with a dense H: cross-entropy reads one log-probability per row, while the
infogain loss weighs every log-probability by the label's row of H. Its forward gathers
those rows (an extra N x C read of H and write) and takes their dot product with the
log-probabilities (another N x C read); its backward works over the rows again in the fused
log-softmax backward, written over the gathered rows on the CPU. Cross-entropy's own work
is about three N x C passes, the infogain loss's about five; but a new N x C tensor costs
its page faults, which both pay per tensor, so at one thread the ratio can fall below 1.

    python benchmarks/bench_infogain.py                     # 1 thread and all cores
    python benchmarks/bench_infogain.py --quick             # classification only, 3 rounds
    python benchmarks/bench_infogain.py --threads 1 --clock cpu
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
QUICK_SHAPES = ("classification N=512 C=1000",)
BASELINE = "F.cross_entropy (baseline)"
#: seconds of calls per timed sample: a classification call lasts 2 ms
MIN_SAMPLE = 0.05


def contenders(logits, labels, H, H_learned):
    """Name -> one forward + backward, the baseline first."""
    float_labels = labels.to(logits.dtype)  # Caffe's labels are floats
    ignore = float_labels  # about 1 in C positions carry the ignore label 0

    def backward(loss):
        loss.backward()
        logits.grad = None
        H_learned.grad = None

    return {
        BASELINE: lambda: backward(F.cross_entropy(logits, labels)),
        "infogain exact, int labels": lambda: backward(
            softmax_infogain_loss(logits, labels, H)),
        "infogain exact, float labels": lambda: backward(
            softmax_infogain_loss(logits, float_labels, H)),
        "infogain caffe, int labels": lambda: backward(
            softmax_infogain_loss(logits, labels, H, mode="caffe")),
        "infogain caffe, float labels": lambda: backward(
            softmax_infogain_loss(logits, float_labels, H, mode="caffe")),
        "infogain exact, learned H": lambda: backward(
            softmax_infogain_loss(logits, float_labels, H_learned)),
        "infogain exact, ignore_label": lambda: backward(
            softmax_infogain_loss(logits, ignore, H, ignore_label=0)),
        "softmax_loss exact": lambda: backward(softmax_loss(logits, float_labels)),
        "softmax_loss caffe": lambda: backward(softmax_loss(logits, float_labels, mode="caffe")),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, repeat=30)
    args = parser.parse_args(argv)
    device, clock, threads = apply_options(parser, args)
    print(f"torch {torch.__version__}, {device}, {args.clock} clock, median of {args.repeat} "
          f"interleaved rounds of at least {MIN_SAMPLE * 1e3:.0f} ms of calls, float32, dense "
          "H; ratio = time / F.cross_entropy time; goal: exact <= 1.5")
    print("| threads | case | contender | ms | x cross_entropy |")
    print("|---|---|---|---|---|")
    for count in threads:
        torch.set_num_threads(count)
        for title in (QUICK_SHAPES if args.quick else SHAPES):
            shape = SHAPES[title]
            generator = torch.Generator().manual_seed(0)
            classes = shape[1]
            label_shape = (shape[0],) + shape[2:]
            logits = torch.randn(shape, generator=generator).mul_(3).to(device)
            logits.requires_grad_()
            labels = torch.randint(classes, label_shape, generator=generator).to(device)
            H = torch.rand(classes, classes, generator=generator).to(device)
            H_learned = H.clone().requires_grad_()
            results = median_times(contenders(logits, labels, H, H_learned), args.repeat,
                                   device, clock, min_sample=MIN_SAMPLE)
            for name, seconds in results.items():
                print(f"| {count} | {title} | {name} | {seconds * 1e3:.2f} | "
                      f"{seconds / results[BASELINE]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
