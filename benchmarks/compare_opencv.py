"""OpenCV's Caffe importer against caffelayers on every Caffe reference case.

For each case in ``fixtures/caffe`` the script loads ``net.prototxt`` and
``weights.caffemodel`` with ``cv2.dnn.readNetFromCaffe``, feeds ``input/*`` and compares the
net's outputs (the blobs no layer reads, as Caffe counts them) after the first forward with
``iter0/data/<blob>`` by the fixtures' rule (``caffelayers.verify.compare``: rtol 1e-4,
atol 1e-6). caffelayers gets the same comparison on the same blobs, and beside it the full
``verify_case`` verdict (every recorded array: blobs, parameters, gradients, solver steps).

Each case runs OpenCV in a child process of its own, so that a crash inside OpenCV is counted
as one failed case instead of ending the run. Both libraries get 2 threads.

    python benchmarks/compare_opencv.py [--cases DIR] [--only NAME ...]

Needs ``opencv-python-headless<5`` (OpenCV 5 removed the Caffe importer), see
``benchmarks/requirements.txt``. Columns: ``OpenCV`` is ``load fail``, ``run fail``,
``crash``, ``mismatch`` or ``match`` (OpenCV creates the layers at the first forward, so a
layer type it does not know counts as ``load fail`` even though ``readNetFromCaffe``
returned); ``err/tol`` is the worst output's max error over its
tolerance (1 is the limit); ``verify`` is ``PASS``/``FAIL`` with the arrays that passed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
CHILD_TIMEOUT_S = 120


def opencv_child(case_dir: str, requests_json: str, out_path: str) -> None:
    """Run one case in OpenCV and save the requested blobs to ``out_path`` (npz).

    ``requests_json`` lists ``[blob, layer, top index]``: OpenCV names outputs by layer, so
    each blob is fetched as an output of the last layer that wrote it. Prints one JSON line
    with the status.
    """
    import cv2

    cv2.setNumThreads(THREADS)
    case = Path(case_dir)
    weights = case / "weights.caffemodel"
    try:
        net = (cv2.dnn.readNetFromCaffe(str(case / "net.prototxt"), str(weights))
               if weights.is_file() else cv2.dnn.readNetFromCaffe(str(case / "net.prototxt")))
    except cv2.error as error:
        print(json.dumps({"status": "load fail", "reason": short_cv_error(error)}))
        return
    try:
        with np.load(case / "reference.npz", allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            inputs = {name: archive[f"input/{name}"] for name in meta["inputs"]}
        for name, value in inputs.items():
            net.setInput(np.ascontiguousarray(value, dtype=np.float32), name)
        names = set(net.getLayerNames())
        results, by_layer = {}, {}
        for blob, layer, index in json.loads(requests_json):
            if layer not in names and blob in names:
                # The importer names some layers (Convolution) after their top blob.
                layer, index = blob, 0
            if layer not in by_layer:
                by_layer[layer] = net.forward(outputBlobs=None, outputName=layer)
            results[blob] = np.asarray(by_layer[layer][index])
    except cv2.error as error:
        reason = short_cv_error(error)
        # OpenCV creates the layers at the first forward: an unknown type surfaces there.
        status = "load fail" if reason.startswith("Can't create layer") else "run fail"
        print(json.dumps({"status": status, "reason": reason}))
        return
    np.savez(out_path, **{f"blob{i}": results[blob] for i, blob in enumerate(results)})
    print(json.dumps({"status": "ran", "blobs": list(results)}))


def short_cv_error(error) -> str:
    """The message of an OpenCV error without its file, line, function and operands."""
    text = re.split(r"error: \(-?\d+:[^)]*\)", str(error), maxsplit=1)[-1]
    text = re.sub(r"in function '[^']*'|^> ", "", text, flags=re.MULTILINE)
    text = " ".join(text.split(" (expected:")[0].split())
    return text[:70]


def output_requests(net):
    """``[blob, layer, top index]`` of each net output that a layer (not an input) wrote."""
    producer = {}
    for node in net.graph.nodes:
        for index, top in enumerate(node.tops):
            producer[top] = None if node.is_input else (node.name, index)
    return [[blob, *producer[blob]] for blob in net.outputs if producer.get(blob)]


def run_opencv(case_dir: Path, requests) -> dict:
    """The child's status, with ``outputs`` (blob -> array) when it ran."""
    with tempfile.TemporaryDirectory() as scratch:
        out_path = Path(scratch) / "outputs.npz"
        command = [sys.executable, __file__, "--opencv-child", str(case_dir),
                   json.dumps(requests), str(out_path)]
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"status": "crash", "reason": f"no answer in {CHILD_TIMEOUT_S} s"}
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            return {"status": "crash", "reason": f"exit status {done.returncode}"}
        status = json.loads(lines[-1])
        if status["status"] == "ran":
            with np.load(out_path) as saved:
                status["outputs"] = {blob: saved[f"blob{i}"]
                                     for i, blob in enumerate(status["blobs"])}
        return status


def compare_outputs(outputs: dict, blobs, arrays) -> tuple:
    """``(all passed, worst error / tolerance)`` over the recorded outputs among ``blobs``."""
    from caffelayers.verify import compare

    checks = [compare(blob, outputs.get(blob), arrays[f"iter0/data/{blob}"])
              for blob in blobs if f"iter0/data/{blob}" in arrays]
    if not checks:
        return False, float("nan")
    ratio = max(check.error / check.tolerance if check.tolerance else
                (0.0 if check.error == 0 else float("inf")) for check in checks)
    return all(check.passed for check in checks), ratio


def case_row(case_dir: Path) -> dict:
    """Both libraries on one case."""
    import torch

    from caffelayers.net import Net
    from caffelayers.verify import load_reference, verify_case

    meta, arrays = load_reference(case_dir)
    row = {"case": case_dir.name}
    weights = case_dir / "weights.caffemodel"
    net = Net(case_dir / "net.prototxt", weights if weights.is_file() else None,
              phase=meta.get("phase", "TEST"))
    requests = output_requests(net)
    blobs = [blob for blob, _, _ in requests]
    with torch.no_grad():
        ours = net(**{name: arrays[f"input/{name}"] for name in meta["inputs"]})
    row["ours_match"], row["ours_ratio"] = compare_outputs(ours, blobs, arrays)
    result = verify_case(case_dir)
    good = sum(check.passed for check in result.checks)
    row["verify"] = f"{'PASS' if result.passed else 'FAIL'} {good}/{len(result.checks)}"
    row["verify_passed"] = result.passed

    opencv = run_opencv(case_dir, requests)
    row["cv_status"], row["cv_reason"] = opencv["status"], opencv.get("reason", "")
    row["cv_ratio"] = float("nan")
    if opencv["status"] == "ran":
        match, row["cv_ratio"] = compare_outputs(opencv["outputs"], blobs, arrays)
        row["cv_status"] = "match" if match else "mismatch"
    return row


def ratio_text(ratio: float) -> str:
    return "-" if np.isnan(ratio) else f"{ratio:.2g}"


def print_table(rows) -> None:
    header = f"{'case':<30} {'OpenCV':<9} {'err/tol':>8}  {'caffelayers':<11} {'err/tol':>8}  " \
             f"{'verify':<12} OpenCV's reason"
    print(header)
    print("-" * len(header))
    for row in rows:
        ours = "match" if row["ours_match"] else "mismatch"
        print(f"{row['case']:<30} {row['cv_status']:<9} {ratio_text(row['cv_ratio']):>8}  "
              f"{ours:<11} {ratio_text(row['ours_ratio']):>8}  {row['verify']:<12} "
              f"{row['cv_reason']}")
    total = len(rows)
    loaded = sum(row["cv_status"] != "load fail" for row in rows)
    ran = sum(row["cv_status"] in ("match", "mismatch") for row in rows)
    cv_match = sum(row["cv_status"] == "match" for row in rows)
    ours_match = sum(row["ours_match"] for row in rows)
    verified = sum(row["verify_passed"] for row in rows)
    print("-" * len(header))
    print(f"OpenCV:      loads {loaded}/{total}, runs {ran}/{total}, "
          f"reproduces the outputs of {cv_match}/{total}")
    print(f"caffelayers: loads {total}/{total}, reproduces the outputs of {ours_match}/{total}, "
          f"verify passes {verified}/{total} (every recorded array)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, default=ROOT / "fixtures" / "caffe")
    parser.add_argument("--only", nargs="*", help="case names (default: every case)")
    parser.add_argument("--opencv-child", nargs=3, metavar=("CASE", "REQUESTS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.opencv_child:
        opencv_child(*args.opencv_child)
        return

    import cv2
    import torch

    if not hasattr(getattr(cv2, "dnn", None), "readNetFromCaffe"):
        sys.exit(f"OpenCV {cv2.__version__} has no cv2.dnn.readNetFromCaffe (OpenCV 5 removed "
                 "it): install opencv-python-headless<5, see benchmarks/requirements.txt")
    torch.set_num_threads(THREADS)
    print(f"OpenCV {cv2.__version__}, torch {torch.__version__}, {THREADS} threads each; "
          f"tolerance rtol 1e-4, atol 1e-6 on max|caffe|\n")
    cases = sorted(path for path in args.cases.iterdir() if (path / "reference.npz").is_file())
    if args.only:
        cases = [path for path in cases if path.name in args.only]
    print_table([case_row(case) for case in cases])


if __name__ == "__main__":
    main()
