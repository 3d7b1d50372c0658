"""Meta-gradients equal an explicit autograd unroll of each user's inner loop."""

from __future__ import annotations

import pytest
import torch

from metarec.meta import Algorithm, learned_names, meta_loss, reptile_direction, split_masks
from metarec.model import bce, logit, represent
from metarec.optim import Localized, gradients
from tests.test_adaptation import CFG, random_tasks, random_theta, sgd_one_user


def unrolled_meta_loss(theta: dict[str, torch.Tensor], ex, y, mask, first_order: bool):  # type: ignore[no-untyped-def]
    """Per user: inner SGD steps with torch.autograd.grad (create_graph for second
    order), then the query loss; summed like meta_loss (mean over query examples)."""
    support, query = split_masks(mask)
    lr = theta["log_inner_lr"].exp()
    total = torch.zeros(())
    for u in range(y.shape[0]):
        exu = ex.take(u)
        phi = theta["phi0"]
        for _ in range(CFG.inner_steps):
            q, base = represent(theta, exu)
            inner = bce(logit(phi, q, base), y[u], support[u])
            inner = inner + CFG.inner_l2 / 2 * ((phi - theta["phi0"]) ** 2).sum()
            (g,) = torch.autograd.grad(inner, phi, create_graph=not first_order)
            phi = phi - lr * (g.detach() if first_order else g)
        q, base = represent(theta, exu)
        z = logit(phi, q, base)
        total = total + (torch.nn.functional.binary_cross_entropy_with_logits(
            z, y[u], reduction="none") * query[u]).sum()
    return total / query.sum()


@pytest.mark.parametrize("algorithm", [Algorithm.MAML, Algorithm.FOMAML, Algorithm.METASGD])
def test_meta_gradient_matches_explicit_unroll(algorithm: Algorithm) -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)

    view = Localized(theta, [ex], dense=learned_names(algorithm))
    ours = gradients(meta_loss(view.theta, view.batches[0], y, mask, CFG, algorithm), view)

    dense = {k: v.clone().requires_grad_() for k, v in theta.items()}
    ref_loss = unrolled_meta_loss(dense, ex, y, mask, first_order=algorithm is Algorithm.FOMAML)
    ref = dict(zip(dense, torch.autograd.grad(ref_loss, list(dense.values())), strict=True))

    assert set(ours) >= {"phi0", "item_emb", "feat_emb"}
    for name, grad in ours.items():
        rows = view.rows_of(name)
        expected = ref[name] if rows is None else ref[name][rows]
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4, msg=name)
    # gradients are not trivially zero
    assert ours["phi0"].abs().sum() > 0 and ours["item_emb"].abs().sum() > 0
    if algorithm is Algorithm.METASGD:
        assert ours["log_inner_lr"].abs().sum() > 0


def test_second_order_differs_from_first_order() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    grads = {}
    for algorithm in (Algorithm.MAML, Algorithm.FOMAML):
        view = Localized(theta, [ex], dense=learned_names(algorithm))
        grads[algorithm] = gradients(
            meta_loss(view.theta, view.batches[0], y, mask, CFG, algorithm), view)
    assert not torch.allclose(grads[Algorithm.MAML]["phi0"], grads[Algorithm.FOMAML]["phi0"])


def test_reptile_moves_the_init_towards_the_adapted_weights() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    direction = reptile_direction(theta, ex, y, mask, CFG)
    phi = theta["phi0"]
    adapted = []
    for u in range(5):
        m = mask[u].bool()
        adapted.append(sgd_one_user(theta, phi, ex.take(u).take(m), y[u][m], mask[u][m]))
    torch.testing.assert_close(direction, phi - torch.stack(adapted).mean(0), atol=1e-5,
                               rtol=1e-5)
