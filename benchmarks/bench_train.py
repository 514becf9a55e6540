"""One training iteration of SphereFace-20 through ``caffelayers train`` against plain PyTorch.

SphereFace-20 at full width (64/128/256/512 channels, fc5 512, 10572 classes, 112x96 images),
batch 32, in the same run:

* ``caffelayers``: :func:`caffelayers.train.train` (the code path of ``caffelayers train``):
  the prototxt read into a :class:`~caffelayers.Net`, Caffe's SGD update in
  :class:`~caffelayers.Solver` (momentum 0.9, weight decay 5e-4, ``lr_mult``/``decay_mult``
  per blob), the loss check and callbacks of every iteration. The data layer is an
  ``Input`` fed from arrays in memory, so that data loading (worker processes, which on a
  small machine compete with the net for cores) is left out of both sides.
* ``pytorch``: the same network written directly as ``nn.Module`` (Conv2d, PReLU, residual
  adds, Linear) with ``torch.optim.SGD`` (same momentum, decay on weights only, as the
  prototxt's ``decay_mult``), the same margin layer function
  (:func:`caffelayers.layers.margin_inner_product.margin_inner_product`) and
  ``F.cross_entropy``.

Rounds alternate the two (so that a noisy neighbour slows both alike); each round trains a
few warm-up iterations and then times the rest, one iteration per sample. The result is the
median seconds per iteration and the ratio caffelayers / pytorch (target <= 1.10).

    python benchmarks/bench_train.py                 # CPU
    python benchmarks/bench_train.py --device cuda --iterations 20 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caffelayers.layers.margin_inner_product import margin_inner_product
from caffelayers.sphereface import IMAGE, WIDTHS, sphereface_prototxt
from caffelayers.sphereface import UNITS as SPHEREFACE_UNITS
from caffelayers.train import train

UNITS, FC5, CLASSES = SPHEREFACE_UNITS[20], 512, 10572
HEIGHT, WIDTH = IMAGE[1:]
LAMBDA = dict(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)


class Unit(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a, self.pa = nn.Conv2d(width, width, 3, 1, 1), nn.PReLU(width, 0.25)
        self.b, self.pb = nn.Conv2d(width, width, 3, 1, 1), nn.PReLU(width, 0.25)

    def forward(self, x):
        return x + self.pb(self.b(self.pa(self.a(x))))


class SphereFace20(nn.Module):
    """The same network written directly in PyTorch."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for units, width in zip(UNITS, WIDTHS):
            layers += [nn.Conv2d(channels, width, 3, 2, 1), nn.PReLU(width, 0.25)]
            layers += [Unit(width) for _ in range(units)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.fc5 = nn.Linear(WIDTHS[-1] * 7 * 6, FC5)
        self.fc6 = nn.Parameter(torch.randn(CLASSES, FC5) * 0.01)
        self.iteration = 0

    def forward(self, x, labels):
        self.iteration += 1
        value = LAMBDA["base"] * (1 + LAMBDA["gamma"] * self.iteration) ** -LAMBDA["power"]
        features = self.fc5(self.features(x).flatten(1))
        logits = margin_inner_product(features, self.fc6, labels, 4,
                                      max(value, LAMBDA["lambda_min"]), backward="caffe")
        return F.cross_entropy(logits, labels)


def time_pytorch(batch, iterations, warmup, device):
    model = SphereFace20().to(device)
    # The prototxt's multipliers: biases learn at twice the rate, without weight decay.
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    weights = [p for p in model.parameters() if all(p is not b for b in biases)]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": 5e-4},
                                 {"params": biases, "weight_decay": 0.0, "lr": 0.02}],
                                lr=0.01, momentum=0.9)
    x, labels = data(batch, device)
    times = []
    for step in range(warmup + iterations):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, labels)
        loss.backward()
        optimizer.step()
        float(loss.detach())  # the loss value, as a training loop prints it (and a sync on CUDA)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def time_caffelayers(batch, iterations, warmup, device, folder: Path):
    (folder / "net.prototxt").write_text(
        sphereface_prototxt(UNITS, WIDTHS, FC5, CLASSES, batch=batch, data_layer="Input"))
    (folder / "solver.prototxt").write_text(
        f'net: "{folder / "net.prototxt"}"\nbase_lr: 0.01 momentum: 0.9 weight_decay: 0.0005\n'
        f'lr_policy: "fixed" max_iter: {warmup + iterations + 1} display: 0 snapshot: 0\n'
        f'snapshot_after_train: false random_seed: 1\n')
    x, labels = data(batch, "cpu")
    stamps = []

    def stamp(solver):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    train(str(folder / "solver.prototxt"), device=device, workers=0,
          arrays={"data": x.numpy(), "label": labels.numpy()}, callbacks=[stamp])
    # Between two stamps: one update, then the next forward and backward.
    return list(np.diff(stamps))[warmup:warmup + iterations]


def data(batch, device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, HEIGHT, WIDTH, generator=generator)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator)
    return x.to(device), labels.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3, help="timed per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results = {"caffelayers": [], "pytorch": []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            results["caffelayers"] += time_caffelayers(args.batch, args.iterations, args.warmup,
                                                       args.device, Path(folder))
            results["pytorch"] += time_pytorch(args.batch, args.iterations, args.warmup,
                                               args.device)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    medians = {name: statistics.median(times) for name, times in results.items()}
    print(f"SphereFace-20, batch {args.batch}, {CLASSES} classes, {HEIGHT}x{WIDTH}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, times in results.items():
        print(f"  {name:12s} median {medians[name]:.4f} s/iter "
              f"({args.batch / medians[name]:.1f} img/s) over {len(times)} iterations: "
              + " ".join(f"{t:.3f}" for t in times))
    print(f"  ratio caffelayers / pytorch: {medians['caffelayers'] / medians['pytorch']:.3f} "
          "(target <= 1.10)")


if __name__ == "__main__":
    main()
