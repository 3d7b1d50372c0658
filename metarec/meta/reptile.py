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
from metarec.model import ModelConfig, Theta
from metarec.representation import represent
from metarec.users import UserTasks


class Reptile:
    """Direction φ_0 − mean_u φ_u: a descent direction for φ_0 alone."""

    learns: tuple[str, ...] = ("phi0",)
    learns_tables: bool = False

    def __init__(self, model: ModelConfig, meta: MetaConfig):
        self.model = model
        self.meta = meta
        self.adaptation = user_adaptation(model)

    def direction(self, tasks: UserTasks, theta: Theta) -> MetaDirection:
        rep = represent(theta, tasks.ids())
        weight = inner_weights(tasks.mask, self.model.recency, self.meta.inner_weights)
        phi0 = theta["phi0"].numpy()
        phi = np.repeat(phi0[None, :], len(tasks.y), axis=0)
        kernels.adapt_tasks(phi, kernels.WeightedTasks(rep.q, rep.base, tasks.y, weight),
                            self.adaptation.rule(theta))
        return MetaDirection({"phi0": torch.from_numpy(phi0 - phi.mean(0))}, None, float("nan"))
