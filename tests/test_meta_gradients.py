"""Each meta-learner's direction equals an independent reference: an explicit
autograd unroll of every user's inner loop (MAML, FOMAML, Meta-SGD, ANIL), the
plain pooled loss's gradient (fine-tune), the textbook inner loop's weights
(Reptile), and the prototype's closed form (both adaptations under a meta-learner)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from metarec import kernels
from metarec.meta import (
    ANIL,
    MAML,
    META_LEARNERS,
    Algorithm,
    InnerWeights,
    MetaConfig,
    MetaDirection,
    inner_weights,
    meta_learner,
    split_masks,
)
from metarec.model import Adaptation, Theta, logit, represent
from tests.reference_learning import (
    CFG,
    pooled_loss,
    prototype_one_user,
    random_tasks,
    random_theta,
    reptile_direction,
    unrolled_query_loss,
    user_tasks,
)


def direction(algorithm: Algorithm, theta: Theta, adaptation: Adaptation = Adaptation.GRADIENT,
              weights: InnerWeights = InnerWeights.RECENCY, seed: int = 1) -> MetaDirection:
    model = CFG.model_copy(update={"adaptation": adaptation})
    ours = meta_learner(model, MetaConfig(algorithm=algorithm, inner_weights=weights))
    return ours.direction(user_tasks(*random_tasks(5, 8, seed)), theta)


def reference_gradients(loss_of: Callable[[Theta], torch.Tensor],
                        theta: Theta) -> dict[str, torch.Tensor]:
    """Autograd of a reference loss with respect to every parameter of θ, dense."""
    dense = {k: v.clone().requires_grad_() for k, v in theta.items()}
    loss = loss_of(dense)
    return dict(zip(dense, torch.autograd.grad(loss, list(dense.values()), allow_unused=True),
                    strict=True))


def assert_matches(ours: MetaDirection, ref: dict[str, torch.Tensor],
                   learns: tuple[str, ...]) -> None:
    assert ours.view is not None
    assert set(ours.grads) == {*learns, "item_emb", "item_bias", "feat_emb", "feat_bias"}
    for name, grad in ours.grads.items():
        rows = ours.view.rows_of(name)
        expected = ref[name] if rows is None else ref[name][rows]
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4, msg=name)
    # gradients are not trivially zero
    assert ours.grads["phi0"].abs().sum() > 0 and ours.grads["item_emb"].abs().sum() > 0


def test_every_algorithm_has_its_module() -> None:
    assert set(META_LEARNERS) == set(Algorithm)
    for algorithm in Algorithm:
        ours = meta_learner(CFG, MetaConfig(algorithm=algorithm))
        assert "phi0" in ours.learns


@pytest.mark.parametrize("weights", list(InnerWeights))
@pytest.mark.parametrize("algorithm", [Algorithm.MAML, Algorithm.FOMAML, Algorithm.METASGD,
                                       Algorithm.ANIL])
def test_the_meta_gradient_is_an_explicit_unroll(algorithm: Algorithm,
                                                 weights: InnerWeights) -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    uniform = weights is InnerWeights.UNIFORM
    ours = direction(algorithm, theta, weights=weights)
    ref = reference_gradients(lambda dense: unrolled_query_loss(
        dense, ex, y, mask, first_order=algorithm is Algorithm.FOMAML, uniform=uniform), theta)
    learns = meta_learner(CFG, MetaConfig(algorithm=algorithm)).learns
    assert_matches(ours, ref, learns)
    if algorithm is Algorithm.METASGD:
        assert ours.grads["log_inner_lr"].abs().sum() > 0
    dense = {k: v.clone().requires_grad_() for k, v in theta.items()}
    want = unrolled_query_loss(dense, ex, y, mask, False, uniform).detach()
    assert ours.loss == pytest.approx(float(want), rel=1e-5)


def test_second_order_differs_from_first_order() -> None:
    theta = random_theta()
    maml, fomaml = direction(Algorithm.MAML, theta), direction(Algorithm.FOMAML, theta)
    assert not torch.allclose(maml.grads["phi0"], fomaml.grads["phi0"])


def test_anil_is_maml_in_this_model() -> None:
    """φ_u is the model's only per-user (head) parameter, so ANIL's head-only inner
    loop is MAML's: the very same direction, bit for bit."""
    assert issubclass(ANIL, MAML)
    theta = random_theta()
    anil, maml = direction(Algorithm.ANIL, theta), direction(Algorithm.MAML, theta)
    assert anil.grads.keys() == maml.grads.keys() and anil.loss == maml.loss
    for name, grad in anil.grads.items():
        assert torch.equal(grad, maml.grads[name]), name


def test_finetune_is_the_pooled_loss_gradient() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    ref = reference_gradients(lambda dense: pooled_loss(dense, ex, y, mask), theta)
    assert_matches(direction(Algorithm.FINETUNE, theta), ref, ("global_bias", "phi0"))


@pytest.mark.parametrize("weights", list(InnerWeights))
def test_the_compiled_reptile_direction_is_the_textbook_one(weights: InnerWeights) -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    ours = direction(Algorithm.REPTILE, theta, weights=weights)
    assert ours.view is None and set(ours.grads) == {"phi0"}
    want = reptile_direction(theta, ex, y, mask, uniform=weights is InnerWeights.UNIFORM)
    torch.testing.assert_close(ours.grads["phi0"], want, atol=1e-5, rtol=1e-5)


def test_reptile_with_the_prototype_moves_towards_its_closed_form() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)
    ours = direction(Algorithm.REPTILE, theta, Adaptation.PROTOTYPE)
    weight = torch.from_numpy(inner_weights(mask.numpy(), CFG.recency))
    adapted = [prototype_one_user(theta, ex.take(u), y[u], weight[u]) for u in range(5)]
    torch.testing.assert_close(ours.grads["phi0"], theta["phi0"] - torch.stack(adapted).mean(0),
                               atol=1e-5, rtol=1e-5)


def test_maml_through_the_prototype_is_the_closed_forms_gradient() -> None:
    theta = random_theta()
    ex, y, mask = random_tasks(5, 8)

    def loss(dense: Theta) -> torch.Tensor:
        support, query = split_masks(mask)
        weight = torch.from_numpy(inner_weights(support.numpy(), CFG.recency))
        total = torch.zeros(())
        for u in range(5):
            phi = prototype_one_user(dense, ex.take(u), y[u], weight[u])
            q, base = represent(dense, ex.take(u))
            total = total + (torch.nn.functional.binary_cross_entropy_with_logits(
                logit(phi, q, base), y[u], reduction="none") * query[u]).sum()
        return total / query.sum()

    ref = reference_gradients(loss, theta)
    assert_matches(direction(Algorithm.MAML, theta, Adaptation.PROTOTYPE), ref,
                   ("global_bias", "phi0"))


def test_meta_training_weighs_examples_as_serving_does() -> None:
    """Each example of a run by ``recency ** (examples after it)``, the serving loop's
    weight (:func:`metarec.kernels._recency_weights`, before normalising) for a user
    whose ring holds the run in slots 0, 1, ..."""
    mask = np.array([[1.0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=np.float32)
    decay = 0.8 ** np.arange(6, dtype=np.float32)
    ours = inner_weights(mask, 0.8)
    for u in range(2):
        served = np.empty(6, dtype=np.float32)
        kernels._recency_weights(served, mask[u], decay, int(mask[u].sum()))
        np.testing.assert_allclose(ours[u] / max(ours[u].sum(), 1.0), served, rtol=1e-6)
