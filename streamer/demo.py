"""The end of ``./dev run``'s demo: a few users' top items as ``metarec serve`` would
rank them, beside the scores a new user of the same features would get, so the
effect of the personal fast weights is visible at a glance."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from metarec.datasets import movielens
from metarec.events import FeatureValue, Impression, decode_event
from streamer.cluster import Cluster
from streamer.config import Settings
from streamer.live_state import LiveState
from streamer.serving_metrics import ServingMetrics
from streamer.sources import read_source

#: candidates ranked: the most shown items of the stream
CANDIDATES = 300


def show_personalisation(cluster: Cluster, settings: Settings, source: str, *,
                         users: int = 3, top: int = 5,
                         out: Callable[[str], None] = print) -> None:
    shown: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    item_features: dict[str, dict[str, FeatureValue]] = {}
    user_features: dict[str, dict[str, FeatureValue]] = {}
    for rec in read_source(source):
        event = decode_event(rec.value, max_bytes=settings.session.max_record_bytes)
        if not isinstance(event, Impression):
            continue
        shown[event.item_id] += 1
        labels[event.user_id] += 1
        item_features.setdefault(event.item_id, event.item_features)
        user_features.setdefault(event.user_id, event.user_features)
    titles = movielens.titles() if source == "movielens-100k" else {}
    candidates = [(item, item_features[item]) for item, _ in shown.most_common(CANDIDATES)]
    state = LiveState(cluster, settings, ServingMetrics())
    state.start()
    try:
        if not state.wait_ready(120):
            out("demo: the serving state did not catch up with the topics in 2 minutes")
            return
        out(f"\nWhat `metarec serve` answers now: each user's top {top} of the "
            f"{len(candidates)} most shown items, scored with their personal weights, and "
            "what a new user with the same features would get for them:")
        for user, _ in labels.most_common(users):
            personal, _ = state.score(user, candidates, context=None, user_features=None)
            fresh, _ = state.score(f"new-user-like-{user}", candidates, context=None,
                                   user_features=user_features[user])
            feats = ", ".join(f"{k} {v}" for k, v in user_features[user].items())
            out(f"\n  user {user} ({feats}; {personal.k} labels learned)")
            out(f"    {'item':<44} {'personal p':>10} {'new user p':>10}")
            for i in np.argsort(-personal.p, kind="stable")[:top]:
                item = candidates[i][0]
                name = f"{item} {titles.get(item, '')}".strip()[:44]
                out(f"    {name:<44} {personal.p[i]:>10.3f} {fresh.p[i]:>10.3f}")
    finally:
        state.stop()
