"""Join clicks to impressions in event time.

* An impression that already carries ``clicked`` is labelled at once.
* A click labels its pending impression 1 if it comes within the attribution
  window of the impression's time.
* A pending impression is labelled 0 once the watermark (highest event time
  seen minus the allowed lateness) passes the end of its window.
* A click that arrives before its impression waits (bounded) for it.

With several source partitions, each has its own event-time high mark and the
watermark follows the slowest partition that is still active (one that gave a
record within ``idle_after`` seconds of wall time), so a partition read ahead
cannot close the windows of impressions still unread in another.

Memory is bounded: past ``max_pending`` the impression whose window ends first
is closed early as a non-click (counted as ``evicted``); orphan clicks past
``max_orphans`` are dropped (counted). Everything runs on event timestamps, so a
replay joins exactly like the live run.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from metarec.events import Click, Impression


@dataclass(slots=True)
class Scored:
    """The prediction made for an impression when it was seen (filled by the learner)."""

    p: float = math.nan
    k: int = 0


@dataclass(slots=True)
class Labelled:
    impression: Impression
    label: float
    scored: Scored


@dataclass(slots=True)
class _Pending:
    impression: Impression
    scored: Scored
    partition: int
    offset: int


@dataclass
class Joiner:
    window: float = 3600.0
    lateness: float = 60.0
    max_pending: int = 1_000_000
    max_orphans: int = 100_000
    idle_after: float = 10.0
    watermark: float = -math.inf
    stats: Counter[str] = field(default_factory=Counter)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _deadlines: list[tuple[float, str]] = field(default_factory=list)
    _orphans: OrderedDict[str, float] = field(default_factory=OrderedDict)
    _high: dict[int, float] = field(default_factory=dict)  # partition -> highest event time
    _heard: dict[int, float] = field(default_factory=dict)  # partition -> last wall time
    _last_now: float | None = None  # wall time of the last watermark computation
    _lowest: int | None = None  # the partition that set it

    @property
    def pending(self) -> int:
        return len(self._pending)

    def track(self, partitions: list[int], now: float) -> None:
        """Partitions assigned to this reader hold the watermark back from the
        start, until they deliver or stay silent for ``idle_after`` seconds."""
        for p in partitions:
            self._high.setdefault(p, -math.inf)
            self._heard.setdefault(p, now)

    def advance(self, timestamp: float, partition: int = -1,
                now: float | None = None) -> list[Labelled]:
        """Move the watermark with an event's time; close the windows it passes.
        ``now`` (monotonic wall time) marks the partition active; None: always active."""
        if now is not None:
            self._heard[partition] = now
        if timestamp > self._high.get(partition, -math.inf):
            self._high[partition] = timestamp
            if now == self._last_now and self._lowest not in (None, partition):
                return []  # not the slowest partition that rose: the minimum stays
        elif now == self._last_now:
            # no partition's high rose and none fell idle: the watermark cannot move,
            # and everything it had passed is already closed
            return []
        self._last_now = now
        if len(self._high) == 1:  # one source partition, the one that just delivered
            low, self._lowest = self._high[partition], partition
        else:
            low, self._lowest = min(
                (t, p) for p, t in self._high.items()
                if now is None or now - self._heard.get(p, now) <= self.idle_after)
        self.watermark = max(self.watermark, low - self.lateness)
        out: list[Labelled] = []
        while self._deadlines and self._deadlines[0][0] < self.watermark:
            _, imp_id = heapq.heappop(self._deadlines)
            pend = self._pending.pop(imp_id, None)
            if pend is not None:
                self.stats["no_click"] += 1
                out.append(Labelled(pend.impression, 0.0, pend.scored))
        while self._orphans:
            imp_id, ts = next(iter(self._orphans.items()))
            if ts + self.window >= self.watermark:
                break
            del self._orphans[imp_id]
            self.stats["orphan_click_expired"] += 1
        return out

    def impression(self, imp: Impression, scored: Scored, partition: int = -1,
                   offset: int = -1) -> list[Labelled]:
        if imp.clicked is not None:
            self.stats["prelabelled"] += 1
            return [Labelled(imp, float(imp.clicked), scored)]
        if imp.impression_id in self._pending:
            self.stats["duplicate_impression"] += 1
            return []
        click_ts = self._orphans.pop(imp.impression_id, None)
        if click_ts is not None and 0 <= click_ts - imp.timestamp <= self.window:
            self.stats["clicked"] += 1
            return [Labelled(imp, 1.0, scored)]
        deadline = imp.timestamp + self.window
        if deadline < self.watermark:
            self.stats["late_impression"] += 1
            return [Labelled(imp, 0.0, scored)]
        self._pending[imp.impression_id] = _Pending(imp, scored, partition, offset)
        heapq.heappush(self._deadlines, (deadline, imp.impression_id))
        return self._evict()

    def click(self, click: Click) -> list[Labelled]:
        pend = self._pending.get(click.impression_id)
        if pend is None:
            if click.timestamp + self.window < self.watermark:
                self.stats["late_click"] += 1
            else:
                self._orphans[click.impression_id] = click.timestamp
                if len(self._orphans) > self.max_orphans:
                    self._orphans.popitem(last=False)
                    self.stats["orphan_click_evicted"] += 1
            return []
        if not 0 <= click.timestamp - pend.impression.timestamp <= self.window:
            self.stats["click_outside_window"] += 1
            return []
        del self._pending[click.impression_id]  # its heap entry is skipped when popped
        self.stats["clicked"] += 1
        return [Labelled(pend.impression, 1.0, pend.scored)]

    def _evict(self) -> list[Labelled]:
        out: list[Labelled] = []
        while len(self._pending) > self.max_pending:
            _, imp_id = heapq.heappop(self._deadlines)
            pend = self._pending.pop(imp_id, None)
            if pend is not None:
                self.stats["evicted"] += 1
                out.append(Labelled(pend.impression, 0.0, pend.scored))
        return out

    def oldest_offsets(self) -> dict[int, int]:
        """Lowest source offset still pending, by partition: committing past it
        would lose the impression if the process died before its label."""
        out: dict[int, int] = {}
        for pend in self._pending.values():
            if pend.offset >= 0 and pend.offset < out.get(pend.partition, math.inf):
                out[pend.partition] = pend.offset
        return out
