"""Kafka plumbing: topics, clients, reading a topic range, dead letters."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from metarec.records import DeadLetter, Record
from streamer.cluster import Cluster
from streamer.config import FETCH_MAX_WAIT_MS, KafkaSettings
from streamer.errors import MissingTopicError

log = logging.getLogger(__name__)

#: Apache Kafka's default message limit; some brokers (the embedded one) accept
#: more, so every producer here keeps to it
MAX_MESSAGE_BYTES = 1_000_000
#: a topic whose end offsets were reached is read on until it has been quiet this
#: long: some brokers report the newest batch late
SETTLE_MS = 1500


def ensure_topics(cluster: Cluster, kafka: KafkaSettings) -> None:
    """Create the topics explicitly (some brokers auto-create with other layouts).
    The model topic has one partition: its order is the version order."""
    wanted = {
        kafka.events_topic: kafka.partitions,
        kafka.dlq_topic: kafka.partitions,
        kafka.model_topic: 1,
        kafka.drift_topic: 1,
    }
    admin = cluster.admin()
    try:
        existing = set(admin.list_topics())
        _create(admin, existing, wanted)
        if kafka.durable_state:
            # the changelog is partitioned like the events topic as it is, not as
            # it would be created
            described = admin.describe_topics([kafka.events_topic])
            events = len(described[0]["partitions"]) if described else kafka.partitions
            _create(admin, existing, {kafka.changelog(): events, kafka.updates(): 1},
                    {kafka.changelog(): {"cleanup.policy": "compact"}})
    finally:
        admin.close()


def _create(admin: KafkaAdminClient, existing: set[str], wanted: dict[str, int],
            configs: dict[str, dict[str, str]] | None = None) -> None:
    for name, partitions in wanted.items():
        if name in existing:
            continue
        try:
            admin.create_topics([NewTopic(name, partitions, 1,
                                          topic_configs=(configs or {}).get(name, {}))])
            log.info("created topic %s with %d partition(s)", name, partitions)
        except TopicAlreadyExistsError:
            pass


def producer(cluster: Cluster) -> KafkaProducer:
    return cluster.producer(acks="all", linger_ms=5,
                         batch_size=256 * 1024, max_request_size=2 * MAX_MESSAGE_BYTES)


def group_consumer(cluster: Cluster, kafka: KafkaSettings, max_poll_records: int) -> KafkaConsumer:
    """A member of ``kafka.group_id`` that commits by hand."""
    return cluster.consumer(group_id=kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=max(100, kafka.session_timeout_ms // 6),
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        max_poll_records=max_poll_records,
    )


def poll(consumer: KafkaConsumer, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
    """``consumer.poll``, and a way round a kafka-python (3.0.12) bug that strands
    resumed partitions: the records a paused partition had fetched are parked, and
    put back in line only when no other partition's records are in line; but an
    exhausted entry stays in line (empty, not missing) until another fetch
    completes, and parked partitions are not fetched, so once the other partitions
    have nothing more to give, a resumed one is never read again. The fetcher
    treats an exhausted entry and a missing one alike everywhere else, so it is
    cleared before each poll."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None and getattr(fetcher, "_next_partition_records", None) is not None \
            and not fetcher._next_partition_records:
        fetcher._next_partition_records = None
    polled: dict[Any, list[Any]] = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    return polled


def record_of(message: Any, *, headers: bool = False) -> Record:
    """A consumed message as a :class:`Record` (a null value reads as empty bytes).
    Headers only when asked for: event records do not need them, and their size
    is in no record limit."""
    return Record(message.value if message.value is not None else b"", message.key,
                  message.topic, message.partition, message.offset, message.timestamp,
                  message.headers if headers else None)


class TopicPoll(NamedTuple):
    """One poll of a topic range: each partition's records in its order, the
    partitions read to their end, and all of them."""

    records: list[Record]
    at_end: frozenset[int]
    partitions: frozenset[int]


class TopicRange(NamedTuple):
    """Which part of a topic to read: from an offset (in every partition) or a
    broker timestamp, to before an offset (None: the beginning, the end).
    ``from_ms`` seeks by record timestamp: a record is written no earlier than its
    event happened, so nothing in range is skipped. There is no ``to_ms``: an event
    inside the range may be written after its end, so the end is found by reading
    (the session filters by event time) or given as an offset."""

    from_ms: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None


def read_range(cluster: Cluster, topic: str, rng: TopicRange | None = None, *,
               max_records: int = 2000, missing_ok: bool = False,
               headers: bool = False) -> Iterator[TopicPoll]:
    """A topic range (to its end: read on until quiet for :data:`SETTLE_MS`). No
    consumer group: nothing is committed, and no live group's offsets move. A topic
    that does not exist raises :class:`MissingTopicError`, or with ``missing_ok``
    yields nothing. ``headers``: keep the records' headers."""
    # earliest: a start offset that retention has deleted means the first record kept
    cons = cluster.consumer(group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest", fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                         max_partition_fetch_bytes=2 * MAX_MESSAGE_BYTES)
    try:
        parts = cons.partitions_for_topic(topic)
        if not parts:
            if missing_ok:
                return
            raise MissingTopicError(f"topic {topic!r} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        rng = rng or TopicRange()
        cons.assign(tps)
        end = cons.end_offsets(tps)
        limit = dict.fromkeys(tps, rng.to_offset)
        if rng.from_offset is not None:
            for tp in tps:
                cons.seek(tp, rng.from_offset)
        elif rng.from_ms is not None:
            found = cons.offsets_for_times(dict.fromkeys(tps, rng.from_ms))
            for tp in tps:
                cons.seek(tp, found[tp].offset if found[tp] else end[tp])
        else:  # the log's start, wherever retention has moved it
            cons.seek_to_beginning(*tps)
        quiet_since = time.monotonic()
        done: set[TopicPartition] = set()
        while len(done) < len(tps):
            polled = cons.poll(timeout_ms=100, max_records=max_records)
            records: list[Record] = []
            for tp, msgs in polled.items():
                last = limit[tp]
                kept = [m for m in msgs if last is None or m.offset < last]
                if last is not None and len(kept) < len(msgs):
                    done.add(tp)
                records += [record_of(m, headers=headers) for m in kept]
            now = time.monotonic()
            if records:
                quiet_since = now
            at_end = set()
            for tp in tps:
                last = limit[tp]
                position = cons.position(tp)
                if last is not None and position >= last:
                    done.add(tp)
                if position >= end[tp]:
                    at_end.add(tp)
                    if (now - quiet_since) * 1000 >= SETTLE_MS:
                        done.add(tp)
            yield TopicPoll(records, frozenset(tp.partition for tp in done | at_end),
                            frozenset(tp.partition for tp in tps))
    finally:
        cons.close()


#: room left in a dead letter for the record's framing (batch header, varints, the
#: truncation headers): kafka-python's estimate adds under 100 bytes to a record
DLQ_FRAMING_BYTES = 1024
DLQ_DETAIL_BYTES = 2000
DLQ_SHORT_TEXT_BYTES = 255  # reason, topic
#: of a key that does not fit beside the value, this much is kept (the value, the
#: original record, matters more for finding out what went wrong)
DLQ_KEY_KEPT_BYTES = 1024

DeadLetterMessage = tuple[bytes | None, bytes, list[tuple[str, bytes]]]  # key, value, headers


def _header_text(text: str, limit: int) -> bytes:
    """UTF-8 of any text (lone surrogates escaped as \\udcXX), cut at a character
    boundary to at most ``limit`` bytes, so that header readers can always decode it."""
    raw = text.encode("utf-8", "backslashreplace")
    return raw if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore").encode()


def dead_letter(d: DeadLetter) -> DeadLetterMessage:
    """The message for one dead letter: the original key and bytes, and why/where in
    headers (the convention of Kafka Connect's dead-letter queues). It always fits in
    MAX_MESSAGE_BYTES: a dead letter the producer or broker refused would stop the
    consumer on the same record after every restart. What is cut is marked, with the
    original size: ``metarec.dlq.key_truncated``, ``metarec.dlq.truncated`` (value)."""
    rec = d.record
    headers = [
        ("metarec.dlq.reason", _header_text(d.reason, DLQ_SHORT_TEXT_BYTES)),
        ("metarec.dlq.detail", _header_text(d.detail, DLQ_DETAIL_BYTES)),
        ("metarec.dlq.topic", _header_text(rec.topic, DLQ_SHORT_TEXT_BYTES)),
        ("metarec.dlq.partition", str(rec.partition).encode()),
        ("metarec.dlq.offset", str(rec.offset).encode()),
    ]
    room = MAX_MESSAGE_BYTES - DLQ_FRAMING_BYTES - sum(len(k) + len(v) for k, v in headers)
    key, value = rec.key, rec.value
    key_room = max(room - len(value), DLQ_KEY_KEPT_BYTES)
    if key is not None and len(key) > key_room:
        headers.append(("metarec.dlq.key_truncated", str(len(key)).encode()))
        key = key[:key_room]
    value_room = room - len(key or b"")
    if len(value) > value_room:
        headers.append(("metarec.dlq.truncated", str(len(value)).encode()))
        value = value[:value_room]
    return key, value, headers


def send_dead_letters(prod: KafkaProducer, topic: str,
                      dead: Iterable[DeadLetter]) -> list[FutureRecordMetadata]:
    """Send each as :func:`dead_letter` makes it. Check the futures after a flush:
    offsets must not be committed past a dead letter the broker refused."""
    futures = []
    for d in dead:
        key, value, headers = dead_letter(d)
        futures.append(prod.send(topic, key=key, value=value, headers=headers))
    return futures


def produce_records(prod: KafkaProducer, topic: str, records: Iterable[Record]) -> int:
    n = 0
    for rec in records:
        prod.send(topic, key=rec.key, value=rec.value)
        n += 1
    prod.flush()
    return n
