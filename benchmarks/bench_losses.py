"""Time the softmax-loss family around A-Softmax against torch.nn.functional.cross_entropy
(forward + backward), at each thread count asked for (``--threads``, default ``1,all``).

Every row is a ratio to ``F.cross_entropy(logits, labels)`` measured in the same run, on
inputs of the same shape, in interleaved rounds (a load change on the machine hits every
contender alike), so the numbers compare across machines. Where a straightforward autograd
version of the same loss exists, its ratio is printed too: that is what the hand-written
backward saves. The margin heads are timed by ``bench_margin.py`` (against the product).

    python benchmarks/bench_losses.py [--device cpu|cuda] [--repeat 15] [--threads 1,all]
    python benchmarks/bench_losses.py --quick                    # classification, 3 rounds
    python benchmarks/bench_losses.py --threads 1 --clock cpu    # steadier on a busy CPU
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import add_options, apply_options, median_times

from caffelayers.losses.distillation import cwtm_loss, distillation_loss, dkpp_loss
from caffelayers.losses.distribution import softmax_diff_loss
from caffelayers.losses.sv_softmax import sv_softmax_loss

SHAPES = {
    "classification N=512 C=1000": (512, 1000),
    "segmentation N=8 C=21 128x128": (8, 21, 128, 128),
}
QUICK_SHAPES = ("classification N=512 C=1000",)


# -- straightforward autograd versions, for comparison ------------------------------------
def autograd_sv_softmax(cos, labels, s, t, m):
    """SV-AM-Softmax on the full matrix: a mask, a boost, a one-hot margin."""
    column = labels.unsqueeze(1)
    label_value = cos.gather(1, column) - m
    mask = (cos > label_value).scatter(1, column, False)
    logits = s * cos + mask * (s * (t - 1) * (cos + 1))
    logits = logits.scatter(1, column, s * label_value)
    return F.cross_entropy(logits, labels)


def autograd_softmax_diff(x, target, mode):
    p = torch.softmax(x, 1)
    if mode == "L2":
        return 0.5 * (p - target).square().sum()
    return (p - target).abs().sum()


def autograd_kd(student, teacher, labels, T, alpha):
    soft = F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher / T, 1),
                    reduction="batchmean") * T * T
    return alpha * soft + (1 - alpha) * F.cross_entropy(student, labels)


def contenders(shape, device, generator):
    """``{name: (ours, autograd or None)}``, each a forward + backward; the baseline first."""
    classes = shape[1]
    positions = (shape[0],) + tuple(shape[2:])
    logits = torch.randn(shape, device=device, generator=generator).requires_grad_()
    cos = (torch.rand(shape, device=device, generator=generator) * 2 - 1).requires_grad_()
    labels = torch.randint(0, classes, positions, device=device, generator=generator)
    teacher = torch.randn(shape, device=device, generator=generator)
    target = torch.softmax(torch.randn(shape, device=device, generator=generator) * 2, 1)
    per_sample = target.reshape(shape[0], classes, -1)[..., 0].contiguous()
    binary = torch.rand(shape, device=device, generator=generator)
    permutations = torch.Generator(device=device).manual_seed(0)

    def run(loss_fn, leaf):
        def step():
            loss_fn().backward()
            leaf.grad = None
        return step

    rows = {"F.cross_entropy (baseline)": (run(lambda: F.cross_entropy(logits, labels),
                                                logits), None)}
    for name, margin, m in [("none", "none", 0.0), ("AM m=0.35", "am", 0.35),
                            ("Arc m=0.5", "arc", 0.5), ("Sphere m=4", "sphere", 4)]:
        ours = run(lambda margin=margin, m=m: sv_softmax_loss(cos, labels, 30.0, 1.2, margin,
                                                              m), cos)
        naive = run(lambda: autograd_sv_softmax(cos, labels, 30.0, 1.2, 0.35), cos) \
            if margin == "am" else None
        rows[f"sv_softmax_loss {name}, t=1.2"] = (ours, naive)
    rows["sv_softmax_loss t=1 (plain)"] = (run(lambda: sv_softmax_loss(cos, labels, 30.0),
                                               cos), None)
    for mode in ("L1", "L2"):
        rows[f"softmax_diff_loss {mode}"] = (
            run(lambda mode=mode: softmax_diff_loss(logits, target, mode), logits),
            run(lambda mode=mode: autograd_softmax_diff(logits, target, mode), logits))
    rows["softmax_diff_loss MI"] = (run(lambda: softmax_diff_loss(logits, target, "MI"),
                                        logits), None)
    rows["softmax_diff_loss MI T=4"] = (
        run(lambda: softmax_diff_loss(logits, target, "MI", 4.0), logits), None)
    if len(shape) > 2:
        rows["softmax_diff_loss MI, target per sample"] = (
            run(lambda: softmax_diff_loss(logits, per_sample, "MI"), logits), None)
    rows["softmax_diff_loss multilabel MI T=2"] = (
        run(lambda: softmax_diff_loss(logits, binary, "MI", 2.0, "multilabel"), logits), None)
    rows["softmax_diff_loss multilabel L1"] = (
        run(lambda: softmax_diff_loss(logits, binary, "L1", style="multilabel"), logits), None)
    rows["distillation_loss T=4, labels"] = (
        run(lambda: distillation_loss(logits, teacher, 4.0, 0.9, labels), logits),
        run(lambda: autograd_kd(logits, teacher, labels, 4.0, 0.9), logits)
        if len(shape) == 2 else None)
    rows["distillation_loss T=4, no labels"] = (
        run(lambda: distillation_loss(logits, teacher, 4.0), logits), None)
    rows["cwtm_loss"] = (run(lambda: cwtm_loss(logits, teacher, labels), logits), None)
    rows["dkpp_loss T=4, labels"] = (
        run(lambda: dkpp_loss(logits, teacher, 4.0, 0.9, labels, permutations), logits), None)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, repeat=15)
    args = parser.parse_args(argv)
    device, clock, threads = apply_options(parser, args)
    print(f"torch {torch.__version__}, {device}, {args.clock} clock, median of {args.repeat} "
          "interleaved rounds, float32, forward + backward")
    print("| threads | case | loss | ms | x cross_entropy | autograd version x cross_entropy |")
    print("|---|---|---|---|---|---|")
    for count in threads:
        torch.set_num_threads(count)
        for case in (QUICK_SHAPES if args.quick else SHAPES):
            generator = torch.Generator(device=device).manual_seed(0)
            rows = contenders(SHAPES[case], device, generator)
            steps = {}
            for name, (ours, naive) in rows.items():
                steps[name] = ours
                if naive is not None:
                    steps[name + " (autograd)"] = naive
            times = median_times(steps, args.repeat, device, clock)
            baseline = times["F.cross_entropy (baseline)"]
            for name, (_, naive) in rows.items():
                autograd = (f"{times[name + ' (autograd)'] / baseline:.2f}" if naive is not None
                            else "")
                print(f"| {count} | {case} | {name} | {times[name] * 1e3:.2f} | "
                      f"{times[name] / baseline:.2f} | {autograd} |", flush=True)

if __name__ == "__main__":
    main()
