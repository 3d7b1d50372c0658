"""Kafka plumbing: topics, producers, consumers, dead letters."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from streamer.config import Settings
from streamer.model_topic import MAX_MESSAGE_BYTES
from streamer.pipeline import DeadLetter, Record

log = logging.getLogger(__name__)


def ensure_topics(bootstrap: str, settings: Settings) -> None:
    """Create the topics explicitly (some brokers auto-create with other layouts).
    The model topic has one partition: its order is the version order."""
    wanted = {
        settings.events_topic: settings.partitions,
        settings.dlq_topic: settings.partitions,
        settings.model_topic: 1,
        settings.drift_topic: 1,
    }
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        existing = set(admin.list_topics())
        for name, partitions in wanted.items():
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, partitions, 1)])
                log.info("created topic %s with %d partition(s)", name, partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                         batch_size=256 * 1024, max_request_size=2 * MAX_MESSAGE_BYTES)


def consumer(bootstrap: str, settings: Settings) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(100, settings.session_timeout_ms // 6),
        # The default 500 ms fetch wait throttles a consumer on small fetches.
        fetch_max_wait_ms=10,
        max_poll_records=settings.max_batch_records,
    )


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
