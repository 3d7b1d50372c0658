"""The interface of a meta-learner, and what the algorithms share: the support and
query halves of a task, and the weights of the examples adapted on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from metarec.meta.config import InnerWeights
from metarec.model import Theta
from metarec.optim import Localized
from metarec.users import UserTasks


@dataclass
class MetaDirection:
    """θ's descent direction from one sample of tasks, by parameter: a gradient, or
    Reptile's difference of weights. A table's rows are ``view.rows_of(name)``; a
    dense parameter's direction is whole. ``loss``: the objective, NaN if none."""

    grads: dict[str, torch.Tensor]
    view: Localized | None
    loss: float


class MetaLearner(Protocol):
    """A meta-learning algorithm: from a sample of users' tasks and θ, the direction in
    which the meta-update (Adagrad, :class:`metarec.meta.MetaTrainer`) moves θ."""

    #: θ's dense parameters it learns (the tables besides, if ``learns_tables``)
    learns: tuple[str, ...]
    learns_tables: bool

    def direction(self, tasks: UserTasks, theta: Theta) -> MetaDirection:
        """``tasks``: each sampled user's examples in time order, oldest first."""
        ...


def split_masks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support = the earlier half of each user's task, query = the later half, so the
    objective is the streaming situation: adapt on what a user did, be scored on
    what they do next."""
    length = mask.sum(-1, keepdim=True)
    j = torch.arange(mask.shape[-1], dtype=mask.dtype)
    support = (j < torch.floor(length / 2)).to(mask.dtype) * mask
    return support, mask - support


def inner_weights(mask: np.ndarray, recency: float,
                  how: InnerWeights = InnerWeights.RECENCY) -> np.ndarray:
    """Weights of the examples a sampled user is adapted on in meta-training, those of
    a leading run ``mask`` (n x R, 1 for an example, the oldest first). By recency:
    ``recency ** age``, age the examples after it in the run, which is what the
    serving loop gives the same examples when it adapts the user just after the
    run's last one, so meta-training adapts users as serving will. Uniform: the
    mask."""
    if how is InnerWeights.UNIFORM:
        return mask
    width = mask.shape[-1]
    decay = recency ** np.arange(width, dtype=np.float32)  # the serving loop's
    age = mask.sum(-1, keepdims=True).astype(np.int64) - 1 - np.arange(width)
    return mask * decay[np.maximum(age, 0)]
