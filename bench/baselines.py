"""Online learners users would pick instead of metarec, as test-then-train loops
over the same events (dicts as :func:`metarec.datasets.movielens.events` yields).
Each returns the prediction of every event, made before learning from it."""

from __future__ import annotations

import math
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


def vw_lines(events: list[Event]) -> list[str]:
    """Each event as a labelled VW text example (user and item namespaces)."""
    out = []
    for e in events:
        u, i = tokens(e)
        out.append(f"{1 if e['clicked'] else -1} |u {' '.join(u)} |i {' '.join(i)}")
    return out


def vowpal_wabbit_lines(lines: list[str], lr: float = 0.5) -> np.ndarray:
    """VW at its best: logistic loss, user x item interactions (-q ui), adaptive
    normalised SGD; each example parsed once, then predicted (a test call: the label
    is not used), learned and finished."""
    import vowpalwabbit

    vw = vowpalwabbit.Workspace(f"--loss_function logistic --link logistic -q ui -b 22 "
                                f"-l {lr} --quiet")
    p = np.empty(len(lines))
    parse, predict, learn, finish = vw.parse, vw.predict, vw.learn, vw.finish_example
    for n, line in enumerate(lines):
        ex = parse(line)
        p[n] = predict(ex)
        learn(ex)
        finish(ex)
    vw.finish()
    return p


def vowpal_wabbit(events: list[Event], lr: float = 0.5) -> np.ndarray:
    return vowpal_wabbit_lines(vw_lines(events), lr)


def mf_indices(events: list[Event]) -> tuple[np.ndarray, np.ndarray]:
    """Users' and items' ids as dense row numbers, in order of first appearance."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    u = np.array([users.setdefault(e["user_id"], len(users)) for e in events])
    i = np.array([items.setdefault(e["item_id"], len(items)) for e in events])
    return u, i


def torch_adagrad_mf(users: np.ndarray, items: np.ndarray, labels: np.ndarray,
                     dim: int = 8, lr: float = 0.1, seed: int = 0) -> np.ndarray:
    """Logistic matrix factorisation (global, user and item biases, user . item),
    predicted then learned one event at a time with Adagrad, in torch. At its best:
    gradients written out (no autograd graph or optimizer object per step), rows
    updated in place."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_u, n_i = int(users.max()) + 1, int(items.max()) + 1
    emb_u = torch.randn(n_u, dim + 1, generator=g) * 0.01  # last column: the bias
    emb_i = torch.randn(n_i, dim + 1, generator=g) * 0.01
    emb_u[:, dim] = 0.0
    emb_i[:, dim] = 0.0
    acc_u, acc_i = torch.full_like(emb_u, 1e-6), torch.full_like(emb_i, 1e-6)
    bias, acc_b = 0.0, 1e-6
    p = np.empty(len(users))
    with torch.no_grad():
        for n, (u, i, y) in enumerate(zip(users.tolist(), items.tolist(), labels.tolist(),
                                          strict=True)):
            eu, ei = emb_u[u], emb_i[i]
            # the bias columns: the user's meets 1 on the item side and vice versa
            z = bias + float(torch.dot(eu[:dim], ei[:dim])) + float(eu[dim] + ei[dim])
            q = 1.0 / (1.0 + math.exp(-z))
            p[n] = q
            err = q - y
            gu = err * ei
            gu[dim] = err
            gi = err * eu
            gi[dim] = err
            acc_u[u] += gu * gu
            acc_i[i] += gi * gi
            eu -= lr * gu / acc_u[u].sqrt()
            ei -= lr * gi / acc_i[i].sqrt()
            acc_b += err * err
            bias -= lr * err / math.sqrt(acc_b)
    return p
