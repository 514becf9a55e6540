"""The command as installed: its version, ``python -m caffelayers``, and ``--import`` of a
user's module whose layer types then convert. Every test runs a real process."""

import argparse
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

import caffelayers

SCRIPT = Path(sys.executable).parent / "caffelayers"

# A user's module: a layer type caffelayers does not have, with both converters' emitters.
USER_MODULE = '''
from caffelayers import register_emitter, register_layer
from caffelayers.converters.pytorch import register_source_emitter
from caffelayers.layers import CaffeLayer


@register_layer("TripleForTest")
class Triple(CaffeLayer):
    """y = 3 x."""

    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx):
        return cls()

    def output_shapes(self, bottom_shapes):
        return [bottom_shapes[0]]

    def forward(self, x):
        return 3 * x


@register_emitter("TripleForTest")
def emit_triple(ctx, node):
    (x,), (top,) = ctx.bottoms(node), ctx.tops(node)
    ctx.op("Mul", [x, ctx.const(3.0, "three")], top)


@register_source_emitter("TripleForTest")
def triple_source(layer):
    layer.assign(f"3 * {layer.bottoms[0]}")
'''

NET = '''name: "triple"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 5 dim: 7 dim: 3 } } }
layer { name: "triple" type: "TripleForTest" bottom: "data" top: "out" }
'''


def run(*argv, cwd=None, env=None):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env, check=False)


def with_pythonpath(path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return env


def test_version_is_the_package_metadata():
    done = run(SCRIPT, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"caffelayers {caffelayers.__version__}"
    assert caffelayers.__version__ == metadata.version("caffelayers")


def test_python_dash_m_is_the_same_command(tmp_path):
    done = run(sys.executable, "-m", "caffelayers", "--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"caffelayers {caffelayers.__version__}"
    done = run(sys.executable, "-m", "caffelayers", "inspect", "no_such.prototxt", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_import_registers_a_users_layer_type_for_convert(tmp_path):
    (tmp_path / "user_layers").mkdir()
    (tmp_path / "user_layers" / "triple_layer.py").write_text(USER_MODULE)
    (tmp_path / "net.prototxt").write_text(NET)
    env = with_pythonpath(tmp_path / "user_layers")

    done = run(SCRIPT, "convert", "net.prototxt", "--to", "onnx", "-o", "triple.onnx",
               cwd=tmp_path, env=env)
    assert done.returncode == 2 and "TripleForTest" in done.stderr  # unknown without --import

    done = run(SCRIPT, "--import", "triple_layer", "convert", "net.prototxt", "--to", "onnx",
               "-o", "triple.onnx", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    import onnxruntime

    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "triple.onnx"))
    (out,) = session.run(None, {"data": x})
    np.testing.assert_allclose(out, 3 * x, rtol=1e-6)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["caffelayers.prototxt"] == "net.prototxt"
    assert "caffelayers.caffemodel" not in meta  # no weights: nothing to name

    done = run(sys.executable, "-m", "caffelayers", "--import", "triple_layer", "convert",
               "net.prototxt", "--to", "pytorch", "-o", "triple_pytorch", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "3 * " in (tmp_path / "triple_pytorch" / "model.py").read_text()


def test_a_module_that_fails_to_import_is_one_error_line(tmp_path):
    (tmp_path / "broken_layers.py").write_text("raise RuntimeError('broken on purpose')\n")
    env = with_pythonpath(tmp_path)
    for module, words in (("broken_layers", "RuntimeError: broken on purpose"),
                          ("no_such_module_here", "ModuleNotFoundError")):
        done = run(SCRIPT, "--import", module, "layers", cwd=tmp_path, env=env)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [done.stderr.strip()]
        assert done.stderr.startswith(f"error: --import {module}: ") and words in done.stderr
        assert done.stdout == ""


def test_readme_synopses_are_the_parsers():
    from caffelayers.cli import rewrite_readme_synopses

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    from caffelayers.cli import build_parser

    assert "<!-- synopsis: caffelayers inspect convert verify train layers -->" in readme
    # every command is in exactly one block
    blocks = re.findall(r"<!-- synopsis: ([^>]*?) -->", readme)
    listed = sorted(name for block in blocks for name in block.split())
    commands = next(action for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction)).choices
    assert listed == sorted(["caffelayers", *commands])
    assert readme == rewrite_readme_synopses(readme), "stale: run `make readme`"


def test_synopsis_follows_the_parser():
    from caffelayers.cli import synopsis

    lines = synopsis(["caffelayers", "convert", "layers"]).splitlines()
    assert lines[0] == "```sh" and lines[-1] == "```"
    assert lines[1] == "caffelayers [--version] [--import MODULE]... COMMAND ..."
    convert = " ".join(line.strip() for line in lines[2:-2])
    # required options bare, optional ones bracketed, choices and defaults as values
    assert convert.startswith("caffelayers convert NET.prototxt [WEIGHTS.caffemodel] --to onnx|")
    assert " -o OUT " in convert and "[--opset 17]" in convert and "[--atol 1e-6]" in convert
    assert "[--input NAME=N,C,H,W]..." in convert and "[--static-batch]" in convert
    assert lines[-2].startswith("caffelayers layers  # ")
    assert max(map(len, lines)) <= 95
    assert synopsis(["layers"]).splitlines()[1].startswith("caffelayers layers  # ")


def test_onnx_model_names_its_sources_and_each_nodes_layer(tmp_path, cases_dir):
    import onnx

    from caffelayers.cli import main

    case = cases_dir / "sphereface4_deploy"
    out = tmp_path / "model.onnx"
    assert main(["convert", str(case / "net.prototxt"), str(case / "weights.caffemodel"),
                 "--to", "onnx", "-o", str(out)]) == 0
    model = onnx.load(str(out))
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert meta["caffelayers.prototxt"] == "net.prototxt"  # the name, not the directory
    assert meta["caffelayers.caffemodel"] == "weights.caffemodel"
    assert "net.prototxt" in model.doc_string and "weights.caffemodel" in model.doc_string
    layers = {node.name: node.type for node in caffelayers.Net(case / "net.prototxt").graph.nodes}
    for node in model.graph.node:
        layer = re.fullmatch(r"Caffe layer '(.+)' of type (\w+)", node.doc_string)
        assert layer and layers[layer.group(1)] == layer.group(2), node.name
    assert {"Convolution", "InnerProduct"} <= {
        re.search(r"of type (\w+)", node.doc_string).group(1) for node in model.graph.node}


def test_class_name_from_the_nets_name():
    from caffelayers.converters.pytorch.codegen import class_name_for

    assert class_name_for("VGG_ILSVRC_16_layers") == "VGGILSVRC16Layers"
    assert class_name_for("ResNet-50") == "ResNet50"
    assert class_name_for("sphereface 4 deploy") == "Sphereface4Deploy"
    assert class_name_for("3d-unet") == "Net3dUnet"
    assert class_name_for("none") == "NoneNet"
    assert class_name_for("") == class_name_for("---") == "CaffeNet"


def test_generated_class_is_named_after_the_net_when_asked(tmp_path):
    from caffelayers.converters.pytorch import convert_to_pytorch
    from caffelayers.converters.pytorch.codegen import load_pytorch

    (tmp_path / "net.prototxt").write_text(
        'name: "my-res net"\n'
        'layer { name: "data" type: "Input" top: "data" '
        'input_param { shape { dim: 2 dim: 5 dim: 7 dim: 3 } } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }\n')
    net = caffelayers.Net(tmp_path / "net.prototxt")
    out = convert_to_pytorch(net, tmp_path / "out", class_name=None)
    assert "class MyResNet(nn.Module):" in (out / "model.py").read_text()
    assert type(load_pytorch(out)).__name__ == "MyResNet"
    out = convert_to_pytorch(net, tmp_path / "given", class_name="Given")
    assert "class Given(nn.Module):" in (out / "model.py").read_text()


def test_convert_names_the_class_after_the_net_or_as_told(tmp_path):
    case = Path(__file__).resolve().parent.parent / "fixtures" / "caffe" / "sphereface4_deploy"
    for extra, expected in (([], "class_name_for"), (["--class-name", "FaceNet4"], "FaceNet4")):
        out = tmp_path / (extra[1] if extra else "default")
        done = subprocess.run([sys.executable, "-m", "caffelayers", "convert",
                               str(case / "net.prototxt"), str(case / "weights.caffemodel"),
                               "--to", "pytorch", "-o", str(out), *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        source = (out / "model.py").read_text()
        if expected == "class_name_for":
            from caffelayers.converters.pytorch.codegen import class_name_for
            from caffelayers.proto import io

            expected = class_name_for(io.read_prototxt(case / "net.prototxt").name)
        assert f"\nclass {expected}(" in source
