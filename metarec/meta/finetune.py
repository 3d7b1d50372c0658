"""The control: φ_0 and θ trained by ordinary gradient descent on every sampled
user's examples pooled, with no inner loop in the objective. Users still adapt from
φ_0 in serving exactly as with the meta-learners, so what this measures is the
meta-objective's worth."""

from __future__ import annotations

import torch

from metarec.meta.objective import Objective
from metarec.model import Examples, Theta, bce, logit, represent


class FineTune(Objective):
    def loss(self, theta: Theta, tasks: Examples, y: torch.Tensor, mask: torch.Tensor,
             start: torch.Tensor) -> torch.Tensor:
        q, base = represent(theta, tasks)
        return bce(logit(start.unsqueeze(-2), q, base), y, mask)
