"""The ``caffelayers`` command line.

Bad input ends with one ``error: ...`` line on stderr and exit status 2; anything else that
escapes is a bug and keeps its traceback so that it gets reported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from . import __version__
from .errors import CaffeLayersError, shape_text
from .options import add_net_state_options, add_unknown_fields_option
from .registry import LAYERS
from .train import add_train_parser


def _inspect_rows(graph) -> List[dict]:
    from .proto.forks import fork_of_type

    rows = []
    for node in graph.nodes:
        known = node.type in LAYERS
        rows.append({
            "name": node.name,
            "type": node.type if known else f"{node.type} (unknown)",
            "fork": fork_of_type(node.type),
            "bottoms": node.bottoms,
            "tops": node.tops,
            "shapes": [None if s is None else list(s) for s in node.top_shapes],
            "params": node.num_params,
        })
    return rows


def cmd_inspect(args) -> int:
    from .graph import build_graph, load_net_param, parse_input_specs
    from .layers.base import BuildContext
    from .net import check_weights_fit, read_weights, warn_unloaded

    net_param, source_dir = load_net_param(args.net, args.phase, args.level, args.stage,
                                           allow_unknown_fields=args.allow_unknown_fields)
    graph = build_graph(net_param, parse_input_specs(args.input),
                        BuildContext(phase=args.phase.upper(), source_dir=source_dir,
                                     source_file=Path(args.net), fill=False),
                        device="meta", strict=False)
    if args.weights:
        warn_unloaded(check_weights_fit(graph.nodes, read_weights(args.weights, lazy=True),
                                        args.weights), args.weights)
    rows = _inspect_rows(graph)
    known_params = [row["params"] for row in rows if row["params"] is not None]
    total = sum(known_params)
    complete = len(known_params) == len(rows)
    if args.json:
        print(json.dumps({"name": graph.name, "phase": args.phase.upper(), "layers": rows,
                          "inputs": graph.inputs, "outputs": graph.outputs,
                          "total_params": total, "total_params_complete": complete,
                          "unknown_layers": [list(u) for u in graph.unknown],
                          "notes": graph.notes}, indent=2))
        return 0
    table = [("name", "type", "bottoms -> tops", "output shapes", "params")]
    for row in rows:
        table.append((row["name"], row["type"],
                      f"{','.join(row['bottoms']) or '-'} -> {','.join(row['tops']) or '-'}",
                      " ".join(shape_text(s) for s in row["shapes"]) or "-",
                      "?" if row["params"] is None else f"{row['params']:,}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    print(f"net {graph.name!r}, phase {args.phase.upper()}, {len(rows)} layers")
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j < 4 else cell.rjust(w)
                        for j, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"total parameters: {total:,}" + ("" if complete else " (plus layers of unknown size)"))
    print(f"inputs: {', '.join(graph.inputs) or 'none'}; outputs: {', '.join(graph.outputs)}")
    forks: Dict[str, List[str]] = {}
    for row in rows:
        if row["fork"] and row["type"] not in forks.setdefault(row["fork"], []):
            forks[row["fork"]].append(row["type"])
    for fork, types in forks.items():
        print(f"from {fork}: {', '.join(types)}")
    if graph.unknown:
        print("unknown layer types: " + ", ".join(f"{n!r} ({t})" for n, t in graph.unknown))
    for note in graph.notes:
        print(f"note: {note}")
    return 0


def _report(result, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        for failure in result.failures:
            print(f"  {failure.describe()}")
        print(result.summary)
    return 0 if result.passed else 1


def cmd_verify(args) -> int:
    from .verify import compare_forward, open_case, verify_case

    if args.runtime == "torch":
        result = verify_case(args.case, rtol=args.rtol, atol=args.atol,
                             margin_backward=args.margin_backward, loss_mode=args.loss_mode)
    elif args.runtime == "onnxruntime":
        from .converters.onnx import verify_case_onnx

        result = verify_case_onnx(args.case, rtol=args.rtol, atol=args.atol)
    else:
        from .converters.pytorch import ConvertedNet

        meta, arrays, net = open_case(args.case, phase="TEST")
        converted = ConvertedNet(net, args.runtime)
        result = compare_forward(meta, arrays, lambda inputs: converted(**inputs),
                                 args.rtol, args.atol)
        result.case = meta.get("case", Path(args.case).name)
    return _report(result, args.json)


def cmd_convert(args) -> int:
    from . import convert
    from .graph import located, build_graph, load_net_param, parse_input_specs
    from .layers.base import BuildContext
    from .net import Net
    from .verify import compare_forward, load_reference, reshape_to_reference

    inputs = parse_input_specs(args.input)
    net_param, source_dir = load_net_param(args.net, args.phase, args.level, args.stage,
                                           allow_unknown_fields=args.allow_unknown_fields)
    source = args.net
    outputs = [blob for blob in (args.outputs or "").split(",") if blob]
    if outputs:  # the part of the net that computes these blobs, built from the message
        net_param = convert.cut_at_blobs(net_param, outputs, args.net)
        source = convert.anchor_paths(net_param, source_dir)
    graph = build_graph(net_param, inputs, BuildContext(phase=args.phase, source_dir=source_dir,
                                                        source_file=Path(args.net), fill=False),
                        device="meta", strict=False)
    with located(Path(args.net)):
        convert.check_convertible(graph, args.to)  # every layer it cannot convert, at once
        preprocess = convert.preprocess_spec(net_param, source_dir, graph.inputs)
    if not args.weights:
        print("note: no weights given: parameters come from the prototxt's fillers "
              f"(seed {args.seed})", file=sys.stderr)
    net = Net(source, args.weights, phase=args.phase, inputs=inputs or None, seed=args.seed,
              level=args.level, stages=args.stage,
              allow_unknown_fields=args.allow_unknown_fields, source_file=Path(args.net))
    written = convert.write(net, args.to, args.output, args.opset, args.static_batch,
                            args.static_shape, outputs, args.class_name)
    if preprocess is not None:
        convert.write_preprocess(preprocess, args.to, written)
    for path in written:
        print(f"wrote {path}")
    if preprocess is not None:
        print(f"note: {convert.preprocess_note(preprocess, args.to)}", file=sys.stderr)
    note = convert.input_size_note(net, args.static_shape) if args.to == "onnx" else None
    if note:
        print(f"note: {note}", file=sys.stderr)
    if not args.reference:
        return 0
    meta, arrays = load_reference(args.reference)
    reshape_to_reference(net, meta, arrays)  # inputs the net cannot take: the layer is named
    result = compare_forward(meta, arrays, convert.runner(args.to, args.output), args.rtol,
                             args.atol)
    return _report(result, False)


def layer_table() -> str:
    """The Markdown table of supported layer types that the README shows (from the registries):
    each type's fork, its module (the forward), whether Caffe defines a backward for it, and
    whether it converts to ONNX and to PyTorch source."""
    from .converters.onnx import UNSUPPORTED
    from .converters.pytorch import SOURCE_EMITTERS
    from .proto.forks import fork_of_type
    from .registry import EMITTERS

    lines = ["| Caffe type | fork | forward | backward | ONNX | PyTorch source | what it computes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for type_name in sorted(LAYERS, key=str.lower):
        cls = LAYERS[type_name]
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        summary = summary.rstrip(".").replace("|", "\\|")
        onnx = "yes" if type_name in EMITTERS else \
            "no" if type_name not in UNSUPPORTED else "no (see `convert`)"
        lines.append(f"| `{type_name}` | {fork_of_type(type_name) or 'BVLC'} "
                     f"| `{cls.__module__}.{cls.__name__}` "
                     f"| {'yes' if cls.has_backward else 'no'} | {onnx} "
                     f"| {'yes' if type_name in SOURCE_EMITTERS else 'no'} | {summary} |")
    return "\n".join(lines)


def cmd_layers(args) -> int:
    print(layer_table())
    return 0


def _option_value(action: argparse.Action) -> str:
    """What follows an option in the synopsis: its choices, its metavar, or its default as an
    example value."""
    if action.choices:
        return "|".join(map(str, action.choices))
    if action.metavar:
        return action.metavar
    if isinstance(action.default, float):  # 0.0001 and 1e-06 as a reader writes them
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{action.default:g}").replace("e+", "e")
    if action.default not in (None, [], ""):
        return str(action.default)
    return action.dest.upper()


def _usage_words(parser: argparse.ArgumentParser) -> List[str]:
    """One word per argument: positionals by their metavar, required options bare, the others
    in brackets, ``...`` after what may repeat."""
    words = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not action.option_strings:
            name = action.metavar or action.dest.upper()
            words.append(f"[{name}]" if action.nargs == "?" else
                         f"{name}..." if action.nargs in ("+", "*") else name)
            continue
        word = action.option_strings[0]
        if action.nargs != 0:
            word += " " + _option_value(action)
        repeats = isinstance(action, (argparse._AppendAction, argparse._ExtendAction))
        words.append((word if action.required else f"[{word}]") + ("..." if repeats else ""))
    return words


def _wrap(words: List[str], width: int) -> List[str]:
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append("    " + word)
        else:
            lines[-1] += " " + word
    return lines


def synopsis(commands: List[str], width: int = 95) -> str:
    """The README's fenced ``sh`` block of usage lines for these subcommands, rendered from
    :func:`build_parser` (``make readme`` writes it; a test fails when it is stale). The name
    ``caffelayers`` among them stands for the line of the command's own options; a
    subcommand without arguments gets its help as a comment."""
    parser = build_parser()
    subparsers = next(action for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    lines = []
    for name in commands:
        if name == "caffelayers":
            lines += _wrap(["caffelayers"] + _usage_words(parser) + ["COMMAND", "..."], width)
            continue
        words = _usage_words(subparsers.choices[name])
        lines += _wrap(["caffelayers", name] + words, width) if words else \
            [f"caffelayers {name}  # {helps[name]}"]
    return "```sh\n" + "\n".join(lines) + "\n```"


def rewrite_readme_synopses(text: str) -> str:
    """``text`` with every block between ``<!-- synopsis: COMMAND ... -->`` and
    ``<!-- synopsis:end -->`` rendered anew by :func:`synopsis`."""
    return re.sub(r"(<!-- synopsis: ([^>]*?) -->\n).*?(<!-- synopsis:end -->)",
                  lambda m: m.group(1) + synopsis(m.group(2).split()) + "\n" + m.group(3),
                  text, flags=re.DOTALL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caffelayers",
        description="Load, inspect, verify and convert Caffe models (SphereFace's included).")
    parser.add_argument("--version", action="version", version=f"caffelayers {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE",
                        help="import MODULE before the command (repeatable), so that the layer "
                             "types, ONNX emitters and PyTorch source emitters it registers "
                             "work here; it is found on PYTHONPATH")
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="list a net's layers, blob shapes and parameters")
    inspect.add_argument("net", metavar="NET.prototxt", help="net .prototxt")
    inspect.add_argument("weights", nargs="?", metavar="WEIGHTS.caffemodel",
                         help=".caffemodel to check against the net")
    inspect.add_argument("--phase", default="TEST", type=str.upper, choices=["TRAIN", "TEST"])
    add_net_state_options(inspect)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    add_unknown_fields_option(inspect)
    inspect.set_defaults(run=cmd_inspect)

    verify = sub.add_parser("verify", help="replay a Caffe reference case and compare")
    verify.add_argument("case", metavar="CASE_DIR",
                        help="case directory (net.prototxt, weights.caffemodel, "
                             "reference.npz)")
    verify.add_argument("--rtol", type=float, default=1e-4)
    verify.add_argument("--atol", type=float, default=1e-6)
    verify.add_argument("--margin-backward", choices=["caffe", "exact"], default="caffe")
    verify.add_argument("--loss-mode", choices=["caffe", "exact"], default="caffe")
    verify.add_argument("--runtime", default="torch",
                        choices=["torch", "onnxruntime", "pytorch-source", "torchscript"],
                        help="replay through the Net runtime (forward and backward) or "
                             "through a converted model (forward)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(run=cmd_verify)

    convert = sub.add_parser("convert", help="convert a Caffe net to ONNX, PyTorch source or "
                                             "TorchScript")
    convert.add_argument("net", metavar="NET.prototxt", help="net .prototxt")
    convert.add_argument("weights", nargs="?", metavar="WEIGHTS.caffemodel",
                         help=".caffemodel (without it: the fillers)")
    convert.add_argument("--to", required=True,
                         choices=["onnx", "pytorch", "torchscript", "exported"])
    convert.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="output file (onnx, torchscript, exported: a .pt2) or "
                              "directory (pytorch)")
    convert.add_argument("--phase", default="TEST", type=str.upper, choices=["TRAIN", "TEST"])
    add_net_state_options(convert)
    convert.add_argument("--opset", type=int, default=17, help="ONNX opset (13 or newer)")
    convert.add_argument("--static-batch", action="store_true",
                         help="fix the batch dimension of the ONNX model")
    convert.add_argument("--static-shape", action="store_true",
                         help="keep the prototxt's height and width in the ONNX model. "
                              "Without it they are symbolic (the model runs at any size the "
                              "net accepts) when the net is fully convolutional: no layer "
                              "fixes them, such as an InnerProduct on spatial features, a "
                              "Reshape to fixed dims, a fixed-size Crop or a loss; a note says "
                              "which layer keeps them fixed")
    convert.add_argument("--reference", metavar="REFERENCE.npz",
                         help="run the converted model on these inputs and compare")
    convert.add_argument("--seed", type=int, default=0, help="filler seed without weights")
    convert.add_argument("--rtol", type=float, default=1e-4)
    convert.add_argument("--atol", type=float, default=1e-6)
    add_unknown_fields_option(convert)
    convert.add_argument("--outputs", metavar="BLOB,...",
                         help="cut the net at these blobs: only the layers computing them are "
                              "converted (the loss and accuracy layers of a training net "
                              "fall away); the ONNX model returns each of them")
    convert.add_argument("--class-name", metavar="NAME",
                         help="the generated PyTorch class (default: from the net's name:)")
    convert.set_defaults(run=cmd_convert)

    add_train_parser(sub)
    from .tools import TOOLS  # test, time, plot, draw: Caffe's tools around `caffe`

    for tool in TOOLS:
        tool.add_parser(sub)

    layers = sub.add_parser("layers", help="the supported Caffe layer types (Markdown table)")
    layers.set_defaults(run=cmd_layers)
    return parser


def import_user_module(name: str) -> None:
    """Import a module of the user's (``--import``), whose import registers their layer types.

    Whatever its import raises (a missing module, a syntax error, a type registered twice) is
    their input going wrong, so it becomes one error naming the module rather than a traceback.
    """
    try:
        importlib.import_module(name)
    except Exception as error:  # any failure of the user's code is reported
        raise CaffeLayersError(f"--import {name}: {type(error).__name__}: {error}") from error


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}",
                                                                  file=sys.stderr)
        try:
            for name in args.imports:
                import_user_module(name)
            return args.run(args)
        except CaffeLayersError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # a second Ctrl-C during train's snapshot, say
            return 130


if __name__ == "__main__":
    sys.exit(main())
