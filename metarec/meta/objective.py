"""What the gradient-based meta-learners share: a loss of θ on the sampled tasks,
differentiated with respect to the rows of θ the tasks touch."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from metarec.adaptation import user_adaptation
from metarec.meta.base import MetaDirection, inner_weights, split_masks
from metarec.meta.config import MetaConfig
from metarec.model import Examples, ModelConfig, Theta, bce, logit, represent
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
        view = Localized(theta, [tasks.examples()], dense=self.learns)
        loss = self.loss(view.theta, view.batches[0], torch.from_numpy(tasks.y),
                         torch.from_numpy(tasks.mask))
        return MetaDirection(gradients(loss, view), view, float(loss.detach()))

    @abstractmethod
    def loss(self, theta: Theta, tasks: Examples, y: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """The objective on tasks n x R (``mask`` 1 for an example, oldest first)."""


class QueryLoss(Objective):
    """The query loss (a plain mean, as prequential scores count every prediction)
    after adapting φ_0 on each support set (its examples weighted as
    :func:`~metarec.meta.base.inner_weights` says), differentiated through the
    adaptation (MAML and its kin)."""

    first_order = False

    def loss(self, theta: Theta, tasks: Examples, y: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        phi = theta["phi0"].expand(y.shape[0], -1)
        q, base = represent(theta, tasks)  # once: support and query share the examples
        support, query = split_masks(mask)
        weight = torch.from_numpy(inner_weights(support.numpy(), self.model.recency,
                                                 self.meta.inner_weights))
        adapted = self.adaptation.adapt(theta, phi, q, base, y, weight,
                                        first_order=self.first_order)
        return bce(logit(adapted.unsqueeze(-2), q, base), y, query)
