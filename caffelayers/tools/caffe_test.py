"""``caffelayers test``: Caffe's ``caffe test``, scoring a trained model on its TEST data.

    caffelayers test --model NET.prototxt --weights W.caffemodel [--iterations 50]
        [--stage S[,S...]] [--level L] [--device cpu|cuda] [--json]

The TEST phase net is built (``--stage``/``--level`` pick the NetState, as Caffe's flags do),
its data layers read their own sources (``ImageData``, ``Data``, ``HDF5Data``; see
:mod:`caffelayers.data`), and ``--iterations`` forward passes run. As Caffe's tool, it prints
every element of every output blob for each pass (``Batch 3, accuracy = 0.75``), then the
mean net loss (``Loss: 0.41``) and each element's mean over the passes, loss outputs with
their weight (``loss = 0.41 (* 1 = 0.41 loss)``). Numbers print as C++'s default stream
does (six significant digits). ``--json`` gives the same numbers as one object.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch

from ..errors import CaffeLayersError
from ..options import add_net_state_options

__all__ = ["add_parser", "cmd_test", "cpp_float", "score"]


def cpp_float(value: float) -> str:
    """A float as C++'s ``ostream << float`` writes it (``%g``, six significant digits)."""
    return f"{value:.6g}"


def score(model: str, weights: str, iterations: int = 50, stages=(), level: int = 0,
          device: str = "cpu", seed: int = 0) -> Dict:
    """Run ``iterations`` TEST-phase forward passes of ``model`` fed by its data layers.

    Args:
        model: the net prototxt.
        weights: caffemodel path(s), comma-separated as Caffe's ``--weights``; later files
            overwrite the layers they hold.
        iterations: forward passes (Caffe's default is 50).
        stages, level: the NetState.
        device: ``"cpu"`` or ``"cuda"``.
        seed: seeds the data layers' shuffles (TEST-phase crops are central).

    Returns:
        ``{"batches": [[(output, value), ...] per pass], "loss": mean net loss,
        "scores": [{"output", "mean", "loss_weight"} per output element]}``.
    """
    from ..data import net_inputs
    from ..net import Net

    if iterations < 1:
        raise CaffeLayersError(f"--iterations must be at least 1, got {iterations}")
    if not weights:
        raise CaffeLayersError("need model weights to score (--weights)")
    paths = [path for path in weights.split(",") if path]
    net = Net(model, paths[0], phase="TEST", level=level, stages=list(stages), device=device)
    for path in paths[1:]:
        net.copy_trained_layers(path)
    weights_of = {top: weight for node in net.graph.nodes
                  for top, weight in zip(node.tops, node.loss_weights) if weight}
    fed = [node.name for node in net.graph.nodes
           if node.is_input and node.type in ("Input", "MemoryData")]
    if fed:
        raise CaffeLayersError(f"{model}: layer(s) {', '.join(map(repr, fed))} take arrays; "
                               "caffelayers test reads data layers (ImageData, Data, HDF5Data)")
    inputs = net_inputs(net, seed=seed, workers=0)
    batches: List[List] = []
    sums: List[float] = []
    names: List[str] = []
    loss = 0.0
    try:
        with torch.no_grad():
            for i in range(iterations):
                outputs = net(**inputs())
                loss += float(sum(weight * float(value.sum())
                                  for _, weight, value in net.losses()))
                row = []
                for name, value in outputs.items():
                    for element in value.detach().double().cpu().reshape(-1).tolist():
                        row.append((name, element))
                if i == 0:
                    sums = [0.0] * len(row)
                    names = [name for name, _ in row]
                for index, (_, element) in enumerate(row):
                    sums[index] += element
                batches.append(row)
    finally:
        inputs.close()
    scores = [{"output": name, "mean": total / iterations,
               "loss_weight": weights_of.get(name, 0.0)} for name, total in zip(names, sums)]
    return {"batches": batches, "loss": loss / iterations, "scores": scores}


def cmd_test(args) -> int:
    result = score(args.model, args.weights, args.iterations, args.stage, args.level, args.device)
    if args.json:
        print(json.dumps({"iterations": args.iterations,
                          "batches": [[{"output": n, "value": v} for n, v in row]
                                      for row in result["batches"]],
                          "loss": result["loss"], "scores": result["scores"]}, indent=2))
        return 0
    print(f"Running for {args.iterations} iterations.")
    for i, row in enumerate(result["batches"]):
        for name, value in row:
            print(f"Batch {i}, {name} = {cpp_float(value)}")
    print(f"Loss: {cpp_float(result['loss'])}")
    for entry in result["scores"]:
        weight = entry["loss_weight"]
        suffix = ""
        if weight:
            suffix = f" (* {cpp_float(weight)} = {cpp_float(weight * entry['mean'])} loss)"
        print(f"{entry['output']} = {cpp_float(entry['mean'])}{suffix}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``test`` command to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "test", help="score a trained model on its TEST-phase data (Caffe's caffe test)",
        description="Run the TEST phase net on its data layers for --iterations batches and "
                    "print each output per batch and its mean, as Caffe's `caffe test`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, metavar="NET.prototxt", help="net .prototxt with data layers")
    parser.add_argument("--weights", required=True, metavar="W.caffemodel",
                        help="trained .caffemodel(s), comma-separated")
    parser.add_argument("--iterations", type=int, default=50, help="batches to score")
    add_net_state_options(parser, inputs=False)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", action="store_true", help="the numbers as one JSON object")
    parser.set_defaults(run=cmd_test)
    return parser
