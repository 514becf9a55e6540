"""Caffe's learning-rate policies (BVLC's ``SGDSolver::GetLearningRate``)."""

from __future__ import annotations

import logging
import math
from typing import Tuple

__all__ = ["LR_POLICIES", "caffe_learning_rate"]

logger = logging.getLogger(__name__)

#: Caffe's learning-rate policies, exactly as ``lr_policy`` spells them.
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def caffe_learning_rate(param, iteration: int, current_step: int) -> Tuple[float, int]:
    """The learning rate at ``iteration`` and the new ``current_step`` (Caffe's
    ``GetLearningRate``, which updates the step counter as it goes).

    - fixed: ``base_lr``
    - step: ``base_lr * gamma ^ floor(iter / stepsize)`` (the step count is stored)
    - exp: ``base_lr * gamma ^ iter``
    - inv: ``base_lr * (1 + gamma * iter) ^ (-power)``
    - multistep: ``base_lr * gamma ^ current_step``, where ``current_step`` advances by at most
      one per call, when ``iter`` has reached ``stepvalue[current_step]``
    - poly: ``base_lr * (1 - iter / max_iter) ^ power``
    - sigmoid: ``base_lr / (1 + exp(-gamma * (iter - stepsize)))``

    Args:
        param: a ``SolverParameter``.
        iteration: the number of updates done so far (Caffe's ``iter_``).
        current_step: the step counter before the call (multistep and step keep it).
    """
    policy, base_lr, gamma = param.lr_policy, param.base_lr, param.gamma
    if policy == "fixed":
        return base_lr, current_step
    if policy == "step":
        current_step = iteration // param.stepsize
        return base_lr * gamma ** current_step, current_step
    if policy == "exp":
        return base_lr * gamma ** iteration, current_step
    if policy == "inv":
        return base_lr * (1.0 + gamma * iteration) ** (-param.power), current_step
    if policy == "multistep":
        if current_step < len(param.stepvalue) and iteration >= param.stepvalue[current_step]:
            current_step += 1
            logger.info("MultiStep Status: Iteration %d, step = %d", iteration, current_step)
        return base_lr * gamma ** current_step, current_step
    if policy == "poly":
        return base_lr * (1.0 - iteration / param.max_iter) ** param.power, current_step
    if policy == "sigmoid":
        exponent = -gamma * (iteration - param.stepsize)
        # Caffe's exp overflows to inf and the rate to 0; Python's math.exp would raise.
        return base_lr / (1.0 + (math.inf if exponent > 709 else math.exp(exponent))), \
            current_step
    raise ValueError(f"unknown lr_policy {policy!r}")  # check_solver rejects it first

