"""The online learner: predict, learn, adapt and meta-update over micro-batches.

A micro-batch is a stream-ordered list of operations, each *predict* (score an
impression with its user's current fast weights) or *learn* (a labelled example
of that user). θ is fixed within a batch, so every op is represented once; the
chain of each user's predictions and fast-weight steps then runs in stream order
in one compiled call (:mod:`metarec.serving`), so a prediction always reflects
every label the user gave before it. θ takes its online step at the end of the
batch, on every label as it was scored (:class:`~metarec.online.OnlineTheta`);
meta-updates are :class:`~metarec.meta.MetaTrainer`'s. :class:`OnlineLearner`
holds the parts together and is the one surface the streaming code uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, Field

from metarec import serving
from metarec.adaptation import user_adaptation
from metarec.kernels import LEARN, PREDICT, ExampleIds, OpArrays
from metarec.meta import MetaConfig, MetaReport, MetaTrainer
from metarec.model import ModelConfig, Theta, init_theta, initial_phi
from metarec.online import OnlineTheta
from metarec.representation import represent
from metarec.users import ItemFeatures, UserStore

__all__ = ["LEARN", "PREDICT", "LearnerConfig", "MetaReport", "OnlineLearner", "Ops",
           "Scores"]


class LearnerConfig(BaseModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    meta: MetaConfig = Field(default_factory=MetaConfig)
    task_size: int = Field(50, ge=2, description="recent labelled examples kept per user (task)")
    online_lr: float = Field(0.05, gt=0, description="Adagrad rate of θ's per-micro-batch step")
    seed: int = Field(0, description="seed of the initialisation and of task sampling")
    task_context: str | None = Field(
        None, description="a context field (e.g. platform) that splits each user's task: "
        "user x that field's value is a task whose weights are the user's own (learned from "
        "all the user's labels) plus a residual learned from its labels; none: the user alone")
    task_residual_rate: float = Field(
        0.3, gt=0, le=1, description="with task_context, the residual's inner rate as a "
        "fraction of the user's: small, a task follows its user; 1, its own labels as much")


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
    # the task each op's task refines (a user × context task's user), None for none:
    # such a task's weights are its prior's plus a residual, and the prior learns every
    # label too
    prior: list[str] | None = None
    # n, each op's user's segment (0: none), which picks a new user's φ_0; None: none
    segment: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Scores:
    p: np.ndarray  # predicted click probability, NaN for LEARN ops
    k: np.ndarray  # labels the user had taught before this op


class OnlineLearner:
    """θ (:attr:`online`), the users (:attr:`users`) and the meta-trainer (:attr:`meta`)."""

    def __init__(self, config: LearnerConfig, theta: Theta | None = None,
                 examples_learned: int = 0):
        """``examples_learned``: what ``theta`` had learned (a loaded version's count)."""
        self.config = config
        m = config.model
        self.theta: Theta = theta if theta is not None else init_theta(m, config.seed)
        self.items = ItemFeatures(m.features.item_buckets, m.features.item_slots)
        self.users = UserStore(m.phi_dim, config.task_size, m.features.user_slots,
                               m.features.context_slots, self.items)
        self.adaptation = user_adaptation(m)
        # weight of a task example by its age (labels given since it was written)
        self.decay = m.recency ** np.arange(config.task_size, dtype=np.float32)
        rng = np.random.default_rng(config.seed)
        self.online = OnlineTheta(self.theta, m, config.online_lr, rng)
        self.meta = MetaTrainer(config.meta, m, self.theta, rng)
        self.examples_learned = examples_learned

    def process(self, ops: Ops) -> Scores:
        """Score every predict op and learn every label, in stream order."""
        if len(ops) == 0:
            return Scores(np.full(0, np.nan), np.zeros(0, dtype=np.int64))
        users = self.users
        start = self.theta["phi0"].numpy()
        if ops.segment is not None:
            with torch.no_grad():
                start = initial_phi(self.theta, torch.from_numpy(ops.segment)).numpy()
        if ops.prior is None:
            rows = users.rows_for(ops.user, start)
            prior = np.full(len(ops), -1, dtype=np.int64)
        else:
            prior = users.rows_for(ops.prior, start)
            # the users' rows exist now, so a new row here is a finer task's: a residual
            # on its user's weights, zero at first
            rows = users.rows_for(ops.user, np.zeros(start.shape[-1], dtype=np.float32))
            prior[prior == rows] = -1  # an op without a finer task learns on its user's
        # features are the user's: set on the user's row in stream order, then given
        # to the finer tasks, so every op is represented as with no task key
        finer = prior >= 0
        user_rows = np.where(finer, prior, rows)
        users.set_features(user_rows, ops.user_feats)
        users.features[rows[finer]] = users.features[prior[finer]]
        if ops.segment is not None:
            users.set_segments(user_rows, ops.segment)
        self.items.update(ops.item, ops.item_feats)
        learn = np.flatnonzero(ops.kind == LEARN)
        self.online.start_items(ops.item[learn])
        # θ is fixed until the batch ends: represent every op once, and every buffered
        # example of the users who learn; the compiled loop then only scores and
        # steps users, in stream order.
        user_feats = np.concatenate([users.features[rows], ops.context], axis=1)
        ids = ExampleIds(ops.item, ops.item_feats, user_feats)
        rep = represent(self.theta, ids)
        chain = _with_priors(rows, ops.kind, prior)
        at = chain.op
        learning = ops.kind[at] == LEARN
        tasks = serving.batch_tasks(users, self.theta, chain.rows[learning],
                                    chain.prior[learning])
        op_arrays = OpArrays(rows=chain.rows, kind=ops.kind[at], label=ops.label[at],
                             q=rep.q[at], base=rep.base[at],
                             task_of=serving.task_index(tasks, chain.rows), item=ops.item[at],
                             context=ops.context[at], prior=chain.prior,
                             prior_task=serving.task_index(tasks, chain.prior))
        # the weights each example meets before it is learned: θ's online step
        # trains on exactly the situation a prediction is made in
        out = serving.serve(op_arrays, users, tasks, self.decay,
                            self.adaptation.rule(self.theta), self.config.task_residual_rate)
        p, k, learn_phi = out.p[chain.own], out.k[chain.own], out.learn_phi[chain.own]
        self.examples_learned += len(learn)
        self.meta.schedule.count(len(learn))
        if len(learn):
            labelled = ExampleIds(ops.item[learn], ops.item_feats[learn], user_feats[learn])
            self.online.step(labelled, rep.q[learn], rep.base[learn], rep.side[learn],
                             ops.label[learn], learn_phi[learn])
        return Scores(p, k)

    @property
    def meta_due(self) -> bool:
        return self.meta.schedule.due

    def meta_update(self) -> MetaReport | None:
        """One meta-update of θ from a sample of users' tasks; None if too few users."""
        return self.meta.update(self.users)

    @property
    def meta_updates(self) -> int:
        return self.meta.updates


class _Chain(NamedTuple):
    """A micro-batch's ops with each label of a task that has a prior learned by the
    prior too, just after: the rows the serving loop runs."""

    op: np.ndarray  # the op each entry runs
    rows: np.ndarray  # its row: the op's task, or the prior learning the op's label
    prior: np.ndarray  # the prior row of an op's own entry, -1 for none
    own: np.ndarray  # by op, its own entry


def _with_priors(rows: np.ndarray, kind: np.ndarray, prior: np.ndarray) -> _Chain:
    """The entries in stream order: every op, then its label again on its prior (after
    the task has met the label with the weights it had: the prior's plus its own)."""
    again = (kind == LEARN) & (prior >= 0)
    own = np.arange(len(rows)) + np.cumsum(again) - again
    op = np.empty(len(rows) + int(again.sum()), dtype=np.int64)
    op[own] = np.arange(len(rows))
    repeat = own[again] + 1
    op[repeat] = np.flatnonzero(again)
    chain_rows, chain_prior = rows[op], prior[op]
    chain_rows[repeat] = prior[again]
    chain_prior[repeat] = -1
    return _Chain(op, chain_rows, chain_prior, own)
