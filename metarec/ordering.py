"""Event-time order across source partitions, and a progress one record cannot move.

Kafka orders records within a partition only. A consumer catching up a backlog
is handed each partition in chunks of thousands of records, so in arrival order
one partition runs days of event time ahead of another; learning in that order
is not learning the stream (clicks of one partition's users are learned long
before the no-clicks of anyone else's). :class:`EventTimeOrder` holds decoded
events per partition and releases them merged by event time, with the rule of
Kafka Streams' task idling: an event is released once every partition that could
still deliver an earlier one has delivered past it. A partition holds the others
back only while it is behind its log (not caught up) and has delivered within
``idle_after`` seconds of wall time, so a live trickle is released at once, and
a partition that stops answering stops nobody for long.

Each partition's *progress*, which bounds the others, is the lower median of
its last five event times (the smallest while it has given fewer than three),
so one or two outliers cannot move it. An event more than ``max_ahead`` seconds
ahead of everything its partition has given so far is held aside, and judged by
the records after it: one that is not far behind it confirms the jump (the
event rejoins the stream in its place); two that are far behind it, but not
behind the partition's progress (late records, such as a producer's retries,
say nothing of where the stream is), show it was an outlier, and it is rejected
as ``ahead_of_stream``. When no more records
come (the end of a log, or a partition silent for ``idle_after``), it is taken
if nothing spoke against it and rejected if something did. A real gap in a
sparse stream therefore loses nothing, and a lone record from the future moves
no one's windows.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class OrderConfig(BaseModel):
    """How partitions are merged by event time."""

    max_ahead_seconds: float = Field(
        3600.0, gt=0, description="an event this far ahead of all its partition has given is "
        "held aside: taken if the next record is near it (a real jump), dead-lettered "
        "(ahead_of_stream) if the next two are far behind it")
    idle_partition_seconds: float = Field(
        10.0, gt=0, description="a partition silent this long (wall time) no longer holds "
        "back the event-time merge of the others")

#: event times a partition's progress is the lower median of
RECENT = 5
#: records far behind an event held aside that show it was an outlier
CONTRADICTIONS = 2


@dataclass(slots=True)
class Held(Generic[T]):
    """An event waiting for its turn, with where it came from."""

    timestamp: float
    partition: int
    offset: int
    item: T


class RecentMedian:
    """The lower median of the last five values seen: a ring padded with ``-inf``
    and read, sorted, at its middle, so up to two outliers among five cannot raise
    it. :meth:`add` returns it (``-inf`` until three values were seen);
    :attr:`floor` is the same, but the smallest value while there are fewer."""

    __slots__ = ("_i", "_n", "_ring", "floor")

    def __init__(self) -> None:
        self._ring = [-math.inf] * RECENT
        self._i = self._n = 0
        self.floor = -math.inf

    def add(self, value: float) -> float:
        self._ring[self._i] = value
        self._i = (self._i + 1) % RECENT
        self._n += 1
        ring = sorted(self._ring)
        self.floor = ring[max(RECENT // 2, RECENT - self._n)]
        return ring[RECENT // 2]


@dataclass(slots=True)
class _Partition(Generic[T]):
    heard: float
    recent: RecentMedian = field(default_factory=RecentMedian)
    progress: float = -math.inf
    high: float = -math.inf  # the latest event time taken into the stream
    buffer: deque[Held[T]] = field(default_factory=deque)
    # (event, contradictions, the partition's progress when it was held aside)
    aside: list[tuple[Held[T], int, float]] = field(default_factory=list)


class EventTimeOrder(Generic[T]):
    def __init__(self, *, max_ahead: float, idle_after: float = 10.0):
        self.max_ahead = max_ahead
        self.idle_after = idle_after
        self._parts: dict[int, _Partition[T]] = {}

    @classmethod
    def of(cls, config: OrderConfig) -> EventTimeOrder[T]:
        return cls(max_ahead=config.max_ahead_seconds, idle_after=config.idle_partition_seconds)

    def track(self, partitions: Iterable[int], now: float) -> None:
        """Partitions assigned to this reader hold the release back from the start,
        until they deliver, catch up or stay silent for ``idle_after`` seconds."""
        for p in partitions:
            if p not in self._parts:
                self._parts[p] = _Partition(heard=now)

    def add(self, timestamp: float, partition: int, offset: int, item: T,
            now: float) -> list[Held[T]]:
        """Take one event of ``partition`` (in the partition's order); returns the
        events held aside that the records since showed to be outliers."""
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Partition(heard=now)
        part.heard = now
        rejected = self._judge(part, timestamp) if part.aside else []
        held = Held(timestamp, partition, offset, item)
        if part.high > -math.inf and timestamp > part.high + self.max_ahead:
            part.aside.append((held, 0, part.progress))
        else:
            self._take(part, held)
        return rejected

    def _take(self, part: _Partition[T], held: Held[T]) -> None:
        part.buffer.append(held)
        part.high = max(part.high, held.timestamp)
        part.recent.add(held.timestamp)
        part.progress = part.recent.floor

    def _judge(self, part: _Partition[T], timestamp: float) -> list[Held[T]]:
        """What a new record of the partition says of the events held aside. One
        behind where the partition had got when the event was held aside is late (a
        producer's retry of an old record, say): it says nothing of where the stream
        is now, however many of them come."""
        rejected, still = [], []
        for held, against, since in part.aside:
            if timestamp >= held.timestamp - self.max_ahead:
                self._take(part, held)  # the stream did jump: not an outlier
            elif timestamp < since:
                still.append((held, against, since))
            elif against + 1 >= CONTRADICTIONS:
                rejected.append(held)
            else:
                still.append((held, against + 1, since))
        part.aside = still
        return rejected

    def _settle(self, part: _Partition[T]) -> list[Held[T]]:
        """No more records to judge by: take what nothing spoke against, reject
        the rest."""
        for held, against, _ in part.aside:
            if against == 0:
                self._take(part, held)
        rejected = [held for held, against, _ in part.aside if against]
        part.aside = []
        return rejected

    def release(self, caught_up: Collection[int] | None, now: float | None,
                paused: Collection[int] = ()) -> tuple[list[Held[T]], list[Held[T]]]:
        """Every event no constraining partition can still precede, in event-time
        order (each partition's own order kept), and the events held aside of idle
        partitions that were contradicted (rejected). ``caught_up``: partitions
        known to be at the end of their log; ``now`` None: no partition counts as
        idle (a replay must not depend on the wall clock); ``paused``: partitions
        the reader stopped fetching, silent but not idle."""
        parts = self._parts
        idle = set() if now is None else {
            p for p, part in parts.items()
            if p not in paused and now - part.heard > self.idle_after}
        rejected = [h for p in idle if parts[p].aside for h in self._settle(parts[p])]
        if len(parts) <= 1:  # one partition is in its own order already
            return [h for part in parts.values() for h in _drain(part.buffer)], rejected
        # An event may go once no other constraining partition's progress is below
        # it (a partition's own progress never holds it: its order is its offsets'),
        # taken smallest head first, so partitions released in different calls are
        # still in event-time order: the smallest two progresses are enough.
        first = second = (math.inf, -1)
        for p, part in parts.items():
            if (caught_up is not None and p in caught_up) or p in idle:
                continue
            if part.progress < first[0]:
                first, second = (part.progress, p), first
            elif part.progress < second[0]:
                second = (part.progress, p)
        heads = [(part.buffer[0].timestamp, p) for p, part in parts.items() if part.buffer]
        heapq.heapify(heads)
        out: list[Held[T]] = []
        while heads:
            ts, p = heads[0]
            if ts > (second[0] if p == first[1] else first[0]):
                break  # any other head is later: releasing it would overtake this one
            buffer = parts[p].buffer
            out.append(buffer.popleft())
            if buffer:
                heapq.heapreplace(heads, (buffer[0].timestamp, p))
            else:
                heapq.heappop(heads)
        return out, rejected

    def finish(self) -> tuple[list[Held[T]], list[Held[T]]]:
        """End of a finite log: everything still buffered, merged (with what was
        held aside and never contradicted), and what was contradicted, rejected."""
        rejected = [h for part in self._parts.values() for h in self._settle(part)]
        runs = [_drain(part.buffer) for _, part in sorted(self._parts.items())]
        return list(heapq.merge(*runs, key=_time)), rejected

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget partitions given to another reader: it reads their unreleased
        events again from the last commit."""
        for p in partitions:
            self._parts.pop(p, None)

    def held_offsets(self) -> dict[int, int]:
        """Lowest offset still held, by partition: committing past it would lose
        the event if the process died before it was processed."""
        out: dict[int, int] = {}
        for p, part in self._parts.items():
            offsets = [h.offset for h in part.buffer] + [h.offset for h, _, _ in part.aside]
            offsets = [o for o in offsets if o >= 0]
            if offsets:
                out[p] = min(offsets)
        return out

    def buffered(self) -> dict[int, int]:
        """Events held, by partition (a reader pauses a partition that holds many)."""
        return {p: len(part.buffer) + len(part.aside) for p, part in self._parts.items()}


def _time(held: Held[T]) -> float:
    return held.timestamp


def _drain(buffer: deque[Held[T]]) -> list[Held[T]]:
    out = list(buffer)
    buffer.clear()
    return out


