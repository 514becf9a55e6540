"""Running converted models in onnxruntime and replaying Caffe reference cases through them.

A case is an inference case for ONNX when it is not a solver case, every layer of its net in
the TEST phase has an emitter, and (for a case recorded in TRAIN) every layer has the same
settings in TEST as in the recorded phase, so that the TEST net computes the recorded forward.
Dropout, BatchNorm without an explicit ``use_global_stats`` and STOCHASTIC pooling are the
layers whose settings follow the phase.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np
import onnx

from ...errors import CaffeLayersError, UnsupportedParameterError
from ...verify import ATOL, RTOL, VerifyResult, compare, load_reference, open_case
from .core import DEFAULT_OPSET, convert_to_onnx, missing_emitters, output_blobs
from .training import lambda_feed

ModelSource = Union[onnx.ModelProto, str, Path]


def run_onnx(model: ModelSource, inputs: Mapping[str, np.ndarray],
             threads: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Run ``model`` (a ``ModelProto`` or a file) in onnxruntime on the CPU.

    Args:
        model: the model, or the path of a saved one (external data is found next to it).
        inputs: arrays by input blob name; names the model does not take (a label a deploy
            net leaves unread) are ignored. Values are fed as float32.
        threads: onnxruntime's intra-op threads (its default when None).

    Returns:
        The outputs by Caffe blob name.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # not the warning about overridable initializers
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if isinstance(model, onnx.ModelProto):
        source, names = model.SerializeToString(), output_blobs(model)
    else:
        source = str(model)
        names = output_blobs(onnx.load(source, load_external_data=False))
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    missing = [name for name in wanted if name not in inputs]
    if missing:
        raise CaffeLayersError(f"missing inputs {', '.join(missing)} (the model takes "
                               f"{', '.join(wanted)})")
    # initializers that are also inputs (MarginInnerProduct's lambda) are fed when given
    wanted += [i.name for i in session.get_overridable_initializers() if i.name in inputs]
    feed = {name: np.asarray(inputs[name], dtype=np.float32) for name in wanted}
    outputs = [o.name for o in session.get_outputs()]
    results = session.run(outputs, feed)
    return {names.get(name, name): value for name, value in zip(outputs, results)}


def _settings(net) -> list:
    return [(node.name, node.type, repr(node.module), node.module.training)
            for node in net.graph.nodes]


def inference_problem(case_dir: Union[str, Path], meta: Optional[dict] = None) -> Optional[str]:
    """Why a reference case cannot be replayed through ONNX, or None when it can."""
    from ...net import Net

    case_dir = Path(case_dir)
    if meta is None:
        with np.load(case_dir / "reference.npz", allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))  # the arrays are not needed here
    if meta.get("solver"):
        return "a solver case (SGD steps, not inference)"
    prototxt = case_dir / "net.prototxt"
    test_net = Net(prototxt, phase="TEST", seed=0)
    missing = missing_emitters(test_net.graph)
    if missing:
        return "no ONNX emitter for " + ", ".join(f"{name!r} ({type_})"
                                                   for name, type_ in missing)
    phase = meta.get("phase", "TEST")
    if phase != "TEST":
        recorded = _settings(Net(prototxt, phase=phase, seed=0))
        for ours, theirs in zip(_settings(test_net), recorded):
            if ours != theirs:
                return (f"layer {ours[0]!r} ({ours[1]}) is set up differently in TEST than in "
                        f"the recorded {phase} phase")
        if len(recorded) != len(test_net.graph.nodes):
            return f"the {phase} net has other layers than the TEST net"
    return None


def verify_case_onnx(case_dir: Union[str, Path], rtol: float = RTOL, atol: float = ATOL,
                     opset: int = DEFAULT_OPSET, static_batch: bool = False,
                     threads: Optional[int] = None) -> VerifyResult:
    """Convert a reference case's TEST net to ONNX, run it in onnxruntime on the recorded
    inputs and compare every recorded blob (intermediate ones too, exposed as outputs).

    Raises:
        UnsupportedParameterError: the case is not an inference case (see the module
            docstring); the message says why.
    """
    case_dir = Path(case_dir)
    reference = load_reference(case_dir)
    meta = reference[0]
    problem = inference_problem(case_dir, meta)
    if problem:
        raise UnsupportedParameterError(f"{case_dir}: not an inference case for ONNX: {problem}")
    meta, arrays, net = open_case(case_dir, phase="TEST", reference=reference)
    recorded = {parts[2] for parts in (key.split("/", 2) for key in arrays)
                if len(parts) == 3 and parts[0].startswith("iter") and parts[1] == "data"}
    model = convert_to_onnx(net, opset=opset, static_batch=static_batch,
                            outputs=sorted(b for b in recorded if b in net.graph.blob_shapes))
    inputs = {name: arrays[f"input/{name}"] for name in meta["inputs"]}
    result = VerifyResult(meta.get("case", case_dir.name))
    for index in range(int(meta.get("iterations", 1))):
        # the same inputs every iteration; lambda follows MarginInnerProduct's schedule
        results = run_onnx(model, {**inputs, **lambda_feed(net, index)}, threads)
        prefix = f"iter{index}/data/"
        for key, expected in arrays.items():
            if not key.startswith(prefix):
                continue
            blob = key[len(prefix):]
            if blob not in results and blob in net.graph.inputs:
                continue  # an input nothing rewrites: fed, not computed
            result.checks.append(compare(key, results.get(blob), expected, rtol, atol))
    if not result.checks:
        raise CaffeLayersError(f"{case_dir}: reference.npz records no computed blob")
    return result
