"""Meta-learners behind one interface: each turns a batch of user tasks into
gradients for θ (the initialisation φ_0, the tables, and the inner learning rates
where the algorithm learns them).

A task is one user's buffered examples in time order; the earlier half is the
support set, the later half the query set, so the meta-objective is exactly the
streaming situation: adapt on what a user did, be scored on what they do next.
"""

from __future__ import annotations

from enum import StrEnum

import torch
from pydantic import BaseModel, Field

from metarec.model import (
    Examples,
    ModelConfig,
    Theta,
    adapt,
    adapt_represented,
    bce,
    logit,
    represent,
)


class Algorithm(StrEnum):
    MAML = "maml"  # second order: differentiates through the inner steps
    FOMAML = "fomaml"  # first order: inner gradients treated as constants
    REPTILE = "reptile"  # moves φ_0 towards the adapted weights, no query gradient
    METASGD = "metasgd"  # MAML that also learns a per-parameter inner learning rate
    # The control: φ_0 trained by ordinary SGD on users' pooled examples (no inner
    # loop in the objective); users still fine-tune from it exactly as with the others.
    FINETUNE = "finetune"


class MetaConfig(BaseModel):
    algorithm: Algorithm = Field(Algorithm.REPTILE, description="meta-learning algorithm")
    users_per_update: int = Field(256, ge=1, description="tasks sampled per meta-update")
    min_task: int = Field(4, ge=2, description="labelled examples a user needs to be sampled")
    lr: float = Field(0.05, gt=0, description="Adagrad learning rate of the meta-update")
    every_examples: int = Field(2000, ge=1, description="meta-update every N labelled examples")
    every_seconds: float | None = Field(
        None, gt=0, description="also meta-update when this much wall time has passed "
        "(live runs; replays stay deterministic without it)")
    update_tables: bool = Field(True, description="meta-update the embedding tables too "
                                "(else only the initialisation and inner rates)")


def split_masks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support = the earlier half of each user's task, query = the later half."""
    length = mask.sum(-1, keepdim=True)
    j = torch.arange(mask.shape[-1], dtype=mask.dtype)
    support = (j < torch.floor(length / 2)).to(mask.dtype) * mask
    return support, mask - support


def learned_names(algorithm: Algorithm) -> tuple[str, ...]:
    """Dense parameters each algorithm updates (tables are always differentiable)."""
    if algorithm is Algorithm.METASGD:
        return ("global_bias", "phi0", "log_inner_lr")
    if algorithm is Algorithm.REPTILE:
        return ("phi0",)
    return ("global_bias", "phi0")


def meta_loss(
    theta: Theta,
    tasks: Examples,
    y: torch.Tensor,
    mask: torch.Tensor,
    config: ModelConfig,
    algorithm: Algorithm,
) -> torch.Tensor:
    """Query loss after adapting φ_0 on each support set (MAML, FOMAML, Meta-SGD);
    for the fine-tune control, the plain loss of φ_0 on every example."""
    n = y.shape[0]
    phi = theta["phi0"].expand(n, -1)
    q, base = represent(theta, tasks)  # once: support and query share the examples
    if algorithm is Algorithm.FINETUNE:
        return bce(logit(phi.unsqueeze(-2), q, base), y, mask)
    support, query = split_masks(mask)
    adapted = adapt_represented(theta, phi, q, base, y, support, config,
                                first_order=algorithm is Algorithm.FOMAML)
    return bce(logit(adapted.unsqueeze(-2), q, base), y, query)


def reptile_direction(
    theta: Theta, tasks: Examples, y: torch.Tensor, mask: torch.Tensor, config: ModelConfig
) -> torch.Tensor:
    """φ_0 minus the mean of the weights adapted on each whole task: a descent direction.
    The reference: the learner runs a compiled equivalent, held equal to this by a test."""
    with torch.no_grad():
        phi = theta["phi0"].expand(y.shape[0], -1)
        adapted = adapt(theta, phi, tasks, y, mask, config)
        return theta["phi0"] - adapted.mean(0)
