"""Drift episodes over the prequential stream, overall and per segment.

The labelled predictions of a segment are cut into blocks of ``block_labels``
labels. Every completed block, the latest ``current_blocks`` blocks (the current
window) are compared with the ``reference_blocks`` blocks before them:

* ``click_rate``, ``score`` and ``logloss``: the window's mean against the
  reference's. The standard error comes from the spread of the reference's block
  means (batch means), not from a count of examples: users act in bursts, one
  user's burst moves a whole block, and such moves are then ordinary. A change is
  drift when it is both unlikely (``z_threshold``) and large enough to matter: a
  relative change of the click rate or the mean score of ``min_relative_change``,
  a rise of the logloss of ``min_logloss_rise`` (a learning model's loss falls,
  and that is not drift).
* ``score_psi`` and ``item_novelty_psi``: the population stability index of the
  scores, and of how often each item had been seen before, with every user
  weighing the same in each window (a burst is one user, not hundreds of
  examples). Drift when the PSI reaches ``min_psi`` and is unlikely for windows
  of that many users (PSI over ``1/n + 1/m`` users is about chi-square).

A drift is an *episode*: it opens once, with its effect (before, after, the
statistic), and the reference stays as it was before the change while it is
open. It closes when the effect falls below ``close_fraction`` of its minimum
(the signal returned), or once the new level has lasted a whole reference
window: then it is the new normal, and the reference moves on.

A segment is the value of one context field (``platform`` by default); users are
never a segment, so label sets stay small.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

import numpy as np
from numba import njit
from pydantic import BaseModel, Field

#: signals compared by their means, and by their distributions
MEAN_SIGNALS = ("click_rate", "score", "logloss")
PSI_SIGNALS = ("score_psi", "item_novelty_psi")
SIGNALS = MEAN_SIGNALS + PSI_SIGNALS


class DriftConfig(BaseModel):
    """Every setting of the drift monitor: its windows, its thresholds, the segments."""

    block_labels: int = Field(
        100, ge=10, description="labels per block: windows are whole blocks, and a "
        "segment is checked once per block")
    current_blocks: int = Field(
        4, ge=1, description="blocks in the current window (the latest labels): "
        "fewer, sooner but noisier alarms")
    reference_blocks: int = Field(
        40, ge=4, description="blocks in the reference window before it; a segment is "
        "checked once both windows are full")
    z_threshold: float = Field(
        5.0, gt=0, description="standard errors the click rate or the mean score must "
        "move, either way (users as the independent units)")
    logloss_z_threshold: float = Field(
        4.0, gt=0, description="standard errors the mean logloss must rise (one-sided: a "
        "fall is a model learning)")
    min_relative_change: float = Field(
        0.2, gt=0, description="smallest relative change of the click rate or the mean "
        "score that is an alarm (0.2: 20%)")
    min_logloss_rise: float = Field(
        0.02, gt=0, description="smallest rise of the mean logloss that is an alarm")
    min_psi: float = Field(
        0.2, gt=0, description="smallest population stability index that is an alarm "
        "(0.2: the customary 'significant shift')")
    psi_significance: float = Field(
        1e-6, gt=0, lt=1, description="chance a PSI as large would arise between two "
        "samples of the windows' users with nothing changed, below which it is an alarm")
    psi_bins: int = Field(
        10, ge=2, le=100, description="bins of the score PSI, cut at the quantiles of the "
        "reference window (10: deciles)")
    close_fraction: float = Field(
        0.5, gt=0, lt=1, description="an episode closes when its effect falls below this "
        "fraction of the minimum that opened it (hysteresis)")
    feature_top_values: int = Field(
        8, ge=1, le=60, description="values of each feature whose shares the feature's PSI "
        "compares (the reference's most common), the rest pooled as 'other'")
    max_features: int = Field(
        24, ge=0, le=64, description="context, user and item features monitored at most "
        "(the first seen); each is a PSI signal 'psi:<where>.<name>'")
    segment_field: str = Field(
        "platform", description="context field whose values are the segments monitored "
        "on their own besides 'all'")
    max_segments: int = Field(
        20, ge=1, description="segment values monitored at most besides 'all'; values first "
        "seen after that count in 'all' only")


@dataclass(frozen=True)
class DriftEvent:
    """An episode opening or closing: which signal, where, when (event time) and by
    how much. ``statistic``: the z score of a mean, or the PSI."""

    signal: str
    detector: Literal["user_means", "psi"]
    segment: str
    timestamp: float
    examples: int  # labels of the segment seen when it happened
    before: float
    after: float
    statistic: float
    state: Literal["open", "closed"] = "open"
    #: why an episode closed: the signal "returned", or the new level "settled"
    reason: str = ""

    @property
    def magnitude(self) -> float:
        return self.after - self.before

    @property
    def relative(self) -> float:
        return self.magnitude / abs(self.before) if self.before else math.inf


#: added to every bin's share: a bin empty in one sample would make the PSI infinite
PSI_EPSILON = 1e-4

#: an item seen 0, 1, 2 or 3+ times before: a stationary catalogue settles at 3+, and
#: more bins would only tell apart items that are all familiar
NOVELTY_CAP = 3
NOVELTY_EDGES = np.array([-np.inf, *(k + 0.5 for k in range(NOVELTY_CAP)), np.inf])


def psi(reference: np.ndarray, current: np.ndarray, edges: np.ndarray,
        reference_weights: np.ndarray | None = None,
        current_weights: np.ndarray | None = None) -> float:
    """Population stability index of two samples over the bins ``edges``, each
    value weighing its weight (by default, all alike)."""
    ref = _shares(reference, edges, reference_weights)
    cur = _shares(current, edges, current_weights)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _shares(x: np.ndarray, edges: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Each bin's share of the total weight: bins [edges[i], edges[i + 1]), as
    ``np.histogram``'s when the outer edges are infinite, at a fraction of its cost."""
    counts = np.bincount(np.searchsorted(edges[1:-1], x, side="right"), weights,
                         minlength=len(edges) - 1)
    return counts / max(float(counts.sum()), 1e-12) + PSI_EPSILON


@functools.lru_cache(maxsize=256)
def chi2_quantile(p_upper: float, dof: int) -> float:
    """The chi-square value exceeded with probability ``p_upper`` (Wilson–Hilferty)."""
    z = NormalDist().inv_cdf(1 - p_upper)
    k = float(dof)
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


#: users a current window needs before it can raise an alarm
MIN_USERS = 20


@dataclass(frozen=True)
class _Window:
    """What a window's labels say, every user weighing the same: the user count,
    the mean over users of each user's mean label, score and loss with its standard
    error (users as the independent units), and the shares of the score's bins and
    of the novelty's."""

    users: int
    means: np.ndarray  # label, score, loss
    errors: np.ndarray
    score_mean: float
    novelty_mean: float
    score_edges: np.ndarray
    score_shares: np.ndarray
    novelty_shares: np.ndarray
    feature_shares: np.ndarray  # features x FEATURE_CODES: each code's share of users

    @classmethod
    def of(cls, values: np.ndarray, score_edges: np.ndarray | None, bins: int,
           features: int) -> _Window:
        """``values``: rows of (label, score, loss, novelty, user code, then a code per
        feature, of which the first ``features`` are in use); the score's bins at
        ``score_edges``, or else cut at this window's quantiles."""
        if score_edges is None:
            score_edges = _quantile_edges(values[:, 1], bins)
        users, means, errors, score, novelty, feature_shares = summarise_window(
            values, score_edges[1:-1], NOVELTY_EDGES[1:-1], features, FEATURE_CODES)
        return cls(users, means[:3], errors, float(means[1]), float(means[3]), score_edges,
                   score + PSI_EPSILON, novelty + PSI_EPSILON, feature_shares)


@njit(cache=True)
def summarise_window(values: np.ndarray, score_inner: np.ndarray, novelty_inner: np.ndarray,
                     features: int, codes: int
                     ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over a window (see :meth:`_Window.of`): the users; the mean over
    users of each user's mean label, score, loss and novelty, and the standard error
    of the first three; the user-weighted shares of the score's bins (cut at
    ``score_inner``), the novelty's, and each feature's codes."""
    n = values.shape[0]
    order = np.argsort(values[:, 4], kind="mergesort")
    group = np.empty(n, np.int64)
    sums = np.zeros((n, 4))
    counts = np.zeros(n)
    users = 0
    for k in range(n):
        i = order[k]
        if k == 0 or values[i, 4] != values[order[k - 1], 4]:
            users += 1
        g = users - 1
        group[i] = g
        counts[g] += 1.0
        for c in range(4):
            sums[g, c] += values[i, c]
    means = np.zeros(4)
    for g in range(users):
        for c in range(4):
            means[c] += sums[g, c] / counts[g]
    means /= max(users, 1)
    errors = np.full(3, np.nan)
    if users > 1:
        var = np.zeros(3)
        for g in range(users):
            for c in range(3):
                d = sums[g, c] / counts[g] - means[c]
                var[c] += d * d
        errors = np.sqrt(var / (users - 1)) / math.sqrt(users)
    score = np.zeros(len(score_inner) + 1)
    novelty = np.zeros(len(novelty_inner) + 1)
    shares = np.zeros((features, codes))
    for i in range(n):
        w = 1.0 / counts[group[i]]
        score[np.searchsorted(score_inner, values[i, 1], side="right")] += w
        novelty[np.searchsorted(novelty_inner, values[i, 3], side="right")] += w
        for f in range(features):
            shares[f, int(values[i, FEATURES_AT + f])] += w
    total = max(float(users), 1e-12)  # every user weighs 1
    return users, means, errors, score / total, novelty / total, shares / total


def warm_up() -> None:
    """Compile (or load) the monitor's kernel with the types of real traffic: a
    segment's first check otherwise stops mid-stream to do it."""
    values = np.zeros((3, FEATURES_AT + 1))
    values[:, 4] = [0.0, 1.0, 1.0]
    _Window.of(values, None, 2, 1)


@dataclass
class _Episode:
    opened_block: int
    reference: _Window  # as it was before the change, kept while the episode is open


@dataclass
class _Segment:
    """One segment's latest windows and open episodes."""

    config: DriftConfig
    name: str
    n: int = 0
    blocks: int = 0
    # the labels of the block being filled: (label, score, loss, novelty, user, time)
    partial: list[np.ndarray] = field(default_factory=list)
    # the latest windows' blocks, oldest first: label, score, loss, novelty and user
    # code per row
    recent: deque[np.ndarray] = field(init=False)
    reference: _Window | None = None
    episodes: dict[str, _Episode] = field(default_factory=dict)
    # after an episode whose signal returned: the reference from before it, and the
    # block until which the rolling reference still holds the episode's labels
    kept: dict[str, tuple[_Window, int]] = field(default_factory=dict)
    # the monitored features' names, in column order (shared with the monitor)
    features: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.config.reference_blocks + self.config.current_blocks)

    def update(self, columns: np.ndarray, latest_psi: dict[tuple[str, str], float]
               ) -> list[DriftEvent]:
        """``columns``: n x 6 (label, score, loss, novelty, user, time), in order."""
        out: list[DriftEvent] = []
        size = self.config.block_labels
        held = sum(len(c) for c in self.partial)
        start = 0
        while held + len(columns) - start >= size:
            take = size - held
            block = np.concatenate([*self.partial, columns[start:start + take]])
            self.partial, held, start = [], 0, start + take
            out += self._block(block, latest_psi)
        if start < len(columns):
            self.partial.append(columns[start:])
        self.n += len(columns)
        return out

    def _block(self, block: np.ndarray, latest_psi: dict[tuple[str, str], float]
               ) -> list[DriftEvent]:
        c = self.config
        self.blocks += 1
        self.recent.append(np.delete(block, TIME_AT, axis=1))
        if len(self.recent) < self.recent.maxlen:  # type: ignore[operator]
            return []
        blocks = list(self.recent)
        # the reference moves a block at a time: summarised every few blocks it is
        # nearly the same, at a fraction of the cost
        if self.reference is None or self.blocks % REFRESH_BLOCKS == 0:
            self.reference = _Window.of(np.concatenate(blocks[:c.reference_blocks]), None,
                                        c.psi_bins, len(self.features))
        current_values = np.concatenate(blocks[c.reference_blocks:])
        # labels of the segment at the block's end: blocks are cut at whole counts
        timestamp, examples = float(block[-1, 5]), self.blocks * c.block_labels
        out: list[DriftEvent] = []
        currents: dict[int, _Window] = {}  # by the reference's identity: its score bins
        for signal in [*SIGNALS, *(f"psi:{name}" for name in self.features)]:
            episode = self.episodes.get(signal)
            kept = self.kept.get(signal)
            if kept is not None and self.blocks >= kept[1]:
                del self.kept[signal]
                kept = None
            reference = (episode.reference if episode is not None
                         else kept[0] if kept is not None else self.reference)
            current = currents.get(id(reference))
            if current is None:
                current = currents[id(reference)] = _Window.of(
                    current_values, reference.score_edges, c.psi_bins, len(self.features))
            event = self._check(signal, reference, current, episode, timestamp, examples,
                                latest_psi)
            if event is not None:
                out.append(event)
        return out

    def _check(self, signal: str, reference: _Window, current: _Window,
               episode: _Episode | None, timestamp: float, examples: int,
               latest_psi: dict[tuple[str, str], float]) -> DriftEvent | None:
        c = self.config
        detector: Literal["user_means", "psi"]
        if signal in MEAN_SIGNALS:
            col = MEAN_SIGNALS.index(signal)
            detector = "user_means"
            before, after = float(reference.means[col]), float(current.means[col])
            change = after - before
            statistic = change / max(math.hypot(reference.errors[col], current.errors[col]),
                                     1e-12)
            if signal == "logloss":  # only a rise: a learning model's loss falls
                effect, minimum, unlikely = change, c.min_logloss_rise, \
                    statistic >= c.logloss_z_threshold
            else:
                effect = abs(change) / max(abs(before), 1e-12)
                minimum, unlikely = c.min_relative_change, abs(statistic) >= c.z_threshold
        elif signal.startswith("psi:"):
            detector = "psi"
            col = self.features.index(signal[4:])
            if col >= len(reference.feature_shares):
                return None  # first seen since the reference was summarised
            ref, cur = _top_and_other(reference.feature_shares[col],
                                      current.feature_shares[col], c.feature_top_values)
            before, after = _top_share(reference.feature_shares[col], current.feature_shares[col])
            statistic = effect = float(np.sum((cur - ref) * np.log(cur / ref)))
            latest_psi[(signal, self.name)] = effect
            minimum = c.min_psi
            unlikely = effect / (1 / current.users + 1 / reference.users) >= chi2_quantile(
                c.psi_significance, max(len(ref) - 1, 1))
        else:
            detector = "psi"
            if signal == "score_psi":
                ref, cur = reference.score_shares, current.score_shares
                before, after = reference.score_mean, current.score_mean
            else:
                ref, cur = reference.novelty_shares, current.novelty_shares
                before, after = reference.novelty_mean, current.novelty_mean
            statistic = effect = float(np.sum((cur - ref) * np.log(cur / ref)))
            latest_psi[(signal, self.name)] = effect
            minimum = c.min_psi
            # PSI x (1/n + 1/m) users is about chi-square with nothing changed
            unlikely = effect / (1 / current.users + 1 / reference.users) >= chi2_quantile(
                c.psi_significance, max(len(ref) - 1, 1))
            # items growing familiar is the catalogue settling; only more novelty is drift
            if signal == "item_novelty_psi" and after >= before:
                unlikely = False
        if episode is None:
            if unlikely and effect >= minimum and current.users >= MIN_USERS:
                self.episodes[signal] = _Episode(self.blocks, reference)
                return DriftEvent(signal, detector, self.name, timestamp, examples, before,
                                  after, statistic)
            return None
        returned = effect < c.close_fraction * minimum
        settled = self.blocks - episode.opened_block >= c.reference_blocks
        if not (returned or settled):
            return None
        del self.episodes[signal]
        if returned:  # compare with the level before it, not with the episode itself
            self.kept[signal] = (episode.reference,
                                 self.blocks + c.reference_blocks + c.current_blocks)
        return DriftEvent(signal, detector, self.name, timestamp, examples, before, after,
                          statistic, "closed", "returned" if returned else "settled")


#: blocks between summaries of a segment's reference window
REFRESH_BLOCKS = 4


def _top_and_other(reference: np.ndarray, current: np.ndarray, top: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Shares of the reference's ``top`` most common codes, and of the rest pooled."""
    keep = np.argsort(reference)[::-1][:top]
    keep = keep[reference[keep] > 0]
    ref, cur = reference[keep], current[keep]
    return (np.append(ref, max(1 - ref.sum(), 0.0)) + PSI_EPSILON,
            np.append(cur, max(1 - cur.sum(), 0.0)) + PSI_EPSILON)


def _top_share(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """The share, before and after, of the value whose share moved most."""
    j = int(np.argmax(np.abs(current - reference)))
    return float(reference[j]), float(current[j])


#: columns of a label: label, score, loss, novelty, user code, event time, then a
#: code per monitored feature (windows keep all but the time)
TIME_AT, FEATURES_AT = 5, 5
#: codes of a feature's values: 0 absent, then the first values seen; the last
#: code pools every value after those
FEATURE_CODES = 64
#: distinct feature mappings remembered at most (then forgotten, and seen afresh)
MAX_MAPPINGS = 100_000


class _FeatureCodes:
    """Codes of the monitored features' values, a row per distinct mapping: items'
    and users' mappings repeat with their ids, contexts with their values."""

    def __init__(self, max_features: int):
        self.max_features = max_features
        self.names: list[str] = []
        self._column: dict[str, int] = {}
        self._values: list[dict[str, int]] = []
        self._table = np.zeros((1024, max_features), dtype=np.int64)
        self._used = 1  # row 0: no features
        self._by_key: dict[tuple[str, object], tuple[Mapping[str, object], int]] = {}

    def rows(self, group: str, keys: Sequence[object],
             mappings: Sequence[Mapping[str, object]]) -> list[int]:
        """The row of each mapping (of ``group``: context, user or item), keyed by
        ``keys`` (an id whose mapping usually stays the same)."""
        out = []
        by_key = self._by_key
        for key, mapping in zip(keys, mappings, strict=True):
            if not mapping:
                out.append(0)  # the all-zero row
                continue
            hit = by_key.get((group, key))
            if hit is None or hit[0] != mapping:
                hit = by_key[(group, key)] = (mapping, self._row(group, mapping))
            out.append(hit[1])
        return out

    def forget_if_full(self) -> None:
        """Past ``MAX_MAPPINGS``, forget every row and key (the codes stay)."""
        if len(self._by_key) > MAX_MAPPINGS:
            self._by_key.clear()
            self._used = 1

    def table(self) -> np.ndarray:
        """Every row so far (read it before the next call of :meth:`rows`)."""
        return self._table[:self._used]

    def _row(self, group: str, mapping: Mapping[str, object]) -> int:
        if self._used == len(self._table):
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
        row = self._table[self._used]
        row[:] = 0
        for name, value in mapping.items():
            col = self._column.get(f"{group}.{name}")
            if col is None:
                if len(self.names) >= self.max_features:
                    continue
                col = self._column[f"{group}.{name}"] = len(self.names)
                self.names.append(f"{group}.{name}")
                self._values.append({})
            text = "|".join(map(str, value)) if isinstance(value, list) else str(value)
            codes = self._values[col]
            code = codes.get(text)
            if code is None:
                code = codes[text] = min(len(codes) + 1, FEATURE_CODES - 1)
            row[col] = code
        self._used += 1
        return self._used - 1


def _quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    inner = np.unique(np.quantile(reference, np.linspace(1 / bins, 1 - 1 / bins, bins - 1)))
    return np.concatenate([[-np.inf], inner, [np.inf]])


@dataclass(frozen=True)
class Features:
    """Labels' feature mappings, one of each per label."""

    contexts: Sequence[Mapping[str, object]]
    users: Sequence[Mapping[str, object]]
    items: Sequence[Mapping[str, object]]


class DriftMonitor:
    """Drift episodes over the labelled predictions, overall ('all') and per segment."""

    def __init__(self, config: DriftConfig | None = None):
        self.config = config or DriftConfig()
        self.segments: dict[str, _Segment] = {}
        self.item_seen: defaultdict[str, int] = defaultdict(int)
        self.user_codes: dict[str, int] = {}
        self.events: list[DriftEvent] = []
        self.latest_psi: dict[tuple[str, str], float] = {}
        self.codes = _FeatureCodes(self.config.max_features)

    def update_batch(self, p: np.ndarray, label: np.ndarray, timestamp: np.ndarray,
                     item_ids: list[str], segments: list[str | None],
                     user_ids: list[str], features: Features | None = None
                     ) -> list[DriftEvent]:
        """Labelled predictions in stream order; returns the episodes they opened or
        closed, in event-time order; the same however the stream is chunked.
        ``features``: each label's context, user and item feature mappings."""
        seen, user_codes = self.item_seen, self.user_codes
        novelty = np.empty(len(item_ids))
        for j, item in enumerate(item_ids):
            count = seen[item]
            novelty[j] = min(count, NOVELTY_CAP)
            seen[item] = count + 1
        users = np.fromiter((user_codes.setdefault(u, len(user_codes)) for u in user_ids),
                            dtype=np.float64, count=len(user_ids))
        q = np.clip(p, 1e-7, 1 - 1e-7)
        loss = -(label * np.log(q) + (1 - label) * np.log(1 - q))
        codes = np.zeros((len(p), self.config.max_features), dtype=np.int64)
        if features is not None and self.config.max_features:
            table = self.codes
            table.forget_if_full()
            rows = [table.rows("context", [tuple(map(str, c.items())) for c in
                                           features.contexts], features.contexts),
                    table.rows("user", user_ids, features.users),
                    table.rows("item", item_ids, features.items)]
            # a mapping's row holds its own features' columns, zero elsewhere
            codes = table.table()[np.asarray(rows)].sum(axis=0)
        columns = np.column_stack([label, p, loss, novelty, users, timestamp, codes])
        groups: dict[str, list[int]] = {}
        new = 0  # segments first seen in this batch
        for j, segment in enumerate(segments):
            if segment is None:
                continue
            name = f"{self.config.segment_field}={segment}"
            if name not in groups and name not in self.segments:
                if len(self.segments) + new > self.config.max_segments:
                    continue
                new += 1
            groups.setdefault(name, []).append(j)
        out = self._segment("all").update(columns, self.latest_psi)
        for name, idx in groups.items():
            out += self._segment(name).update(columns[np.asarray(idx)], self.latest_psi)
        out.sort(key=lambda e: e.timestamp)
        self.events += out
        return out

    def open_episodes(self) -> list[tuple[str, str]]:
        """(signal, segment) of every episode open now."""
        return sorted((signal, seg.name) for seg in self.segments.values()
                      for signal in seg.episodes)

    def _segment(self, name: str) -> _Segment:
        seg = self.segments.get(name)
        if seg is None:
            seg = self.segments[name] = _Segment(self.config, name, features=self.codes.names)
        return seg
