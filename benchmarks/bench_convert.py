"""Conversion speed and memory on a VGG-16-sized model; inference speed against OpenCV.

Conversion. The script writes a VGG-16 deploy net (138,357,544 parameters, a 553 MB
caffemodel) with caffelayers' own writer (``Net(..., seed=0).save_caffemodel``), then times
these phases, each in a fresh Python process, ``--repeat`` times (default 3) taking turns:

* ``read + write bytes``: read the caffemodel into memory and write as many bytes to a new
  file: the I/O floor every conversion pays, and the unit of the ``x I/O`` column;
* ``import only``: importing caffelayers and both converters (the interpreter, torch and
  onnx are part of every later peak; its seconds are the imports, which the other rows
  leave out);
* ``load Net``: ``Net(prototxt, caffemodel)``;
* ``to ONNX``: ``Net`` + ``export_onnx`` (convert, write, full checker on the file), as
  ``caffelayers convert --to onnx`` runs it;
* ``to PyTorch``: ``Net`` + ``convert_to_pytorch`` (``model.py`` + ``weights.pt``, which
  it imports and loads back to check them).

Seconds (the median) exclude the imports; peak RSS (the highest) is the child's
``ru_maxrss`` and includes them and the memory-mapped caffemodel. The caffemodel sits in the
page cache for every phase and nothing is fsync'ed, so every phase pays the same write-back
to the disk as the I/O floor does. Targets (issue 7): a conversion within 2x the I/O
time, peak RSS under 2.5x the caffemodel's size.

Inference. The full-size SphereFace-20 deploy net (3x112x96 input, 512-D fc5 feature), its
filler weights saved to a caffemodel, runs in OpenCV's Caffe importer (``cv2.dnn``, the
anchor), in onnxruntime (our ONNX) and in PyTorch (our generated source) at batch 1 and 16,
2 threads each. The engines take turns within every round, so a change of load on the
machine hits all of them alike; the table gives the median milliseconds per batch and images
per second, and each engine's largest difference from ``Net``'s fc5 over its tolerance
(rtol 1e-4, atol 1e-6; 1 is the limit).

    python benchmarks/bench_convert.py                  # both parts, 3-4 min on 2 cores
    python benchmarks/bench_convert.py --skip-convert   # inference only, about 1 min
    python benchmarks/bench_convert.py --skip-infer --repeat 1 --keep /tmp/bench

OpenCV 5 removed ``cv2.dnn.readNetFromCaffe``: install ``opencv-python-headless<5``
(``benchmarks/requirements.txt``); without it the OpenCV rows say so and the rest runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
MB = 1e6
VGG_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
CONVERT_PHASES = (("io", "read + write bytes"), ("import", "import only"), ("load", "load Net"),
                  ("onnx", "to ONNX"), ("pytorch", "to PyTorch"))
TIME_TARGET, RSS_TARGET = 2.0, 2.5


# --- the nets ---------------------------------------------------------------------------

def vgg16_prototxt() -> str:
    """VGG-16 (configuration D) as a deploy prototxt: 13 3x3 convolutions with ReLU, five
    2x2 max pools, fc6/fc7 of 4096 with ReLU and Dropout, fc8 of 1000 and Softmax."""
    text = 'name: "VGG_ILSVRC_16_layers"\n' + _input_dims("data", (1, 3, 224, 224))
    bottom = "data"
    for block, (convs, width) in enumerate(VGG_BLOCKS, start=1):
        for index in range(1, convs + 1):
            name = f"conv{block}_{index}"
            text += (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" '
                     f'top: "{name}"\n  convolution_param {{ num_output: {width} pad: 1 '
                     f'kernel_size: 3\n    {_fillers()} }} }}\n'
                     f'layer {{ name: "relu{block}_{index}" type: "ReLU" bottom: "{name}" '
                     f'top: "{name}" }}\n')
            bottom = name
        text += (f'layer {{ name: "pool{block}" type: "Pooling" bottom: "{bottom}" '
                 f'top: "pool{block}"\n  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}\n')
        bottom = f"pool{block}"
    for name, width in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        text += (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" '
                 f'top: "{name}"\n  inner_product_param {{ num_output: {width}\n    '
                 f'{_fillers()} }} }}\n')
        if name != "fc8":
            text += (f'layer {{ name: "relu{name[2:]}" type: "ReLU" bottom: "{name}" '
                     f'top: "{name}" }}\n'
                     f'layer {{ name: "drop{name[2:]}" type: "Dropout" bottom: "{name}" '
                     f'top: "{name}" dropout_param {{ dropout_ratio: 0.5 }} }}\n')
        bottom = name
    return text + 'layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }\n'


def _input_dims(name: str, shape) -> str:
    return f'input: "{name}"\n' + "".join(f"input_dim: {d}\n" for d in shape)


def _fillers() -> str:
    return 'weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 }'


# --- phases, each run in a child process ------------------------------------------------

def child(phase: str, workdir: Path) -> dict:
    """Run one phase here and return what the parent prints (seconds, peak RSS, extras)."""
    import resource

    result, begin = {}, time.perf_counter()
    if phase == "io":
        start = time.perf_counter()
        data = (workdir / "vgg16.caffemodel").read_bytes()
        (workdir / "io_copy.bin").write_bytes(data)
        result["seconds"] = time.perf_counter() - start
    else:
        import torch

        torch.set_num_threads(THREADS)
        from caffelayers.converters.onnx import export_onnx
        from caffelayers.converters.pytorch import convert_to_pytorch
        from caffelayers.net import Net

        start = time.perf_counter()
        if phase in ("write-vgg16", "write-sphereface"):
            stem = phase[len("write-"):]
            net = Net(workdir / f"{stem}.prototxt", seed=0)
            net.save_caffemodel(workdir / f"{stem}.caffemodel")
            result["parameters"] = sum(p.numel() for p in net.parameters())
        elif phase in ("load", "onnx", "pytorch"):
            steps = result["steps"] = {}
            net = Net(workdir / "vgg16.prototxt", workdir / "vgg16.caffemodel")
            steps["load"] = time.perf_counter() - start
            if phase == "onnx":
                # What `caffelayers convert --to onnx` runs: the weights go from the net's
                # parameters to the file, never into a second in-memory model.
                written = export_onnx(net, workdir / "vgg16.onnx")
                result["bytes"] = sum(path.stat().st_size for path in written)
            elif phase == "pytorch":
                out = convert_to_pytorch(net, workdir / "vgg16_pytorch")
                result["bytes"] = sum(path.stat().st_size for path in out.iterdir())
        elif phase == "infer":
            result["rows"] = inference_rows(workdir)
        elif phase != "import":
            raise ValueError(f"unknown phase {phase!r}")
        # The import row reports the imports themselves; every other phase leaves them out.
        result["seconds"] = time.perf_counter() - (begin if phase == "import" else start)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return result


def run_child(phase: str, workdir: Path, timeout: float = 600) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", phase, str(workdir)],
                          check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"phase {phase} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- inference --------------------------------------------------------------------------

def inference_engines(workdir: Path):
    """Engine name -> function(batch array) -> fc5 as numpy, or -> the reason it is missing."""
    import numpy as np
    import onnxruntime
    import torch

    from caffelayers.converters.onnx import convert_to_onnx, save_onnx
    from caffelayers.converters.pytorch import convert_to_pytorch, load_pytorch
    from caffelayers.net import Net

    prototxt, weights = workdir / "sphereface.prototxt", workdir / "sphereface.caffemodel"
    engines = {}
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        version = getattr(cv2, "__version__", "not installed")
        engines[f"OpenCV {version}"] = ("unavailable: needs opencv-python-headless<5 "
                                        "(readNetFromCaffe)")
    else:
        cv2.setNumThreads(THREADS)
        cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))

        def run_opencv(batch):
            cv_net.setInput(batch)
            return cv_net.forward()
        engines[f"OpenCV {cv2.__version__} dnn"] = run_opencv

    net = Net(prototxt, weights)
    save_onnx(convert_to_onnx(net), workdir / "sphereface.onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = onnxruntime.InferenceSession(str(workdir / "sphereface.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    engines[f"onnxruntime {onnxruntime.__version__}"] = (
        lambda batch: session.run(None, {input_name: batch})[0])

    model = load_pytorch(convert_to_pytorch(net, workdir / "sphereface_pytorch"))

    def run_torch(batch):
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()
    engines[f"PyTorch {torch.__version__.split('+')[0]} source"] = run_torch

    def reference(batch):
        with torch.no_grad():
            return net(data=batch)["fc5"].numpy()
    return engines, reference, np


def inference_rows(workdir: Path, rounds=None):
    """One row per engine and batch: median ms per batch, images/s, error over tolerance."""
    import torch

    from caffelayers.verify import compare

    torch.set_num_threads(THREADS)
    engines, reference, np = inference_engines(workdir)
    rounds = rounds or {1: 20, 16: 5}
    rows = []
    for batch_size, count in rounds.items():
        batch = np.random.default_rng(batch_size).uniform(
            -1, 1, (batch_size, 3, 112, 96)).astype(np.float32)
        expected = reference(batch)
        runnable = {name: run for name, run in engines.items() if callable(run)}
        times = {name: [] for name in runnable}
        ratios = {}
        for round_ in range(count + 2):  # two warm-up rounds
            for name, run in runnable.items():
                start = time.perf_counter()
                output = run(batch)
                elapsed = time.perf_counter() - start
                if round_ >= 2:
                    times[name].append(elapsed)
                elif round_ == 0:
                    check = compare("fc5", np.asarray(output).reshape(expected.shape), expected)
                    ratios[name] = check.error / check.tolerance
        for name, run in engines.items():
            if not callable(run):
                rows.append({"engine": name, "batch": batch_size, "note": run})
                continue
            median = statistics.median(times[name])
            rows.append({"engine": name, "batch": batch_size, "ms": median * 1e3,
                         "images_per_s": batch_size / median, "ratio": ratios[name],
                         "rounds": count})
    return rows


# --- the report -------------------------------------------------------------------------

def convert_report(workdir: Path, repeat: int) -> None:
    (workdir / "vgg16.prototxt").write_text(vgg16_prototxt())
    made = run_child("write-vgg16", workdir)
    size = (workdir / "vgg16.caffemodel").stat().st_size
    print(f"VGG-16 deploy: {made['parameters']:,} parameters, caffemodel {size / MB:.1f} MB "
          f"(written by Net.save_caffemodel in {made['seconds']:.1f} s)")
    runs = {phase: [] for phase, _ in CONVERT_PHASES}
    for _ in range(repeat):  # phases take turns, so that a load change hits them alike
        for phase, _ in CONVERT_PHASES:
            runs[phase].append(run_child(phase, workdir))
            (workdir / "io_copy.bin").unlink(missing_ok=True)
    median = {phase: statistics.median(r["seconds"] for r in results)
              for phase, results in runs.items()}
    peak = {phase: max(r["peak_rss"] for r in results) for phase, results in runs.items()}
    header = (f"{'phase':<20} {'seconds':>8} {'x I/O':>6} {'peak RSS MB':>12} {'x model':>8} "
              f"{'output MB':>10}  seconds per step")
    print(header)
    print("-" * len(header))
    for phase, label in CONVERT_PHASES:
        last = runs[phase][-1]
        versus_io = "-" if phase == "import" else f"{median[phase] / median['io']:.2f}"
        output = f"{last['bytes'] / MB:.1f}" if "bytes" in last else "-"
        steps = ""
        if phase in ("onnx", "pytorch"):
            load = statistics.median(r["steps"]["load"] for r in runs[phase])
            step = "export_onnx" if phase == "onnx" else "convert_to_pytorch"
            steps = f"load {load:.1f}, {step} {median[phase] - load:.1f}"
        print(f"{label:<20} {median[phase]:>8.2f} {versus_io:>6} {peak[phase] / MB:>12.0f} "
              f"{peak[phase] / size:>8.2f} {output:>10}  {steps}")
    print("-" * len(header))
    for phase, label in (("onnx", "ONNX"), ("pytorch", "PyTorch")):
        time_ratio, rss_ratio = median[phase] / median["io"], peak[phase] / size
        print(f"{label:<8} time {time_ratio:.2f}x I/O (target <= {TIME_TARGET:g}x: "
              f"{'met' if time_ratio <= TIME_TARGET else 'MISSED'}), peak RSS "
              f"{rss_ratio:.2f}x model (target < {RSS_TARGET:g}x: "
              f"{'met' if rss_ratio < RSS_TARGET else 'MISSED'})")
    print(f"median seconds (imports excluded) and highest peak RSS (imports included) of "
          f"{repeat} runs, each in a fresh process")


def infer_report(workdir: Path) -> None:
    # Imported here: the parent process stays free of caffelayers (the children measure it).
    from caffelayers.sphereface import sphereface_prototxt

    (workdir / "sphereface.prototxt").write_text(sphereface_prototxt(train=False))
    made = run_child("write-sphereface", workdir)
    print(f"SphereFace-20 deploy: {made['parameters']:,} parameters, filler weights (seed 0), "
          f"input Nx3x112x96, output fc5 (512); {THREADS} threads per engine")
    rows = run_child("infer", workdir)["rows"]
    header = f"{'engine':<28} {'batch':>5} {'ms/batch':>9} {'images/s':>9} {'fc5 err/tol':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if "note" in row:
            print(f"{row['engine']:<28} {row['batch']:>5}  {row['note']}")
            continue
        print(f"{row['engine']:<28} {row['batch']:>5} {row['ms']:>9.1f} "
              f"{row['images_per_s']:>9.1f} {row['ratio']:>12.2g}")
    print("-" * len(header))
    rounds = sorted({(row["batch"], row["rounds"]) for row in rows if "rounds" in row})
    print("median of " + ", ".join(f"{count} rounds at batch {batch}" for batch, count in rounds)
          + " after 2 warm-up rounds; err/tol: the largest difference from Net's fc5 over its "
          "tolerance")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-convert", action="store_true", help="skip the VGG-16 part")
    parser.add_argument("--skip-infer", action="store_true", help="skip the inference part")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of every conversion phase (default 3)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep the files")
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        if not args.skip_convert:
            convert_report(workdir, args.repeat)
            print()
        if not args.skip_infer:
            infer_report(workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
