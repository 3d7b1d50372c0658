"""Drift monitoring over the prequential stream, overall and per segment.

Signals, each fed one labelled prediction at a time in event-time order:

* ``logloss``: river ``ADWIN`` on each example's logloss; only a rise is an alarm
  (a learning model's loss falls, and that is not drift).
* ``click_rate`` and ``score``: river ``PageHinkley`` on the label and on the
  predicted probability.
* ``score_psi`` and ``item_novelty_psi``: population stability index of the
  scores, and of how often each item had been seen before, over the latest
  window against a reference window (re-based after an alarm).

A segment is the value of one context field (``platform`` by default); users are
never a segment, so label sets stay small.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field
from river import drift


class DriftConfig(BaseModel):
    warmup: int = Field(2000, ge=0, description="examples per segment before alarms count")
    adwin_delta: float = Field(0.01, gt=0, lt=1, description="ADWIN confidence on logloss")
    ph_threshold: float = Field(60.0, gt=0, description="Page-Hinkley threshold (click rate, "
                                "score)")
    ph_delta: float = Field(0.05, ge=0, description="Page-Hinkley tolerated change")
    psi_window: int = Field(2000, ge=100, description="examples in the PSI windows")
    psi_threshold: float = Field(0.25, gt=0, description="PSI above this is an alarm")
    segment_field: str = Field("platform", description="context field whose values are "
                               "segments")
    max_segments: int = Field(20, ge=1, description="segments tracked besides 'all'")


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


def psi(reference: np.ndarray, current: np.ndarray, edges: np.ndarray) -> float:
    """Population stability index of two samples over the bins ``edges``."""
    eps = 1e-4
    ref = np.histogram(reference, edges)[0] / max(len(reference), 1) + eps
    cur = np.histogram(current, edges)[0] / max(len(current), 1) + eps
    return float(np.sum((cur - ref) * np.log(cur / ref)))


class _PSI:
    def __init__(self, window: int, edges: np.ndarray | None = None):
        self.window = window
        self.fixed_edges = edges
        self.reference: np.ndarray | None = None
        self.edges: np.ndarray | None = None
        self.recent: deque[float] = deque(maxlen=window)
        self.since = 0

    def update(self, x: float) -> tuple[float, float, float] | None:
        """(psi, reference mean, current mean) when it is time to compare."""
        self.recent.append(x)
        if self.reference is None:
            if len(self.recent) == self.window:
                self._rebase()
            return None
        self.since += 1
        if self.since < self.window // 4:
            return None
        self.since = 0
        cur = np.asarray(self.recent)
        assert self.edges is not None
        return psi(self.reference, cur, self.edges), float(self.reference.mean()), float(cur.mean())

    def _rebase(self) -> None:
        self.reference = np.asarray(self.recent)
        if self.fixed_edges is not None:
            self.edges = self.fixed_edges
        else:  # deciles of the reference
            inner = np.unique(np.quantile(self.reference, np.linspace(0.1, 0.9, 9)))
            self.edges = np.concatenate([[-np.inf], inner, [np.inf]])
        self.since = 0


# an item seen 0, 1, 2 or 3+ times before: a stationary catalogue settles at 3+
NOVELTY_EDGES = np.array([-np.inf, 0.5, 1.5, 2.5, np.inf])


@dataclass
class _Segment:
    config: DriftConfig
    n: int = 0
    adwin: drift.ADWIN = field(init=False)
    ph_ctr: drift.PageHinkley = field(init=False)
    ph_score: drift.PageHinkley = field(init=False)
    psi_score: _PSI = field(init=False)
    psi_novelty: _PSI = field(init=False)
    # slow (~2,000 examples) and fast (~200) moving averages: "from what to what"
    ctr_slow: float = 0.0
    ctr_fast: float = 0.0
    score_slow: float = 0.0
    score_fast: float = 0.0

    def __post_init__(self) -> None:
        c = self.config
        self.adwin = drift.ADWIN(delta=c.adwin_delta)
        self.ph_ctr = drift.PageHinkley(threshold=c.ph_threshold, delta=c.ph_delta)
        self.ph_score = drift.PageHinkley(threshold=c.ph_threshold, delta=c.ph_delta)
        self.psi_score = _PSI(c.psi_window)
        self.psi_novelty = _PSI(c.psi_window, NOVELTY_EDGES)


class DriftMonitor:
    def __init__(self, config: DriftConfig | None = None):
        self.config = config or DriftConfig()
        self.segments: dict[str, _Segment] = {}
        self.item_seen: defaultdict[str, int] = defaultdict(int)
        self.events: list[DriftEvent] = []
        self.latest_psi: dict[tuple[str, str], float] = {}

    def update(self, p: float, label: float, timestamp: float, item_id: str,
               segment: str | None) -> list[DriftEvent]:
        """One labelled prediction; returns the alarms it raised."""
        novelty = float(min(self.item_seen[item_id], 3))
        self.item_seen[item_id] += 1
        out = self._update("all", p, label, timestamp, novelty)
        if segment is not None:
            name = f"{self.config.segment_field}={segment}"
            if name in self.segments or len(self.segments) <= self.config.max_segments:
                out += self._update(name, p, label, timestamp, novelty)
        self.events += out
        return out

    def _segment(self, name: str) -> _Segment:
        seg = self.segments.get(name)
        if seg is None:
            seg = self.segments[name] = _Segment(self.config)
        return seg

    def _update(self, name: str, p: float, label: float, timestamp: float,
                novelty: float) -> list[DriftEvent]:
        seg = self._segment(name)
        seg.n += 1
        armed = seg.n > self.config.warmup
        out: list[DriftEvent] = []

        def fire(signal: str, detector: str, before: float, after: float) -> None:
            if armed:
                out.append(DriftEvent(signal, detector, name, timestamp, seg.n, before, after))

        q = min(max(p, 1e-7), 1 - 1e-7)
        loss = -(label * math.log(q) + (1 - label) * math.log(1 - q))
        before = seg.adwin.estimation
        seg.adwin.update(loss)
        if seg.adwin.drift_detected and seg.adwin.estimation > before:
            fire("logloss", "adwin", before, seg.adwin.estimation)
        slow, fast = 1 / min(seg.n, 2000), 1 / min(seg.n, 200)
        seg.ctr_slow += slow * (label - seg.ctr_slow)
        seg.ctr_fast += fast * (label - seg.ctr_fast)
        seg.score_slow += slow * (p - seg.score_slow)
        seg.score_fast += fast * (p - seg.score_fast)
        seg.ph_ctr.update(label)
        if seg.ph_ctr.drift_detected:
            fire("click_rate", "page_hinkley", seg.ctr_slow, seg.ctr_fast)
        seg.ph_score.update(p)
        if seg.ph_score.drift_detected:
            fire("score", "page_hinkley", seg.score_slow, seg.score_fast)
        for signal, tracker, x in (("score_psi", seg.psi_score, p),
                                   ("item_novelty_psi", seg.psi_novelty, novelty)):
            if not armed:  # the reference window is the first one after the warm-up
                continue
            got = tracker.update(x)
            if got is None:
                continue
            value, ref_mean, cur_mean = got
            self.latest_psi[(signal, name)] = value
            if value > self.config.psi_threshold:
                fire(signal, "psi", ref_mean, cur_mean)
                tracker._rebase()
        return out
