"""The online learner: predict, learn, adapt and meta-update over micro-batches.

A micro-batch is a stream-ordered list of operations, each *predict* (score an
impression with its user's current fast weights) or *learn* (a labelled example
of that user). Users are independent, so the batch runs in waves: wave j holds
every user's j-th step, where a step is the user's next predictions followed by
their next labels. One tensor program per wave scores or adapts every user in
it, and each user's operations still happen strictly in their own order, so a
prediction always reflects every label the user gave before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from metarec import kernels
from metarec.meta import Algorithm, MetaConfig, learned_names, meta_loss, reptile_direction
from metarec.model import (
    Examples,
    ModelConfig,
    Theta,
    bce,
    init_theta,
    logit,
    represent,
)
from metarec.optim import Adagrad, Localized, gradients
from metarec.users import ItemFeatures, UserStore

PREDICT = 0
LEARN = 1


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
        learn_phi = np.zeros((n, self.config.model.phi_dim), dtype=np.float32)
        # θ is fixed until the batch ends: represent every op once, differentiably for
        # θ's online step at the end, and every buffered example of the users who
        # learn; the waves only gather.
        view = Localized(self.theta, [self._examples(ops, rows, np.arange(n))],
                         dense=("global_bias",))
        q_t, base_t = represent(view.theta, view.batches[0])
        q, base = q_t.detach().numpy(), base_t.detach().numpy()
        learning = rows[learn_ops]
        ring = _BatchRing(self, np.unique(learning), learning)
        wave, rank = _waves(rows, ops.kind)
        # one segment per wave: its predictions first, then its labels by rank
        order = np.lexsort((rank, ops.kind, wave))
        for seg in np.split(order, np.flatnonzero(np.diff(wave[order])) + 1):
            kind = ops.kind[seg]
            pred, learn = seg[kind == PREDICT], seg[kind == LEARN]
            if len(pred):
                pr = rows[pred]
                p[pred] = kernels.sigmoid(kernels.logit(users.phi[pr], q[pred], base[pred]))
                k[pred] = users.learned[pr]
            if len(learn):
                lr_rows = rows[learn]
                # the weights each example meets before it is learned: θ's online
                # step trains on exactly the situation a prediction is made in
                learn_phi[learn] = users.phi[lr_rows]
                ranks = rank[learn]
                for r in range(int(ranks[-1]) + 1):  # a user's labels in order
                    sel = learn[ranks == r] if ranks[-1] else learn
                    ring.push(rows[sel], q[sel], base[sel], ops.label[sel])
                    users.push(rows[sel], ops.item[sel], ops.context[sel], ops.label[sel])
                ring.adapt(np.unique(lr_rows) if ranks[-1] else lr_rows)
        self.examples_learned += len(learn_ops)
        self.since_meta += len(learn_ops)
        if len(learn_ops):
            # θ's step, on each label scored with the fast weights it met. A sum, not
            # a mean: each example's gradient counts in full, however many share the
            # micro-batch (the batch size is an I/O choice, not a model one).
            z = logit(torch.from_numpy(learn_phi[learn_ops]), q_t[learn_ops], base_t[learn_ops])
            loss = bce(z, torch.from_numpy(ops.label[learn_ops])) * len(learn_ops)
            self.online_opt.step(self.theta, gradients(loss, view), self.config.online_lr, view)
        return Scores(p, k)

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

    def _examples(self, ops: Ops, rows: np.ndarray, idx: np.ndarray) -> Examples:
        user_feats = np.concatenate([self.users.features[rows[idx]], ops.context[idx]], axis=1)
        return Examples(torch.from_numpy(ops.item[idx]), torch.from_numpy(ops.item_feats[idx]),
                        torch.from_numpy(user_feats.astype(np.int64)))

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
        # θ loaded from a snapshot: its non-zero item rows have been started already
        self.item_started = self.theta["item_emb"].abs().sum(1).numpy() > 0
        n_users = len(self.users)
        eligible = np.flatnonzero(self.users.learned[:n_users] >= cfg.min_task)
        if len(eligible) < 2:
            return None
        if len(eligible) > cfg.users_per_update:
            eligible = np.sort(self.rng.choice(eligible, cfg.users_per_update, replace=False))
        tasks, y, mask = self.users.task(eligible)
        if cfg.algorithm is Algorithm.REPTILE:
            direction = reptile_direction(self.theta, tasks, y, mask, self.config.model)
            self.meta_opt.step(self.theta, {"phi0": direction}, cfg.lr)
            loss = float("nan")
        else:
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


class _BatchRing:
    """The task buffers of a micro-batch's learning users, already represented
    under the batch's θ, kept in step with :class:`UserStore` as labels arrive."""

    def __init__(self, learner: OnlineLearner, rows: np.ndarray, pushes: np.ndarray):
        self.users = learner.users
        self.config = learner.config.model
        self.rows = rows  # sorted, unique
        # Only the slots this batch can reach: a young user fills slots 0, 1, ...,
        # so new users cost their few examples, not a whole ring.
        reach = self.users.learned[rows] + np.bincount(np.searchsorted(rows, pushes),
                                                        minlength=len(rows))
        self.width = int(min(self.users.ring, reach.max(initial=0)))
        task, y, mask = self.users.ring_view(rows, self.width)
        with torch.no_grad():
            q, base = represent(learner.theta, task)
            self.lr = learner.theta["log_inner_lr"].exp().numpy()
            self.phi0 = learner.theta["phi0"].numpy().copy()
        self.q, self.base, self.y, self.mask = q.numpy(), base.numpy(), y.numpy(), mask.numpy()
        # weight of a slot by its age (labels given since it was written)
        self.decay = self.config.recency ** np.arange(self.users.ring, dtype=np.float32)

    def push(self, rows: np.ndarray, q: np.ndarray, base: np.ndarray,
             label: np.ndarray) -> None:
        j = np.searchsorted(self.rows, rows)
        slot = self.users.learned[rows] % self.users.ring
        self.q[j, slot] = q
        self.base[j, slot] = base
        self.y[j, slot] = label
        self.mask[j, slot] = 1.0

    def adapt(self, rows: np.ndarray) -> None:
        j = np.searchsorted(self.rows, rows)
        users = self.users
        age = (users.learned[rows, None] - 1 - np.arange(self.width)) % users.ring
        weight = self.mask[j] * self.decay[age]
        users.phi[rows] = kernels.adapt(users.phi[rows], self.q[j], self.base[j], self.y[j],
                                        weight, self.lr, self.phi0, self.config)


def _waves(rows: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wave of each op (a user's step number: a prediction after a label starts a
    new step) and rank of each label among its user's labels in the same wave."""
    wave = np.empty(len(rows), dtype=np.int64)
    rank = np.zeros(len(rows), dtype=np.int64)
    state: dict[int, tuple[int, int, int]] = {}  # row -> (wave, last kind, labels in wave)
    for i, (r, kd) in enumerate(zip(rows.tolist(), kind.tolist(), strict=True)):
        w, last, labels = state.get(r, (0, PREDICT, 0))
        if kd == PREDICT and last == LEARN:
            w, labels = w + 1, 0
        if kd == LEARN:
            rank[i] = labels
            labels += 1
        wave[i] = w
        state[r] = (w, kd, labels)
    return wave, rank
