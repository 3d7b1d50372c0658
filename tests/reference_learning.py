"""Reference implementations of the learning core, for the tests to hold the
library to: textbook, one-user-at-a-time versions (autograd where the library
writes a gradient out), and the random θ and tasks they run on. Nothing but the
tests runs them."""

from __future__ import annotations

import numpy as np
import torch

from metarec.meta import split_masks
from metarec.model import Examples, ModelConfig, Theta, bce, init_theta, logit, represent
from metarec.users import UserTasks

CFG = ModelConfig(dim=4, inner_steps=3, inner_lr=0.3, inner_l2=0.05)


def random_theta(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = init_theta(CFG, seed)
    for name in ("item_emb", "item_bias", "feat_emb", "feat_bias"):
        theta[name] = torch.randn(theta[name].shape, generator=gen) * 0.3
    theta["feat_emb"][0] = 0
    theta["feat_bias"][0] = 0
    return theta


def random_tasks(n: int, r: int, seed: int = 1) -> tuple[Examples, torch.Tensor, torch.Tensor]:
    """``n`` users' tasks of width ``r``, filled from the start: their lengths are
    r, 3, 1, r - 2 and 5 (a user of one example has an empty support set)."""
    gen = torch.Generator().manual_seed(seed)
    spec = CFG.features
    ex = Examples(
        torch.randint(1, spec.item_buckets, (n, r), generator=gen),
        torch.randint(0, 50, (n, r, spec.item_slots), generator=gen),
        torch.randint(0, 50, (n, r, spec.user_slots + spec.context_slots), generator=gen),
    )
    y = torch.randint(0, 2, (n, r), generator=gen).float()
    lengths = torch.tensor([r, 3, 1, r - 2, 5][:n])
    mask = (torch.arange(r)[None, :] < lengths[:, None]).float()
    return ex, y, mask


def user_tasks(ex: Examples, y: torch.Tensor, mask: torch.Tensor) -> UserTasks:
    """The tasks as the user store hands them to a meta-learner."""
    return UserTasks(ex.item.numpy(), ex.item_feats.numpy(), ex.user_feats.numpy(),
                     y.numpy(), mask.numpy(), np.zeros(len(y), dtype=np.int64))


def recency_weights(length: int, recency: float) -> torch.Tensor:
    """``recency ** age`` of a run of ``length`` examples, the oldest first."""
    return recency ** torch.arange(length - 1, -1, -1, dtype=torch.float32)


def sgd_one_user(theta: Theta, phi: torch.Tensor, ex: Examples, y: torch.Tensor,
                 weight: torch.Tensor, config: ModelConfig = CFG) -> torch.Tensor:
    """The textbook inner loop: autograd on one user's regularised, weighted loss,
    step by step."""
    lr = theta["log_inner_lr"].exp()
    for _ in range(config.inner_steps):
        phi = phi.detach().requires_grad_()
        q, base = represent(theta, ex)
        loss = bce(logit(phi, q, base), y, weight)
        loss = loss + config.inner_l2 / 2 * ((phi - theta["phi0"]) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, phi)
        phi = phi - lr * grad
    return phi.detach()


def prototype_one_user(theta: Theta, ex: Examples, y: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    """The prototype's closed form for one user: φ_0 plus the inner rates times the
    weighted mean of (q, 1) over their clicks minus that over their skips."""
    q, _ = represent(theta, ex)
    w = weight / weight.sum().clamp(min=1.0)
    sign = torch.where(y > 0.5, 1.0, -1.0) * w
    shift = torch.cat([(sign[:, None] * q).sum(0), sign.sum()[None]])
    return theta["phi0"] + theta["log_inner_lr"].exp() * shift


def reptile_direction(theta: Theta, ex: Examples, y: torch.Tensor, mask: torch.Tensor,
                      config: ModelConfig = CFG, uniform: bool = False) -> torch.Tensor:
    """φ_0 minus the mean of every user's weights after the textbook inner loop on
    their whole task, its examples weighted by recency (or alike)."""
    recency = 1.0 if uniform else config.recency
    adapted = []
    for u in range(y.shape[0]):
        m = mask[u].bool()
        weight = recency_weights(int(m.sum()), recency)
        adapted.append(sgd_one_user(theta, theta["phi0"], ex.take(u).take(m), y[u][m], weight,
                                    config))
    return theta["phi0"] - torch.stack(adapted).mean(0)


def unrolled_query_loss(theta: Theta, ex: Examples, y: torch.Tensor, mask: torch.Tensor,
                        first_order: bool, uniform: bool = False) -> torch.Tensor:
    """MAML's objective by hand, per user: inner SGD steps on the support set (by
    recency, or alike) with torch.autograd.grad (create_graph for second order),
    then the query loss, a mean over every user's query examples."""
    recency = 1.0 if uniform else CFG.recency
    support, query = split_masks(mask)
    lr = theta["log_inner_lr"].exp()
    total = torch.zeros(())
    for u in range(y.shape[0]):
        exu = ex.take(u)
        n_support = int(support[u].sum())
        weight = torch.zeros(y.shape[1])
        weight[:n_support] = recency_weights(n_support, recency)
        phi = theta["phi0"]
        for _ in range(CFG.inner_steps):
            q, base = represent(theta, exu)
            inner = bce(logit(phi, q, base), y[u], weight)
            inner = inner + CFG.inner_l2 / 2 * ((phi - theta["phi0"]) ** 2).sum()
            (g,) = torch.autograd.grad(inner, phi, create_graph=not first_order)
            phi = phi - lr * (g.detach() if first_order else g)
        q, base = represent(theta, exu)
        z = logit(phi, q, base)
        total = total + (torch.nn.functional.binary_cross_entropy_with_logits(
            z, y[u], reduction="none") * query[u]).sum()
    return total / query.sum()


def pooled_loss(theta: Theta, ex: Examples, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The fine-tune control's objective by hand: φ_0's mean logistic loss over every
    example of every task."""
    losses = []
    for u in range(y.shape[0]):
        m = mask[u].bool()
        q, base = represent(theta, ex.take(u).take(m))
        losses.append(torch.nn.functional.binary_cross_entropy_with_logits(
            logit(theta["phi0"], q, base), y[u][m], reduction="none"))
    return torch.cat(losses).mean()

