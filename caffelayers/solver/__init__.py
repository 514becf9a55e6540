"""Caffe's solvers: a ``solver.prototxt`` trains a :class:`~caffelayers.Net` as Caffe would.

One module per concern, imported one way (``checks`` reads ``learning_rate`` and ``updates``;
``engine`` reads them all):

- :mod:`.learning_rate`: the ``lr_policy`` formulas (:func:`caffe_learning_rate`);
- :mod:`.updates`: the solver types' update rules (:data:`SOLVER_TYPES`);
- :mod:`.checks`: the solver file validated before anything is built;
- :mod:`.counters`: layer counters saved beside a snapshot;
- :mod:`.engine`: :class:`Solver`, the training loop, its snapshots and restore.
"""

from .engine import Solver
from .learning_rate import LR_POLICIES, caffe_learning_rate
from .updates import SOLVER_TYPES

__all__ = ["LR_POLICIES", "SOLVER_TYPES", "Solver", "caffe_learning_rate"]
