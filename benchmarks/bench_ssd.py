"""SSD detectors converted to ONNX and run in onnxruntime, against OpenCV 4.x's Caffe importer.

Two published nets at 300 x 300, their full widths: chuanqi305's MobileNet-SSD (BatchNorm
and Scale kept, 21 classes) and OpenCV's res10 face detector (Normalize, 2 classes). The
prototxts come from the generators of ``tests/converters/test_ssd_models.py`` (loaded from
that file), the weights from their fillers with seed 0 and heads scaled so that the
detections are real ones (``seeded_detector``). Each net is converted once
(``convert_to_onnx``, dynamic batch) and loaded once by ``cv2.dnn.readNetFromCaffe``; at
every batch size both engines are first checked to give the same detections (as sets of
rows, rtol 1e-4), then timed in the same run, taking turns within every round
(``timing.median_times``), and the medians give images per second and the ratio
onnxruntime / OpenCV (above 1: onnxruntime is faster).

    python benchmarks/bench_ssd.py [--threads 2] [--repeat 20] [--batches 1 8]

Needs ``opencv-python-headless<5`` (OpenCV 5 removed ``readNetFromCaffe``), see
``requirements.txt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from timing import median_times

ROOT = Path(__file__).resolve().parent.parent
GENERATORS = ROOT / "tests" / "converters" / "test_ssd_models.py"
SIZE = 300


def load_generators():
    """The SSD prototxt generators and weight seeding, from the test file that checks them."""
    spec = importlib.util.spec_from_file_location("ssd_models", GENERATORS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engines(prototxt: Path, weights: Path, onnx_path: Path, threads: int):
    """``{engine: run(batch) -> detections}`` for onnxruntime and OpenCV."""
    import cv2
    import onnxruntime

    from caffelayers.converters.onnx import convert_to_onnx, save_onnx
    from caffelayers.net import Net

    save_onnx(convert_to_onnx(Net(prototxt, weights)), onnx_path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # the detections' row count is not the declared 1
    session = onnxruntime.InferenceSession(str(onnx_path), options,
                                           providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    cv2.setNumThreads(threads)
    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))

    def run_opencv(batch):
        cv_net.setInput(batch)
        return cv_net.forward()

    return {f"onnxruntime {onnxruntime.__version__}":
            lambda batch: session.run(None, {input_name: batch})[0],
            f"OpenCV {cv2.__version__}": run_opencv}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads per engine")
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not hasattr(getattr(cv2, "dnn", None), "readNetFromCaffe"):
        parser.exit(1, "needs OpenCV with cv2.dnn.readNetFromCaffe (opencv-python-headless<5)\n")
    torch.set_num_threads(args.threads)
    models = load_generators()
    nets = {"MobileNet-SSD": models.mobilenet_ssd_prototxt(),
            "face detector (res10)": models.face_detector_prototxt()}
    calibration = {"MobileNet-SSD": {},
                   "face detector (res10)": {"conf_scale": 2.0, "background": 4.0}}
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ssd_") as tmp:
        for index, (name, text) in enumerate(nets.items()):
            folder = Path(tmp) / str(index)
            folder.mkdir()
            prototxt, weights, _ = models.detector_files(
                folder, text, models.image_batch(1, SIZE), **calibration[name])
            runs = engines(prototxt, weights, folder / "model.onnx", args.threads)
            ours, theirs = list(runs)
            for batch_size in args.batches:
                batch = models.image_batch(batch_size, SIZE, seed=batch_size)
                outputs = {engine: run(batch) for engine, run in runs.items()}
                models.assert_same_detections(f"{name}, batch {batch_size}", outputs[ours],
                                              outputs[theirs])
                detections = len(models.detection_rows(outputs[ours]))
                medians = median_times({engine: (lambda run=run, batch=batch: run(batch))
                                        for engine, run in runs.items()},
                                       args.repeat, torch.device("cpu"))
                rows.append((name, batch_size, detections,
                             {engine: batch_size / seconds for engine, seconds in medians.items()}))
    engine_names = list(rows[0][3])
    header = (f"{'net (300 x 300)':<22} {'batch':>5} {'rows':>5} "
              + " ".join(f"{e + ' img/s':>22}" for e in engine_names) + f" {'ratio':>7}")
    print(header)
    print("-" * len(header))
    for name, batch_size, detections, rates in rows:
        ratio = rates[engine_names[0]] / rates[engine_names[1]]
        print(f"{name:<22} {batch_size:>5} {detections:>5} "
              + " ".join(f"{rates[e]:>22.1f}" for e in engine_names) + f" {ratio:>7.2f}")
    print("-" * len(header))
    print(f"median of {args.repeat} interleaved rounds after a warm-up round, {args.threads} "
          f"threads per engine; rows: detections (the same set in both engines); ratio: "
          f"{engine_names[0]} / {engine_names[1]} images per second; total "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
