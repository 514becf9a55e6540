"""The solver file checked as a whole before anything is built: one error naming every problem."""

from __future__ import annotations

from typing import List

from ..errors import CaffeFormatError, UnsupportedParameterError
from .learning_rate import LR_POLICIES
from .updates import SOLVER_TYPES, UpdateRule

__all__ = ["check_solver"]


def check_solver(param, path) -> UpdateRule:
    """Reject what Caffe would reject (at construction or at its first use) with one clear
    error naming the solver file; returns the update rule of ``param.type``."""
    problems: List[str] = []
    train_fields = [f for f in ("net", "net_param", "train_net", "train_net_param")
                    if param.HasField(f)]
    if len(train_fields) != 1:
        problems.append("exactly one of net, net_param, train_net, train_net_param must name "
                        f"the train net, found {', '.join(train_fields) or 'none'}")
    if param.HasField("net") and param.HasField("net_param"):
        problems.append("net and net_param may not both be given")
    test_nets = len(param.test_net) + len(param.test_net_param)
    generic = param.HasField("net") or param.HasField("net_param")
    if (len(param.test_iter) < test_nets) if generic else (len(param.test_iter) != test_nets):
        problems.append(f"test_iter must be given once per test net: {test_nets} test nets, "
                        f"{len(param.test_iter)} test_iter")
    instances = max(len(param.test_iter), test_nets)
    if len(param.test_state) and len(param.test_state) != instances:
        problems.append(f"test_state must be given once per test net or not at all: "
                        f"{instances} test nets, {len(param.test_state)} test_state")
    if instances and param.test_interval <= 0:
        problems.append("test nets need test_interval > 0")
    if any(n <= 0 for n in param.test_iter):
        problems.append("test_iter must be positive")
    for name in ("display", "test_interval", "snapshot"):
        if getattr(param, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(param, name)}")
    if param.max_iter < 0:
        problems.append(f"max_iter must be >= 0, got {param.max_iter}")
    if param.average_loss < 1:
        problems.append(f"average_loss must be >= 1, got {param.average_loss}")
    if param.iter_size < 1:
        problems.append(f"iter_size must be >= 1, got {param.iter_size}")
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        problems.append(f"lr_policy {policy!r} is not one of {', '.join(LR_POLICIES)}"
                        if policy else f"lr_policy is missing (one of {', '.join(LR_POLICIES)})")
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        problems.append(f"lr_policy {policy!r} needs stepsize > 0, got {param.stepsize}")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        problems.append(f"lr_policy {policy!r} needs gamma >= 0, got {param.gamma:g}")
    if policy == "poly" and param.max_iter <= 0:
        problems.append(f"lr_policy 'poly' needs max_iter > 0, got {param.max_iter}")
    if param.regularization_type not in ("L2", "L1"):
        problems.append(f"regularization_type {param.regularization_type!r} is not L2 or L1")
    rule = SOLVER_TYPES.get(param.type)
    if rule is None:
        problems.append(f"solver type {param.type!r} is not one of "
                        f"{', '.join(SOLVER_TYPES)} (the names are case-sensitive)")
    if param.type in ("AdaGrad", "RMSProp") and param.momentum != 0:
        problems.append(f"momentum cannot be used with {param.type} (got {param.momentum:g})")
    if param.type == "RMSProp" and not 0 <= param.rms_decay < 1:
        problems.append(f"rms_decay must lie in [0, 1), got {param.rms_decay:g}")
    if problems:
        raise CaffeFormatError("; ".join(problems), path or "<SolverParameter>")
    if param.snapshot_format == param.HDF5:
        raise UnsupportedParameterError(f"{path or '<SolverParameter>'}: snapshot_format HDF5 "
                                        "is not supported; use BINARYPROTO")
    if param.snapshot_diff:
        raise UnsupportedParameterError(f"{path or '<SolverParameter>'}: snapshot_diff is not "
                                        "supported (snapshots hold the weights only)")
    return rule

