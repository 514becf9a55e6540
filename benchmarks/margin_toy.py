"""A-Softmax on a toy problem: the picture of SphereFace's Figure 2, made by caffelayers.

A small MLP maps 16-D inputs from a Gaussian mixture to 2-D or 3-D features, trained under
plain softmax (InnerProduct with bias + cross-entropy) and under A-Softmax (MarginInnerProduct
+ cross-entropy) with m = 2 and m = 4, in both backward modes. The figure shows each trained
net's test features, normalized onto the circle (2-D) or the sphere (3-D), coloured by
class, with the class weight directions and the test accuracy (argmax of the cosine logits,
``margin=False``) in each title.

    python benchmarks/margin_toy.py                       # writes docs/margin_toy.png
    python benchmarks/margin_toy.py --steps 300 --out /tmp/quick.png

Needs matplotlib, which caffelayers itself does not depend on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from caffelayers.layers import MarginInnerProduct
from caffelayers.layers.inner_product import InnerProduct

ROOT = Path(__file__).resolve().parent.parent
INPUT_DIM = 16
CLASSES = {2: 6, 3: 8}
HEADS = (("softmax", None, None), ("A-Softmax m=2", 2, "caffe"), ("A-Softmax m=2", 2, "exact"),
         ("A-Softmax m=4", 4, "caffe"), ("A-Softmax m=4", 4, "exact"))
# SphereFace's schedule, with a lower floor so that the margin dominates by the end.
SCHEDULE = dict(base=1000.0, gamma=0.12, power=1.0, lambda_min=0.5)


def make_data(classes: int, per_class: int, generator: torch.Generator):
    """A Gaussian mixture in 16-D whose classes overlap a little."""
    centres = torch.randn(classes, INPUT_DIM, generator=generator) * 0.9
    labels = torch.arange(classes).repeat_interleave(per_class)
    points = centres[labels] + torch.randn(len(labels), INPUT_DIM, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return points[order], labels[order]


class ToyNet(nn.Module):
    """16 -> 64 -> 64 -> feature_dim (PReLU, as SphereFace), then the classification head."""

    def __init__(self, feature_dim: int, classes: int, margin, backward):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(INPUT_DIM, 64), nn.PReLU(64), nn.Linear(64, 64),
                                  nn.PReLU(64), nn.Linear(64, feature_dim))
        if margin is None:
            self.head = InnerProduct(feature_dim, classes)
            nn.init.normal_(self.head.weight, std=0.1)
        else:
            self.head = MarginInnerProduct(feature_dim, classes, margin, backward=backward,
                                           **SCHEDULE)

    def forward(self, x, label=None):
        features = self.body(x)
        if isinstance(self.head, MarginInnerProduct):
            logits, _ = self.head(features, label, margin=label is not None)
        else:
            logits = self.head(features)
        return features, logits

    def directions(self):
        weight = self.head.weight.detach()
        return weight / weight.norm(dim=1, keepdim=True)


def train(net, x, y, steps, batch, generator):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps // 2, 3 * steps // 4])
    for _ in range(steps):
        pick = torch.randint(0, len(y), (batch,), generator=generator)
        _, logits = net(x[pick], y[pick])
        loss = F.cross_entropy(logits, y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return loss.item()


def run(feature_dim, steps, batch, seed):
    classes = CLASSES[feature_dim]
    generator = torch.Generator().manual_seed(seed)
    x, y = make_data(classes, 500, generator)
    split = len(y) * 4 // 5
    results = []
    for title, margin, backward in HEADS:
        torch.manual_seed(seed)
        net = ToyNet(feature_dim, classes, margin, backward)
        start = time.perf_counter()
        loss = train(net, x[:split], y[:split], steps, batch, generator)
        with torch.no_grad():
            features, logits = net(x[split:])
        accuracy = (logits.argmax(1) == y[split:]).double().mean().item()
        name = title if backward is None else f"{title} ({backward})"
        print(f"{feature_dim}-D {name:24s} loss {loss:.3f} test accuracy {accuracy:.1%} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
        results.append((name, accuracy, features, y[split:], net.directions()))
    return results


def draw(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(results) for results in rows.values())
    figure = plt.figure(figsize=(3.2 * columns, 3.9 * len(rows)))
    palette = plt.get_cmap("tab10")
    for row, (dim, results) in enumerate(sorted(rows.items())):
        for column, (name, accuracy, features, labels, directions) in enumerate(results):
            index = row * columns + column + 1
            unit = (features / features.norm(dim=1, keepdim=True)).numpy()
            colours = [palette(int(label) % 10) for label in labels]
            if dim == 2:
                axes = figure.add_subplot(len(rows), columns, index)
                # A little radial spread keeps coincident points visible.
                radius = 1 + 0.04 * torch.rand(len(unit), generator=torch.Generator()
                                               .manual_seed(column)).numpy()
                axes.scatter(unit[:, 0] * radius, unit[:, 1] * radius, s=2, c=colours)
                for class_, (u, v) in enumerate(directions.numpy()):
                    axes.plot([0, 0.8 * u], [0, 0.8 * v], color=palette(class_ % 10), lw=1.5)
                axes.set_xlim(-1.15, 1.15)
                axes.set_ylim(-1.15, 1.15)
                axes.set_aspect("equal")
                axes.set_xticks([])
                axes.set_yticks([])
            else:
                axes = figure.add_subplot(len(rows), columns, index, projection="3d")
                axes.scatter(unit[:, 0], unit[:, 1], unit[:, 2], s=1.5, c=colours,
                             depthshade=False)
                axes.set_box_aspect((1, 1, 1))
                axes.set_xticks([])
                axes.set_yticks([])
                axes.set_zticks([])
                axes.view_init(elev=25, azim=35)
            axes.set_title(f"{dim}-D, {name}\ntest accuracy {accuracy:.1%}", fontsize=9)
    figure.suptitle("Test features on the unit circle / sphere, coloured by class "
                    "(lines: class weight directions)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="2,3", help="feature dimensions to train (2, 3)")
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps per net")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "margin_toy.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    rows = {int(d): run(int(d), args.steps, args.batch, args.seed) for d in args.dims.split(",")}
    draw(rows, args.out)


if __name__ == "__main__":
    main()
