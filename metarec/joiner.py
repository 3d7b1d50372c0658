"""Join clicks to impressions in event time.

* An impression that already carries ``clicked`` is labelled at once.
* A click labels its pending impression 1 if it names the same user and item and
  comes within the attribution window of the impression's time. By default
  (``ClickRelease.WINDOW_END``) that label is learned when the window closes,
  with the no-clicks of its time: learning clicks as they come while no-clicks
  wait a window shows the learner the positives first, and on a stream not much
  longer than the window it learns that nearly everything is clicked (the
  delayed-feedback bias; Chapelle 2014, Ktena et al. 2019). ``ON_ARRIVAL``
  learns a click at once, for windows short against the stream. A click that
  names a pending impression of another user or item is rejected
  (``join_mismatch``), so one client's clicks cannot relabel another's.
* A pending impression is labelled 0 once the watermark passes the end of its
  window. The watermark is the lower median of the last five event times fed to
  :meth:`Joiner.advance`, minus the allowed lateness: one outlier cannot move it,
  and it never goes back.
* A click that arrives before its impression waits (bounded) for it; an
  impression whose window closed before it arrived is dropped (``late_impression``).
* An impression id seen again within ``dedup_horizon`` seconds of event time
  (pending, or already labelled) is dropped and counted: a re-sent record is not
  learned twice.

The joiner is fed one stream in event-time order (see
:class:`metarec.ordering.EventTimeOrder` for several partitions), so a replay
joins exactly like the live run. Memory is bounded: past ``max_pending``
impressions or ``max_pending_bytes`` of their records, the impression whose
window ends first is closed early as a non-click (``evicted``); orphan clicks
past ``max_orphans`` and remembered ids past ``max_seen`` are dropped.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from metarec.events import Click, Impression, Rejected
from metarec.ordering import RecentMedian


@dataclass(slots=True)
class Scored:
    """The prediction made for an impression when it was seen (filled by the learner)."""

    p: float = math.nan
    k: int = 0


@dataclass(slots=True)
class Labelled:
    """A label to learn, and the source offsets of its impression and click
    (-1: none, or not from a partitioned source)."""

    impression: Impression
    label: float
    scored: Scored
    partition: int = -1
    offset: int = -1
    click_offset: int = -1


class ClickRelease(enum.StrEnum):
    """When a joined click is learned."""

    WINDOW_END = "window_end"
    ON_ARRIVAL = "on_arrival"


class JoinConfig(BaseModel):
    """How clicks meet their impressions, and how much waits for them."""

    attribution_window_seconds: float = Field(
        3600.0, gt=0, description="a click counts if it comes this long after its impression")
    allowed_lateness_seconds: float = Field(
        60.0, ge=0, description="watermark = the lower median of the latest event times minus "
        "this")
    click_release: ClickRelease = Field(
        ClickRelease.WINDOW_END, description="when a joined click is learned: window_end "
        "(with the no-clicks of its time, unbiased) or on_arrival (at once: faster, but "
        "positives come first while windows are open)")
    max_pending_impressions: int = Field(
        1_000_000, ge=1, description="unlabelled impressions held at most (then the earliest "
        "window is closed as 0)")
    max_pending_bytes: int = Field(
        256 << 20, ge=1, description="bytes of unlabelled impressions' records held at most "
        "(then the earliest window is closed as 0)")
    dedup_horizon_seconds: float = Field(
        86400.0, ge=0, description="an impression id seen again within this much event time "
        "is a duplicate: dropped and counted")
    max_orphan_clicks: int = Field(
        100_000, ge=0, description="clicks waiting for their impression held at most (the "
        "oldest are dropped)")
    max_remembered_ids: int = Field(
        1_000_000, ge=0, description="labelled impression ids remembered for the dedup "
        "horizon at most (the oldest are forgotten)")


@dataclass(slots=True)
class _Pending:
    impression: Impression
    scored: Scored
    partition: int
    offset: int
    size: int
    clicked: bool = False
    click_offset: int = -1

    def labelled(self, label: float) -> Labelled:
        return Labelled(self.impression, label, self.scored, self.partition, self.offset,
                        self.click_offset)


@dataclass
class Joiner:
    window: float = 3600.0
    lateness: float = 60.0
    release: ClickRelease = ClickRelease.WINDOW_END
    max_pending: int = 1_000_000
    max_pending_bytes: int = 256 << 20
    max_orphans: int = 100_000
    dedup_horizon: float = 86_400.0
    max_seen: int = 1_000_000
    watermark: float = -math.inf
    stats: Counter[str] = field(default_factory=Counter)
    pending_bytes: int = 0
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _deadlines: list[tuple[float, str]] = field(default_factory=list)
    # clicks waiting for their impression, by (impression, user, item): a foreign
    # click naming the same impression waits apart and cannot shadow the real one
    # (click time, partition, offset): a waiting click bounds the commit as a pending
    # impression does, or a crash would lose it
    _orphans: OrderedDict[tuple[str, str, str], tuple[float, int, int]] = field(
        default_factory=OrderedDict)
    # labelled impression ids -> until when (event time) a repeat is a duplicate;
    # inserted in about event-time order, so the oldest are at the front
    _seen: OrderedDict[str, float] = field(default_factory=OrderedDict)
    _clock: RecentMedian = field(default_factory=RecentMedian)

    @classmethod
    def of(cls, config: JoinConfig) -> Joiner:
        return cls(window=config.attribution_window_seconds,
                   lateness=config.allowed_lateness_seconds, release=config.click_release,
                   max_pending=config.max_pending_impressions,
                   max_pending_bytes=config.max_pending_bytes,
                   max_orphans=config.max_orphan_clicks,
                   dedup_horizon=config.dedup_horizon_seconds,
                   max_seen=config.max_remembered_ids)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def advance(self, timestamp: float) -> list[Labelled]:
        """Move the clock with an event's time; close the windows the watermark passes."""
        mark = self._clock.add(timestamp) - self.lateness
        if mark <= self.watermark:
            return []
        self.watermark = mark
        return self._close(mark)

    def close_all(self) -> list[Labelled]:
        """End of a finite log: every window is over (clicked ones labelled 1)."""
        self.watermark = math.inf
        return self._close(math.inf)

    def _close(self, mark: float) -> list[Labelled]:
        out: list[Labelled] = []
        while self._deadlines and self._deadlines[0][0] < mark:
            _, imp_id = heapq.heappop(self._deadlines)
            pend = self._pop(imp_id)
            if pend is not None:
                self.stats["clicked" if pend.clicked else "no_click"] += 1
                out.append(pend.labelled(float(pend.clicked)))
        while self._orphans:
            key, (ts, _, _) = next(iter(self._orphans.items()))
            if ts + self.window >= mark:
                break
            del self._orphans[key]
            self.stats["orphan_click_expired"] += 1
        while self._seen:
            imp_id, until = next(iter(self._seen.items()))
            if until >= mark:
                break
            del self._seen[imp_id]
        return out

    def impression(self, imp: Impression, scored: Scored, partition: int = -1,
                   offset: int = -1, size: int = 0) -> list[Labelled]:
        """An impression, scored before this call; ``size``: its record's bytes."""
        imp_id = imp.impression_id
        if imp_id in self._pending or imp_id in self._seen:
            self.stats["duplicate_impression"] += 1
            return []
        if imp.clicked is not None:
            self.stats["prelabelled"] += 1
            self._remember(imp)
            return [Labelled(imp, float(imp.clicked), scored, partition, offset)]
        orphan = self._orphans.pop((imp_id, imp.user_id, imp.item_id), None)
        clicked = orphan is not None and 0 <= orphan[0] - imp.timestamp <= self.window
        # a click's offset says where it is read again only in its impression's
        # partition (events keyed by user id share one)
        click_offset = orphan[2] if clicked and orphan is not None and \
            orphan[1] == partition else -1
        if clicked and self.release is ClickRelease.ON_ARRIVAL:
            self.stats["clicked"] += 1
            self._remember(imp)
            return [Labelled(imp, 1.0, scored, partition, offset, click_offset)]
        deadline = imp.timestamp + self.window
        if deadline < self.watermark:
            # its window closed before it came: its click may have come and gone, so
            # no label can be trusted (and past the dedup horizon it may be a repeat)
            self.stats["late_impression"] += 1
            return []
        self._pending[imp_id] = _Pending(imp, scored, partition, offset, size, clicked,
                                         click_offset)
        self.pending_bytes += size
        heapq.heappush(self._deadlines, (deadline, imp_id))
        return self._evict()

    def click(self, click: Click, partition: int = -1,
              offset: int = -1) -> list[Labelled] | Rejected:
        """A click: its impression's label, nothing yet, or why it cannot be joined."""
        pend = self._pending.get(click.impression_id)
        if pend is None:
            if click.impression_id in self._seen or click.timestamp + self.window < self.watermark:
                self.stats["late_click"] += 1
            else:
                key = (click.impression_id, click.user_id, click.item_id)
                self._orphans.pop(key, None)  # a repeat waits from its own place
                self._orphans[key] = (click.timestamp, partition, offset)
                if len(self._orphans) > self.max_orphans:
                    self._orphans.popitem(last=False)
                    self.stats["orphan_click_evicted"] += 1
            return []
        imp = pend.impression
        if (click.user_id, click.item_id) != (imp.user_id, imp.item_id):
            self.stats["click_mismatch"] += 1
            return Rejected("join_mismatch",
                            f"click on impression {click.impression_id!r} names user "
                            f"{click.user_id!r} and item {click.item_id!r}; the impression "
                            f"is user {imp.user_id!r}'s, of item {imp.item_id!r}")
        if not 0 <= click.timestamp - imp.timestamp <= self.window:
            self.stats["click_outside_window"] += 1
            return []
        if self.release is ClickRelease.WINDOW_END:
            if pend.clicked:
                self.stats["duplicate_click"] += 1
            else:
                pend.clicked = True
                pend.click_offset = offset if partition == pend.partition else -1
            return []
        self._pop(click.impression_id)  # its heap entry is skipped when popped
        self.stats["clicked"] += 1
        pend.click_offset = offset if partition == pend.partition else -1
        return [pend.labelled(1.0)]

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget the pending impressions of partitions given to another reader
        (it reads them again from the last commit, which never passed them)."""
        gone = set(partitions)
        for imp_id in [i for i, pend in self._pending.items() if pend.partition in gone]:
            pend = self._pending.pop(imp_id)
            self.pending_bytes -= pend.size
        for key in [k for k, (_, p, _) in self._orphans.items() if p in gone]:
            del self._orphans[key]

    def reset(self) -> None:
        """Forget everything but the counts: the stream is read again from an
        earlier point, so no id it remembers is a duplicate any more."""
        self.watermark = -math.inf
        self.pending_bytes = 0
        self._pending.clear()
        self._deadlines.clear()
        self._orphans.clear()
        self._seen.clear()
        self._clock = RecentMedian()

    def _pop(self, imp_id: str) -> _Pending | None:
        pend = self._pending.pop(imp_id, None)
        if pend is not None:
            self.pending_bytes -= pend.size
            self._remember(pend.impression)
        return pend

    def remember(self, imp: Impression) -> None:
        """An impression learned before (read again after a restart): a repeat of
        its id is a duplicate."""
        self._remember(imp)

    def _remember(self, imp: Impression) -> None:
        self._seen[imp.impression_id] = imp.timestamp + self.dedup_horizon
        if len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)

    def _evict(self) -> list[Labelled]:
        out: list[Labelled] = []
        while len(self._pending) > self.max_pending or (
                self.pending_bytes > self.max_pending_bytes and len(self._pending) > 1):
            _, imp_id = heapq.heappop(self._deadlines)
            pend = self._pop(imp_id)
            if pend is not None:
                self.stats["evicted"] += 1
                out.append(pend.labelled(0.0))
        return out

    def oldest_offsets(self) -> dict[int, int]:
        """Lowest source offset still pending (an impression waiting for its label,
        or a click for its impression), by partition: committing past it would lose
        it if the process died first."""
        out: dict[int, int] = {}
        waiting = [(pend.partition, pend.offset) for pend in self._pending.values()]
        waiting += [(partition, offset) for _, partition, offset in self._orphans.values()]
        for partition, offset in waiting:
            if offset >= 0 and offset < out.get(partition, math.inf):
                out[partition] = offset
        return out
