"""θ's changes on the updates topic: every member's deltas, in its transactions.

Each transaction of a member writes one update: its θ delta since the last
(:class:`metarec.theta_state.Delta`, possibly empty) in chunks of at most
900 KB, keyed ``<incarnation>/<seq>/<chunk>/<chunks>``, tagged with the
transaction, and with a ``metarec-confirms`` header naming the transactions of
other members that its member found committed when it restored their
partitions. Every member follows the topic and applies the others' updates once
they are known committed, so the group learns one θ; the model versions' writer
publishes it with the vector of updates it holds (:class:`Applied`), and a
loader applies the updates after that vector.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition

from metarec.theta_state import Delta, DeltaError
from streamer.cluster import Cluster
from streamer.txn_log import Confirmed, Tag, abort_open, read_to_end, reader

log = logging.getLogger("metarec.updates")

CONFIRMS_HEADER = "metarec-confirms"
CHUNK_BYTES = 900_000
#: how often a member looks for the others' updates (a poll costs about 0.5 ms: not
#: one per micro-batch)
POLL_EVERY_SECONDS = 0.2

Message = tuple[bytes, bytes, list[tuple[str, bytes]]]


def confirmation(tag: Tag) -> Message:
    """Sent outside any transaction once ``tag``'s committed: the others apply its
    update at once instead of at this member's next transaction."""
    return (f"confirm/{tag.incarnation}/{tag.seq}".encode(), b"",
            [(CONFIRMS_HEADER, json.dumps({tag.incarnation: tag.seq}).encode())])


def messages(tag: Tag, delta: Delta | None, confirms: dict[str, int]) -> list[Message]:
    payload = delta.dumps() if delta is not None else b""
    chunks = [payload[i:i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)] or [b""]
    headers = [tag.header(), (CONFIRMS_HEADER, json.dumps(confirms).encode())]
    out = [(f"{tag.incarnation}/{tag.seq}/{i}/{len(chunks)}".encode(), chunk, headers)
           for i, chunk in enumerate(chunks)]
    return out


class Applied(dict[str, int]):
    """Incarnation -> the last of its updates a θ holds (they are applied in order)."""


@dataclass
class _Pending:
    offset: int  # of its first chunk
    chunks: dict[int, bytes] = field(default_factory=dict)
    total: int = 0


@dataclass
class UpdateLog:
    """The updates topic as read so far: what is committed, what is applied, what
    waits for its confirmation."""

    #: incarnations of this process -> the last of their transactions it knows
    #: committed: those updates are in its θ already (one whose commit failed here
    #: but reached the broker is not, and is applied like another member's)
    own: dict[str, int]
    applied: Applied = field(default_factory=Applied)
    confirmed: Confirmed = field(default_factory=Confirmed)
    skipped: Counter[str] = field(default_factory=Counter)
    position: int = 0  # the next offset to read
    _pending: dict[tuple[str, int], _Pending] = field(default_factory=dict)

    def add(self, offset: int, key: bytes | None, value: bytes | None,
            headers: list[tuple[str, bytes]] | None) -> None:
        self.position = offset + 1
        tag = Tag.of(headers)
        parts = (key or b"").split(b"/")
        if (key or b"").startswith(b"confirm/"):
            self._confirms(headers)
            return
        if tag is None or len(parts) != 4 or not all(
                p.isascii() and p.isdigit() for p in parts[1:]):
            self.skipped["not_ours"] += 1
            return
        chunk, total = int(parts[2]), int(parts[3])
        if not 0 <= chunk < total:
            self.skipped["bad_chunk"] += 1
            return
        self.confirmed.saw(tag)
        self._confirms(headers)
        if tag.seq <= self.applied.get(tag.incarnation, 0):
            return  # held already (read again from a loader's start)
        pend = self._pending.setdefault((tag.incarnation, tag.seq),
                                        _Pending(offset, total=total))
        if pend.total != total:
            self.skipped["bad_chunk"] += 1
            return
        pend.chunks[chunk] = value or b""

    def _confirms(self, headers: list[tuple[str, bytes]] | None) -> None:
        raw = next((v for k, v in headers or [] if k == CONFIRMS_HEADER), b"{}")
        try:
            confirms = json.loads(raw or b"{}")
            if not isinstance(confirms, dict) or not all(
                    isinstance(seq, int) for seq in confirms.values()):
                raise ValueError("not {incarnation: seq}")
        except (ValueError, UnicodeDecodeError):
            self.skipped["bad_confirms"] += 1
            return
        for inc, seq in confirms.items():
            self.confirmed.note(str(inc), seq)

    def ready(self) -> list[tuple[Tag, Delta | None]]:
        """Complete, committed updates not yet applied, in the topic's order (this
        process's own included: :meth:`is_own` tells them apart)."""
        out: list[tuple[Tag, Delta | None]] = []
        for (inc, seq), pend in sorted(self._pending.items(), key=lambda kv: kv[1].offset):
            if len(pend.chunks) < pend.total or seq > self.confirmed.get(inc, 0):
                continue
            if any(i == inc and s < seq for i, s in self._pending):
                continue  # an earlier one of this incarnation is still incomplete
            del self._pending[(inc, seq)]
            payload = b"".join(pend.chunks[i] for i in range(pend.total))
            self.applied[inc] = seq
            if not payload:
                out.append((Tag("", inc, seq), None))
                continue
            try:
                out.append((Tag("", inc, seq), Delta.loads(payload)))
            except DeltaError as exc:
                self.skipped["bad_delta"] += 1
                log.warning("update %s/%d is damaged, skipped: %s", inc, seq, exc)
        return out

    def is_own(self, tag: Tag) -> bool:
        """An update this process's θ already holds."""
        return tag.seq <= self.own.get(tag.incarnation, 0)

    def low_water(self) -> int:
        """The offset a loader must read from to see every update not applied."""
        return min((p.offset for p in self._pending.values()), default=self.position)


def catch_up(cluster: Cluster, topic: str, updates: UpdateLog, *, start: int,
             stall_seconds: float, own_id: str) -> None:
    """Read the updates topic from ``start`` to its end into ``updates``."""
    tp = TopicPartition(topic, 0)
    updates.position = max(updates.position, start)
    for msg in read_to_end(cluster, [tp], start={tp: start}, stall_seconds=stall_seconds,
                           own_id=own_id):
        updates.add(msg.offset, msg.key, msg.value, msg.headers)


class UpdateFollower:
    """Reads new updates as they come (no group: every member reads them all)."""

    def __init__(self, cluster: Cluster, topic: str, updates: UpdateLog, *,
                 stall_seconds: float, own_id: str):
        """A transaction that keeps the topic's end unreadable for ``stall_seconds``
        is aborted, as in a restore (a member died in its last, empty one)."""
        self.cluster, self.updates = cluster, updates
        self.stall_seconds, self.own_id = stall_seconds, own_id
        self.consumer: KafkaConsumer = reader(cluster)
        self.tp = TopicPartition(topic, 0)
        self.consumer.assign([self.tp])
        self.consumer.seek(self.tp, updates.position)
        self._polled_at = -math.inf
        self._stalled_since: float | None = None

    def poll_now(self) -> list[tuple[Tag, Delta | None]]:
        """What has come, whenever the last poll was (before a restore's first record)."""
        self._polled_at = -math.inf
        return self.poll()

    def poll(self) -> list[tuple[Tag, Delta | None]]:
        now = time.monotonic()
        if now - self._polled_at < POLL_EVERY_SECONDS:
            return []
        self._polled_at = now
        polled = self.consumer.poll(timeout_ms=0, max_records=500)
        for msgs in polled.values():
            for m in msgs:
                self.updates.add(m.offset, m.key, m.value, m.headers)
        self._watch_stall(now, bool(polled))
        return self.updates.ready()

    def _watch_stall(self, now: float, moved: bool) -> None:
        high = self.consumer.highwater(self.tp)
        position = self.consumer.position(self.tp)
        if moved or high is None or position is None or position >= high:
            self._stalled_since = None
            return
        if self._stalled_since is None:
            self._stalled_since = now
        elif now - self._stalled_since >= self.stall_seconds:
            abort_open(self.cluster, self.tp, position, self.own_id)
            self._stalled_since = None

    def close(self) -> None:
        self.consumer.close()
