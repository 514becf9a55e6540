"""Time per step and peak memory per rank of the sharded A-Softmax head, against N.

For every class count N and process count P the script starts P fresh processes
(``torch.multiprocessing.spawn``; gloo on CPU, NCCL on GPUs, gloo when P ranks must share
one GPU). Each rank holds N/P rows of a :class:`ShardedMarginInnerProduct` (QUADRUPLE,
Caffe's backward, lambda on SphereFace's schedule), with SGD momentum 0.9 as the solver,
so it holds its rows' weight, gradient and history. The global batch of M rows is split
over the ranks (M/P features each): the same problem on more processes. One step is
forward + backward + the solver's update; the first step (which also allocates the
momentum) is not timed.

Memory per rank, on CPU: the process's peak resident set (``getrusage`` ``ru_maxrss``)
minus its resident set just before the head is built (after importing torch and joining
the process group), i.e. every byte the head, its data and its steps touched at their
highest point, allocator overhead included. On CUDA: ``torch.cuda.max_memory_allocated``
minus the allocation before the head is built. The ``model`` column is the arithmetic
lower bound: weight, gradient and momentum (3 x N/P x K) plus the logits buffer
(M x N/P), in float32.

Threads: each rank gets ``cpu_count // P`` torch threads, so P = 1 and P = 2 use the same
cores. Times are the median of the timed steps and the slowest rank.

    python benchmarks/bench_sharded.py                      # N = 1e4 .. 1e6, P = 1, 2
    python benchmarks/bench_sharded.py --quick              # N = 1e4, 1e5; one timed step
    python benchmarks/bench_sharded.py --device cuda --nproc 1,2,4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from caffelayers.layers.sharded_head import ShardedMarginInnerProduct
from timing import resident_bytes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLASSES = [round(10 ** (4 + i / 2)) for i in range(5)]      # 1e4, 10^4.5, ..., 1e6


def _rank_main(rank: int, world: int, config: dict, store: str, out: str) -> None:
    device = torch.device(config["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = ("nccl" if device.type == "cuda" and torch.cuda.device_count() >= world
               else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        classes, features, batch = config["classes"], config["features"], config["batch"]
        rows = batch // world
        before_rss = resident_bytes()
        before_cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        generator = torch.Generator(device=device).manual_seed(rank)
        head = ShardedMarginInnerProduct(features, classes, "QUADRUPLE", base=1000,
                                         gamma=0.12, power=1, lambda_min=5).to(device)
        solver = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(rows, features, device=device, generator=generator)
        labels = torch.randint(0, classes, (rows,), device=device, generator=generator)
        x.requires_grad_()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()

        times = []
        for step in range(config["steps"] + 1):
            sync()
            start = time.perf_counter()
            solver.zero_grad()
            x.grad = None
            head(x, labels).loss.backward()
            solver.step()
            sync()
            if step:
                times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before_cuda
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before_rss
        result = {"rank": rank, "step_s": statistics.median(times), "peak_bytes": peak,
                      "shard_rows": head.end - head.start}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_config(classes: int, world: int, args) -> dict:
    """Spawn ``world`` ranks for one class count; the slowest rank's time and the largest
    per-rank peak."""
    config = {"classes": classes, "features": args.features, "batch": args.batch,
                  "steps": args.steps, "device": args.device}
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world, config, os.path.join(folder, "store"), folder),
                 nprocs=world, join=True)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    shard = max(r["shard_rows"] for r in ranks)
    model = 4 * shard * (3 * args.features + args.batch)
    return {"classes": classes, "nproc": world, "step_s": max(r["step_s"] for r in ranks),
                "peak_bytes": max(r["peak_bytes"] for r in ranks), "model_bytes": model}


def table(results) -> str:
    lines = [("| N | P | step (s) | peak memory per rank (MiB) | model (MiB) | "
             "memory vs P = 1 |"),
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    single = {r["classes"]: r["peak_bytes"] for r in results if r["nproc"] == 1}
    for r in results:
        ratio = (f"{r['peak_bytes'] / single[r['classes']]:.2f}"
                 if r["classes"] in single else "")
        lines.append(f"| {r['classes']:,} | {r['nproc']} | {r['step_s']:.3f} | "
                     f"{r['peak_bytes'] / 2**20:,.0f} | {r['model_bytes'] / 2**20:,.0f} | "
                     f"{ratio} |")
    return "\n".join(lines)


def draw(results, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for world in sorted({r["nproc"] for r in results}):
        mine = [r for r in results if r["nproc"] == world]
        classes = [r["classes"] for r in mine]
        left.plot(classes, [r["step_s"] for r in mine], "o-", label=f"P = {world}")
        right.plot(classes, [r["peak_bytes"] / 2**20 for r in mine], "o-",
                   label=f"P = {world}")
        right.plot(classes, [r["model_bytes"] / 2**20 for r in mine], ":", color="gray")
    left.set_ylabel("seconds per step (fwd + bwd + SGD)")
    right.set_ylabel("peak memory per rank (MiB)")
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("classes N")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    right.text(0.02, 0.98, "dotted: weight + grad + momentum + logits", fontsize=8,
               transform=right.transAxes, va="top")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=lambda s: [int(float(v)) for v in s.split(",")],
                        default=None, help="comma-separated class counts (default 1e4 to "
                        "1e6, five log-spaced values)")
    parser.add_argument("--nproc", type=lambda s: [int(v) for v in s.split(",")],
                        default=[1, 2], help="comma-separated process counts")
    parser.add_argument("--features", type=int, default=512, help="K")
    parser.add_argument("--batch", type=int, default=256, help="M, the global batch")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after a warm-up")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="N = 1e4, 1e5; one timed step")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "sharded_head.png",
                        help="where to write the log-log figure ('' for none)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available")
    if args.classes is None:
        args.classes = [10_000, 100_000] if args.quick else DEFAULT_CLASSES
    if args.quick:
        args.steps = 1
    if any(args.batch % world for world in args.nproc):
        parser.error(f"--batch {args.batch} must divide by every process count")
    results = []
    for classes in args.classes:
        for world in args.nproc:
            result = run_config(classes, world, args)
            results.append(result)
            print(f"N={classes:>9,} P={world}: {result['step_s']:.3f} s/step, "
                  f"{result['peak_bytes'] / 2**20:,.0f} MiB per rank", flush=True)
    print()
    print(table(results))
    largest = max(args.classes)
    peaks = {r["nproc"]: r["peak_bytes"] for r in results if r["classes"] == largest}
    if 1 in peaks:
        for world, peak in sorted(peaks.items()):
            print(f"N = {largest:,}: memory per rank at P = {world} is "
                  f"{peak / peaks[1]:.2f} of P = 1 (1/P = {1 / world:.2f})")
    if str(args.figure):
        title = (f"sharded A-Softmax head, K = {args.features}, M = {args.batch}, "
                 f"{args.device} ({os.cpu_count()} cores)" if args.device == "cpu" else
                 f"sharded A-Softmax head, K = {args.features}, M = {args.batch}, "
                 f"{torch.cuda.get_device_name()}")
        draw(results, args.figure, title)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
