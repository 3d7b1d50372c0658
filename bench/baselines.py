"""Online learners users would pick instead of metarec, as test-then-train loops
over the same events (dicts as :func:`metarec.datasets.movielens.events` yields).
Each returns the prediction of every event, made before learning from it."""

from __future__ import annotations

from typing import Any

import numpy as np

Event = dict[str, Any]


def tokens(event: Event) -> tuple[list[str], list[str]]:
    """One-hot tokens of the user side and the item side of an event."""
    u = [f"user={event['user_id']}"] + [f"{k}={v}" for k, v in event["user_features"].items()]
    i = [f"item={event['item_id']}"]
    for k, v in event["item_features"].items():
        i += [f"{k}={x}" for x in v] if isinstance(v, list) else [f"{k}={v}"]
    return u, i


def labels(events: list[Event]) -> np.ndarray:
    return np.array([e["clicked"] for e in events], dtype=float)


def click_rates(events: list[Event], prior: float = 5.0, decay: float = 1.0) -> np.ndarray:
    """Smoothed per-user and per-item click rates, combined in logit space
    (independent evidence). ``decay`` < 1 weighs a user's recent labels more."""
    users: dict[str, list[float]] = {}
    items: dict[str, list[float]] = {}
    clicks = seen = 0.0
    p = np.empty(len(events))
    for n, e in enumerate(events):
        mean = (clicks + 1) / (seen + 2)
        u = users.setdefault(e["user_id"], [0.0, 0.0])
        i = items.setdefault(e["item_id"], [0.0, 0.0])
        pu = (u[0] + prior * mean) / (u[1] + prior)
        pi = (i[0] + prior * mean) / (i[1] + prior)
        z = np.log(pu / (1 - pu)) + np.log(pi / (1 - pi)) - np.log(mean / (1 - mean))
        p[n] = 1 / (1 + np.exp(-z))
        y = float(e["clicked"])
        u[0], u[1] = u[0] * decay + y, u[1] * decay + 1
        i[0], i[1] = i[0] + y, i[1] + 1
        clicks, seen = clicks + y, seen + 1
    return p


def river_logistic(events: list[Event], lr: float = 0.05) -> np.ndarray:
    """river LogisticRegression on one-hot features (no interactions)."""
    from river import linear_model, optim

    model = linear_model.LogisticRegression(optimizer=optim.SGD(lr))
    p = np.empty(len(events))
    for n, e in enumerate(events):
        u, i = tokens(e)
        x = dict.fromkeys(u + i, 1.0)
        p[n] = model.predict_proba_one(x).get(True, 0.5)
        model.learn_one(x, bool(e["clicked"]))
    return p


def vowpal_wabbit(events: list[Event], lr: float = 0.5) -> np.ndarray:
    """Logistic loss, user x item interactions (-q ui), adaptive normalised SGD."""
    import vowpalwabbit

    vw = vowpalwabbit.Workspace(f"--loss_function logistic --link logistic -q ui -b 22 "
                                f"-l {lr} --quiet")
    p = np.empty(len(events))
    for n, e in enumerate(events):
        u, i = tokens(e)
        features = f"|u {' '.join(u)} |i {' '.join(i)}"
        p[n] = vw.predict(features)
        vw.learn(f"{1 if e['clicked'] else -1} {features}")
    vw.finish()
    return p
