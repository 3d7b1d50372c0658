"""Online learners users would pick instead of metarec, as test-then-train loops
over the same events (dicts as :func:`metarec.datasets.movielens.events` yields).
Each returns the prediction of every event, made before learning from it."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import njit

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


def vowpal_wabbit_lines(lines: list[str], lr: float = 0.5, power_t: float = 0.5,
                        quadratic: str = "ui") -> np.ndarray:
    """VW at its best: logistic loss, the ``quadratic`` interactions of the user (u)
    and item (i) namespaces (``"ui"``: user x item; ``"ui uu"``: and user x user),
    adaptive normalised SGD; each example parsed once, then predicted (a test call:
    the label is not used), learned and finished."""
    import vowpalwabbit

    pairs = " ".join(f"-q {q}" for q in quadratic.split())
    vw = vowpalwabbit.Workspace(f"--loss_function logistic --link logistic {pairs} -b 22 "
                                f"-l {lr} --power_t {power_t} --quiet")
    p = np.empty(len(lines))
    parse, predict, learn, finish = vw.parse, vw.predict, vw.learn, vw.finish_example
    for n, line in enumerate(lines):
        ex = parse(line)
        p[n] = predict(ex)
        learn(ex)
        finish(ex)
    vw.finish()
    return p


def vowpal_wabbit(events: list[Event], lr: float = 0.5, power_t: float = 0.5,
                  quadratic: str = "ui") -> np.ndarray:
    return vowpal_wabbit_lines(vw_lines(events), lr, power_t, quadratic)


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


#: MovieLens-1M's age groups, for the ages MovieLens-100K gives
AGE_EDGES = (18, 25, 35, 45, 50, 56)


class SideIds(NamedTuple):
    """Every event's ids as dense rows: user, item, the user's age bucket, gender and
    occupation, the item's release decade and genres (-1 pads a row)."""

    user: np.ndarray
    item: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray
    decade: np.ndarray
    genres: np.ndarray  # n x most genres of an item


def side_ids(events: list[Event]) -> SideIds:
    tables: dict[str, dict[str, int]] = {}

    def ids(name: str, values: list[str]) -> np.ndarray:
        table = tables.setdefault(name, {})
        return np.array([table.setdefault(v, len(table)) for v in values], dtype=np.int64)

    def feature(e: Event, side: str, name: str) -> str:
        return str(e[side].get(name, ""))

    ages = [str(np.searchsorted(AGE_EDGES, int(feature(e, "user_features", "age") or 0),
                                side="right")) for e in events]
    decades = [feature(e, "item_features", "year")[:3] for e in events]
    genre_lists = [e["item_features"].get("genre", []) for e in events]
    width = max(1, max(len(g) for g in genre_lists))
    genre_table = tables.setdefault("genre", {})
    genres = np.full((len(events), width), -1, dtype=np.int64)
    for n, g in enumerate(genre_lists):
        genres[n, :len(g)] = [genre_table.setdefault(x, len(genre_table)) for x in g]
    return SideIds(ids("user", [e["user_id"] for e in events]),
                   ids("item", [e["item_id"] for e in events]), ids("age", ages),
                   ids("gender", [feature(e, "user_features", "gender") for e in events]),
                   ids("occupation", [feature(e, "user_features", "occupation") for e in events]),
                   ids("decade", decades), genres)


@njit(cache=True)
def _adagrad(table: np.ndarray, acc: np.ndarray, row: int, grad: np.ndarray, lr: float) -> None:
    for c in range(grad.shape[0]):
        acc[row, c] += grad[c] * grad[c]
        table[row, c] -= lr * grad[c] / (math.sqrt(acc[row, c]) + 1e-10)


@njit(cache=True)
def _side_mf(ids: SideIds, y: np.ndarray, tables: tuple[np.ndarray, ...],
             biases: np.ndarray, lr: float) -> np.ndarray:
    """The per-event loop of :func:`side_feature_mf`: predict, then one Adagrad step
    on every table row and bias the event touched."""
    user_t, item_t, age_t, gender_t, occ_t, decade_t, genre_t = tables
    accs = [np.zeros_like(t) for t in tables]
    bias_acc = np.zeros_like(biases)  # the global bias, then users', then items'
    n_users = user_t.shape[0]
    dim = user_t.shape[1]
    p = np.empty(y.shape[0])
    uv, iv, genre_mean = np.empty(dim), np.empty(dim), np.empty(dim)
    for n in range(y.shape[0]):
        u, i = ids.user[n], ids.item[n]
        a, g, o, d = ids.age[n], ids.gender[n], ids.occupation[n], ids.decade[n]
        count = 0
        genre_mean[:] = 0.0
        for x in ids.genres[n]:
            if x >= 0:
                genre_mean += genre_t[x]
                count += 1
        if count:
            genre_mean /= count
        uv[:] = user_t[u] + age_t[a] + gender_t[g] + occ_t[o]
        iv[:] = item_t[i] + decade_t[d] + genre_mean
        z = biases[0] + biases[1 + u] + biases[1 + n_users + i] + np.dot(uv, iv)
        q = 1.0 / (1.0 + math.exp(-z))
        p[n] = q
        err = q - y[n]
        grad_u, grad_i = err * iv, err * uv
        for table, acc, row in ((user_t, accs[0], u), (age_t, accs[2], a),
                                (gender_t, accs[3], g), (occ_t, accs[4], o)):
            _adagrad(table, acc, row, grad_u, lr)
        _adagrad(item_t, accs[1], i, grad_i, lr)
        _adagrad(decade_t, accs[5], d, grad_i, lr)
        if count:
            share = grad_i / count
            for x in ids.genres[n]:
                if x >= 0:
                    _adagrad(genre_t, accs[6], x, share, lr)
        for b in (0, 1 + u, 1 + n_users + i):
            bias_acc[b] += err * err
            biases[b] -= lr * err / (math.sqrt(bias_acc[b]) + 1e-10)
    return p


def side_feature_mf(events: list[Event], lr: float = 0.1, dim: int = 16,
                    seed: int = 0) -> np.ndarray:
    """Per-event matrix factorisation with side features, at its best (compiled):
    user and item embeddings (std 0.05) plus the embeddings of the user's age bucket,
    gender and occupation (added to the user's vector) and of the item's genres
    (their mean) and release decade (added to the item's); global, user and item
    biases (zero at first); logit = biases + user . item; one Adagrad step per event,
    no meta-learning."""
    ids = side_ids(events)
    rng = np.random.default_rng(seed)
    sizes = [int(ids.user.max()) + 1, int(ids.item.max()) + 1, int(ids.age.max()) + 1,
             int(ids.gender.max()) + 1, int(ids.occupation.max()) + 1,
             int(ids.decade.max()) + 1, int(ids.genres.max()) + 1]
    tables = tuple(rng.normal(0.0, 0.05, (n, dim)) for n in sizes)
    biases = np.zeros(1 + sizes[0] + sizes[1])
    return _side_mf(ids, labels(events), tables, biases, lr)
