"""A micro-batch's serving: every op scored and every label learned by its user's
fast weights, in stream order, in one compiled call (:func:`metarec.kernels.serve`)."""

from __future__ import annotations

import numpy as np

from metarec import kernels
from metarec.adaptation import Rule
from metarec.kernels import BatchTasks, OpArrays, Served
from metarec.model import Theta
from metarec.representation import represent
from metarec.users import UserStore


def batch_tasks(users: UserStore, theta: Theta, learning: np.ndarray,
                prior: np.ndarray) -> BatchTasks:
    """The tasks of the users learning in a batch (their row per label, ``learning``,
    and the row of the task each refines, ``prior``, -1 for none), by ring slot,
    represented under the batch's θ. Only the slots this batch can reach: a young
    user fills slots 0, 1, ..., so new users cost their few examples, not a whole
    ring."""
    rows, first = np.unique(learning, return_index=True)
    reach = users.learned[rows] + np.bincount(np.searchsorted(rows, learning),
                                              minlength=len(rows))
    width = int(min(users.ring, reach.max(initial=0)))
    ring = users.ring_view(rows, width)
    rep = represent(theta, ring.ids())
    return BatchTasks(rows, rep.q, rep.base, ring.y, ring.mask, prior[first])


def task_index(tasks: BatchTasks, rows: np.ndarray) -> np.ndarray:
    """Each user row's task, -1 for users who only predict in this batch."""
    if not len(tasks.rows):
        return np.full(len(rows), -1, dtype=np.int64)
    j = np.minimum(np.searchsorted(tasks.rows, rows), len(tasks.rows) - 1)
    return np.where(tasks.rows[j] == rows, j, -1)


def serve(ops: OpArrays, users: UserStore, tasks: BatchTasks, decay: np.ndarray,
          rule: Rule, residual_rate: float) -> Served:
    """:func:`metarec.kernels.serve`: predictions (NaN for a label), the labels each
    user had given before each op, and the fast weights each label met. Residuals
    (of tasks with a prior) follow ``rule`` at ``residual_rate`` times its rates,
    towards zero rather than φ_0."""
    n = len(ops.rows)
    out = Served(np.full(n, np.nan), np.zeros(n, dtype=np.int64),
                 np.zeros((n, users.phi.shape[1]), dtype=np.float32))
    kernels.serve(ops, users.arrays(), tasks, decay, rule,
                  rule._replace(phi0=np.zeros_like(rule.phi0), lr=rule.lr * residual_rate), out)
    return out
