"""The meta-update: sample users' tasks, ask the algorithm for θ's direction, and
take an Adagrad step along it (its own accumulators, apart from θ's online ones)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from metarec.meta.config import MetaConfig
from metarec.meta.registry import meta_learner
from metarec.meta.schedule import MetaSchedule
from metarec.model import ModelConfig, Theta
from metarec.optim import Adagrad
from metarec.users import UserStore


@dataclass
class MetaReport:
    users: int
    loss: float
    seconds: float


class MetaTrainer:
    """θ's meta-learning: the algorithm, its optimiser and its schedule. ``rng`` samples
    the users (shared with the item starts of :class:`~metarec.online.OnlineTheta`:
    one stream, drawn from in stream order)."""

    def __init__(self, meta: MetaConfig, model: ModelConfig, theta: Theta,
                 rng: np.random.Generator):
        self.config = meta
        self.theta = theta
        self.rng = rng
        self.algorithm = meta_learner(model, meta)
        self.opt = Adagrad(theta)
        self.schedule = MetaSchedule(meta.every_examples, meta.every_seconds)
        self.updates = 0

    def update(self, users: UserStore) -> MetaReport | None:
        """One meta-update from a sample of users' tasks; None if too few users."""
        cfg = self.config
        t0 = time.perf_counter()
        self.schedule.restart()
        n = len(users)
        # a user × context task's row is a residual on its user's, not a task from φ_0
        eligible = np.flatnonzero((users.learned[:n] >= cfg.min_task) & ~users.residual[:n])
        if len(eligible) < 2:
            return None
        if len(eligible) > cfg.users_per_update:
            eligible = np.sort(self.rng.choice(eligible, cfg.users_per_update, replace=False))
        found = self.algorithm.direction(users.tasks(eligible), self.theta)
        grads, view = found.grads, found.view
        if not cfg.update_tables and view is not None:
            grads = {k: g for k, g in grads.items() if view.rows_of(k) is None}
        self.opt.step(self.theta, grads, cfg.lr, view)
        self.updates += 1
        return MetaReport(len(eligible), found.loss, time.perf_counter() - t0)
