"""What a meta-update is: the algorithm, its schedule and its sample of users."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class Algorithm(StrEnum):
    MAML = "maml"  # second order: differentiates through the inner steps
    FOMAML = "fomaml"  # first order: inner gradients treated as constants
    REPTILE = "reptile"  # moves φ_0 towards the adapted weights, no query gradient
    METASGD = "metasgd"  # MAML that also learns a per-parameter inner learning rate
    # MAML with only the head adapted in the inner loop; φ_u is this model's only
    # per-user parameter, so it is MAML's computation (see metarec.meta.anil)
    ANIL = "anil"
    # The control: φ_0 trained by ordinary SGD on users' pooled examples (no inner
    # loop in the objective); users still fine-tune from it exactly as with the others.
    FINETUNE = "finetune"


class InnerWeights(StrEnum):
    RECENCY = "recency"  # as serving weighs them: recency ** (examples after it)
    UNIFORM = "uniform"  # every example alike


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
    inner_weights: InnerWeights = Field(
        InnerWeights.RECENCY, description="weights of the examples a sampled user is adapted "
        "on in meta-training: by recency as serving weighs them (the model's recency to "
        "the power of the examples after it), or uniform")
