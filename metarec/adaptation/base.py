"""The interface of a per-user adaptation: how φ_u follows the user's task."""

from __future__ import annotations

from typing import Protocol

import torch

from metarec.kernels import GradientSteps, PrototypeShift
from metarec.model import Theta

#: the compiled form of an adaptation: its settings, whose type picks the kernel
Rule = GradientSteps | PrototypeShift


class UserAdaptation(Protocol):
    """φ_u from a user's task, in two forms that compute the same thing: compiled
    (:meth:`rule`, for the serving loop and Reptile) and torch (:meth:`adapt`,
    differentiable in θ, for the meta-gradients)."""

    def rule(self, theta: Theta) -> Rule:
        """The compiled adaptation at θ's current φ_0 and inner rates."""
        ...

    def adapt(self, theta: Theta, phi: torch.Tensor, q: torch.Tensor, base: torch.Tensor,
              y: torch.Tensor, weight: torch.Tensor, *, first_order: bool = False,
              labels: torch.Tensor | None = None) -> torch.Tensor:
        """Every user's weights adapted from ``phi`` (n x d+1) on their task (``q``
        n x R x d; ``base``, ``y``, ``weight`` n x R, an example's ``weight`` relative
        to the others of its task, 0 for none). ``first_order``: the inner gradients
        count as constants in the derivative (FOMAML). ``labels``: each user's label
        count, where the rule depends on it (none: adapted from φ_0, k = 0)."""
        ...
