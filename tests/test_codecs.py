"""Events compressed by the producer are read like any others.

Compression is the producer's choice, made per batch: one service upgrading its
client or turning on ``compression.type=zstd`` puts compressed batches into the
events topic, and no consumer setting refuses them. kafka-python decodes gzip by
itself, but snappy, lz4 and zstd only when their packages (python-snappy, lz4,
zstandard) are installed; without them it raises ``UnsupportedCodecError`` from
``poll``: the consumer stops, and stops again on the same batch after every
restart. The producer here is librdkafka (confluent-kafka), the client most
producers in the wild are built on, so the batches are the ones they write.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from metarec.datasets.synthetic import SyntheticStream
from streamer.embedded import EmbeddedBroker

pytestmark = pytest.mark.integration

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def create_topic(broker: EmbeddedBroker, name: str, partitions: int) -> None:
    # explicitly: the embedded broker would auto-create it with several partitions
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


@pytest.mark.parametrize("codec", CODECS)
def test_replay_reads_and_learns_every_event_whatever_the_compression(
        broker: EmbeddedBroker, codec: str, tmp_path: Path) -> None:
    topic = f"ev-{codec}-{uuid.uuid4().hex[:8]}"
    create_topic(broker, topic, partitions=2)
    events = list(SyntheticStream(users=20, events_per_user=10, seed=5).events())
    # linger: many records to a batch, so each batch really is compressed as one
    prod = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": codec,
                     "linger.ms": 50, "acks": "all"})
    try:
        for event in events:
            prod.produce(topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
        assert prod.flush(30) == 0
    finally:
        prod.close()

    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "replay", f"kafka:{topic}",
         "--bootstrap-servers", broker.bootstrap, "--item-buckets", "4096",
         "--feature-buckets", "1024", "--dim", "8", "--metrics-port", "0",
         "--summary-json", str(summary)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads(summary.read_text())
    assert result["records"] == len(events)
    assert result["dead_letters"] == {}
    # the synthetic stream is pre-labelled: every impression is learned from
    assert result["predictions"] == sum(e["type"] == "impression" for e in events)
