"""Drift monitoring over the prequential stream, overall and per segment.

Signals, fed the labelled predictions of each micro-batch in stream order:

* ``logloss``: river ``ADWIN`` on each example's logloss; only a rise is an alarm
  (a learning model's loss falls, and that is not drift).
* ``click_rate`` and ``score``: Page-Hinkley (river's, computed over arrays) on
  the label and on the predicted probability.
* ``score_psi`` and ``item_novelty_psi``: population stability index of the
  scores, and of how often each item had been seen before, over the latest
  window against the window before it (re-based after an alarm).

A segment is the value of one context field (``platform`` by default); users are
never a segment, so label sets stay small.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from pydantic import BaseModel, Field
from river import drift


class DriftConfig(BaseModel):
    """Every setting of the drift monitor: its detectors, their windows, the segments."""

    warmup: int = Field(
        2000, ge=0, description="labelled examples a segment sees before any of its alarms "
        "is raised (its PSI windows start filling after them)")
    adwin_delta: float = Field(
        0.01, gt=0, lt=1, description="ADWIN's confidence on the per-example logloss: "
        "smaller, fewer and later alarms")
    ph_threshold: float = Field(
        60.0, gt=0, description="Page-Hinkley alarm threshold on the click rate and on the "
        "score: the cumulative deviation from their running mean, summed over examples")
    ph_delta: float = Field(
        0.05, ge=0, description="deviation of a label or a score from its running mean "
        "(probability units, per example) that Page-Hinkley tolerates without alarm")
    ph_min_instances: int = Field(
        30, ge=1, description="examples a Page-Hinkley detector sees, at the start and "
        "after each alarm, before it may raise one")
    ph_alpha: float = Field(
        1 - 0.0001, gt=0, le=1, description="Page-Hinkley's forgetting factor per example "
        "on the accumulated deviation (1: never forgets)")
    psi_window: int = Field(
        2000, ge=100, description="labelled examples in each PSI window: the latest window "
        "is compared with the one just before it")
    psi_threshold: float = Field(
        0.25, gt=0, description="population stability index above which the latest window "
        "is an alarm (0.25: the customary 'major shift')")
    psi_bins: int = Field(
        10, ge=2, le=100, description="bins of the score PSI, cut at the quantiles of the "
        "reference window (10: deciles)")
    psi_checks_per_window: int = Field(
        4, ge=1, le=100, description="PSI comparisons per window of new examples (4: one "
        "every quarter window)")
    slow_average_examples: int = Field(
        2000, ge=1, description="span in examples of the slow moving average a click-rate "
        "or score alarm reports as the value before the change")
    fast_average_examples: int = Field(
        200, ge=1, description="span in examples of the fast moving average a click-rate "
        "or score alarm reports as the value after the change")
    segment_field: str = Field(
        "platform", description="context field whose values are the segments monitored "
        "on their own besides 'all'")
    max_segments: int = Field(
        20, ge=1, description="segment values monitored at most besides 'all'; values first "
        "seen after that count in 'all' only")


@dataclass(frozen=True)
class DriftEvent:
    """What drifted, where, when (event time) and by how much."""

    signal: str
    detector: str
    segment: str
    timestamp: float
    examples: int  # examples of the segment seen when it fired
    before: float
    after: float

    @property
    def magnitude(self) -> float:
        return self.after - self.before


#: added to every bin's share: a bin empty in one sample would make the PSI infinite
PSI_EPSILON = 1e-4

#: Page-Hinkley's recursion is run over chunks of this many examples: within one,
#: alpha**-k stays near 1, so the cumulative sums keep their precision
PH_CHUNK = 4096


def psi(reference: np.ndarray, current: np.ndarray, edges: np.ndarray) -> float:
    """Population stability index of two samples over the bins ``edges``."""
    ref = np.histogram(reference, edges)[0] / max(len(reference), 1) + PSI_EPSILON
    cur = np.histogram(current, edges)[0] / max(len(current), 1) + PSI_EPSILON
    return float(np.sum((cur - ref) * np.log(cur / ref)))


class PageHinkley:
    """river's ``PageHinkley`` (mode "both"), over arrays: the same recursion, as
    cumulative sums, so a micro-batch costs a few numpy calls rather than a Python
    call per example."""

    def __init__(self, threshold: float, delta: float, min_instances: int = 30,
                 alpha: float = 1 - 0.0001):
        self.threshold, self.delta = threshold, delta
        self.min_instances, self.alpha = min_instances, alpha
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.sum_increase = self.sum_decrease = 0.0
        self.min_increase, self.max_decrease = math.inf, -1.0
        self.drift_detected = False

    def update_many(self, x: np.ndarray) -> list[int]:
        """Feed ``x`` in order; the indices at which a drift was detected."""
        alarms: list[int] = []
        j = 0
        while j < len(x):
            if self.drift_detected:
                self._reset()
            xs = x[j:j + PH_CHUNK]
            k = np.arange(1, len(xs) + 1)
            n = self.n + k
            mean = (self.mean * self.n + np.cumsum(xs)) / n
            dev = xs - mean
            decay = self.alpha ** k
            inc = decay * (self.sum_increase + np.cumsum((dev - self.delta) / decay))
            dec = decay * (self.sum_decrease + np.cumsum((dev + self.delta) / decay))
            min_inc = np.minimum.accumulate(np.minimum(inc, self.min_increase))
            max_dec = np.maximum.accumulate(np.maximum(dec, self.max_decrease))
            hit = np.flatnonzero((n >= self.min_instances) & (
                (inc - min_inc > self.threshold) | (max_dec - dec > self.threshold)))
            end = int(hit[0]) if len(hit) else len(xs) - 1
            self.n, self.mean = int(n[end]), float(mean[end])
            self.sum_increase, self.sum_decrease = float(inc[end]), float(dec[end])
            self.min_increase, self.max_decrease = float(min_inc[end]), float(max_dec[end])
            if len(hit):
                self.drift_detected = True
                alarms.append(j + end)
            j += end + 1
        return alarms


class _PSI:
    """PSI of the latest window against the window just before it, every
    ``window // checks`` examples, over fixed ``edges`` or else ``bins`` cut at the
    reference's quantiles. Comparing neighbours, not a fixed first window, lets a
    model's scores shift slowly as it learns, and still catches an abrupt change
    within a window."""

    def __init__(self, window: int, edges: np.ndarray | None = None, *, bins: int = 10,
                 checks: int = 4):
        self.window = window
        self.fixed_edges = edges
        self.bins = bins
        self.every = window // checks
        # the latest (up to) 2 windows of values, a ring ending before index `end`
        self._ring = np.zeros(2 * window)
        self._held = self._end = 0
        self.since = 0

    def update_many(self, xs: np.ndarray,
                    threshold: float) -> list[tuple[int, float, float, float]]:
        """Feed ``xs`` in order, comparing every ``window // checks`` examples once two
        windows are held and re-basing after each alarm: (index, psi, reference mean,
        current mean) for every comparison made."""
        out = []
        j = 0
        while j < len(xs):
            # append up to the next comparison at once
            step = max(2 * self.window - self._held, self.every - self.since, 1)
            chunk = xs[j:j + step]
            self._append(chunk)
            self.since += len(chunk)
            j += len(chunk)
            if self._held < 2 * self.window or self.since < self.every:
                continue
            self.since = 0
            got = self._compare()
            out.append((j - 1, *got))
            if got[0] > threshold:
                self._held = self.window  # the changed window becomes the next reference
        return out

    def _append(self, xs: np.ndarray) -> None:
        size = len(self._ring)
        xs = xs[-size:]
        self._ring[(self._end + np.arange(len(xs))) % size] = xs
        self._end = (self._end + len(xs)) % size
        self._held = min(self._held + len(xs), size)

    def _compare(self) -> tuple[float, float, float]:
        size = len(self._ring)
        data = self._ring[(self._end - size + np.arange(size)) % size]  # oldest first
        ref, cur = data[: self.window], data[self.window:]
        edges = self.fixed_edges
        if edges is None:  # the reference's quantiles (deciles for 10 bins)
            inner = np.unique(np.quantile(ref, np.linspace(1 / self.bins, 1 - 1 / self.bins,
                                                           self.bins - 1)))
            edges = np.concatenate([[-np.inf], inner, [np.inf]])
        return psi(ref, cur, edges), float(ref.mean()), float(cur.mean())


#: an item seen 0, 1, 2 or 3+ times before: a stationary catalogue settles at 3+, and
#: more bins would only tell apart items that are all familiar
NOVELTY_CAP = 3
NOVELTY_EDGES = np.array([-np.inf, *(k + 0.5 for k in range(NOVELTY_CAP)), np.inf])


@dataclass
class _Segment:
    config: DriftConfig
    name: str
    n: int = 0
    adwin: drift.ADWIN = field(init=False)
    ph_ctr: PageHinkley = field(init=False)
    ph_score: PageHinkley = field(init=False)
    psi_score: _PSI = field(init=False)
    psi_novelty: _PSI = field(init=False)
    # slow and fast moving averages (DriftConfig's spans): "from what to what"
    ctr_slow: float = 0.0
    ctr_fast: float = 0.0
    score_slow: float = 0.0
    score_fast: float = 0.0

    def __post_init__(self) -> None:
        c = self.config
        self.adwin = drift.ADWIN(delta=c.adwin_delta)
        self.ph_ctr, self.ph_score = (
            PageHinkley(c.ph_threshold, c.ph_delta, c.ph_min_instances, c.ph_alpha)
            for _ in range(2))
        self.psi_score = _PSI(c.psi_window, bins=c.psi_bins, checks=c.psi_checks_per_window)
        self.psi_novelty = _PSI(c.psi_window, NOVELTY_EDGES, checks=c.psi_checks_per_window)

    def update(self, p: np.ndarray, label: np.ndarray, timestamp: np.ndarray,
               novelty: np.ndarray, latest_psi: dict[tuple[str, str], float]) -> list[DriftEvent]:
        out: list[DriftEvent] = []
        m, n0, warmup = len(p), self.n, self.config.warmup
        if m == 0:
            return out
        self.n += m
        first = max(0, warmup - n0)  # the first index past the warm-up: alarms count

        def at(j: int) -> tuple[float, int]:
            return float(timestamp[j]), n0 + j + 1

        q = np.clip(p, 1e-7, 1 - 1e-7)
        loss = -(label * np.log(q) + (1 - label) * np.log(1 - q))
        adwin = self.adwin
        # ADWIN's window only grows between detections: its mean is tracked here,
        # and read back from ADWIN after a detection (and after the reset that follows)
        total, width, resync = adwin.total, adwin.width, False
        for j, x in enumerate(loss.tolist()):
            before = total / width if width else 0.0
            adwin.update(x)
            if adwin.drift_detected or resync:
                total, width, resync = adwin.total, adwin.width, adwin.drift_detected
                if adwin.drift_detected and j >= first and total / width > before:
                    out.append(DriftEvent("logloss", "adwin", self.name, *at(j), before,
                                          total / width))
            else:
                total, width = total + x, width + 1
        # moving averages, kept per example: "from what to what" for the alarms
        ewma = np.empty((m, 4))
        _moving_averages(label, p, n0, np.array([self.ctr_slow, self.ctr_fast, self.score_slow,
                                                 self.score_fast]),
                         (self.config.slow_average_examples, self.config.fast_average_examples),
                         ewma)
        self.ctr_slow, self.ctr_fast, self.score_slow, self.score_fast = ewma[-1].tolist()
        for signal, ph, values, col in (("click_rate", self.ph_ctr, label, 0),
                                        ("score", self.ph_score, p, 2)):
            for j in ph.update_many(values):
                if j >= first:
                    out.append(DriftEvent(signal, "page_hinkley", self.name, *at(j),
                                          float(ewma[j, col]), float(ewma[j, col + 1])))
        threshold = self.config.psi_threshold
        for signal, tracker, values in (("score_psi", self.psi_score, p),
                                        ("item_novelty_psi", self.psi_novelty, novelty)):
            for j, value, ref_mean, cur_mean in tracker.update_many(values[first:], threshold):
                latest_psi[(signal, self.name)] = value
                if value > threshold:
                    out.append(DriftEvent(signal, "psi", self.name, *at(first + j), ref_mean,
                                          cur_mean))
        return out


@njit(cache=True)
def _moving_averages(label: np.ndarray, score: np.ndarray, n0: int, start: np.ndarray,
                     spans: tuple[int, int], out: np.ndarray) -> None:
    """Slow and fast moving averages (over about ``spans`` examples) of the label and
    the score after each example, from ``start`` after ``n0`` examples: ``out`` m x 4."""
    avg = start.copy()
    slow_span, fast_span = spans
    for j in range(label.shape[0]):
        n = n0 + j + 1
        slow, fast = 1.0 / min(n, slow_span), 1.0 / min(n, fast_span)
        avg[0] += slow * (label[j] - avg[0])
        avg[1] += fast * (label[j] - avg[1])
        avg[2] += slow * (score[j] - avg[2])
        avg[3] += fast * (score[j] - avg[3])
        out[j] = avg


class DriftMonitor:
    """Drift alarms over the labelled predictions, overall ('all') and per segment."""

    def __init__(self, config: DriftConfig | None = None):
        self.config = config or DriftConfig()
        self.segments: dict[str, _Segment] = {}
        self.item_seen: defaultdict[str, int] = defaultdict(int)
        self.events: list[DriftEvent] = []
        self.latest_psi: dict[tuple[str, str], float] = {}

    def update_batch(self, p: np.ndarray, label: np.ndarray, timestamp: np.ndarray,
                     item_ids: list[str], segments: list[str | None]) -> list[DriftEvent]:
        """Labelled predictions in stream order; returns the alarms they raised, in
        event-time order; the same as feeding them one at a time."""
        seen = self.item_seen
        novelty = np.empty(len(item_ids))
        for j, item in enumerate(item_ids):
            count = seen[item]
            novelty[j] = min(count, NOVELTY_CAP)
            seen[item] = count + 1
        overall = self._segment("all")
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
        out = overall.update(p, label, timestamp, novelty, self.latest_psi)
        for name, idx in groups.items():
            sel = np.asarray(idx)
            out += self._segment(name).update(p[sel], label[sel], timestamp[sel],
                                              novelty[sel], self.latest_psi)
        out.sort(key=lambda e: e.timestamp)
        self.events += out
        return out

    def _segment(self, name: str) -> _Segment:
        seg = self.segments.get(name)
        if seg is None:
            seg = self.segments[name] = _Segment(self.config, name)
        return seg
