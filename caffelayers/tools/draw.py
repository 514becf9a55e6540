"""``caffelayers draw``: a picture of a net (Caffe's ``python/draw_net.py``).

    caffelayers draw NET.prototxt -o net.svg|net.png|net.dot [--rankdir LR|TB]
        [--phase TRAIN|TEST] [--stage S] [--level L] [--input NAME=N,C,H,W]

Layers and blobs are nodes, as in Caffe's drawing: layers are boxes coloured by Caffe's
palette (convolutions red, pooling orange, inner products purple, in-place neuron layers
green, the others blue) labelled with name, type, kernel/stride/pad and parameter count;
blobs are grey octagons labelled with their name and output shape, from the graph that
``caffelayers inspect`` prints (``?`` where only the data can tell). An in-place layer
(``top == bottom``) writes a new node of its blob, so the picture is a chain rather than
Caffe's two-node loop. Only the layers of ``--phase`` are drawn (shapes need one phase).

``.dot`` writes Graphviz source. ``.svg`` and ``.png`` are laid out here, without Graphviz
(neither the program nor a Python package bundling it installs from wheels on our
machines): nodes are ranked by their longest path from an input and ordered within a rank
by their predecessors' positions; SVG is written directly and PNG drawn with matplotlib (the
``plot`` extra).
"""

from __future__ import annotations

import argparse
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from ..errors import CaffeLayersError, shape_text
from ..options import add_net_state_options

__all__ = ["DrawNode", "add_parser", "cmd_draw", "layout", "net_drawing", "to_dot", "to_svg"]

LAYER_COLOR = "#6495ED"
NEURON_COLOR = "#90EE90"
BLOB_COLOR = "#E0E0E0"
TYPE_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
               "InnerProduct": "#CC33FF"}
_CHAR_WIDTH, _LINE_HEIGHT, _PAD = 6.6, 14.0, 8.0
_RANK_GAP, _NODE_GAP = 36.0, 18.0


@dataclass
class DrawNode:
    """One box of the drawing: a layer or one version of a blob."""

    key: str
    kind: str  # "layer" or "blob"
    lines: List[str]
    color: str
    predecessors: List[str] = field(default_factory=list)
    rank: int = 0
    x: float = 0.0  # centre
    y: float = 0.0
    width: float = 0.0
    height: float = 0.0


def _first(values, default):
    """A repeated size field's first value (Caffe's draw_net shows that one), else ``default``
    (the ``_h`` field or Caffe's default)."""
    return values[0] if len(values) else default


def _layer_lines(node) -> List[str]:
    param = node.param
    kind = node.type
    if kind == "Pooling":
        from ..proto import caffe_pb2

        method = caffe_pb2.PoolingParameter.PoolMethod.Name(param.pooling_param.pool)
        kind = f"Pooling {method}"
    lines = [node.name, f"({kind})"]
    if node.type in ("Convolution", "Deconvolution"):
        p = param.convolution_param
        lines.append(f"kernel {_first(p.kernel_size, p.kernel_h or 1)}, "
                     f"stride {_first(p.stride, p.stride_h or 1)}, "
                     f"pad {_first(p.pad, p.pad_h)}, out {p.num_output}")
    elif node.type == "Pooling":
        p = param.pooling_param
        kernel = "global" if p.global_pooling else p.kernel_size or p.kernel_h
        lines.append(f"kernel {kernel}, stride {p.stride or p.stride_h or 1}, "
                     f"pad {p.pad or p.pad_h}")
    elif node.type == "InnerProduct":
        lines.append(f"out {param.inner_product_param.num_output}")
    if node.num_params:
        lines.append(f"params {node.num_params:,}")
    return lines


def net_drawing(graph) -> List[DrawNode]:
    """The drawing's nodes for a built graph, in topological order."""
    nodes: List[DrawNode] = []
    current: Dict[str, str] = {}  # blob name: key of its newest node
    versions: Dict[str, int] = {}
    shapes = graph.blob_shapes

    def blob(name: str, shape, producer=None) -> str:
        versions[name] = versions.get(name, -1) + 1
        key = f"blob:{name}:{versions[name]}"
        nodes.append(DrawNode(key, "blob", [name, shape_text(shape)],
                              BLOB_COLOR, [producer] if producer else []))
        current[name] = key
        return key

    for index, node in enumerate(graph.nodes):
        in_place = len(node.bottoms) == 1 and node.tops == node.bottoms
        color = NEURON_COLOR if in_place else TYPE_COLORS.get(node.type, LAYER_COLOR)
        key = f"layer:{index}"
        inputs = [current[name] if name in current else blob(name, shapes.get(name))
                  for name in node.bottoms]
        nodes.append(DrawNode(key, "layer", _layer_lines(node), color, inputs))
        for top, shape in zip(node.tops, node.top_shapes):
            blob(top, shape, key)
    return nodes


def layout(nodes: List[DrawNode], rankdir: str = "LR") -> Tuple[float, float]:
    """Place the nodes (centres and sizes, in pixels); returns the drawing's size."""
    by_key = {node.key: node for node in nodes}
    for node in nodes:
        longest = max((len(line) for line in node.lines), default=1)
        node.width = longest * _CHAR_WIDTH + 2 * _PAD + (12 if node.kind == "blob" else 0)
        node.height = len(node.lines) * _LINE_HEIGHT + _PAD
        node.rank = max((by_key[p].rank + 1 for p in node.predecessors), default=0)
    ranks: Dict[int, List[DrawNode]] = {}
    for node in nodes:
        ranks.setdefault(node.rank, []).append(node)
    across_tb = rankdir == "TB"

    def along(node):  # extent along the rank axis
        return node.height if across_tb else node.width

    def across(node):
        return node.width if across_tb else node.height

    position = 20.0
    for rank in sorted(ranks):
        members = ranks[rank]
        depth = max(along(n) for n in members)
        wanted = {}
        for order, node in enumerate(members):
            anchors = [getattr(by_key[p], "x" if across_tb else "y") for p in node.predecessors]
            wanted[node.key] = sum(anchors) / len(anchors) if anchors else order * 1e-3
        members.sort(key=lambda n: wanted[n.key])
        previous = None
        for node in members:
            centre = wanted[node.key]
            if previous is not None:
                centre = max(centre, getattr(previous, "x" if across_tb else "y") +
                             (across(previous) + across(node)) / 2 + _NODE_GAP)
            if across_tb:
                node.x, node.y = centre, position + depth / 2
            else:
                node.x, node.y = position + depth / 2, centre
            previous = node
        position += depth + _RANK_GAP
    low_x = min(n.x - n.width / 2 for n in nodes)
    low_y = min(n.y - n.height / 2 for n in nodes)
    for node in nodes:
        node.x += 20 - low_x
        node.y += 20 - low_y
    return (max(n.x + n.width / 2 for n in nodes) + 20,
            max(n.y + n.height / 2 for n in nodes) + 20)


def _ends(source: DrawNode, target: DrawNode, rankdir: str):
    if rankdir == "TB":
        return (source.x, source.y + source.height / 2), (target.x, target.y - target.height / 2)
    return (source.x + source.width / 2, source.y), (target.x - target.width / 2, target.y)


def _octagon(node: DrawNode) -> List[Tuple[float, float]]:
    left, right = node.x - node.width / 2, node.x + node.width / 2
    top, bottom = node.y - node.height / 2, node.y + node.height / 2
    cut = min(8.0, node.height / 3)
    return [(left + cut, top), (right - cut, top), (right, top + cut), (right, bottom - cut),
            (right - cut, bottom), (left + cut, bottom), (left, bottom - cut), (left, top + cut)]


def to_svg(nodes: List[DrawNode], rankdir: str, title: str) -> str:
    """The laid-out nodes as an SVG document."""
    width, height = layout(nodes, rankdir)
    by_key = {node.key: node for node in nodes}
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
            'font-family="Helvetica, Arial, sans-serif" font-size="11">'),
           f"<title>{html.escape(title)}</title>",
           ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#444"/>'
            "</marker></defs>"),
           '<rect width="100%" height="100%" fill="white"/>']
    for node in nodes:
        for key in node.predecessors:
            (x0, y0), (x1, y1) = _ends(by_key[key], node, rankdir)
            # A cubic curve leaving and entering along the rank axis.
            if rankdir == "TB":
                middle = (y0 + y1) / 2
                controls = f"{x0:.1f},{middle:.1f} {x1:.1f},{middle:.1f}"
            else:
                middle = (x0 + x1) / 2
                controls = f"{middle:.1f},{y0:.1f} {middle:.1f},{y1:.1f}"
            path = f"M{x0:.1f},{y0:.1f} C{controls} {x1:.1f},{y1:.1f}"
            out.append(f'<path d="{path}" fill="none" stroke="#444" '
                       'marker-end="url(#arrow)"/>')
    for node in nodes:
        if node.kind == "layer":
            out.append(f'<rect x="{node.x - node.width / 2:.1f}" y="{node.y - node.height / 2:.1f}"'
                       f' width="{node.width:.1f}" height="{node.height:.1f}" rx="4" '
                       f'fill="{node.color}" stroke="#333"/>')
        else:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in _octagon(node))
            out.append(f'<polygon points="{points}" fill="{node.color}" stroke="#333"/>')
        first = node.y - (len(node.lines) - 1) * _LINE_HEIGHT / 2
        for index, line in enumerate(node.lines):
            weight = ' font-weight="bold"' if index == 0 else ""
            out.append(f'<text x="{node.x:.1f}" y="{first + index * _LINE_HEIGHT:.1f}" '
                       f'text-anchor="middle" dominant-baseline="central"{weight}>'
                       f"{html.escape(line)}</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def to_png(nodes: List[DrawNode], rankdir: str, title: str, path: Path) -> None:
    """The laid-out nodes drawn with matplotlib into a PNG (one point per layout pixel)."""
    try:
        import matplotlib
    except ImportError as error:
        raise CaffeLayersError(f"a PNG drawing needs matplotlib ({error}): pip install "
                               "'caffelayers[plot]', or write .svg or .dot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Polygon

    width, height = layout(nodes, rankdir)
    by_key = {node.key: node for node in nodes}
    figure = plt.figure(figsize=(width / 72, height / 72))
    axis = figure.add_axes((0, 0, 1, 1))
    axis.set_xlim(0, width)
    axis.set_ylim(height, 0)
    axis.axis("off")
    style = "arc3,rad=0"
    for node in nodes:
        for key in node.predecessors:
            start, end = _ends(by_key[key], node, rankdir)
            axis.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=8,
                                           color="#444", connectionstyle=style, lw=0.8))
    for node in nodes:
        if node.kind == "layer":
            axis.add_patch(FancyBboxPatch((node.x - node.width / 2, node.y - node.height / 2),
                                          node.width, node.height, boxstyle="round,pad=0,"
                                          "rounding_size=4", facecolor=node.color,
                                          edgecolor="#333", lw=0.8))
        else:
            axis.add_patch(Polygon(_octagon(node), closed=True, facecolor=node.color,
                                   edgecolor="#333", lw=0.8))
        axis.text(node.x, node.y, "\n".join(node.lines), ha="center", va="center",
                  fontsize=8, linespacing=1.25, family="sans-serif")
    figure.savefig(path, dpi=100, metadata={"Title": title})
    plt.close(figure)


def _dot_text(text: str, record: bool = False) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if record:  # a record label's field syntax
        for special in "{}|<>":
            text = text.replace(special, "\\" + special)
    return text


def to_dot(nodes: List[DrawNode], rankdir: str, title: str) -> str:
    """Graphviz source with Caffe's draw_net styles (records for layers, octagons for blobs)."""
    out = [f'digraph "{_dot_text(title)}" {{', f"  rankdir={rankdir};",
           '  node [fontname="Helvetica", fontsize=10];']
    for node in nodes:
        shape = "record" if node.kind == "layer" else "octagon"
        label = "\\n".join(_dot_text(line, shape == "record") for line in node.lines)
        out.append(f'  "{node.key}" [label="{label}", shape={shape}, style=filled, '
                   f'fillcolor="{node.color}"];')
    for node in nodes:
        for key in node.predecessors:
            out.append(f'  "{key}" -> "{node.key}";')
    out.append("}")
    return "\n".join(out) + "\n"


def cmd_draw(args) -> int:
    from ..graph import build_graph, load_net_param, parse_input_specs
    from ..layers.base import BuildContext

    suffix = Path(args.output).suffix.lower()
    if suffix not in (".svg", ".png", ".dot"):
        raise CaffeLayersError(f"-o {args.output}: write .svg, .png or .dot")
    net_param, source_dir = load_net_param(args.net, args.phase, args.level, args.stage)
    graph = build_graph(net_param, parse_input_specs(args.input),
                        BuildContext(phase=args.phase, source_dir=source_dir,
                                     source_file=Path(args.net), fill=False),
                        device="meta", strict=False)
    nodes = net_drawing(graph)
    title = f"{graph.name or 'Net'} ({args.phase})"
    output = Path(args.output)
    print(f"Drawing net to {output}")
    if suffix == ".dot":
        output.write_text(to_dot(nodes, args.rankdir, title))
    elif suffix == ".svg":
        output.write_text(to_svg(nodes, args.rankdir, title))
    else:
        to_png(nodes, args.rankdir, title, output)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``draw`` command to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "draw", help="draw a net's layers and blobs (Caffe's draw_net.py)",
        description="Draw a net: layers and blobs as nodes, with output shapes and "
                    "parameter counts, to SVG, PNG or Graphviz DOT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("net", metavar="NET.prototxt", help="net .prototxt")
    parser.add_argument("-o", "--output", required=True, metavar="net.svg|net.png|net.dot", help="net.svg, net.png or net.dot")
    parser.add_argument("--rankdir", default="LR", type=str.upper, choices=["LR", "TB"],
                        help="left to right or top to bottom (Caffe's default is LR)")
    parser.add_argument("--phase", default="TEST", type=str.upper, choices=["TRAIN", "TEST"],
                        help="the layers of this phase")
    add_net_state_options(parser)
    parser.set_defaults(run=cmd_draw)
    return parser
