"""Telling committed writes from aborted ones, on any broker.

Every record a member writes in a transaction carries a tag: its transactional
id, its *incarnation* (a fresh name per process, and per transaction that had
to be aborted) and the transaction's sequence number in that incarnation. An
incarnation never writes after an abort, so of its transactions only the last
can have been aborted: a transaction is known committed once something later
says so, and :class:`Confirmed` collects what says so:

* a later transaction of the same incarnation (its tag confirms the one before);
* the committed offsets' metadata, which names the transaction that committed
  them (the offsets are part of it);
* a confirmation written by the member that restored a partition from those
  offsets, for the member before it (the markers of :mod:`streamer.changelog`
  and the ``metarec-confirms`` header of :mod:`streamer.updates`).

Apache Kafka hides aborted records from ``read_committed`` consumers by itself;
the embedded broker (Tansu 0.6) does not, and never times out a transaction
left open by a dead producer (it blocks every ``read_committed`` reader until a
producer of the same transactional id starts), so :func:`read_to_end` aborts a
transaction that stays open on a topic being restored.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from streamer.cluster import Cluster
from streamer.config import FETCH_MAX_WAIT_MS
from streamer.kafka_io import MAX_MESSAGE_BYTES

log = logging.getLogger("metarec.txn")

TXN_HEADER = "metarec-txn"
#: how long a read at the reported end of a partition goes on finding nothing
#: before it ends
END_QUIET_SECONDS = 0.2


@dataclass(frozen=True)
class Tag:
    """Which transaction wrote a record."""

    transactional_id: str
    incarnation: str
    seq: int

    def text(self) -> str:
        return f"{self.transactional_id}|{self.incarnation}|{self.seq}"

    def header(self) -> tuple[str, bytes]:
        return TXN_HEADER, self.text().encode()

    @classmethod
    @functools.lru_cache(maxsize=4096)  # a transaction's records share one tag
    def parse(cls, text: str | bytes | None) -> Tag | None:
        """A tag from its text (None: not a tag of ours)."""
        if isinstance(text, bytes):
            try:
                text = text.decode()
            except UnicodeDecodeError:
                return None
        parts = (text or "").split("|")
        if len(parts) != 3 or not (parts[2].isascii() and parts[2].isdigit()) or not parts[1]:
            return None
        return cls(parts[0], parts[1], int(parts[2]))

    @classmethod
    def of(cls, headers: Iterable[tuple[str, bytes | None]] | None) -> Tag | None:
        return cls.parse(next((v for k, v in headers or [] if k == TXN_HEADER), None))


class Confirmed(dict[str, int]):
    """Incarnation -> the highest of its transactions known to have committed."""

    def note(self, incarnation: str, seq: int) -> None:
        if seq > self.get(incarnation, 0):
            self[incarnation] = seq

    def saw(self, tag: Tag) -> None:
        """A record of ``tag``: the transaction before it committed."""
        self.note(tag.incarnation, tag.seq - 1)

    def covers(self, tag: Tag) -> bool:
        return tag.seq <= self.get(tag.incarnation, 0)


def reader(cluster: Cluster) -> KafkaConsumer:
    """A consumer of committed records only, outside any group."""
    return cluster.consumer(group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest", isolation_level="read_committed",
                         fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                         max_partition_fetch_bytes=2 * MAX_MESSAGE_BYTES)


def read_to_end(cluster: Cluster, tps: list[TopicPartition], *, start: dict[TopicPartition, int],
                stall_seconds: float, own_id: str) -> Iterator[Any]:
    """Every committed record of ``tps`` from ``start`` (default: the log start) to
    the end of the log as it is now, each partition in its order. A transaction
    that keeps a partition's end from being readable for ``stall_seconds`` is
    aborted (:func:`abort_open`)."""
    cons = reader(cluster)
    try:
        cons.assign(tps)
        for tp in tps:
            if tp in start:
                cons.seek(tp, start[tp])
            else:
                cons.seek_to_beginning(tp)
        # the log's end for a reader of everything (a transaction still open
        # ends the part a committed reader can read before this)
        ends = _high_watermarks(cluster, tps)
        left = set(tps)
        stalled_since: dict[TopicPartition, float] = {}
        quiet_since = time.monotonic()
        while left:
            polled = cons.poll(timeout_ms=100, max_records=2000)
            for msgs in polled.values():
                yield from msgs
            now = time.monotonic()
            if polled:
                quiet_since = now
            for tp in list(left):
                position = cons.position(tp)
                # a broker may report the newest batch late: at the end, read on
                # until a poll has found nothing for a moment
                if position >= ends[tp] and now - quiet_since >= END_QUIET_SECONDS:
                    left.discard(tp)
                elif tp not in polled:
                    since = stalled_since.setdefault(tp, now)
                    if now - since >= stall_seconds:
                        abort_open(cluster, tp, position, own_id)
                        stalled_since.pop(tp)
                else:
                    stalled_since.pop(tp, None)
    finally:
        cons.close()


def _high_watermarks(cluster: Cluster, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    cons = cluster.consumer(group_id=None, enable_auto_commit=False)
    try:
        ends: dict[TopicPartition, int] = cons.end_offsets(tps)
        return ends
    finally:
        cons.close()


def abort_open(cluster: Cluster, tp: TopicPartition, offset: int, own_id: str) -> None:
    """Abort the transaction whose record at ``offset`` of ``tp`` keeps committed
    readers waiting, by starting a producer of its transactional id (what a
    restart of its member would do)."""
    cons = cluster.consumer(group_id=None, enable_auto_commit=False,
                         fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    tag = None
    try:
        cons.assign([tp])
        cons.seek(tp, offset)
        deadline = time.monotonic() + 5
        while tag is None and time.monotonic() < deadline:
            for msgs in cons.poll(timeout_ms=200, max_records=1).values():
                tag = Tag.of(msgs[0].headers)
                break
    finally:
        cons.close()
    if tag is None or tag.transactional_id == own_id:
        log.warning("%s stays unreadable at offset %d, and the record there names no other "
                    "member's transaction: waiting", tp, offset)
        return
    log.warning("%s: member %s left a transaction open at offset %d: aborting it",
                tp, tag.transactional_id, offset)
    try:
        fencer = cluster.producer(transactional_id=tag.transactional_id)
        fencer.init_transactions()
        fencer.close(timeout=5)
    except KafkaError as exc:
        log.warning("could not abort %s's transaction: %s", tag.transactional_id, exc)
