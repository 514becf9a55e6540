"""Forward+backward cost of MarginInnerProduct and the margin heads against the plain
product ``x @ W.T``, at each thread count asked for.

For each thread count (``--threads``, default ``1,all``: one thread, then every core) and
each shape (M rows, K features, N classes; default M in {256, 1024}, K = 512, N in {10572,
85742}) the script times, in the same run and in interleaved rounds (so that slow phases of
the machine hit every contender):

* ``product``: ``x @ W.T`` and its backward, the baseline every ratio refers to;
* ``caffe`` and ``exact``: :class:`caffelayers.layers.MarginInnerProduct` (QUADRUPLE);
* ``head:sphere``, ``head:cos``, ``head:arc``, ``head:combined``:
  :class:`caffelayers.layers.margin_head.MarginHead` on normalized features with s = 64
  (A-Softmax m = 4, CosFace m = 0.35, ArcFace m = 0.5, combined (1, 0.3, 0.2)), the same
  kernel as ``exact`` plus the features' normalization;
* ``autograd`` (only when ``--modes`` names it: it needs a dozen M x N temporaries, 4 GiB
  at the largest shape): a straightforward autograd A-Softmax (normalize, cos, Chebyshev
  polynomial, k from acos, one-hot mix).

Goal (issue 18), wall clock, medians of interleaved rounds, at one thread and at all cores:
caffe <= 1.05x, exact and the heads <= 1.10x the product.

Peak extra memory is the highest allocation during one forward+backward minus the plain
product's, in MiB and in units of one M x N and one N x K float tensor (no mode keeps a
weight-sized temporary: the normalization is applied to blocks of classes while they are in
cache, and the weight gradient is corrected in place). On CUDA it comes from the caching
allocator's statistics; on CPU from the profiler's allocation events; it is measured once
per shape, at the first thread count.

Every step writes fresh tensors of the logits' and the weight gradient's size, as the
product does. Where glibc's allocator hands that memory back to the system between steps,
each page is faulted in again in the next one (a 21 MiB weight is 5 000 pages; at N = 85742
a step takes over 100 000 faults), whoever allocates it; a weight-sized temporary of ours
once cost exact mode 1.35x instead of 1.04x that way, which is why there is none. Run with
``MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_MMAP_THRESHOLD_=4000000000`` (glibc keeps freed
memory) or ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's huge-page allocations) to time the work
rather than the allocator.

On a CPU shared with other busy processes, every parallel region of the intra-op thread
pool can stall for a scheduler time slice, so multi-threaded wall times there say more
about the neighbours than about the layer; ``--threads 1 --clock cpu`` measures the work
itself.

    python benchmarks/bench_margin.py                      # 1 thread and all cores
    python benchmarks/bench_margin.py --quick              # N = 10572 only, 3 rounds
    python benchmarks/bench_margin.py --threads 1 --clock cpu
    python benchmarks/bench_margin.py --device cuda --threads 1 --repeat 20
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from timing import add_options, apply_options, median_times

from caffelayers.layers import MarginInnerProduct
from caffelayers.layers.margin_head import MarginHead

SHAPES = ((256, 512, 10572), (1024, 512, 10572), (256, 512, 85742), (1024, 512, 85742))
QUICK_SHAPES = SHAPES[:2]
HEADS = {"head:sphere": ("sphere", 4), "head:cos": ("cos", 0.35), "head:arc": ("arc", 0.5),
         "head:combined": ("combined", (1.0, 0.3, 0.2))}
MODES = ("product", "caffe", "exact") + tuple(HEADS) + ("autograd",)
DEFAULT_MODES = MODES[:-1]
MARGIN = 4
LAMBDA_SETTINGS = {"base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0}
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


class Inputs:
    """What every contender of one shape reads: features, labels, the upstream gradient."""

    def __init__(self, M, K, N, device, generator):
        self.x = torch.randn(M, K, device=device, generator=generator).requires_grad_()
        self.labels = torch.randint(0, N, (M,), device=device, generator=generator)
        self.grad = torch.randn(M, N, device=device, generator=generator)


class Contender:
    """One mode on one shape: its own weight, the shape's inputs, one step per call."""

    def __init__(self, mode, inputs, K, N, device, generator):
        self.mode, self.inputs = mode, inputs
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
        x, labels = self.inputs.x, self.inputs.labels
        x.grad = None
        self.weight.grad = None
        if self.mode == "product":
            out = x @ self.weight.t()
        elif self.mode == "autograd":
            out = autograd_asoftmax(x, self.weight, labels, MARGIN, self.lambda_)
        elif self.mode in HEADS:
            out = self.module(x, labels)
        else:
            out, _ = self.module(x, labels)
        out.backward(self.inputs.grad)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, repeat=7)
    parser.add_argument("--shapes", default=None,
                        help="M,K,N triples separated by ';' (default: M in {256, 1024}, "
                             "K = 512, N in {10572, 85742}; with --quick N = 10572 only)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated subset of {', '.join(MODES)} (the product is "
                             "always timed: the ratios need it)")
    args = parser.parse_args(argv)
    device, clock, threads = apply_options(parser, args)
    shapes = (QUICK_SHAPES if args.quick else SHAPES) if args.shapes is None else tuple(
        tuple(int(v) for v in triple.split(",")) for triple in args.shapes.split(";"))
    asked = set(args.modes.split(","))
    if asked - set(MODES):
        parser.error(f"unknown modes {', '.join(sorted(asked - set(MODES)))}")
    modes = [m for m in MODES if m in asked | {"product"}]

    print(f"torch {torch.__version__}, {device}, {args.clock} clock, median of {args.repeat} "
          "interleaved rounds; caffe, exact and autograd are QUADRUPLE; goal: caffe <= 1.05, "
          "exact and heads <= 1.10 x product")
    print("| threads | shape M x K x N | mode | ms | x product | peak extra MiB (in M x N and "
          "N x K float tensors) |")
    print("|" + "---|" * 6)
    peaks = {}
    for count in threads:
        torch.set_num_threads(count)
        for M, K, N in shapes:
            generator = torch.Generator(device=device).manual_seed(0)
            inputs = Inputs(M, K, N, device, generator)
            contenders = {mode: Contender(mode, inputs, K, N, device, generator)
                          for mode in modes}
            times = median_times({mode: c.step for mode, c in contenders.items()},
                                 args.repeat, device, clock)
            if (M, K, N) not in peaks:
                peaks[M, K, N] = {mode: peak_bytes(contender, device)
                                  for mode, contender in contenders.items()}
            for mode in modes:
                extra = peaks[M, K, N][mode] - peaks[M, K, N]["product"]
                print(f"| {count} | {M} x {K} x {N} | {mode} | {times[mode] * 1e3:.1f} | "
                      f"{times[mode] / times['product']:.3f} | {extra / 2 ** 20:+.1f} "
                      f"({extra / (M * N * 4):+.2f} MN, {extra / (N * K * 4):+.2f} NK) |",
                      flush=True)
            del contenders, inputs


if __name__ == "__main__":
    main()
