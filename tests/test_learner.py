"""The learner predicts before it learns, in each user's own order, in waves."""

from __future__ import annotations

import json
import time

import numpy as np

from metarec.datasets.synthetic import SyntheticStream
from metarec.events import Impression
from metarec.learner import LEARN, PREDICT, OnlineLearner
from metarec.meta.schedule import MetaSchedule
from metarec.session import StreamSession
from tests.helpers import as_record, records, small_settings
from tests.reference import encode

T0 = 1_700_000_000.0


def impression(user: str, item: str, t: float, clicked: bool | None = None) -> Impression:
    return Impression(type="impression", impression_id=f"{user}-{item}-{t}", user_id=user,
                      item_id=item, timestamp=T0 + t, clicked=clicked,
                      item_features={"category": "c1"})


def warmed_learner() -> OnlineLearner:
    settings = small_settings()
    session = StreamSession(settings.session)
    recs = records(SyntheticStream(users=60, events_per_user=20))
    for i in range(0, len(recs), 200):
        session.process(recs[i:i + 200])
    return session.learner


def test_a_label_changes_the_users_next_prediction_within_the_same_micro_batch() -> None:
    learner = warmed_learner()
    spec = learner.config.model.features
    first = {}
    for label in (1.0, 0.0):
        twin = OnlineLearner(learner.config, theta={k: v.clone() for k, v in learner.theta.items()})
        a = impression("new-user", "i7", 0)
        ops = encode([a, a, a], [PREDICT, LEARN, PREDICT], [0.0, label, 0.0], spec)
        scores = twin.process(ops)
        first[label] = (scores.p[0], scores.p[2], scores.k[2])
    (p0, p_after_click, k_after), (p0_again, p_after_skip, _) = first[1.0], first[0.0]
    assert p0 == p0_again  # the first prediction cannot know the label
    assert k_after == 1
    assert p_after_click > p0 > p_after_skip


def test_interleaving_other_users_does_not_change_anyones_predictions() -> None:
    learner = warmed_learner()
    spec = learner.config.model.features
    a = [impression("ua", f"i{n}", n, clicked=n % 2 == 0) for n in range(4)]
    b = [impression("ub", f"i{n + 10}", n, clicked=n % 3 == 0) for n in range(4)]

    def run(order: list[Impression]) -> dict[str, float]:
        twin = OnlineLearner(learner.config, theta={k: v.clone() for k, v in learner.theta.items()})
        imps = [x for imp in order for x in (imp, imp)]
        kinds = [PREDICT, LEARN] * len(order)
        labels = [float(x.clicked or 0) for x in imps]
        scores = twin.process(encode(imps, kinds, labels, spec))
        return {order[i].impression_id: scores.p[2 * i] for i in range(len(order))}

    interleaved = run([x for pair in zip(a, b, strict=True) for x in pair])
    grouped = run(b + a)
    assert interleaved.keys() == grouped.keys()
    for key, p in interleaved.items():
        assert abs(p - grouped[key]) < 1e-6


def test_prequential_honesty_a_label_never_reaches_its_own_prediction() -> None:
    """Flip one label: its own prediction and every earlier one stay the same;
    the same user's later predictions change."""
    events = list(SyntheticStream(users=40, events_per_user=15, seed=3).events())
    target = 300
    flipped = [dict(e) for e in events]
    flipped[target]["clicked"] = not flipped[target]["clicked"]
    user = events[target]["user_id"]

    def predictions(evs: list[dict]) -> list[dict]:  # type: ignore[type-arg]
        settings = small_settings(meta_every=100)
        session = StreamSession(settings.session)
        out = []
        for i in range(0, len(evs), 64):
            out += [json.loads(p.to_json()) for p in
                    session.process([as_record(e) for e in evs[i:i + 64]]).predictions]
        return out

    base, other = predictions(events), predictions(flipped)
    assert [p["p"] for p in base[: target + 1]] == [p["p"] for p in other[: target + 1]]
    later = [i for i in range(target + 1, len(events)) if events[i]["user_id"] == user]
    assert later and any(base[i]["p"] != other[i]["p"] for i in later)


def test_k_counts_the_labels_a_user_had_given_before() -> None:
    settings = small_settings()
    session = StreamSession(settings.session)
    evs = list(SyntheticStream(users=5, events_per_user=10, seed=4).events())
    preds = session.process([as_record(e) for e in evs]).predictions
    for user in {e["user_id"] for e in evs}:
        ks = [p.k for p in preds if p.user_id == user]
        assert ks == list(range(len(ks)))
    assert np.all(np.isfinite([p.p for p in preds]))


def test_meta_update_is_due_after_n_labels_or_t_seconds() -> None:
    by_count = MetaSchedule(every_examples=3, every_seconds=None)
    by_count.count(2)
    assert not by_count.due
    by_count.count(1)
    assert by_count.due
    by_count.restart()
    assert not by_count.due
    by_time = MetaSchedule(every_examples=10**6, every_seconds=0.05)
    assert not by_time.due  # no label yet: nothing to meta-learn from
    by_time.count(1)
    assert not by_time.due
    time.sleep(0.06)
    assert by_time.due


def test_recent_labels_weigh_more_than_old_ones() -> None:
    """Two new users give the same labels in opposite orders: the one whose latest
    labels are clicks is scored higher next (users' taste drifts within a session)."""
    learner = warmed_learner()
    spec = learner.config.model.features
    history = [1.0] * 5 + [0.0] * 5
    imps, kinds, labels = [], [], []
    for user, ys in (("clicks-last", history[::-1]), ("skips-last", history)):
        for n, y in enumerate(ys):
            imps.append(impression(user, f"i{n}", n))
            kinds.append(LEARN)
            labels.append(y)
        imps.append(impression(user, "i99", 99))
        kinds.append(PREDICT)
        labels.append(0.0)
    scores = learner.process(encode(imps, kinds, labels, spec))
    clicks_last, skips_last = scores.p[10], scores.p[21]
    assert clicks_last > skips_last + 0.02, (clicks_last, skips_last)
