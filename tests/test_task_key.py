"""A task key of user × context: each (user, platform) has fast weights of its own,
which start from the user's; the user's own weights learn from all the user's
labels, exactly as they would with no task key."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from metarec.datasets.synthetic import SyntheticStream
from metarec.evaluation import auc
from metarec.learner import LEARN, PREDICT, LearnerConfig, OnlineLearner, Ops
from metarec.model import ModelConfig
from metarec.task_key import TaskKey
from streamer.replay import replay
from tests.helpers import small_settings
from tests.reference_learning import random_theta

MODEL = ModelConfig(dim=4, inner_steps=2, inner_lr=0.3, inner_l2=0.05, recency=0.8)
PLATFORMS = ("web", "ios", "android")


def learner() -> OnlineLearner:
    return OnlineLearner(LearnerConfig(model=MODEL, task_size=5, online_lr=0.1),
                         theta={k: v.clone() for k, v in random_theta().items()})


def batch(seed: int = 0) -> tuple[Ops, list[str | None]]:
    """Three users on three platforms (or none given), predicting and learning in
    turn, their features changing between two sets and some events without them;
    and each op's platform."""
    rng = np.random.default_rng(seed)
    n, spec = 80, MODEL.features
    who = rng.integers(3, size=n)
    users = [f"u{u}" for u in who]
    platforms: list[str | None] = [None if rng.random() < 0.15 else PLATFORMS[p]
                                   for p in rng.integers(3, size=n)]
    kinds = np.where(rng.random(n) < 0.5, PREDICT, LEARN)
    ops = Ops(user=users, kind=kinds, item=rng.integers(1, 60, n),
              item_feats=rng.integers(0, 50, (n, spec.item_slots)),
              user_feats=np.where(rng.random((n, 1)) < 0.3, 0, rng.integers(
                  1, 50, (3, 2, spec.user_slots))[who, rng.integers(0, 2, n)]),
              context=rng.integers(0, 50, (n, spec.context_slots)),
              label=rng.integers(0, 2, n).astype(np.float32))
    return ops, platforms


def keyed(ops: Ops, platforms: list[str | None]) -> Ops:
    key = TaskKey("platform")
    tasks = [key.of(u, {} if p is None else {"platform": p})
             for u, p in zip(ops.user, platforms, strict=True)]
    return Ops(user=tasks, kind=ops.kind, item=ops.item, item_feats=ops.item_feats,
               user_feats=ops.user_feats, context=ops.context, label=ops.label,
               prior=list(ops.user))


def test_the_task_key_is_the_user_in_one_context_or_the_user_alone() -> None:
    key = TaskKey("platform")
    assert key.of("u1", {"platform": "ios", "region": "r1"}) == "u1\x1fplatform=ios"
    assert key.of("u1", {"region": "r1"}) == "u1"  # no platform: the user's own task
    assert TaskKey(None).of("u1", {"platform": "ios"}) == "u1"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_users_own_weights_learn_every_label_as_without_a_task_key(seed: int) -> None:
    """Every op scored by a task that has no label yet gets the score the user's own
    weights give, with no task key; the user's weights end the same."""
    ops, platforms = batch(seed)
    plain, split = learner(), learner()
    want = plain.process(ops)
    got = split.process(keyed(ops, platforms))

    seen: set[str] = set()
    fresh = np.zeros(len(ops), dtype=bool)
    for i, (user, p) in enumerate(zip(ops.user, platforms, strict=True)):
        task = TaskKey("platform").of(user, {} if p is None else {"platform": p})
        fresh[i] = ops.kind[i] == PREDICT and (task == user or task not in seen)
        if ops.kind[i] == LEARN:
            seen.add(task)
    assert fresh.sum() >= 5 and (~fresh & (ops.kind == PREDICT)).sum() >= 5
    np.testing.assert_array_equal(got.p[fresh], want.p[fresh])
    assert not np.allclose(got.p[~fresh & (ops.kind == PREDICT)],
                           want.p[~fresh & (ops.kind == PREDICT)])
    for user in {"u0", "u1", "u2"}:
        a, b = plain.users.rows[user], split.users.rows[user]
        np.testing.assert_array_equal(split.users.phi[b], plain.users.phi[a])
        assert split.users.learned[b] == plain.users.learned[a]


def test_each_label_is_learned_once_by_its_task_and_once_by_its_user() -> None:
    ops, platforms = batch()
    split = learner()
    split.process(keyed(ops, platforms))
    store = split.users
    learned = {key: int(store.learned[row]) for key, row in store.rows.items()}
    learn = ops.kind == LEARN
    for user in ("u0", "u1", "u2"):
        mine = learn & (np.array(ops.user) == user)
        assert learned[user] == mine.sum()
        for p in PLATFORMS:
            on = mine & (np.array(platforms, dtype=object) == p)
            assert learned.get(f"{user}\x1fplatform={p}", 0) == on.sum()
    # θ counts each label once, not once per task that learned it
    assert split.examples_learned == learn.sum()


def _replay(events: list[dict[str, object]], **settings: object) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        source, log = Path(tmp, "events.jsonl"), Path(tmp, "predictions.jsonl")
        source.write_text("".join(json.dumps(e) + "\n" for e in events))
        replay(small_settings(predictions_out=log, **settings), str(source), progress=False)
        lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == len(events)
    return auc(np.array([r["p"] for r in lines]), np.array([r["label"] for r in lines]))


@pytest.mark.parametrize("taste", [0.0, 1.0])
def test_a_platform_task_key_follows_taste_that_differs_by_platform(taste: float) -> None:
    """Where users' taste differs by platform, a task per (user, platform) predicts
    better than one per user, the more so the faster its residual learns; where it
    does not, the default residual rate costs little and the full one more."""
    events = list(SyntheticStream(users=300, events_per_user=40, platform_taste=taste,
                                  seed=3).events())
    alone = _replay(events)
    split = _replay(events, task_context="platform")
    full = _replay(events, task_context="platform", task_residual_rate=1.0)
    if taste:
        assert alone + 0.005 < split < full
    else:
        assert full < split and split > alone - 0.01
