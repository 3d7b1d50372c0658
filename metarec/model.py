"""The model: shared parameters θ and per-user fast weights φ_u.

Score of user u on item i (a factorisation machine with a per-user part)::

    q_i   = E_item[i] + mean(E_feat[item features of i])
    p_u   = φ_u[:d] + mean(E_feat[user features + context])
    logit = b + b_item[i] + Σ b_feat[features] + φ_u[d] + <p_u, q_i>

θ holds the tables, the global bias, the meta-learned initialisation φ_0 and
the log inner learning rates (learned only by Meta-SGD). φ_u is d+1 floats,
one row of an array. The logit is linear in φ_u, so the inner-loop gradient has
a closed form (:func:`inner_step`) that is still an ordinary differentiable
torch expression of θ: second-order MAML differentiates straight through it.
How φ_u follows a user's task is :mod:`metarec.adaptation`; how θ learns from
many users' is :mod:`metarec.meta`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, Field

from metarec.features import FeatureSpec, Segments

Theta = dict[str, torch.Tensor]
TABLES = ("item_emb", "item_bias", "feat_emb", "feat_bias")
DENSE = ("global_bias", "phi0", "log_inner_lr")
#: θ's offsets of φ_0 by a user feature's value (only with ``init_segment``)
SEGMENT_INIT = "phi0_segment"


class Adaptation(StrEnum):
    GRADIENT = "gradient"  # inner SGD steps on the user's task
    PROTOTYPE = "prototype"  # gradient-free: φ_u = φ_0 + α·(clicked minus skipped items' q)


class ModelConfig(BaseModel):
    dim: int = Field(32, ge=1, description="embedding and user-vector width d")
    features: FeatureSpec = Field(default_factory=FeatureSpec)
    init_scale: float = Field(0.1, gt=0, description="std of the random initial user vector")
    item_init_scale: float = Field(0.1, ge=0, description="std of an item embedding's "
                                   "random start, drawn when the item is first learned from")
    inner_lr: float = Field(0.5, gt=0, description="initial inner (per-user) learning rate")
    inner_steps: int = Field(1, ge=0, description="SGD steps on a user's task per label "
                             "(0: no per-user weights, every user scores with φ_0)")
    adaptation: Adaptation = Field(Adaptation.GRADIENT, description="how φ_u follows the "
                                   "user's task: inner SGD steps (gradient), or a gradient-free "
                                   "shift towards the clicked items (prototype)")
    inner_rate_labels: float = Field(
        15.0, ge=0, description="the inner rate shrinks with the user's labels k as "
        "(1 + k / this)^-1/2, as a per-user Adagrad's would (0: a constant rate)")
    inner_l2: float = Field(0.01, ge=0, description="pull of φ_u towards φ_0 in the inner loss")
    init_segment: str | None = Field(
        None, description="a user feature (e.g. occupation) whose value picks a new user's "
        "initialisation: φ_0 plus a meta-learned offset for that value; none: φ_0 for all")
    init_segment_buckets: int = Field(
        64, ge=2, description="rows of the table of offsets that values of init_segment are "
        "hashed into (row 0: users without the feature)")
    recency: float = Field(0.1, gt=0, le=1, description="weight of a task example per label "
                           "given after it (1: all equal; 0.1: mostly the newest label, with "
                           "the rate shrinking by inner_rate_labels a per-user SGD step)")

    @property
    def phi_dim(self) -> int:
        return self.dim + 1


def segments(config: ModelConfig) -> Segments | None:
    """How users are segmented for their initialisation (None: they are not)."""
    if config.init_segment is None:
        return None
    return Segments(config.init_segment, config.init_segment_buckets)


def theta_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each of θ's parameters (what :func:`init_theta` allocates)."""
    spec, d = config.features, config.dim
    shapes = {"item_emb": (spec.item_buckets, d), "item_bias": (spec.item_buckets,),
              "feat_emb": (spec.feature_buckets, d), "feat_bias": (spec.feature_buckets,),
              "global_bias": (1,), "phi0": (config.phi_dim,),
              "log_inner_lr": (config.phi_dim,)}
    if config.init_segment is not None:
        shapes[SEGMENT_INIT] = (config.init_segment_buckets, config.phi_dim)
    return shapes


def init_theta(config: ModelConfig, seed: int) -> Theta:
    """Tables start at zero: an item never learned from scores by its features
    alone, and untouched rows compress to nothing on the model topic. The learner
    gives an item row a random start when the item is first learned from (see
    :meth:`OnlineLearner.process`)."""
    gen = torch.Generator().manual_seed(seed)
    spec, d = config.features, config.dim
    phi0 = torch.zeros(config.phi_dim)
    phi0[:d] = torch.randn(d, generator=gen) * config.init_scale
    theta = {
        "item_emb": torch.zeros(spec.item_buckets, d),
        "item_bias": torch.zeros(spec.item_buckets),
        "feat_emb": torch.zeros(spec.feature_buckets, d),
        "feat_bias": torch.zeros(spec.feature_buckets),
        "global_bias": torch.zeros(1),
        "phi0": phi0,
        "log_inner_lr": torch.full((config.phi_dim,), float(np.log(config.inner_lr))),
    }
    if config.init_segment is not None:
        theta[SEGMENT_INIT] = torch.zeros(config.init_segment_buckets, config.phi_dim)
    return theta


def initial_phi(theta: Theta, segment: torch.Tensor) -> torch.Tensor:
    """Each task's initialisation (n x d+1) by its user's segment: φ_0, plus the
    segment's offset where θ has them (segment 0, no value: none, and no gradient)."""
    offsets = theta.get(SEGMENT_INIT)
    if offsets is None:
        return theta["phi0"].expand(len(segment), -1)
    return theta["phi0"] + offsets[segment] * (segment > 0).unsqueeze(-1)


class Examples(NamedTuple):
    """Index tensors of a batch of examples, any leading shape ``S``."""

    item: torch.Tensor  # S, item bucket
    item_feats: torch.Tensor  # S x item_slots, 0 = empty
    user_feats: torch.Tensor  # S x (user_slots + context_slots), 0 = empty

    def take(self, idx: torch.Tensor | slice | int) -> Examples:
        return Examples(self.item[idx], self.item_feats[idx], self.user_feats[idx])


def _bag(table: torch.Tensor, idx: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean or sum of ``table`` rows over the last axis of ``idx``, slot 0 = empty
    (excluded, also from the mean's count). One fused embedding_bag, not a gather,
    a mask and a reduction: this is the largest cost of a micro-batch."""
    flat = idx.reshape(-1, idx.shape[-1])
    out = torch.nn.functional.embedding_bag(flat, table, mode=mode, padding_idx=0)
    return out.reshape(*idx.shape[:-1], table.shape[-1])


def represent(theta: Theta, ex: Examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything of the logit except φ_u: ``q`` (S x d) and ``base`` (S) so that
    ``logit = base + φ[d] + <φ[:d], q>``."""
    q = theta["item_emb"][ex.item] + _bag(theta["feat_emb"], ex.item_feats, "mean")
    user_side = _bag(theta["feat_emb"], ex.user_feats, "mean")
    fb = theta["feat_bias"].unsqueeze(-1)
    base = (
        theta["global_bias"]
        + theta["item_bias"][ex.item]
        + _bag(fb, ex.item_feats, "sum")[..., 0]
        + _bag(fb, ex.user_feats, "sum")[..., 0]
        + (user_side * q).sum(-1)
    )
    return q, base


def logit(phi: torch.Tensor, q: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``phi`` broadcasts against ``q``: (n x d+1) with (n x d), (n x 1 x d+1) with (n x R x d)."""
    return base + phi[..., -1] + (phi[..., :-1] * q).sum(-1)


def inner_step(
    phi: torch.Tensor,
    q: torch.Tensor,
    base: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    lr: torch.Tensor,
    phi0: torch.Tensor,
    l2: float,
    *,
    first_order: bool = False,
) -> torch.Tensor:
    """One SGD step on every user's task at once.

    ``phi`` n x (d+1); ``q`` n x R x d; ``base``, ``y``, ``weight`` n x R. The loss
    of user u is the weighted mean logistic loss over its examples (divided by the
    weights' sum, or by 1 if that is smaller) plus ``l2/2 * |φ_u - φ_0|²``; a 0/1
    mask as ``weight`` is the plain mean. Its gradient is written out (the logit is
    linear in φ), which is exact and differentiable, and much cheaper than autograd.
    """
    z = logit(phi.unsqueeze(-2), q, base)
    err = (torch.sigmoid(z) - y) * weight / weight.sum(-1, keepdim=True).clamp(min=1.0)
    grad = torch.cat([(err.unsqueeze(-1) * q).sum(-2), err.sum(-1, keepdim=True)], dim=-1)
    grad = grad + l2 * (phi - phi0)
    if first_order:
        grad = grad.detach()
    return phi - lr * grad


def prototype(phi0: torch.Tensor, q: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
              scale: torch.Tensor) -> torch.Tensor:
    """Gradient-free adaptation: move φ_0 towards the (weighted) mean representation of
    the items a user clicked and away from those they skipped; the bias by the
    mean of ±1. Start-independent, so it is the same from any ``phi``."""
    sign = (2 * y - 1) * weight / weight.sum(-1, keepdim=True).clamp(min=1.0)
    shift = torch.cat([(sign.unsqueeze(-1) * q).sum(-2), sign.sum(-1, keepdim=True)], dim=-1)
    return phi0 + scale * shift


def bce(z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)
