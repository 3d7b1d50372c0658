"""θ's online learning: the per-micro-batch Adagrad step on every label as it was
scored, and the random start of item rows about to be learned from."""

from __future__ import annotations

import numpy as np
import torch

from metarec import kernels
from metarec.kernels import AdagradArrays, ExampleIds, LabelledBatch, Scratch
from metarec.model import ModelConfig, Theta
from metarec.optim import Adagrad
from metarec.representation import theta_arrays


class OnlineTheta:
    """θ with its own Adagrad accumulators, stepped once per micro-batch."""

    def __init__(self, theta: Theta, model: ModelConfig, lr: float, rng: np.random.Generator):
        self.theta = theta
        self.lr = lr
        self.item_init_scale = model.item_init_scale
        self.rng = rng
        self.opt = Adagrad(theta)
        acc = self.opt.acc
        self.acc = AdagradArrays(acc["item_emb"].numpy(), acc["item_bias"].numpy(),
                                 acc["feat_emb"].numpy(), acc["feat_bias"].numpy(),
                                 acc["global_bias"].numpy())
        f = model.features
        self.scratch = Scratch(np.zeros((f.item_buckets, model.phi_dim), dtype=np.float32),
                               np.zeros((f.feature_buckets, model.phi_dim), dtype=np.float32),
                               np.zeros(f.item_buckets, dtype=np.bool_),
                               np.zeros(f.feature_buckets, dtype=np.bool_))
        self.item_started = np.zeros(f.item_buckets, dtype=np.bool_)
        self.resync_items()

    def resync_items(self) -> None:
        """θ's item rows were set from outside (a snapshot, a delta, a rollback):
        its non-zero rows have been started already."""
        self.item_started[:] = self.theta["item_emb"].abs().sum(1).numpy() > 0

    def start_items(self, items: np.ndarray) -> None:
        """Random start for item rows about to be learned from for the first time.
        Every user starts from the same φ_0: with all-zero item rows every gradient
        would point one way and the factorisation would collapse to rank one."""
        new = np.unique(items[~self.item_started[items]])
        if len(new):
            shape = (len(new), self.theta["item_emb"].shape[1])
            start = self.rng.standard_normal(shape) * self.item_init_scale
            self.theta["item_emb"][new] = torch.from_numpy(start.astype(np.float32))
            self.item_started[new] = True

    def step(self, ids: ExampleIds, q: np.ndarray, base: np.ndarray, side: np.ndarray,
             label: np.ndarray, phi: np.ndarray) -> None:
        """Adagrad on labelled examples, each scored with the fast weights ``phi`` it
        met. The loss is a sum, not a mean: each example's gradient counts in full,
        however many share the micro-batch (the batch size is an I/O choice, not a
        model one)."""
        z = kernels.logits(phi, q, base)
        err = (1.0 / (1.0 + np.exp(-z)) - label).astype(np.float32)
        kernels.online_step(LabelledBatch(ids, q, side, err, phi), theta_arrays(self.theta),
                            self.acc, self.scratch, self.lr, self.opt.eps)
