"""Train a small SphereFace net on synthetic faces with ``caffelayers train``; plot the curves.

The script draws ``--classes`` made-up identities (skin tone, face shape, eye spacing and
size, mouth, hair) and ``--per-class`` jittered pictures of each (shift, rotation,
brightness, noise) as PNG files with ImageData lists (every fifth picture of an identity
held out for the TEST phase), writes a SphereFace-4 prototxt (MarginInnerProduct QUADRUPLE +
SoftmaxWithLoss, mirror and mean/scale as the authors', an Accuracy in TEST) and a solver
that tests ten times, runs ``caffelayers train --log train.log`` on them, reads the loss and
lambda back from the Caffe log (``Iteration N (...), loss = X`` and ``Train net output #1:
lambda = Y``, as Caffe's ``parse_log.py`` would) and plots both to ``docs/train_toy.png``.
``caffelayers plot WORKDIR/train.log -o curves.png`` draws the log's loss, test accuracy and
learning rate.

    python benchmarks/train_toy.py                       # 300 iterations, a few minutes on CPU
    python benchmarks/train_toy.py --iterations 100 --out /tmp/toy.png --workdir /tmp/toy
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 56, 48
TEST_BATCH = 20
ROOT = Path(__file__).resolve().parent.parent


def draw_identity(rng):
    """The features that make one identity."""
    return dict(skin=rng.uniform([60, 90, 140], [150, 180, 240]),
                hair=rng.uniform(0, 120, 3), background=rng.uniform(80, 255, 3),
                face=(int(rng.integers(14, 19)), int(rng.integers(19, 25))),
                eye_y=int(rng.integers(21, 27)), eye_gap=int(rng.integers(6, 11)),
                eye_size=int(rng.integers(2, 5)), mouth_y=int(rng.integers(36, 42)),
                mouth_half=int(rng.integers(4, 10)), hair_height=int(rng.integers(5, 12)))


def draw_face(cv2, identity, rng):
    """One jittered BGR picture of an identity."""
    image = np.empty((HEIGHT, WIDTH, 3), np.float32)
    image[:] = identity["background"]
    cx, cy = WIDTH // 2, HEIGHT // 2 + 2
    cv2.ellipse(image, (cx, cy - identity["face"][1] + identity["hair_height"]),
                (identity["face"][0] + 2, identity["hair_height"] + 4), 0, 180, 360,
                identity["hair"].tolist(), -1)
    cv2.ellipse(image, (cx, cy), identity["face"], 0, 0, 360, identity["skin"].tolist(), -1)
    for side in (-1, 1):
        eye = (cx + side * identity["eye_gap"], identity["eye_y"])
        cv2.circle(image, eye, identity["eye_size"], (30, 30, 30), -1)
        cv2.line(image, (eye[0] - 3, eye[1] - 4), (eye[0] + 3, eye[1] - 5),
                 identity["hair"].tolist(), 1)
    cv2.line(image, (cx - identity["mouth_half"], identity["mouth_y"]),
             (cx + identity["mouth_half"], identity["mouth_y"]), (40, 40, 140), 2)
    angle, shift = rng.uniform(-6, 6), rng.uniform(-3, 3, 2)
    warp = cv2.getRotationMatrix2D((cx, cy), angle, rng.uniform(0.93, 1.07))
    warp[:, 2] += shift
    image = cv2.warpAffine(image, warp, (WIDTH, HEIGHT), borderMode=cv2.BORDER_REPLICATE)
    image = image * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20) + rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def make_dataset(folder: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    import cv2

    rng = np.random.default_rng(seed)
    (folder / "faces").mkdir(parents=True, exist_ok=True)
    lists = {"train": [], "test": []}
    for label in range(classes):
        identity = draw_identity(rng)
        for index in range(per_class):
            name = f"faces/{label:03d}_{index:03d}.png"
            cv2.imwrite(str(folder / name), draw_face(cv2, identity, rng))
            # every fifth picture of an identity is held out for the TEST phase
            lists["test" if index % 5 == 4 else "train"].append(f"{name} {label}\n")
    for phase, lines in lists.items():
        (folder / f"{phase}.txt").write_text("".join(lines))
    return folder / "train.txt"


def conv(name, bottom, width):
    return f'''layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{ num_output: {width} kernel_size: 3 stride: 2 pad: 1
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "relu{name[4:]}" type: "PReLU" bottom: "{name}" top: "{name}" }}
'''


def write_net(folder: Path, classes: int, batch: int) -> None:
    text = f'''name: "SpherefaceToy-4"
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ mean_value: 127.5 mean_value: 127.5 mean_value: 127.5
    scale: 0.0078125 mirror: true }}
  image_data_param {{ source: "train.txt" batch_size: {batch} shuffle: true
    new_height: {HEIGHT} new_width: {WIDTH} }} }}
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ mean_value: 127.5 mean_value: 127.5 mean_value: 127.5
    scale: 0.0078125 }}
  image_data_param {{ source: "test.txt" batch_size: {TEST_BATCH}
    new_height: {HEIGHT} new_width: {WIDTH} }} }}
'''
    bottom = "data"
    for stage, width in enumerate((16, 32, 64, 128), start=1):
        text += conv(f"conv{stage}_1", bottom, width)
        bottom = f"conv{stage}_1"
    text += f'''layer {{ name: "fc5" type: "InnerProduct" bottom: "{bottom}" top: "fc5"
  inner_product_param {{ num_output: 64 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: "label" top: "fc6"
  top: "lambda" margin_inner_product_param {{ num_output: {classes} type: QUADRUPLE
    weight_filler {{ type: "xavier" }} base: 1000 gamma: 0.5 power: 1 lambda_min: 5 }} }}
layer {{ name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label"
  top: "softmax_loss" }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "fc6" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
'''
    (folder / "net.prototxt").write_text(text)


def write_solver(folder: Path, iterations: int, test_items: int) -> Path:
    steps = " ".join(f"stepvalue: {int(iterations * f)}" for f in (0.6, 0.85))
    test = f"test_iter: {-(-test_items // TEST_BATCH)} test_interval: {max(iterations // 10, 1)}"
    (folder / "solver.prototxt").write_text(
        f'net: "net.prototxt"\nbase_lr: 0.01 momentum: 0.9 weight_decay: 0.0005\n'
        f'lr_policy: "multistep" gamma: 0.1 {steps}\nmax_iter: {iterations}\n'
        f'display: 10 average_loss: 10 snapshot: 0 snapshot_prefix: "toy" random_seed: 1\n'
        f"{test}\n")
    return folder / "solver.prototxt"


def read_log(text: str):
    """(iterations, losses, lambdas) from Caffe-style log lines."""
    losses, lambdas, iterations = [], [], []
    for line in text.splitlines():
        found = re.search(r"Iteration (\d+) \(.*\), loss = ([-\d.eE+naif]+)", line)
        if found:
            iterations.append(int(found.group(1)))
            losses.append(float(found.group(2)))
        found = re.search(r"Train net output #\d+: lambda = ([-\d.eE+]+)", line)
        if found:
            lambdas.append(float(found.group(1)))
    return iterations, losses, lambdas


def plot(iterations, losses, lambdas, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(iterations, losses, color="tab:blue")
    left.set(xlabel="iteration", ylabel="softmax loss (smoothed over 10)", title="loss")
    right.plot(iterations[:len(lambdas)], lambdas, color="tab:red")
    right.set(xlabel="iteration", ylabel="lambda", yscale="log",
              title="MarginInnerProduct lambda")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--workdir", help="keep the images, prototxts and log here")
    parser.add_argument("--out", default=str(ROOT / "docs" / "train_toy.png"))
    args = parser.parse_args()

    from caffelayers.train import add_train_parser

    with contextlib.ExitStack() as stack:
        folder = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory())).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        make_dataset(folder, args.classes, args.per_class)
        write_net(folder, args.classes, args.batch)
        test_items = len((folder / "test.txt").read_text().splitlines())
        solver = write_solver(folder, args.iterations, test_items)
        command = argparse.ArgumentParser(prog="caffelayers")
        add_train_parser(command.add_subparsers(dest="command", required=True))
        train_args = command.parse_args(["train", str(solver), "--workers", str(args.workers),
                                         "--log", str(folder / "train.log")])
        log = folder / "train.log"
        here = os.getcwd()
        os.chdir(folder)  # Caffe reads the prototxt's relative names from the working directory
        stack.callback(os.chdir, here)
        start = time.perf_counter()
        status = train_args.run(train_args)
        seconds = time.perf_counter() - start
        iterations, losses, lambdas = read_log(log.read_text())
    if status != 0 or not losses:
        raise SystemExit(f"training failed (status {status})")
    images = args.iterations * args.batch
    print(f"{args.iterations} iterations of batch {args.batch} ({args.classes} identities, "
          f"{args.classes * args.per_class} images {HEIGHT}x{WIDTH}) in {seconds:.1f} s "
          f"({images / seconds:.0f} img/s)")
    print(f"loss {losses[0]:.3f} at iteration {iterations[0]} -> {losses[-1]:.3f} at "
          f"iteration {iterations[-1]}; lambda {lambdas[0]:.4g} -> {lambdas[-1]:.4g}")
    if not math.isfinite(losses[-1]) or losses[-1] >= losses[0]:
        raise SystemExit("the loss did not fall")
    plot(iterations, losses, lambdas, Path(args.out),
         f"caffelayers train: SphereFace-4 (QUADRUPLE margin) on {args.classes} synthetic "
         f"identities, batch {args.batch}")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
