"""A synthetic event stream with known structure, for tests and benchmarks.

Users belong to clusters; each cluster has a taste vector, each user a noisy
copy of it. Items have latent vectors, a popularity and a category feature. A
user clicks an item with probability σ(popularity + scale·<taste, item>). Users
arrive over time and act in bursts, as people do, so there are always new users
with few events: the situation meta-learning is for.

With ``prelabelled=True`` (the default) every impression carries ``clicked``.
With ``prelabelled=False`` the impressions are unlabelled and each click is a
separate event, sorted into the stream by its own timestamp: ``click_delay``
seconds after its impression, 5 s for every click by default, or with
``click_delay=(lo, hi)`` drawn per click log-uniformly in [lo, hi] (a live
stream: most clicks come within seconds to a minute, a few minutes later). The
delays come from their own random generator, so the impressions, the items
shown and which of them are clicked are the same whatever the delay.
``session_gap_seconds`` (a day) is the mean gap between a user's sessions: with
a short ``span_seconds``, minutes make a stream of a few hours.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

PLATFORMS = ("web", "ios", "android")


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
    # seconds from an impression to its click (prelabelled=False): None, 5 s for every
    # click; (lo, hi), drawn per click log-uniformly in [lo, hi]
    click_delay: tuple[float, float] | None = None
    session_gap_seconds: float = 86400.0  # mean gap between a user's sessions
    seed: int = 0
    # an injected change from this fraction of the stream's events on:
    # "click_rate" (every logit +1.5), "cluster_flip" (cluster 0's taste reversed),
    # "new_items" (most impressions show items never seen before), "platform_shift"
    # (the share of impressions on "ios" doubles, from a third to two thirds; the
    # clicks do not change)
    drift: str | None = None
    drift_at: float = 0.5
    # taste that differs by platform: a user's taste on each platform is their own plus
    # this times a direction of their own for that platform, and each event's platform
    # is drawn at random (0: one taste, the platforms in turn; not with a drift but
    # "platform_shift", whose clicks ignore it)
    platform_taste: float = 0.0

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

        rows: list[tuple[float, int, int, bool, int]] = []
        # its own generator: without platform taste, the stream is as it always was
        platform_rng = np.random.default_rng([self.seed, 3])
        platform_dev = platform_rng.normal(size=(self.users, len(PLATFORMS), self.latent))
        arrival = np.sort(rng.uniform(0, self.span_seconds * 0.8, size=self.users))
        for u in range(self.users):
            n = max(2, int(rng.poisson(self.events_per_user)))
            # bursts: sessions of a few events a minute apart, sessions a day apart
            # (session_gap_seconds, on average)
            gaps = np.where(rng.random(n) < 0.2, rng.exponential(self.session_gap_seconds, n),
                            rng.exponential(60.0, n))
            times = self.start + arrival[u] + np.cumsum(gaps)
            shown = rng.integers(0, self.items, size=n)
            logits = popularity[shown] + self.taste_scale * item_vec[shown] @ taste[u]
            on = np.full(n, -1)
            if self.platform_taste:
                on = platform_rng.integers(0, len(PLATFORMS), size=n)
                logits += self.taste_scale * self.platform_taste * np.einsum(
                    "nl,nl->n", item_vec[shown], platform_dev[u, on])
            clicked = rng.random(n) < 1 / (1 + np.exp(-logits))
            rows.extend(zip(times.tolist(), [u] * n, shown.tolist(), clicked.tolist(),
                            on.tolist(), strict=True))
        rows.sort(key=lambda r: r[0])
        shift_from = len(rows) + 1
        if self.drift == "platform_shift":
            shift_from = int(len(rows) * self.drift_at)
        elif self.drift is not None:
            rows = self._drifted(rows, rng, clusters, taste, item_vec, popularity)
        platform_rng = np.random.default_rng(self.seed + 2)  # the platforms in turn
        delays = self._click_delays(sum(1 for r in rows if r[3]))
        out: list[dict[str, Any]] = []
        for n, (ts, u, item, click, platform) in enumerate(rows):
            if platform < 0:
                platform = n % 3 if n < shift_from or platform_rng.random() >= 0.5 else 1
            event: dict[str, Any] = {
                "type": "impression",
                "impression_id": f"syn-{self.seed}-{n}",
                "user_id": f"u{u}",
                "item_id": f"i{item}",
                "timestamp": round(ts, 3),
                # region follows the user's cluster, as a country often does
                "context": {"platform": PLATFORMS[platform], "region": f"r{clusters[u]}"},
                "item_features": {"category": f"c{category[item % self.items]}"},
            }
            if self.prelabelled:
                event["clicked"] = bool(click)
            elif click:
                out.append({"type": "click", "impression_id": event["impression_id"],
                            "user_id": event["user_id"], "item_id": event["item_id"],
                            "timestamp": round(ts + next(delays), 3)})
            out.append(event)
        out.sort(key=lambda e: e["timestamp"])  # stable: an impression precedes its click
        yield from out

    def _click_delays(self, clicks: int) -> Iterator[float]:
        """Each click's delay after its impression, in stream order of the impressions."""
        if self.click_delay is None:
            return iter([5.0] * clicks)
        lo, hi = self.click_delay
        if not 0 < lo <= hi:
            raise ValueError(f"click_delay needs 0 < lo <= hi, got {self.click_delay!r}")
        rng = np.random.default_rng([self.seed, 2])  # its own: the clicks stay the same
        return iter(np.exp(rng.uniform(np.log(lo), np.log(hi), size=clicks)).tolist())

    def _drifted(self, rows: list[tuple[float, int, int, bool, int]],
                 rng: np.random.Generator, clusters: np.ndarray, taste: np.ndarray,
                 item_vec: np.ndarray, popularity: np.ndarray
                 ) -> list[tuple[float, int, int, bool, int]]:
        """Re-draw the clicks (and items) of the events after the drift point."""
        start = int(len(rows) * self.drift_at)
        out = rows[:start]
        for ts, u, item, _, platform in rows[start:]:
            shown, user_taste, shift = item, taste[u], 0.0
            if self.drift == "click_rate":
                shift = 1.5
            elif self.drift == "cluster_flip" and clusters[u] == 0:
                user_taste = -taste[u]
            elif self.drift == "new_items" and rng.random() < 0.8:
                shown = self.items + int(rng.integers(0, 5 * self.items))  # unseen ids
            elif self.drift not in ("click_rate", "cluster_flip", "new_items"):
                raise ValueError(f"unknown drift {self.drift!r}")
            base = shown % self.items  # new items behave like old ones, under new ids
            logit = popularity[base] + shift + self.taste_scale * item_vec[base] @ user_taste
            out.append((ts, u, shown, bool(rng.random() < 1 / (1 + np.exp(-logit))),
                        platform))
        return out
