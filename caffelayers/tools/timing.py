"""``caffelayers time``: Caffe's ``caffe time``, per-layer forward and backward times.

    caffelayers time --model NET.prototxt [--iterations 50] [--phase TRAIN|TEST]
        [--stage S[,S...]] [--level L] [--input NAME=N,C,H,W] [--runtime torch|onnxruntime]
        [--device cpu|cuda] [--json]

As Caffe's tool: one untimed forward and backward pass first (allocations), then
``--iterations`` passes, each layer's forward timed in order and its backward in reverse,
and the same report (``Average time per layer:``, ``     conv1\\tforward: 1.2 ms.``,
``Average Forward pass: ...``, ``Total Time: ...``). Caffe times its data layers as layers; here
a file-backed data layer's time is reading one batch from its source (``ImageData``, ``Data``,
``HDF5Data``), and ``Input``/``MemoryData`` tops are filled with random numbers (zeros for
tops that losses and ``Accuracy`` read as labels), which take no time.

``--runtime torch`` runs the :class:`~caffelayers.Net` layer by layer: each layer's bottoms
are cut from the graph so that its backward (autograd on that layer alone) can be timed on
its own, as Caffe calls ``Layer::Backward``. A net without a loss is backpropagated from zero
diffs at its outputs, which costs what Caffe's backward costs. ``--runtime onnxruntime``
converts the net to ONNX and times it with onnxruntime's profiler; each ONNX node is charged
to the Caffe layer it was emitted for (node names start with the layer's name), and a note
gives the time of the nodes onnxruntime adds itself (layout reorders). onnxruntime fuses
nodes (a ReLU into its convolution): the fused node's time goes to the first layer.
onnxruntime runs no backward, so those lines read 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import CaffeLayersError
from ..options import add_net_state_options
from .caffe_test import cpp_float as _c

__all__ = ["add_parser", "cmd_time", "layer_of_node", "time_net", "time_onnxruntime"]


class _Clock:
    """Wall time in milliseconds, waiting for the GPU's queue when the net is on one."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() * 1e3


def _input_batches(net, seed: int) -> Tuple[Dict[str, object], Dict[str, torch.Tensor]]:
    """``({layer: source}, {top: tensor})``: file-backed data layers keep their source (read
    once per pass, timed), array-fed tops get random values (zeros for labels)."""
    from ..data.loader import label_rules
    from ..data.sources import open_source

    sources, fixed = {}, {}
    generator = torch.Generator().manual_seed(seed)
    for node in net.graph.nodes:
        if not node.is_input:
            continue
        if node.type in ("Input", "MemoryData"):
            for top, shape in zip(node.tops, node.top_shapes):
                labels = bool(label_rules(net.graph, top))
                fixed[top] = torch.zeros(shape) if labels else torch.rand(shape,
                                                                          generator=generator)
        else:
            sources[node.name] = open_source(node.param, net.phase, net.source_dir, seed)
    return sources, fixed


def time_net(net, iterations: int = 50, seed: int = 0, on_iteration=None,
             on_warmup=None) -> Dict:
    """Time ``net`` layer by layer as Caffe's ``caffe time`` does.

    Args:
        net: a built :class:`~caffelayers.Net` (its device is where it runs).
        iterations: timed forward-backward passes, after one untimed pass.
        seed: seeds the random inputs and the data layers' shuffles.
        on_iteration: called with ``(iteration, milliseconds)`` after each timed pass.
        on_warmup: called with the untimed pass's loss (Caffe's ``Initial loss``).

    Returns:
        ``{"layers": [{"name", "type", "forward_ms", "backward_ms"}] (averages),
        "forward_ms", "backward_ms", "forward_backward_ms" (averages), "total_ms",
        "initial_loss"}``. The parameters' ``.grad`` hold the last pass's gradients, as
        ``net.backward()`` would leave them; data layers read batch ``j`` in pass ``j``
        (0 is the untimed one).
    """
    if iterations < 1:
        raise CaffeLayersError(f"--iterations must be at least 1, got {iterations}")
    reference = next(iter(net.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    clock = _Clock(device)
    sources, fixed = _input_batches(net, seed)
    fixed = {top: value.to(device=device, dtype=dtype) for top, value in fixed.items()}
    nodes = net.graph.nodes
    forward = [0.0] * len(nodes)
    backward = [0.0] * len(nodes)
    has_loss = any(any(node.loss_weights) for node in nodes)

    def one_pass(record: bool, index: int) -> Tuple[float, float, float]:
        blobs: Dict[str, Tuple[torch.Tensor, int, int]] = {}  # name: (value, producer, slot)
        cut: List[List[Optional[Tuple[torch.Tensor, int, int]]]] = []
        tops: List[List[torch.Tensor]] = []
        start = clock.now()
        for i, node in enumerate(nodes):
            begin = clock.now()
            if node.is_input:
                if node.name in sources:
                    batch = sources[node.name].batch(index)
                    values = [torch.from_numpy(np.ascontiguousarray(batch[top])).to(
                        device=device, dtype=dtype) for top in node.tops]
                else:
                    values = [fixed[top] for top in node.tops]
                cut.append([])
            else:
                links, bottoms = [], []
                for position, name in enumerate(node.bottoms):
                    value, producer, slot = blobs[name]
                    keep = list(node.param.propagate_down)
                    wanted = value.is_floating_point() and \
                        (position >= len(keep) or keep[position])
                    leaf = value.detach().requires_grad_(wanted)
                    links.append((leaf, producer, slot) if wanted else None)
                    bottoms.append(leaf)
                with torch.enable_grad():
                    out = node.module(*bottoms)
                values = list(out) if isinstance(out, tuple) else [out]
                cut.append(links)
            if record:
                forward[i] += clock.now() - begin
            tops.append(values)
            for slot, (name, value) in enumerate(zip(node.tops, values)):
                blobs[name] = (value, i, slot)
        middle = clock.now()
        loss = 0.0
        grads: Dict[Tuple[int, int], torch.Tensor] = {}
        for i, node in enumerate(nodes):
            for slot, weight in enumerate(node.loss_weights):
                if weight:
                    value = tops[i][slot]
                    loss += weight * float(value.detach().sum())
                    grads[(i, slot)] = torch.full_like(value, weight)
        if not has_loss:
            for name in net.outputs:
                value, producer, slot = blobs[name]
                if value.is_floating_point():
                    grads[(producer, slot)] = torch.zeros_like(value)
        back_start = clock.now()
        for i in range(len(nodes) - 1, -1, -1):
            begin = clock.now()
            roots, diffs = [], []
            for slot, value in enumerate(tops[i]):
                if (i, slot) in grads and value.requires_grad:
                    roots.append(value)
                    diffs.append(grads[(i, slot)])
            if roots:
                torch.autograd.backward(roots, diffs)
                for link in cut[i]:
                    if link is not None and link[0].grad is not None:
                        key = (link[1], link[2])
                        grads[key] = grads[key] + link[0].grad if key in grads else link[0].grad
            if record:
                backward[i] += clock.now() - begin
        end = clock.now()
        return middle - start, end - back_start, loss

    net.clear_param_diffs()
    _, _, initial_loss = one_pass(False, 0)
    if on_warmup is not None:
        on_warmup(initial_loss)
    total_start = clock.now()
    forward_total = backward_total = 0.0
    for j in range(iterations):
        iteration_start = clock.now()
        net.clear_param_diffs()
        f, b, _ = one_pass(True, j + 1)
        forward_total += f
        backward_total += b
        if on_iteration is not None:
            on_iteration(j + 1, clock.now() - iteration_start)
    total = clock.now() - total_start
    return {"layers": [{"name": node.name, "type": node.type,
                        "forward_ms": forward[i] / iterations,
                        "backward_ms": backward[i] / iterations}
                       for i, node in enumerate(nodes)],
            "forward_ms": forward_total / iterations, "backward_ms": backward_total / iterations,
            "forward_backward_ms": total / iterations, "total_ms": total,
            "initial_loss": initial_loss}


def layer_of_node(node_name: str, layers: Sequence[str]) -> Optional[str]:
    """The Caffe layer an ONNX node was emitted for: the longest layer name that the node's
    name is, or starts with followed by ``/`` (the layer's further nodes) or ``_`` (a name
    made unique, or onnxruntime's rewrite such as ``conv1_nchwc``); None for nodes that
    onnxruntime adds itself (``ReorderInput``)."""
    best = None
    for layer in layers:
        named = node_name == layer or node_name.startswith((layer + "/", layer + "_"))
        if named and (best is None or len(layer) > len(best)):
            best = layer
    return best


def time_onnxruntime(net, iterations: int = 50, seed: int = 0, on_iteration=None,
                     on_warmup=None) -> Dict:
    """Time the ONNX conversion of ``net`` in onnxruntime (CPU), per Caffe layer, from
    onnxruntime's profile (its ``Node`` events, charged by node name to layers). Data
    layers are read as in :func:`time_net`; the model's inputs are their tops."""
    import onnxruntime as ort

    from .. import convert

    sources, fixed = _input_batches(net, seed)
    nodes = net.graph.nodes
    names = [node.name for node in nodes]
    data_ms = {name: 0.0 for name in sources}
    with tempfile.TemporaryDirectory(prefix="caffelayers-time-") as folder:
        model = Path(folder) / "model.onnx"
        convert.write(net, "onnx", model)
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        wanted = [i.name for i in session.get_inputs()]

        def feed(index: int, record: bool) -> Dict[str, np.ndarray]:
            arrays = {top: value.numpy().astype(np.float32) for top, value in fixed.items()}
            for layer, source in sources.items():
                begin = time.perf_counter()
                arrays.update({top: np.asarray(value, np.float32)
                               for top, value in source.batch(index).items()})
                if record:
                    data_ms[layer] += (time.perf_counter() - begin) * 1e3
            return {name: arrays[name] for name in wanted}

        session.run(None, feed(0, False))
        if on_warmup is not None:
            on_warmup(None)
        runs = []
        total_start = time.perf_counter()
        for j in range(iterations):
            inputs = feed(j + 1, True)
            begin = time.perf_counter()
            session.run(None, inputs)
            runs.append((time.perf_counter() - begin) * 1e3)
            if on_iteration is not None:
                on_iteration(j + 1, runs[-1])
        total = (time.perf_counter() - total_start) * 1e3
        profile = json.loads(Path(session.end_profiling()).read_text())
    per_layer = {name: 0.0 for name in names}
    node_events = [e for e in profile if e.get("cat") == "Node" and
                   e.get("name", "").endswith("_kernel_time")]
    # The first run's events belong to the untimed warm-up: count each node's last
    # ``iterations`` kernel events.
    by_node: Dict[str, List[float]] = {}
    for event in node_events:
        by_node.setdefault(event["name"][:-len("_kernel_time")], []).append(event["dur"])
    unmatched, other_ms = [], 0.0
    for node_name, durations in by_node.items():
        layer = layer_of_node(node_name, names)
        milliseconds = sum(durations[-iterations:]) / 1e3
        if layer is None:
            unmatched.append(node_name)
            other_ms += milliseconds
        else:
            per_layer[layer] += milliseconds
    for layer, milliseconds in data_ms.items():
        per_layer[layer] += milliseconds
    return {"layers": [{"name": node.name, "type": node.type,
                        "forward_ms": per_layer[node.name] / iterations, "backward_ms": 0.0}
                       for node in nodes],
            "forward_ms": (sum(runs) + sum(data_ms.values())) / iterations,
            "backward_ms": 0.0, "forward_backward_ms": total / iterations, "total_ms": total,
            "initial_loss": None, "unmatched_nodes": unmatched,
            "unmatched_ms": other_ms / iterations}


def cmd_time(args) -> int:
    from ..graph import parse_input_specs
    from ..net import Net

    phase = args.phase or ("TRAIN" if args.runtime == "torch" else "TEST")
    net = Net(args.model, phase=phase, level=args.level, stages=args.stage,
              inputs=parse_input_specs(args.input) or None, seed=args.seed,
              device=args.device if args.runtime == "torch" else "cpu")
    say = (lambda line: None) if args.json else print
    say(f"Use {'GPU' if args.device == 'cuda' and args.runtime == 'torch' else 'CPU'}"
        f" ({args.runtime}).")
    say("Performing Forward")

    def warmed_up(loss: Optional[float]) -> None:
        if loss is not None:  # onnxruntime runs no loss or backward
            say(f"Initial loss: {_c(loss)}")
            say("Performing Backward")
        say("*** Benchmark begins ***")
        say(f"Testing for {args.iterations} iterations.")

    def progress(iteration: int, milliseconds: float) -> None:
        say(f"Iteration: {iteration} forward-backward time: {_c(milliseconds)} ms.")

    timer = time_net if args.runtime == "torch" else time_onnxruntime
    result = timer(net, args.iterations, args.seed, progress, warmed_up)
    if args.json:
        print(json.dumps({"runtime": args.runtime, "iterations": args.iterations, **result},
                         indent=2))
        return 0
    print("Average time per layer: ")
    for layer in result["layers"]:
        print(f"{layer['name']:>10}\tforward: {_c(layer['forward_ms'])} ms.")
        print(f"{layer['name']:>10}\tbackward: {_c(layer['backward_ms'])} ms.")
    print(f"Average Forward pass: {_c(result['forward_ms'])} ms.")
    print(f"Average Backward pass: {_c(result['backward_ms'])} ms.")
    print(f"Average Forward-Backward: {_c(result['forward_backward_ms'])} ms.")
    print(f"Total Time: {_c(result['total_ms'])} ms.")
    print("*** Benchmark ends ***")
    if result.get("unmatched_nodes"):
        print(f"note: nodes onnxruntime added ({', '.join(sorted(result['unmatched_nodes']))}): "
              f"{_c(result['unmatched_ms'])} ms per pass")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``time`` command to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "time", help="per-layer forward and backward times (Caffe's caffe time)",
        description="Time a net layer by layer, forward and backward, as Caffe's `caffe time`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, metavar="NET.prototxt", help="net .prototxt")
    parser.add_argument("--iterations", type=int, default=50, help="timed passes")
    parser.add_argument("--phase", type=str.upper, choices=["TRAIN", "TEST"],
                        help="net phase; TRAIN as Caffe's time for the torch runtime, TEST "
                             "(the phase that converts) for onnxruntime")
    add_net_state_options(parser)
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                        help="the Net layer by layer, or its ONNX conversion in onnxruntime "
                             "(forward only)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the torch runtime runs")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the fillers (no weights are loaded) and the random inputs")
    parser.add_argument("--json", action="store_true", help="the times as one JSON object")
    parser.set_defaults(run=cmd_time)
    return parser
