"""Reptile (Nichol et al. 2018): move φ_0 towards the weights each sampled user
adapts to on their whole task. No gradient through θ
is needed, only the adapted weights, so it runs compiled
(:func:`metarec.kernels.adapt_tasks`)."""

from __future__ import annotations

import numpy as np
import torch

from metarec import kernels
from metarec.adaptation import user_adaptation
from metarec.meta.base import MetaDirection, inner_weights
from metarec.meta.config import MetaConfig
from metarec.model import SEGMENT_INIT, ModelConfig, Theta, initial_phi
from metarec.representation import represent
from metarec.users import UserTasks


class Reptile:
    """Direction φ_0 − mean_u φ_u: a descent direction for φ_0 alone; with segments'
    offsets, each segment's offset moves by its own users' mean."""

    learns: tuple[str, ...] = ("phi0",)
    learns_tables: bool = False

    def __init__(self, model: ModelConfig, meta: MetaConfig):
        self.model = model
        self.meta = meta
        self.adaptation = user_adaptation(model)

    def direction(self, tasks: UserTasks, theta: Theta) -> MetaDirection:
        rep = represent(theta, tasks.ids())
        weight = inner_weights(tasks.mask, self.model.recency, self.meta.inner_weights)
        segment = tasks.segment
        with torch.no_grad():
            start = initial_phi(theta, torch.from_numpy(segment)).numpy()
        phi = start.copy()
        kernels.adapt_tasks(phi, kernels.WeightedTasks(rep.q, rep.base, tasks.y, weight),
                            self.adaptation.rule(theta))
        moved = start - phi
        grads = {"phi0": torch.from_numpy(moved.mean(0))}
        if SEGMENT_INIT in theta:
            offsets = np.zeros(tuple(theta[SEGMENT_INIT].shape), dtype=np.float32)
            np.add.at(offsets, segment, moved)
            offsets /= np.maximum(np.bincount(segment, minlength=len(offsets)), 1)[:, None]
            offsets[0] = 0.0  # users without the feature start at φ_0
            grads[SEGMENT_INIT] = torch.from_numpy(offsets)
        return MetaDirection(grads, None, float("nan"))
