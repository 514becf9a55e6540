"""The source tree imports exactly as the installed package: from the repository root, from
anywhere else (the editable install), and from a built wheel, in fresh interpreters.

proto/ and converters/ sit at the top of the tree and are linked into caffelayers/ (see the
README's "Layout"), so each check also says where every module was found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Imports every public module of caffelayers and prints {module: real path of its file}.
IMPORT_ALL = r"""
import importlib, json, os, pkgutil, sys
import caffelayers
found = {}
def visit(package):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name.rpartition(".")[2].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        found[info.name] = os.path.realpath(module.__file__)
        if info.ispkg:
            visit(module)
found["caffelayers"] = os.path.realpath(caffelayers.__file__)
visit(caffelayers)
print(json.dumps(found))
"""


def import_all(cwd: Path, pythonpath: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def check_modules(found: dict, home: Path) -> None:
    """Every subpackage the design names is there, each module found under ``home``."""
    for name in ("caffelayers.proto.io", "caffelayers.proto.caffe_pb2", "caffelayers.solver.engine",
                 "caffelayers.converters.onnx.core", "caffelayers.converters.pytorch.codegen",
                 "caffelayers.layers.pooling", "caffelayers.losses.infogain", "caffelayers.cli"):
        assert name in found, f"{name} was not importable"
    outside = {name: path for name, path in found.items()
               if not Path(path).is_relative_to(home.resolve())}
    assert not outside, f"modules found outside {home}: {outside}"


def test_repository_root_imports_the_source_tree():
    found = import_all(ROOT)
    check_modules(found, ROOT)
    # proto/ and converters/ are the single source: the links resolve to the top-level folders.
    assert found["caffelayers.proto.io"] == str(ROOT / "proto" / "io.py")
    assert found["caffelayers.converters.onnx.core"] == str(ROOT / "converters" / "onnx" / "core.py")


def test_elsewhere_imports_the_installed_package(tmp_path):
    # `make` installs the checkout editable, so the installed package is this tree too.
    check_modules(import_all(tmp_path), ROOT)


def test_top_level_folders_are_not_importable_on_their_own(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import proto"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, "proto/ leaked onto sys.path as a top-level package"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"pip wheel failed: {done.stderr[-2000:]}")
    (path,) = out.glob("caffelayers-*.whl")
    return path


def test_wheel_holds_real_files_and_imports(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        for info in archive.infolist():
            # A link stored in a wheel would point outside the installed package.
            assert (info.external_attr >> 16) & 0o170000 != 0o120000, f"{info.filename} is a link"
        archive.extractall(tmp_path / "site")
    assert "caffelayers/proto/caffe.proto" in names
    assert "caffelayers/converters/onnx/core.py" in names
    assert not [n for n in names if n.split("/")[0] in ("proto", "converters", "tests")]
    work = tmp_path / "elsewhere"
    work.mkdir()
    check_modules(import_all(work, pythonpath=str(tmp_path / "site")), tmp_path / "site")


def test_no_module_is_over_900_lines():
    """Each file has one job; past 900 lines a module is doing several (the generated
    caffe_pb2.py aside)."""
    files = {path.resolve() for folder in ("caffelayers", "proto", "converters")
             for path in (ROOT / folder).rglob("*.py") if path.name != "caffe_pb2.py"}
    long = {str(path.relative_to(ROOT)): n for path in files
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 900}
    assert not long, f"modules over 900 lines: {long}"
