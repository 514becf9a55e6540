"""``caffelayers classify``: Caffe's ``python/classify.py`` (``caffe.Classifier``) on image
files, printing the five best classes of every image.

The preprocessing is Caffe's ``caffe.io.Transformer`` as the classifier sets it up:

1. each image is read as ``caffe.io.load_image`` does: RGB, float in ``[0, 1]``,
   ``H x W x 3`` (a grayscale file is repeated over three channels; a one-channel net reads
   it as ``H x W x 1``);
2. resized to ``images_dim`` by :func:`resize_image` (``caffe.io.resize_image``);
3. cut into 10 crops of the net's input size by :func:`oversample` (four corners and the
   centre, and their mirror images), or the centre crop alone (``center_only``);
4. per crop (:meth:`Preprocessor.__call__`): transposed to ``C x H x W``, channels
   reordered by ``channel_swap`` (RGB to BGR by default), multiplied by ``raw_scale``, the
   mean subtracted, multiplied by ``input_scale``;
5. the net's first output is averaged over an image's 10 crops.

Caffe: a mean image of another size than the crop (ImageNet's 256 x 256 mean for a 227 x 227
net) is resized to the crop size, not cropped, as ``Transformer.set_mean`` does. Differences:
the mean file may be a ``.binaryproto`` as well as a ``.npy``; ``--mean_value`` gives one mean
per channel; no mean is subtracted by default (Caffe's default is ImageNet's mean file);
``.npy`` and folder inputs are not read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..data.extra import require
from ..errors import CaffeFormatError, CaffeLayersError


def load_image(path, color: bool = True) -> np.ndarray:
    """``caffe.io.load_image``: an image file as ``H x W x C`` float32 in ``[0, 1]``, RGB
    (``color``, grayscale repeated over 3 channels) or ``H x W x 1``."""
    cv2 = require("cv2", "classify")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    if image is None:
        problem = "cannot be decoded as an image" if Path(path).is_file() else "not found"
        raise CaffeFormatError(f"image {problem}", path)
    image = image[:, :, ::-1] if color else image[:, :, None]
    return (image / np.float32(255)).astype(np.float32)


def _interpolation(size_in: int, size_out: int) -> np.ndarray:
    """The ``size_out x size_in`` matrix of linear interpolation with pixel centres aligned
    (source ``(i + 0.5) size_in / size_out - 0.5``) and zeros outside the image."""
    weights = np.zeros((size_out, size_in))
    source = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    low = np.floor(source).astype(int)
    frac = source - low
    for offset, weight in ((0, 1 - frac), (1, frac)):
        index = low + offset
        inside = (index >= 0) & (index < size_in)
        weights[np.flatnonzero(inside), index[inside]] += weight[inside]
    return weights


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``caffe.io.resize_image`` (interpolation order 1): ``H x W x C`` to ``size`` (height,
    width).

    The image is scaled to ``[0, 1]`` by its minimum and maximum, resized as scikit-image's
    ``resize(..., order=1, mode="constant")`` of Caffe's time (bilinear, pixel centres
    aligned, zero outside the image, no anti-aliasing), and scaled back; so the border of an
    enlarged image fades towards the image's minimum. A constant image stays constant.
    Returns float32.
    """
    height, width = int(size[0]), int(size[1])
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.full((height, width, image.shape[-1]), low, dtype=np.float32)
    unit = (image.astype(np.float64) - low) / (high - low)
    rows = _interpolation(image.shape[0], height)
    cols = _interpolation(image.shape[1], width)
    resized = np.einsum("jw,iwc->ijc", cols, np.einsum("ih,hwc->iwc", rows, unit))
    return (resized * (high - low) + low).astype(np.float32)


def _center_box(size: Sequence[int], crop: Sequence[int]) -> np.ndarray:
    """Caffe's centre crop box ``(top, left, bottom, right)``: ``size / 2 -+ crop / 2``,
    truncated to integers."""
    center = np.asarray(size, dtype=float) / 2.0
    half = np.asarray(crop, dtype=float) / 2.0
    return np.concatenate([center - half, center + half]).astype(int)


def oversample(images: np.ndarray, crop: Sequence[int]) -> np.ndarray:
    """``caffe.io.oversample``: ``N x H x W x C`` images to ``10 N`` crops of ``crop``
    (height, width): per image the top-left, top-right, bottom-left, bottom-right and centre
    crops, then the same five mirrored left to right."""
    height, width = images.shape[1:3]
    ch, cw = int(crop[0]), int(crop[1])
    boxes = [(i, j, i + ch, j + cw) for i in (0, height - ch) for j in (0, width - cw)]
    boxes.append(tuple(_center_box((height, width), (ch, cw))))
    out = []
    for image in images:
        five = [image[top:bottom, left:right] for top, left, bottom, right in boxes]
        out.extend(five + [c[:, ::-1] for c in five])
    return np.stack(out).astype(np.float32)


class Preprocessor:
    """``caffe.io.Transformer.preprocess`` for one input of shape ``(N, C, H, W)``.

    Args:
        input_shape: the net input's shape.
        mean: per-channel values (``C``) or an image (``C x H x W``, resized to ``H x W``
            when it has another size, as ``set_mean`` does); in the net's channel order and
            scale (after ``channel_swap`` and ``raw_scale``).
        raw_scale, input_scale, channel_swap: as Caffe's Transformer.

    ``__call__`` maps an ``H x W x C`` crop to ``C x H x W``:
    ``((x^T)[channel_swap] * raw_scale - mean) * input_scale``.
    """

    def __init__(self, input_shape: Sequence[int], mean: Optional[np.ndarray] = None,
                 raw_scale: Optional[float] = None, input_scale: Optional[float] = None,
                 channel_swap: Optional[Sequence[int]] = None):
        self.shape = tuple(int(d) for d in input_shape)
        channels = self.shape[1]
        if channel_swap is not None and sorted(channel_swap) != list(range(channels)):
            raise CaffeLayersError(f"channel_swap {list(channel_swap)} is not an order of the "
                                   f"input's {channels} channels")
        self.channel_swap = None if channel_swap is None else list(channel_swap)
        self.raw_scale, self.input_scale = raw_scale, input_scale
        self.mean = None if mean is None else self._fit_mean(np.asarray(mean, np.float32))

    def _fit_mean(self, mean: np.ndarray) -> np.ndarray:
        if mean.ndim == 1:
            if mean.size != self.shape[1]:
                raise CaffeLayersError(f"{mean.size} mean values for an input of "
                                       f"{self.shape[1]} channels")
            return mean[:, None, None]
        if mean.ndim == 4 and mean.shape[0] == 1:  # a 1 x C x H x W mean.binaryproto
            mean = mean[0]
        if mean.ndim == 2:
            mean = mean[None]
        if mean.ndim != 3 or mean.shape[0] != self.shape[1]:
            raise CaffeLayersError(f"the mean has shape {mean.shape}; the input needs "
                                   f"{self.shape[1]} x H x W or {self.shape[1]} values")
        if mean.shape[1:] != self.shape[2:]:
            low, high = float(mean.min()), float(mean.max())
            unit = (mean - low) / (high - low) if high > low else mean - low
            resized = resize_image(unit.transpose(1, 2, 0), self.shape[2:])
            mean = resized.transpose(2, 0, 1) * (high - low) + low
        return mean.astype(np.float32)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        x = crop.astype(np.float32)
        if x.shape[:2] != self.shape[2:]:
            x = resize_image(x, self.shape[2:])
        x = x.transpose(2, 0, 1)
        if self.channel_swap is not None:
            x = x[self.channel_swap]
        if self.raw_scale is not None:
            x = x * np.float32(self.raw_scale)
        if self.mean is not None:
            x = x - self.mean
        if self.input_scale is not None:
            x = x * np.float32(self.input_scale)
        return x


class Classifier:
    """``caffe.Classifier``: a net and its preprocessing.

    Args:
        net: a :class:`caffelayers.Net` (TEST phase) whose first input takes ``N x C x H x W``
            images; the crop size is its ``H x W``.
        image_dims: the size images are resized to before cropping (the crop size when None).
        mean, raw_scale, input_scale, channel_swap: see :class:`Preprocessor`.
    """

    def __init__(self, net, image_dims: Optional[Sequence[int]] = None, mean=None,
                 input_scale: Optional[float] = None, raw_scale: Optional[float] = None,
                 channel_swap: Optional[Sequence[int]] = None):
        self.net = net
        self.input = net.inputs[0]
        shape = net.graph.blob_shapes[self.input]
        if shape is None or len(shape) != 4:
            raise CaffeLayersError(f"the net's input {self.input!r} must be N x C x H x W, "
                                   f"got {shape}")
        self.crop = tuple(shape[2:])
        self.image_dims = tuple(image_dims) if image_dims else self.crop
        if self.image_dims[0] < self.crop[0] or self.image_dims[1] < self.crop[1]:
            raise CaffeLayersError(f"images_dim {self.image_dims} is smaller than the net's "
                                   f"input {self.crop}")
        self.transform = Preprocessor(shape, mean, raw_scale, input_scale, channel_swap)

    def predict(self, images: Sequence[np.ndarray], oversample_crops: bool = True
                ) -> np.ndarray:
        """``Classifier.predict``: the net's first output per image (``N x K``), averaged
        over the 10 crops when ``oversample_crops``."""
        import torch

        resized = np.stack([resize_image(image, self.image_dims) for image in images])
        if oversample_crops:
            crops = oversample(resized, self.crop)
        else:
            top, left, bottom, right = _center_box(self.image_dims, self.crop)
            crops = resized[:, top:bottom, left:right]
        batch = np.stack([self.transform(crop) for crop in crops])
        per_call = 10 if oversample_crops else len(batch)
        outputs = []
        with torch.no_grad():
            for start in range(0, len(batch), per_call):
                result = self.net(**{self.input: batch[start:start + per_call]})
                outputs.append(result[self.net.outputs[0]].cpu().numpy())
        predictions = np.concatenate(outputs).reshape(len(batch), -1)
        if oversample_crops:
            predictions = predictions.reshape(len(images), 10, -1).mean(axis=1)
        return predictions


def _numbers(text: Optional[str], kind, flag: str) -> Optional[List]:
    if text is None or text == "":
        return None
    try:
        return [kind(s) for s in text.split(",")]
    except ValueError:
        raise CaffeLayersError(f"{flag}: expected comma-separated numbers, got {text!r}") \
            from None


def _load_mean(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as error:
            raise CaffeFormatError(f"not a numpy array: {error}", path) from None
    from ..proto import io

    return io.read_binaryproto(path)


def top_classes(scores: np.ndarray, labels: Optional[List[str]], k: int = 5) -> List[Dict]:
    """The ``k`` best classes of one score vector, best first (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"index": int(i), "label": labels[i] if labels and i < len(labels) else str(i),
             "score": float(scores[i])} for i in order]


def cmd_classify(args) -> int:
    from ..net import Net

    if args.mean_file and args.mean_value:
        raise CaffeLayersError("give --mean_file or --mean_value, not both")
    net = Net(args.net, args.weights, phase="TEST")
    shape = net.graph.blob_shapes.get(net.inputs[0]) if net.inputs else None
    if shape is None or len(shape) != 4:
        raise CaffeLayersError(f"the net needs an N x C x H x W input, its inputs are "
                               f"{net.inputs}")
    channels = shape[1]
    mean = _load_mean(args.mean_file) if args.mean_file else \
        _numbers(args.mean_value, float, "--mean_value")
    swap = _numbers(args.channel_swap, int, "--channel_swap")
    if args.channel_swap is None and channels == 3:
        swap = [2, 1, 0]  # Caffe's default: RGB files to the BGR that Caffe nets expect
    labels = None
    if args.labels:
        labels = [line.strip() for line in Path(args.labels).read_text().splitlines()]
    classifier = Classifier(net, _numbers(args.images_dim, int, "--images_dim"),
                            None if mean is None else np.asarray(mean, np.float32),
                            args.input_scale, args.raw_scale, swap)
    images = [load_image(path, color=channels != 1) for path in args.images]
    predictions = classifier.predict(images, not args.center_only)
    results = [{"image": path, "top": top_classes(scores, labels)}
               for path, scores in zip(args.images, predictions)]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(result["image"])
        for entry in result["top"]:
            print(f"  {entry['score']:.4f}  {entry['label']}")
    return 0


def add_parser(subparsers: Callable) -> None:
    """Register ``classify`` on the ``caffelayers`` sub-command parsers."""
    p = subparsers.add_parser("classify", help="the five best classes of images "
                                               "(Caffe's python/classify.py)")
    p.add_argument("net", metavar="NET.prototxt", help="deploy .prototxt")
    p.add_argument("weights", metavar="WEIGHTS.caffemodel", help=".caffemodel")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--mean_file", metavar="MEAN", help="mean image: .binaryproto (1 x C x H x W) or .npy "
                                       "(C x H x W), resized to the input size if needed")
    p.add_argument("--mean_value", metavar="B,G,R", help="one mean per channel, comma-separated (net order)")
    p.add_argument("--raw_scale", type=float, default=255.0,
                   help="multiply the [0, 1] images by this (255)")
    p.add_argument("--input_scale", type=float, metavar="S",
                   help="multiply after the mean subtraction")
    p.add_argument("--channel_swap", metavar="2,1,0", help="channel order from RGB (2,1,0 for 3-channel nets)")
    p.add_argument("--images_dim", default="256,256",
                   help="resize images to HEIGHT,WIDTH before cropping (256,256)")
    p.add_argument("--center_only", action="store_true",
                   help="the centre crop only, instead of 10 crops averaged")
    p.add_argument("--labels", metavar="synset_words.txt", help="class names, one per line (synset_words.txt)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_classify)


__all__ = ["Classifier", "Preprocessor", "add_parser", "cmd_classify", "load_image",
           "oversample", "resize_image", "top_classes"]
