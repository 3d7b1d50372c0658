"""Adaptation by gradient: a few SGD steps on the user's weighted task loss."""

from __future__ import annotations

import torch

from metarec.kernels import GradientSteps
from metarec.model import ModelConfig, Theta, inner_step


class GradientAdaptation:
    """``inner_steps`` steps of :func:`metarec.model.inner_step` from the current φ_u,
    at θ's per-parameter inner rates (shrinking with the user's labels k as
    ``(1 + k / inner_rate_labels)^-1/2``, if set), pulled towards φ_0 by ``inner_l2``."""

    def __init__(self, config: ModelConfig):
        self.steps = config.inner_steps
        self.l2 = config.inner_l2
        self.rate_labels = config.inner_rate_labels

    def rule(self, theta: Theta) -> GradientSteps:
        return GradientSteps(theta["log_inner_lr"].exp().numpy(), theta["phi0"].numpy().copy(),
                             self.l2, self.steps, self.rate_labels)

    def adapt(self, theta: Theta, phi: torch.Tensor, q: torch.Tensor, base: torch.Tensor,
              y: torch.Tensor, weight: torch.Tensor, *, first_order: bool = False,
              labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels``: each user's label count k, for the rate's schedule (none:
        k = 0, a task adapted from φ_0 as meta-training does)."""
        lr = theta["log_inner_lr"].exp()
        if labels is not None and self.rate_labels > 0:
            lr = lr * (1 + labels.float()[:, None] / self.rate_labels) ** -0.5
        for _ in range(self.steps):
            phi = inner_step(phi, q, base, y, weight, lr, theta["phi0"], self.l2,
                             first_order=first_order)
        return phi
