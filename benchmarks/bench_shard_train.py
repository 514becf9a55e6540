"""Memory per rank of ``caffelayers train --nproc 2``, with and without ``--shard-head``.

A net of a trunk (one InnerProduct, K features) and a MarginInnerProduct head of N classes
(QUADRUPLE, SoftmaxWithLoss) trains through :func:`caffelayers.train.train` on two ranks
(gloo, CPU), the way ``caffelayers train --nproc 2`` runs it: SGD with momentum, a test net
(the head as a plain InnerProduct, with Accuracy) every ``--test-interval`` iterations, and
the end-of-run snapshot. The same run goes once unsharded and once with the head sharded.

Memory per rank is the resident set (``/proc/self/statm``) above the one before the solver
was built (after importing torch and joining the process group):

- ``training``: the largest at any iteration's gradient point after the first (the weights,
  gradients, histories and the step's temporaries: what a rank keeps while it trains);
- ``peak``: ``getrusage`` ``ru_maxrss``, over the whole run: building the nets (every rank
  builds the full head before the split), tests and the snapshot (rank 0 gathers the full
  weight and its history to write the standard files).

``head`` is one copy of the ``N x K`` weight in float32; an unsharded rank keeps four (the
weight, its gradient and momentum, the test net's copy), a sharded one three of its half.

    python benchmarks/bench_shard_train.py                  # N = 300,000, K = 128
    python benchmarks/bench_shard_train.py --classes 50000 --iterations 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timing import resident_bytes

NET = '''name: "shard_train"
layer {{ name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param {{ batch_size: {batch} channels: {features} height: 1 width: 1 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: {features} weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "ip1" bottom: "label" top: "fc6"
  include {{ phase: TRAIN }}
  margin_inner_product_param {{ num_output: {classes} type: QUADRUPLE base: 1000 gamma: 0.12
    power: 1 lambda_min: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "ip1" top: "fc6" include {{ phase: TEST }}
  inner_product_param {{ num_output: {classes} bias_term: false }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "fc6" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "loss" }}
'''

SOLVER = '''net: "net.prototxt" base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" display: 0
max_iter: {iterations} test_iter: 1 test_interval: {test_interval} snapshot_after_train: true
snapshot_prefix: "snap/{name}" random_seed: 1
'''


def _rank_main(rank: int, world: int, config: dict, folder: str) -> None:
    from caffelayers.train import train

    os.chdir(folder)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{folder}/store-{config['name']}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    try:
        rng = np.random.default_rng(rank)
        rows = 4 * config["batch"]
        arrays = {"data": rng.normal(size=(rows, config["features"], 1, 1)).astype(np.float32),
                  "label": rng.integers(0, config["classes"], rows).astype(np.float32)}
        before = resident_bytes()
        during = []

        def measure(solver) -> None:
            if solver.iter > 0:
                during.append(resident_bytes() - before)

        train(f"{config['name']}.prototxt", rank=rank, world=world, workers=0, arrays=arrays,
              data_check=False, shard_head=config["sharded"], callbacks=[measure])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        Path(folder, f"{config['name']}-rank{rank}.json").write_text(
            json.dumps({"training": max(during), "peak": peak}))
    finally:
        dist.destroy_process_group()


def measure_run(folder: Path, sharded: bool, args) -> list[dict]:
    """Train once on ``args.nproc`` ranks; each rank's memory."""
    name = "sharded" if sharded else "unsharded"
    (folder / f"{name}.prototxt").write_text(SOLVER.format(
        iterations=args.iterations, test_interval=args.test_interval, name=name))
    config = {"name": name, "sharded": sharded, "classes": args.classes,
              "features": args.features, "batch": args.batch}
    mp.spawn(_rank_main, args=(args.nproc, config, str(folder)), nprocs=args.nproc)
    return [json.loads((folder / f"{name}-rank{rank}.json").read_text())
            for rank in range(args.nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=300_000, help="N")
    parser.add_argument("--features", type=int, default=128, help="K")
    parser.add_argument("--batch", type=int, default=64, help="rows per rank and iteration")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--test-interval", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    head = 4 * args.classes * args.features
    print(f"torch {torch.__version__}, cpu, {args.nproc} ranks (gloo), N = {args.classes:,}, "
          f"K = {args.features}, {args.batch} rows per rank; head = one N x K float32 copy = "
          f"{head / 2**20:,.0f} MiB")
    print("| run | rank | training MiB | x head | peak MiB | x head |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "net.prototxt").write_text(NET.format(
            batch=args.batch, features=args.features, classes=args.classes))
        for sharded in (False, True):
            for rank, used in enumerate(measure_run(folder, sharded, args)):
                print(f"| {'--shard-head' if sharded else 'unsharded'} | {rank} | "
                      f"{used['training'] / 2**20:,.0f} | {used['training'] / head:.2f} | "
                      f"{used['peak'] / 2**20:,.0f} | {used['peak'] / head:.2f} |", flush=True)


if __name__ == "__main__":
    main()
