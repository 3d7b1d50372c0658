"""The compiled serving loop is the torch model's math, op by op: a micro-batch
through :class:`OnlineLearner` gives the predictions, fast weights and θ that a
plain torch reading of the model gives (autograd for θ's step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec import kernels
from metarec.adaptation import user_adaptation
from metarec.kernels import ExampleIds
from metarec.learner import LEARN, PREDICT, LearnerConfig, OnlineLearner, Ops
from metarec.meta import Reptile
from metarec.model import Adaptation, Examples, ModelConfig, bce, logit
from metarec.model import represent as torch_represent
from metarec.optim import Adagrad
from metarec.representation import represent
from tests.reference_learning import random_theta, reptile_direction

RING = 5  # small, so that tasks wrap around within the test
MODEL = ModelConfig(dim=4, inner_steps=2, inner_lr=0.3, inner_l2=0.05, recency=0.8)


def learner(adaptation: Adaptation, rate_labels: float = 0.0) -> OnlineLearner:
    model = MODEL.model_copy(update={"adaptation": adaptation,
                                     "inner_rate_labels": rate_labels})
    theta = random_theta()  # every item row non-zero: no random starts to replay
    return OnlineLearner(LearnerConfig(model=model, task_size=RING, online_lr=0.1),
                         theta={k: v.clone() for k, v in theta.items()})


def batch(seed: int = 0) -> Ops:
    """Three users interleaved: runs of labels, a user who only predicts, and
    more labels than the ring holds."""
    rng = np.random.default_rng(seed)
    users, kinds = [], []
    for _ in range(40):
        users.append(f"u{rng.integers(3)}")
        kinds.append(PREDICT if rng.random() < 0.45 else LEARN)
    users += ["watcher", "watcher"]
    kinds += [PREDICT, PREDICT]
    n, spec = len(users), MODEL.features
    item_feats = rng.integers(0, 50, (n, spec.item_slots))
    item_feats[::4] = 0  # items without features
    context = rng.integers(0, 50, (n, spec.context_slots))
    return Ops(user=users, kind=np.array(kinds), item=rng.integers(1, 60, n),
               item_feats=item_feats, user_feats=rng.integers(1, 50, (n, spec.user_slots)),
               context=context, label=rng.integers(0, 2, n).astype(np.float32))


def torch_reading(theta: dict[str, torch.Tensor], ops: Ops, config: ModelConfig,
                  lr: float) -> tuple[np.ndarray, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each op in order with the torch model: predictions, final fast weights by user,
    and θ after an autograd Adagrad step on each label scored with the weights it met."""
    phi0 = theta["phi0"]
    phi: dict[str, torch.Tensor] = {}
    task: dict[str, list[int]] = {}
    stale: set[str] = set()
    user_feats = {}
    for i, u in enumerate(ops.user):  # a user's latest features are theirs
        user_feats[u] = torch.from_numpy(ops.user_feats[i])
    ex = Examples(torch.from_numpy(ops.item), torch.from_numpy(ops.item_feats),
                  torch.stack([torch.cat([user_feats[u], torch.from_numpy(c)])
                               for u, c in zip(ops.user, ops.context, strict=True)]))
    with torch.no_grad():
        q, base = torch_represent(theta, ex)

    def adapt(u: str) -> None:
        idx = torch.tensor(task[u][-RING:])
        age = torch.arange(len(idx) - 1, -1, -1, dtype=torch.float32)
        weight = config.recency ** age
        with torch.no_grad():
            phi[u] = user_adaptation(config).adapt(
                theta, phi[u][None], q[idx][None], base[idx][None],
                torch.from_numpy(ops.label)[idx][None], weight[None],
                labels=torch.tensor([len(task[u])]))[0]

    p = np.full(len(ops), np.nan)
    met = {}
    for i, u in enumerate(ops.user):
        phi.setdefault(u, phi0.clone())
        task.setdefault(u, [])
        if ops.kind[i] == PREDICT:
            if u in stale:
                adapt(u)
                stale.discard(u)
            p[i] = float(torch.sigmoid(logit(phi[u], q[i], base[i])))
        else:
            met[i] = phi[u]
            task[u].append(i)
            stale.add(u)
    for u in stale:
        adapt(u)
    learn = sorted(met)
    tables = {k: v.clone().requires_grad_() for k, v in theta.items()
              if k in ("item_emb", "item_bias", "feat_emb", "feat_bias", "global_bias")}
    q_g, base_g = torch_represent({**theta, **tables}, ex)
    z = logit(torch.stack([met[i] for i in learn]), q_g[learn], base_g[learn])
    loss = bce(z, torch.from_numpy(ops.label[learn])) * len(learn)
    grads = dict(zip(tables, torch.autograd.grad(loss, list(tables.values())), strict=True))
    after = {k: v.clone() for k, v in theta.items()}
    Adagrad(after).step(after, grads, lr)
    return p, phi, after


@pytest.mark.parametrize(("adaptation", "rate_labels"), [
    *((a, 0.0) for a in Adaptation), (Adaptation.GRADIENT, 3.0)])
def test_a_micro_batch_is_the_torch_model_op_by_op(adaptation: Adaptation,
                                                   rate_labels: float) -> None:
    """With ``rate_labels``, the inner rate shrinks with the user's labels."""
    ours = learner(adaptation, rate_labels)
    ops = batch()
    want_p, want_phi, want_theta = torch_reading(
        {k: v.clone() for k, v in ours.theta.items()}, ops, ours.config.model, 0.1)
    got = ours.process(ops)
    np.testing.assert_allclose(got.p, want_p, atol=1e-5)
    assert np.isnan(got.p[ops.kind == LEARN]).all()
    for user, phi in want_phi.items():
        np.testing.assert_allclose(ours.users.phi[ours.users.rows[user]], phi.numpy(),
                                   atol=1e-5)
    for name, value in want_theta.items():
        np.testing.assert_allclose(ours.theta[name].numpy(), value.numpy(), atol=1e-5,
                                   err_msg=name)


def test_the_compiled_reptile_direction_is_the_torch_one_on_the_stores_tasks() -> None:
    ours = learner(Adaptation.GRADIENT)
    ours.process(batch())
    tasks = ours.users.tasks(np.arange(len(ours.users)))
    want = reptile_direction(ours.theta, tasks.examples(), torch.from_numpy(tasks.y),
                             torch.from_numpy(tasks.mask), ours.config.model)
    got = Reptile(ours.config.model, ours.config.meta).direction(tasks, ours.theta)
    np.testing.assert_allclose(got.grads["phi0"].numpy(), want.numpy(), atol=1e-5)


def test_compiled_represent_is_the_torch_one() -> None:
    ours = learner(Adaptation.GRADIENT)
    ops = batch(1)
    feats = np.concatenate([ops.user_feats, ops.context], axis=1)
    q, base, _ = represent(ours.theta, ExampleIds(ops.item, ops.item_feats, feats))
    want_q, want_base = torch_represent(ours.theta, Examples(
        torch.from_numpy(ops.item), torch.from_numpy(ops.item_feats), torch.from_numpy(feats)))
    np.testing.assert_allclose(q, want_q.numpy(), atol=1e-6)
    np.testing.assert_allclose(base, want_base.numpy(), atol=1e-6)
    assert kernels.logits(np.zeros((len(base), 5), np.float32), q, base) == pytest.approx(base)
