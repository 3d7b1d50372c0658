"""Adaptation without gradients: φ_u is φ_0 shifted towards the user's clicks."""

from __future__ import annotations

import torch

from metarec.kernels import PrototypeShift
from metarec.model import ModelConfig, Theta, prototype


class PrototypeAdaptation:
    """φ_u = φ_0 + α ⊙ (weighted mean over the task of ±(q, 1), + for a click), with
    α θ's inner rates (:func:`metarec.model.prototype`). It depends on the task
    alone, not on the current φ_u, and is differentiable in θ like the gradient
    steps, so every meta-learner trains through it. ``inner_steps`` 0 turns it off."""

    def __init__(self, config: ModelConfig):
        self.steps = config.inner_steps

    def rule(self, theta: Theta) -> PrototypeShift:
        return PrototypeShift(theta["log_inner_lr"].exp().numpy(), theta["phi0"].numpy().copy(),
                              self.steps)

    def adapt(self, theta: Theta, phi: torch.Tensor, q: torch.Tensor, base: torch.Tensor,
              y: torch.Tensor, weight: torch.Tensor, *, first_order: bool = False,
              labels: torch.Tensor | None = None) -> torch.Tensor:
        """``first_order`` changes nothing: there is no inner gradient to hold constant."""
        if not self.steps:
            return phi
        return prototype(theta["phi0"], q, y, weight, theta["log_inner_lr"].exp())
