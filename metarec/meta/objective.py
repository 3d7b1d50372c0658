"""What the gradient-based meta-learners share: a loss of θ on the sampled tasks,
differentiated with respect to the rows of θ the tasks touch."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from metarec.adaptation import user_adaptation
from metarec.meta.base import MetaDirection, inner_weights, split_masks
from metarec.meta.config import MetaConfig
from metarec.model import (
    SEGMENT_INIT,
    Examples,
    ModelConfig,
    Theta,
    bce,
    initial_phi,
    logit,
    represent,
)
from metarec.optim import Localized, gradients
from metarec.users import UserTasks


class Objective(ABC):
    """A meta-learner whose direction is the gradient of :meth:`loss`."""

    learns: tuple[str, ...] = ("global_bias", "phi0")
    learns_tables: bool = True

    def __init__(self, model: ModelConfig, meta: MetaConfig):
        self.model = model
        self.meta = meta
        self.adaptation = user_adaptation(model)

    def direction(self, tasks: UserTasks, theta: Theta) -> MetaDirection:
        # the segments' offsets of φ_0, where θ has them, are learned with φ_0
        dense = self.learns + ((SEGMENT_INIT,) if SEGMENT_INIT in theta else ())
        view = Localized(theta, [tasks.examples()], dense=dense)
        start = initial_phi(view.theta, torch.from_numpy(tasks.segment))
        loss = self.loss(view.theta, view.batches[0], torch.from_numpy(tasks.y),
                         torch.from_numpy(tasks.mask), start)
        return MetaDirection(gradients(loss, view), view, float(loss.detach()))

    @abstractmethod
    def loss(self, theta: Theta, tasks: Examples, y: torch.Tensor, mask: torch.Tensor,
             start: torch.Tensor) -> torch.Tensor:
        """The objective on tasks n x R (``mask`` 1 for an example, oldest first), each
        starting from its row of ``start`` (its user's initialisation)."""


class QueryLoss(Objective):
    """The query loss (a plain mean, as prequential scores count every prediction)
    after adapting φ_0 on each support set (its examples weighted as
    :func:`~metarec.meta.base.inner_weights` says), differentiated through the
    adaptation (MAML and its kin)."""

    first_order = False

    def loss(self, theta: Theta, tasks: Examples, y: torch.Tensor, mask: torch.Tensor,
             start: torch.Tensor) -> torch.Tensor:
        phi = start
        q, base = represent(theta, tasks)  # once: support and query share the examples
        support, query = split_masks(mask)
        weight = torch.from_numpy(inner_weights(support.numpy(), self.model.recency,
                                                 self.meta.inner_weights))
        adapted = self.adaptation.adapt(theta, phi, q, base, y, weight,
                                        first_order=self.first_order)
        return bce(logit(adapted.unsqueeze(-2), q, base), y, query)
