"""The online learner: predict, learn, adapt and meta-update over micro-batches.

A micro-batch is a stream-ordered list of operations, each *predict* (score an
impression with its user's current fast weights) or *learn* (a labelled example
of that user). θ is fixed within a batch, so every op is represented in one
tensor program; the chain of each user's predictions and fast-weight steps then
runs in stream order in one compiled call (:func:`metarec.kernels.serve`), so a
prediction always reflects every label the user gave before it. θ takes its
online step at the end of the batch, on every label as it was scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from metarec import kernels
from metarec.kernels import LEARN, PREDICT
from metarec.meta import Algorithm, MetaConfig, learned_names, meta_loss
from metarec.model import (
    Adaptation,
    ModelConfig,
    Theta,
    init_theta,
)
from metarec.optim import Adagrad, Localized, gradients
from metarec.users import ItemFeatures, UserStore

__all__ = ["LEARN", "PREDICT", "LearnerConfig", "OnlineLearner", "Ops", "Scores"]


class LearnerConfig(BaseModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    meta: MetaConfig = Field(default_factory=MetaConfig)
    task_size: int = Field(50, ge=2, description="recent labelled examples kept per user (task)")
    online_lr: float = Field(0.05, gt=0, description="Adagrad rate of θ's per-micro-batch step")
    seed: int = Field(0, description="seed of the initialisation and of task sampling")


@dataclass
class Ops:
    """A micro-batch of operations in stream order (arrays of length n)."""

    user: list[str]
    kind: np.ndarray  # PREDICT or LEARN
    item: np.ndarray  # item bucket
    item_feats: np.ndarray  # n x item_slots
    user_feats: np.ndarray  # n x user_slots (all zero: unchanged)
    context: np.ndarray  # n x context_slots
    label: np.ndarray  # float, meaningful for LEARN

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Scores:
    p: np.ndarray  # predicted click probability, NaN for LEARN ops
    k: np.ndarray  # labels the user had taught before this op


@dataclass
class MetaReport:
    users: int
    loss: float
    seconds: float


class OnlineLearner:
    def __init__(self, config: LearnerConfig, theta: Theta | None = None):
        self.config = config
        m = config.model
        self.theta: Theta = theta if theta is not None else init_theta(m, config.seed)
        self.items = ItemFeatures(m.features.item_buckets, m.features.item_slots)
        self.users = UserStore(m.phi_dim, config.task_size, m.features.user_slots,
                               m.features.context_slots, self.items)
        self.online_opt = Adagrad(self.theta)
        # zeroed gradient rows and touched-flags the size of the item and feature
        # tables, for the compiled online step (it leaves them zero again)
        f = m.features
        self._scratch = (np.zeros((f.item_buckets, m.phi_dim), dtype=np.float32),
                         np.zeros((f.feature_buckets, m.phi_dim), dtype=np.float32),
                         np.zeros(f.item_buckets, dtype=np.bool_),
                         np.zeros(f.feature_buckets, dtype=np.bool_))
        self.meta_opt = Adagrad(self.theta)
        self.rng = np.random.default_rng(config.seed)
        self.examples_learned = 0
        self.since_meta = 0
        self.meta_updates = 0
        self.last_meta = time.monotonic()
        # θ loaded from a snapshot: its non-zero item rows have been started already
        self.item_started = self.theta["item_emb"].abs().sum(1).numpy() > 0

    # -- one micro-batch ---------------------------------------------------------------

    def process(self, ops: Ops) -> Scores:
        n = len(ops)
        p = np.full(n, np.nan)
        k = np.zeros(n, dtype=np.int64)
        if n == 0:
            return Scores(p, k)
        users = self.users
        rows = users.rows_for(ops.user, self.theta["phi0"])
        users.set_features(rows, ops.user_feats)
        self.items.update(ops.item, ops.item_feats)
        learn_ops = np.flatnonzero(ops.kind == LEARN)
        self._start_items(ops.item[learn_ops])
        # θ is fixed until the batch ends: represent every op once, and every buffered
        # example of the users who learn; the compiled loop then only scores and
        # steps users, in stream order.
        user_feats = np.concatenate([users.features[rows], ops.context], axis=1)
        q, base, side = self._represent(ops.item, ops.item_feats, user_feats)
        task = _BatchTask(self, rows[learn_ops])
        # the weights each example meets before it is learned: θ's online step
        # trains on exactly the situation a prediction is made in
        learn_phi = np.zeros((n, self.config.model.phi_dim), dtype=np.float32)
        m = self.config.model
        kernels.serve(
            rows, ops.kind, ops.label, q, base, task.index(rows), ops.item, ops.context,
            users.phi, users.learned, users.ring_item, users.ring_context, users.ring_label,
            task.rows, task.q, task.base, task.y, task.mask, task.decay, task.lr, task.phi0,
            m.inner_l2, m.inner_steps, m.adaptation is Adaptation.PROTOTYPE, p, k, learn_phi)
        self.examples_learned += len(learn_ops)
        self.since_meta += len(learn_ops)
        if len(learn_ops):
            self._online_step(ops, learn_ops, user_feats, q, base, side, learn_phi[learn_ops])
        return Scores(p, k)

    def _represent(self, item: np.ndarray, item_feats: np.ndarray,
                   user_feats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`metarec.model.represent` under the current θ, compiled, for examples
        of any leading shape: ``q``, ``base`` and the user side."""
        shape, d = item.shape, self.config.model.dim
        n = item.size
        q = np.empty((n, d), dtype=np.float32)
        side = np.empty((n, d), dtype=np.float32)
        base = np.empty(n, dtype=np.float32)
        t = self.theta
        # explicit widths: a batch may hold no example at all (impressions, no label)
        kernels.represent(item.reshape(n), item_feats.reshape(n, item_feats.shape[-1]),
                          user_feats.reshape(n, user_feats.shape[-1]),
                          t["item_emb"].numpy(), t["item_bias"].numpy(), t["feat_emb"].numpy(),
                          t["feat_bias"].numpy(), float(t["global_bias"]), q, base, side)
        return q.reshape(*shape, d), base.reshape(shape), side.reshape(*shape, d)

    def _online_step(self, ops: Ops, learn: np.ndarray, user_feats: np.ndarray, q: np.ndarray,
                     base: np.ndarray, side: np.ndarray, phi: np.ndarray) -> None:
        """θ's Adagrad step on each label scored with the fast weights it met. The
        loss is a sum, not a mean: each example's gradient counts in full, however
        many share the micro-batch (the batch size is an I/O choice, not a model one)."""
        z = kernels.logits(phi, q[learn], base[learn])
        err = (1.0 / (1.0 + np.exp(-z)) - ops.label[learn]).astype(np.float32)
        t, acc = self.theta, self.online_opt.acc
        kernels.online_step(
            ops.item[learn], ops.item_feats[learn], user_feats[learn], q[learn], side[learn],
            err, phi, t["item_emb"].numpy(), t["item_bias"].numpy(), t["feat_emb"].numpy(),
            t["feat_bias"].numpy(), t["global_bias"].numpy(), acc["item_emb"].numpy(),
            acc["item_bias"].numpy(), acc["feat_emb"].numpy(), acc["feat_bias"].numpy(),
            acc["global_bias"].numpy(), *self._scratch, self.config.online_lr,
            self.online_opt.eps)

    def _start_items(self, items: np.ndarray) -> None:
        """Random start for item rows about to be learned from for the first time.
        Every user starts from the same φ_0: with all-zero item rows every gradient
        would point one way and the factorisation would collapse to rank one."""
        new = np.unique(items[~self.item_started[items]])
        if len(new):
            scale = self.config.model.item_init_scale
            start = self.rng.standard_normal((len(new), self.config.model.dim)) * scale
            self.theta["item_emb"][new] = torch.from_numpy(start.astype(np.float32))
            self.item_started[new] = True

    # -- meta-update -------------------------------------------------------------------

    @property
    def meta_due(self) -> bool:
        cfg = self.config.meta
        if self.since_meta >= cfg.every_examples:
            return True
        return (cfg.every_seconds is not None and self.since_meta > 0
                and time.monotonic() - self.last_meta >= cfg.every_seconds)

    def meta_update(self) -> MetaReport | None:
        """One meta-update of θ from a sample of users' tasks; None if too few users."""
        cfg = self.config.meta
        t0 = time.perf_counter()
        self.since_meta = 0
        self.last_meta = time.monotonic()
        n_users = len(self.users)
        eligible = np.flatnonzero(self.users.learned[:n_users] >= cfg.min_task)
        if len(eligible) < 2:
            return None
        if len(eligible) > cfg.users_per_update:
            eligible = np.sort(self.rng.choice(eligible, cfg.users_per_update, replace=False))
        if cfg.algorithm is Algorithm.REPTILE:
            direction = self._reptile_direction(eligible)
            self.meta_opt.step(self.theta, {"phi0": torch.from_numpy(direction)}, cfg.lr)
            loss = float("nan")
        else:
            tasks, y, mask = self.users.task(eligible)
            view = Localized(self.theta, [tasks], dense=learned_names(cfg.algorithm))
            loss_t = meta_loss(view.theta, view.batches[0], y, mask, self.config.model,
                               cfg.algorithm)
            grads = gradients(loss_t, view)
            if not cfg.update_tables:
                grads = {k: g for k, g in grads.items() if view.rows_of(k) is None}
            self.meta_opt.step(self.theta, grads, cfg.lr, view)
            loss = float(loss_t.detach())
        self.meta_updates += 1
        return MetaReport(len(eligible), loss, time.perf_counter() - t0)

    def _reptile_direction(self, rows: np.ndarray) -> np.ndarray:
        """:func:`metarec.meta.reptile_direction` on these users' tasks, compiled:
        Reptile needs no gradient through θ, only each user's adapted weights."""
        item, item_feats, user_feats, y, mask = self.users.task_arrays(rows)
        q, base, _ = self._represent(item, item_feats, user_feats)
        m, t = self.config.model, self.theta
        phi0 = t["phi0"].numpy()
        phi = np.repeat(phi0[None, :], len(rows), axis=0)
        kernels.adapt_tasks(phi, q, base, y, mask, t["log_inner_lr"].exp().numpy(), phi0,
                            m.inner_l2, m.inner_steps, m.adaptation is Adaptation.PROTOTYPE)
        return phi0 - phi.mean(0)


class _BatchTask:
    """The tasks of a micro-batch's learning users by ring slot, represented under
    the batch's θ; the compiled loop keeps them in step with the store's rings."""

    def __init__(self, learner: OnlineLearner, learning: np.ndarray):
        users, m = learner.users, learner.config.model
        self.rows = np.unique(learning)
        # Only the slots this batch can reach: a young user fills slots 0, 1, ...,
        # so new users cost their few examples, not a whole ring.
        reach = users.learned[self.rows] + np.bincount(np.searchsorted(self.rows, learning),
                                                        minlength=len(self.rows))
        width = int(min(users.ring, reach.max(initial=0)))
        item, item_feats, user_feats, self.y, self.mask = users.ring_view(self.rows, width)
        self.q, self.base, _ = learner._represent(item, item_feats, user_feats)
        self.lr = learner.theta["log_inner_lr"].exp().numpy()
        self.phi0 = learner.theta["phi0"].numpy().copy()
        # weight of a slot by its age (labels given since it was written)
        self.decay = m.recency ** np.arange(users.ring, dtype=np.float32)

    def index(self, rows: np.ndarray) -> np.ndarray:
        """Each user row's task, -1 for users who only predict in this batch."""
        if not len(self.rows):
            return np.full(len(rows), -1, dtype=np.int64)
        j = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        return np.where(self.rows[j] == rows, j, -1)
