"""Caffe's solver types: each ``ComputeUpdateValue`` as an in-place rule on the gradient.

Caffe's rules are not ``torch.optim``'s: SGD keeps ``lr * grad`` in its momentum history, so
after a learning-rate step the old, larger steps still decay through the history; Nesterov's
step is written on that history too; Adam adds ``delta`` to ``sqrt(v)`` before its bias
correction (torch adds ``eps`` after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple

import torch

__all__ = ["SOLVER_TYPES", "Hyper", "UpdateRule"]


class Hyper(NamedTuple):
    """The solver-wide constants an update rule reads."""

    momentum: float
    momentum2: float
    delta: float
    rms_decay: float


def _sgd(diff, history, local_rate, hyper, iteration):
    (h,) = history
    h.mul_(hyper.momentum).add_(diff, alpha=local_rate)
    diff.copy_(h)


def _nesterov(diff, history, local_rate, hyper, iteration):
    (h,) = history
    previous = h.clone()
    h.mul_(hyper.momentum).add_(diff, alpha=local_rate)
    torch.mul(h, 1.0 + hyper.momentum, out=diff)
    diff.add_(previous, alpha=-hyper.momentum)


def _adagrad(diff, history, local_rate, hyper, iteration):
    (h,) = history
    h.addcmul_(diff, diff)
    diff.div_(h.sqrt().add_(hyper.delta)).mul_(local_rate)


def _rmsprop(diff, history, local_rate, hyper, iteration):
    (h,) = history
    h.mul_(hyper.rms_decay).addcmul_(diff, diff, value=1.0 - hyper.rms_decay)
    diff.div_(h.sqrt().add_(hyper.delta)).mul_(local_rate)


def _adadelta(diff, history, local_rate, hyper, iteration):
    squared_grads, squared_updates = history
    decay = hyper.momentum
    squared_grads.mul_(decay).addcmul_(diff, diff, value=1.0 - decay)
    # The stored update history is of the step before the learning rate scales it.
    diff.mul_(((squared_updates + hyper.delta) / (squared_grads + hyper.delta)).sqrt_())
    squared_updates.mul_(decay).addcmul_(diff, diff, value=1.0 - decay)
    diff.mul_(local_rate)


def _adam(diff, history, local_rate, hyper, iteration):
    first, second = history
    beta1, beta2 = hyper.momentum, hyper.momentum2
    t = iteration + 1
    correction = math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    first.mul_(beta1).add_(diff, alpha=1.0 - beta1)
    second.mul_(beta2).addcmul_(diff, diff, value=1.0 - beta2)
    torch.div(first, second.sqrt().add_(hyper.delta), out=diff)
    diff.mul_(local_rate * correction)


@dataclass(frozen=True)
class UpdateRule:
    """A solver type: its ``ComputeUpdateValue`` and how many history blobs it keeps per
    learnable blob (Caffe stores them slot by slot: all first slots, then all second ones).

    ``compute(diff, history, local_rate, hyper, iteration)`` turns the regularized gradient
    ``diff`` into the update in place and advances ``history``.
    """

    formula: str
    history_slots: int
    compute: Callable[..., None]


#: Caffe's solver types (the ``type`` strings, exactly) and their rules, with ``g`` the
#: regularized gradient, ``r`` the local rate and ``t = iter + 1``.
SOLVER_TYPES: Dict[str, UpdateRule] = {
    "SGD": UpdateRule("h = momentum h + r g; update = h", 1, _sgd),
    "Nesterov": UpdateRule("h' = momentum h + r g; update = (1 + momentum) h' - momentum h",
                           1, _nesterov),
    "AdaGrad": UpdateRule("h += g^2; update = r g / (sqrt(h) + delta)", 1, _adagrad),
    "RMSProp": UpdateRule("h = rms_decay h + (1 - rms_decay) g^2; "
                          "update = r g / (sqrt(h) + delta)", 1, _rmsprop),
    "AdaDelta": UpdateRule("G = momentum G + (1 - momentum) g^2; "
                           "s = g sqrt((U + delta) / (G + delta)); "
                           "U = momentum U + (1 - momentum) s^2; update = r s", 2, _adadelta),
    "Adam": UpdateRule("m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; update = r "
                       "sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + delta), b1 = momentum, "
                       "b2 = momentum2", 2, _adam),
}

