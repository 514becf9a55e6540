"""Forward+backward cost of MarginInnerProduct and the margin heads against the plain
product ``x @ W.T``.

For each shape (M rows, K features, N classes) the script times, in the same run and in
interleaved rounds (so that slow phases of the machine hit every contender):

* ``product``: ``x @ W.T`` and its backward, the baseline every ratio refers to;
* ``caffe`` and ``exact``: :class:`caffelayers.layers.MarginInnerProduct` (QUADRUPLE);
* ``autograd``: a straightforward autograd A-Softmax (normalize, cos, Chebyshev polynomial,
  k from acos, one-hot mix), which builds several M x N temporaries;
* ``head:sphere``, ``head:cos``, ``head:arc``, ``head:combined``:
  :class:`caffelayers.layers.margin_head.MarginHead` on normalized features with s = 64
  (A-Softmax m = 4, CosFace m = 0.35, ArcFace m = 0.5, combined (1, 0.3, 0.2)), the same
  kernel as ``exact`` plus the features' normalization.

Peak extra memory is the highest allocation during one forward+backward minus the plain
product's, in MiB and in units of one M x N and one N x K float tensor (the exact mode keeps
the normalized weight, one N x K tensor, from forward to backward; a negative value means
a lower peak than autograd's product). On CUDA it comes from the caching allocator's
statistics; on CPU from the profiler's allocation events.

On a CPU shared with other busy processes, every parallel region of the intra-op thread
pool can stall for a scheduler time slice; the product is three matrix products while the
margin modes add a few dozen memory-bound passes, so multi-threaded wall times there say more
about the neighbours than about the layer. ``--threads 1 --clock cpu`` measures the work
itself.

    python benchmarks/bench_margin.py --device cpu
    python benchmarks/bench_margin.py --threads 1 --clock cpu
    python benchmarks/bench_margin.py --device cuda --repeat 20
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from timing import add_options, apply_options

from caffelayers.layers import MarginInnerProduct
from caffelayers.layers.margin_head import MarginHead

SHAPES = ((256, 512, 10572), (1024, 512, 10572), (512, 512, 85742))
HEADS = {"head:sphere": ("sphere", 4), "head:cos": ("cos", 0.35), "head:arc": ("arc", 0.5),
         "head:combined": ("combined", (1.0, 0.3, 0.2))}
MODES = ("product", "caffe", "exact", "autograd") + tuple(HEADS)
MARGIN = 4
LAMBDA_SETTINGS = dict(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)
CHEBYSHEV = {1: lambda c: c, 2: lambda c: 2 * c ** 2 - 1, 3: lambda c: 4 * c ** 3 - 3 * c,
             4: lambda c: 8 * c ** 4 - 8 * c ** 2 + 1}


def autograd_asoftmax(x, weight, labels, margin, lambda_):
    """A-Softmax the way it is usually written in PyTorch: every step on the full matrix."""
    unit = F.normalize(weight, dim=1)
    x_norm = x.norm(dim=1, keepdim=True)
    logits = x @ unit.t()
    cos = (logits / x_norm).clamp(-1, 1)
    cos_m = CHEBYSHEV[margin](cos)
    k = torch.floor(margin * torch.acos(cos) / math.pi)
    psi = (-1) ** k * cos_m - 2 * k
    one_hot = F.one_hot(labels, weight.shape[0]).to(x.dtype)
    return logits + one_hot * (x_norm * psi - logits) / (1 + lambda_)


class Contender:
    """One mode on one shape: fresh leaves, a fixed upstream gradient, one step per call."""

    def __init__(self, mode, M, K, N, device, generator):
        self.mode = mode
        self.x = torch.randn(M, K, device=device, generator=generator).requires_grad_()
        self.labels = torch.randint(0, N, (M,), device=device, generator=generator)
        self.grad = torch.randn(M, N, device=device, generator=generator)
        if mode in ("caffe", "exact"):
            self.module = MarginInnerProduct(K, N, "QUADRUPLE", backward=mode,
                                             **LAMBDA_SETTINGS).to(device)
            self.weight = self.module.weight
        elif mode in HEADS:
            kind, margin = HEADS[mode]
            self.module = MarginHead(K, N, kind, s=64.0, m=margin).to(device)
            self.weight = self.module.weight
        else:
            self.weight = torch.randn(N, K, device=device, generator=generator)
            self.weight.requires_grad_()
        self.lambda_ = 5.0

    def step(self):
        self.x.grad = None
        self.weight.grad = None
        if self.mode == "product":
            out = self.x @ self.weight.t()
        elif self.mode == "autograd":
            out = autograd_asoftmax(self.x, self.weight, self.labels, MARGIN, self.lambda_)
        elif self.mode in HEADS:
            out = self.module(self.x, self.labels)
        else:
            out, _ = self.module(self.x, self.labels)
        out.backward(self.grad)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(contender, device, clock):
    synchronize(device)
    start = clock()
    contender.step()
    synchronize(device)
    return clock() - start


def peak_bytes(contender, device):
    """Highest memory allocated during one step, above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        contender.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        contender.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def bench_shape(M, K, N, device, repeat, modes, clock):
    generator = torch.Generator(device=device).manual_seed(0)
    contenders = {mode: Contender(mode, M, K, N, device, generator) for mode in modes}
    for contender in contenders.values():  # warm-up: allocator, thread pools, kernels
        contender.step()
    times = {mode: [] for mode in modes}
    for _ in range(repeat):
        for mode, contender in contenders.items():
            times[mode].append(time_step(contender, device, clock))
    peaks = {mode: peak_bytes(contender, device) for mode, contender in contenders.items()}
    return ({mode: statistics.median(values) * 1e3 for mode, values in times.items()}, peaks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, repeat=7)
    parser.add_argument("--shapes", default=None,
                        help="M,K,N triples separated by ';' (default: the issue's three)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {', '.join(MODES)} (product and "
                             "autograd are always timed: the ratios need them)")
    args = parser.parse_args(argv)
    device, clock = apply_options(parser, args)
    shapes = SHAPES if args.shapes is None else tuple(
        tuple(int(v) for v in triple.split(",")) for triple in args.shapes.split(";"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.clock} "
          f"clock, median of {args.repeat} interleaved rounds; caffe, exact and autograd are "
          "QUADRUPLE")
    header = ("| shape M x K x N | mode | device | ms | x product | autograd A-Softmax "
              "x product | peak extra MiB (in M x N and N x K float tensors) |")
    print(header)
    print("|" + "---|" * 7)
    modes = [m for m in MODES if m in {"product", "autograd"} | set(args.modes.split(","))]
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {', '.join(sorted(unknown))}")
    for M, K, N in shapes:
        times, peaks = bench_shape(M, K, N, device, args.repeat, modes, clock)
        baseline_ratio = times["autograd"] / times["product"]
        for mode in modes:
            extra = peaks[mode] - peaks["product"]
            print(f"| {M} x {K} x {N} | {mode} | {device} | {times[mode]:.1f} | "
                  f"{times[mode] / times['product']:.3f} | {baseline_ratio:.2f} | "
                  f"{extra / 2 ** 20:+.1f} ({extra / (M * N * 4):+.2f} MN, "
                  f"{extra / (N * K * 4):+.2f} NK) |", flush=True)


if __name__ == "__main__":
    main()
