"""Batched fast adaptation is exactly what a per-user loop of plain SGD would do."""

from __future__ import annotations

import torch

from metarec.model import (
    Examples,
    ModelConfig,
    adapt,
    bce,
    init_theta,
    logit,
    represent,
)

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


def sgd_one_user(theta: dict[str, torch.Tensor], phi: torch.Tensor, ex: Examples,
                 y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The textbook version: autograd on one user's regularised loss, step by step."""
    lr = theta["log_inner_lr"].exp()
    for _ in range(CFG.inner_steps):
        phi = phi.detach().requires_grad_()
        q, base = represent(theta, ex)
        loss = bce(logit(phi, q, base), y, mask)
        loss = loss + CFG.inner_l2 / 2 * ((phi - theta["phi0"]) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, phi)
        phi = phi - lr * grad
    return phi.detach()


def test_batched_adaptation_equals_a_per_user_sgd_loop() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    noise = torch.randn(5, CFG.phi_dim, generator=torch.Generator().manual_seed(3))
    phi = theta["phi0"] + 0.1 * noise
    batched = adapt(theta, phi, ex, y, mask, CFG)
    for u in range(5):
        m = mask[u].bool()
        one = sgd_one_user(theta, phi[u], ex.take(u).take(m), y[u][m], mask[u][m])
        torch.testing.assert_close(batched[u], one, atol=1e-5, rtol=1e-5)


def test_users_do_not_leak_into_each_other() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    phi = theta["phi0"].expand(5, -1)
    before = adapt(theta, phi, ex, y, mask, CFG)
    y2 = y.clone()
    y2[0] = 1 - y2[0]  # change only user 0's labels
    after = adapt(theta, phi, ex, y2, mask, CFG)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:])
