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


def send_dead_letters(prod: KafkaProducer, topic: str,
                      dead: Iterable[DeadLetter]) -> list[FutureRecordMetadata]:
    """Original bytes as the value, original key, and why/where in headers (the
    convention of Kafka Connect's dead-letter queues). Check the futures after a
    flush: offsets must not be committed past a dead letter the broker refused."""
    futures = []
    for d in dead:
        rec = d.record
        headers = [
            ("metarec.dlq.reason", d.reason.encode()),
            ("metarec.dlq.detail", d.detail.encode()[:2000]),
            ("metarec.dlq.topic", rec.topic.encode()),
            ("metarec.dlq.partition", str(rec.partition).encode()),
            ("metarec.dlq.offset", str(rec.offset).encode()),
        ]
        value = rec.value
        if len(value) > MAX_MESSAGE_BYTES - 8192:  # keep the DLQ itself deliverable
            value = value[: MAX_MESSAGE_BYTES - 8192]
            headers.append(("metarec.dlq.truncated", b"1"))
        futures.append(prod.send(topic, key=rec.key, value=value, headers=headers))
    return futures


def produce_records(prod: KafkaProducer, topic: str, records: Iterable[Record]) -> int:
    n = 0
    for rec in records:
        prod.send(topic, key=rec.key, value=rec.value)
        n += 1
    prod.flush()
    return n
