"""Batched fast adaptation, torch and compiled, is exactly what a per-user loop of
the textbook version does, with any example weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec import kernels
from metarec.adaptation import GradientAdaptation, PrototypeAdaptation, user_adaptation
from metarec.model import Adaptation, represent
from metarec.representation import represent as compiled_represent
from tests.reference_learning import (
    CFG,
    prototype_one_user,
    random_tasks,
    random_theta,
    recency_weights,
    sgd_one_user,
    user_tasks,
)


def weights(mask: torch.Tensor, recency: bool) -> torch.Tensor:
    """The mask, or recency weights over each user's leading run of examples."""
    if not recency:
        return mask
    out = torch.zeros_like(mask)
    for u, length in enumerate(mask.sum(-1).long().tolist()):
        out[u, :length] = recency_weights(length, 0.7)
    return out


@pytest.mark.parametrize("recency", [False, True])
def test_batched_adaptation_equals_a_per_user_sgd_loop(recency: bool) -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    weight = weights(mask, recency)
    noise = torch.randn(5, CFG.phi_dim, generator=torch.Generator().manual_seed(3))
    phi = theta["phi0"] + 0.1 * noise
    q, base = represent(theta, ex)
    batched = GradientAdaptation(CFG).adapt(theta, phi, q, base, y, weight)
    for u in range(5):
        m = mask[u].bool()
        one = sgd_one_user(theta, phi[u], ex.take(u).take(m), y[u][m], weight[u][m])
        torch.testing.assert_close(batched[u], one, atol=1e-5, rtol=1e-5)


def test_the_prototype_is_its_closed_form() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    weight = weights(mask, True)
    q, base = represent(theta, ex)
    batched = PrototypeAdaptation(CFG).adapt(theta, theta["phi0"].expand(5, -1), q, base, y,
                                             weight)
    for u in range(5):
        m = mask[u].bool()
        want = prototype_one_user(theta, ex.take(u).take(m), y[u][m], weight[u][m])
        torch.testing.assert_close(batched[u], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("adaptation", list(Adaptation))
def test_the_compiled_adaptation_is_the_torch_one(adaptation: Adaptation) -> None:
    """:func:`metarec.kernels.adapt_tasks` with either rule, weights as given."""
    config = CFG.model_copy(update={"adaptation": adaptation})
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    weight = weights(mask, True)
    ours = user_adaptation(config)
    phi = np.repeat(theta["phi0"].numpy()[None], 5, axis=0)
    rep = compiled_represent(theta, user_tasks(ex, y, mask).ids())
    kernels.adapt_tasks(phi, kernels.WeightedTasks(rep.q, rep.base, y.numpy(), weight.numpy()),
                        ours.rule(theta))
    q, base = represent(theta, ex)
    want = ours.adapt(theta, theta["phi0"].expand(5, -1), q, base, y, weight)
    np.testing.assert_allclose(phi, want.numpy(), atol=1e-5)


def test_no_inner_steps_is_no_adaptation() -> None:
    config = CFG.model_copy(update={"inner_steps": 0})
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    q, base = represent(theta, ex)
    phi = theta["phi0"].expand(5, -1)
    for adaptation in Adaptation:
        ours = user_adaptation(config.model_copy(update={"adaptation": adaptation}))
        assert torch.equal(ours.adapt(theta, phi, q, base, y, mask), phi)


def test_users_do_not_leak_into_each_other() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    phi = theta["phi0"].expand(5, -1)
    q, base = represent(theta, ex)
    ours = GradientAdaptation(CFG)
    before = ours.adapt(theta, phi, q, base, y, mask)
    y2 = y.clone()
    y2[0] = 1 - y2[0]  # change only user 0's labels
    after = ours.adapt(theta, phi, q, base, y2, mask)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:])
