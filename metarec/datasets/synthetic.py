"""A synthetic event stream with known structure, for tests and benchmarks.

Users belong to clusters; each cluster has a taste vector, each user a noisy
copy of it. Items have latent vectors, a popularity and a category feature. A
user clicks an item with probability σ(popularity + scale·<taste, item>). Users
arrive over time and act in bursts, as people do, so there are always new users
with few events: the situation meta-learning is for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SyntheticStream:
    users: int = 400
    items: int = 100
    clusters: int = 4
    latent: int = 4
    events_per_user: int = 40
    taste_scale: float = 1.5
    user_noise: float = 0.3
    cluster_weights: tuple[float, ...] | None = None  # default: uneven, 40/30/20/10...
    start: float = 1_700_000_000.0
    span_seconds: float = 30 * 86400.0
    prelabelled: bool = True  # False: unlabelled impressions plus separate click events
    seed: int = 0

    def cluster_of_users(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        weights = np.asarray(self.cluster_weights or np.arange(self.clusters, 0, -1), float)
        return rng.choice(self.clusters, size=self.users, p=weights / weights.sum())

    def events(self) -> Iterator[dict[str, Any]]:
        """JSON-ready event dicts in event-time order."""
        rng = np.random.default_rng(self.seed + 1)
        clusters = self.cluster_of_users()
        centres = rng.normal(size=(self.clusters, self.latent))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        taste = centres[clusters] + self.user_noise * rng.normal(size=(self.users, self.latent))
        item_vec = rng.normal(size=(self.items, self.latent)) / np.sqrt(self.latent) * 2
        popularity = rng.normal(scale=0.5, size=self.items)
        category = np.argmax(item_vec[:, :2], axis=1) + 2 * (item_vec[:, 2] > 0)

        rows: list[tuple[float, int, int, bool]] = []
        arrival = np.sort(rng.uniform(0, self.span_seconds * 0.8, size=self.users))
        for u in range(self.users):
            n = max(2, int(rng.poisson(self.events_per_user)))
            # bursts: sessions of a few events a minute apart, sessions days apart
            gaps = np.where(rng.random(n) < 0.2, rng.exponential(86400.0, n),
                            rng.exponential(60.0, n))
            times = self.start + arrival[u] + np.cumsum(gaps)
            shown = rng.integers(0, self.items, size=n)
            logits = popularity[shown] + self.taste_scale * item_vec[shown] @ taste[u]
            clicked = rng.random(n) < 1 / (1 + np.exp(-logits))
            rows.extend(zip(times.tolist(), [u] * n, shown.tolist(), clicked.tolist(),
                            strict=True))
        rows.sort(key=lambda r: r[0])
        out: list[dict[str, Any]] = []
        for n, (ts, u, item, click) in enumerate(rows):
            event: dict[str, Any] = {
                "type": "impression",
                "impression_id": f"syn-{self.seed}-{n}",
                "user_id": f"u{u}",
                "item_id": f"i{item}",
                "timestamp": round(ts, 3),
                "context": {"platform": ["web", "ios", "android"][n % 3]},
                "item_features": {"category": f"c{category[item]}"},
            }
            if self.prelabelled:
                event["clicked"] = bool(click)
            elif click:
                out.append({"type": "click", "impression_id": event["impression_id"],
                            "user_id": event["user_id"], "item_id": event["item_id"],
                            "timestamp": round(ts + 5.0, 3)})
            out.append(event)
        out.sort(key=lambda e: e["timestamp"])  # stable: an impression precedes its click
        yield from out
