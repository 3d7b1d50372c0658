"""`metarec run` against a real Kafka-protocol broker, as a separate process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from metarec import snapshot
from metarec.datasets.synthetic import SyntheticStream
from streamer import kafka_io
from streamer.config import Settings
from streamer.embedded import EmbeddedBroker, free_port
from streamer.model_topic import MAX_MESSAGE_BYTES, read_versions

pytestmark = pytest.mark.integration

MALFORMED: list[tuple[bytes, str]] = [
    (b"this is not json", "not_json"),
    (b'{"type": "purchase", "user_id": "u1", "item_id": "i1", "impression_id": "x",'
     b' "timestamp": 1700000000}', "unknown_type"),
    (b'{"type": "impression", "user_id": "u1", "item_id": "i1", "impression_id": "y",'
     b' "timestamp": 1700000000000}', "bad_timestamp"),
    (b'{"type": "click", "user_id": "u1", "impression_id": "z", "timestamp": 1700000000}',
     "schema"),
    (b'{"type": "impression", "pad": "' + b"x" * 70_000 + b'"}', "oversized"),
]


class Topics:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.events, self.model, self.dlq = f"ev-{tag}", f"model-{tag}", f"dlq-{tag}"
        self.drift = f"drift-{tag}"
        self.group = f"group-{tag}"

    def flags(self, broker: EmbeddedBroker) -> list[str]:
        return ["--bootstrap-servers", broker.bootstrap, "--events-topic", self.events,
                "--model-topic", self.model, "--dlq-topic", self.dlq, "--group-id", self.group,
                "--drift-topic", self.drift,
                "--partitions", "3", "--item-buckets", "16384", "--feature-buckets", "1024",
                "--meta-every", "400", "--meta-users", "64", "--publish-every", "2",
                "--publish-min-seconds", "0",
                "--max-batch-records", "300", "--log-every-seconds", "1",
                # small chunks, so that even this small model travels in several
                "--model-chunk-bytes", "16384"]

    def settings(self, broker: EmbeddedBroker) -> Settings:
        return Settings.of(bootstrap_servers=broker.bootstrap, events_topic=self.events,
                        model_topic=self.model, dlq_topic=self.dlq, group_id=self.group,
                        drift_topic=self.drift, partitions=3)


def metarec(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer.cli", *args]


def produce(broker: EmbeddedBroker, topic: str, events: list[dict[str, Any]],
            malformed: list[tuple[bytes, str]]) -> None:
    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    bad_at = {len(events) * (i + 1) // (len(malformed) + 1): m for i, m in enumerate(malformed)}
    for n, event in enumerate(events):
        if n in bad_at:
            prod.send(topic, key=b"u1", value=bad_at[n][0])
        prod.send(topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
    prod.flush()
    prod.close()


def read_all(broker: EmbeddedBroker, topic: str, partitions: int) -> list[Any]:
    cons = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                         fetch_max_wait_ms=10, max_partition_fetch_bytes=4 * MAX_MESSAGE_BYTES)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    cons.assign(tps)
    cons.seek_to_beginning(*tps)
    out, quiet = [], 0
    while quiet < 10:
        batch = cons.poll(timeout_ms=100)
        msgs = [m for ms in batch.values() for m in ms]
        out += msgs
        quiet = 0 if msgs else quiet + 1
    cons.close()
    return out


def committed(broker: EmbeddedBroker, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets (an OffsetFetch; this consumer joins nothing)."""
    cons = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group,
                         enable_auto_commit=False)
    try:
        found = {p: cons.committed(TopicPartition(topic, p)) for p in range(partitions)}
        return {p: off for p, off in found.items() if off is not None}
    finally:
        cons.close()


def test_run_consumes_joins_learns_dead_letters_commits_and_publishes(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    topics = Topics()
    kafka_io.ensure_topics(broker.cluster, topics.settings(broker).kafka)
    events = list(SyntheticStream(users=80, events_per_user=20, prelabelled=False,
                                  seed=11).events())
    produce(broker, topics.events, events, MALFORMED)
    preds_file = tmp_path / "preds.jsonl"

    done = subprocess.run(
        metarec("run", *topics.flags(broker), "--idle-exit-seconds", "4", "--metrics-port", "0",
                "--predictions-out", str(preds_file)),
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    # Predictions: one line per labelled impression, labels as joined from clicks.
    clicked = {e["impression_id"] for e in events if e["type"] == "click"}
    impressions = {e["impression_id"]: e for e in events if e["type"] == "impression"}
    lines = [json.loads(line) for line in preds_file.read_text().splitlines()]
    assert all(set(p) == {"user_id", "item_id", "timestamp", "k", "p", "label"} for p in lines)
    assert all(0.0 < p["p"] < 1.0 for p in lines)
    # the last attribution window is still open at exit: those wait, unlabelled
    assert 0.95 * len(impressions) <= len(lines) <= len(impressions)
    by_key = Counter((p["user_id"], p["item_id"], p["timestamp"]) for p in lines)
    assert max(by_key.values()) == 1
    truth = {(e["user_id"], e["item_id"], e["timestamp"]): int(i in clicked)
             for i, e in impressions.items()}
    assert all(truth[(p["user_id"], p["item_id"], p["timestamp"])] == p["label"]
               for p in lines)

    # Dead letters: the original bytes, the reason and where they came from.
    dead = read_all(broker, topics.dlq, 3)
    assert sorted(m.value for m in dead) == sorted(raw for raw, _ in MALFORMED)
    for m in dead:
        headers = {k: v.decode() for k, v in m.headers}
        assert headers["metarec.dlq.reason"] == dict(MALFORMED)[m.value]
        assert headers["metarec.dlq.topic"] == topics.events
        assert int(headers["metarec.dlq.partition"]) in range(3)
        assert int(headers["metarec.dlq.offset"]) >= 0

    # Offsets: committed after learning, never past an impression still pending.
    offsets = committed(broker, topics.group, topics.events, 3)
    total = len(events) + len(MALFORMED)
    assert set(offsets) == {0, 1, 2}
    assert 0.9 * total <= sum(offsets.values()) < total

    # Model versions: several, each message under Apache Kafka's 1 MB default.
    raw = read_all(broker, topics.model, 1)
    assert all(len(m.value) + len(m.key) + sum(len(k) + len(v) for k, v in m.headers)
               <= 1_000_000 for m in raw)
    manifests = [json.loads(m.value) for m in raw if dict(m.headers)["metarec-kind"] == b"manifest"]
    assert len(manifests) >= 2
    assert [m["version"] for m in manifests] == list(range(1, len(manifests) + 1))
    assert [m["parent"] for m in manifests[1:]] == [m["version"] for m in manifests[:-1]]
    assert max(len(m["chunks"]) for m in manifests) >= 2  # chunking really happens

    # A second process loads the newest version.
    out = tmp_path / "model.npz"
    pulled = subprocess.run(metarec("model", "pull", "--bootstrap-servers", broker.bootstrap,
                                    "--model-topic", topics.model, "--out", str(out)),
                            capture_output=True, text=True, timeout=60)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["version"] == len(manifests)
    theta = snapshot.loads(out.read_bytes())
    assert theta["item_emb"].shape == (16384, 32)

    # A restarted run starts from the newest published version.
    produce(broker, topics.events, list(SyntheticStream(users=20, events_per_user=10,
                                                        seed=12).events()), [])
    again = subprocess.run(metarec("run", *topics.flags(broker), "--idle-exit-seconds", "3",
                                   "--metrics-port", "0"),
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"loaded model version {len(manifests)}" in again.stderr
    newest = read_versions(broker.cluster, topics.model).newest
    assert newest is not None and newest.manifest.parent == len(manifests)


def test_sigterm_drains_commits_publishes_and_exits_zero(broker: EmbeddedBroker,
                                                         tmp_path: Path) -> None:
    topics = Topics()
    kafka_io.ensure_topics(broker.cluster, topics.settings(broker).kafka)
    events = list(SyntheticStream(users=200, events_per_user=30, seed=13).events())
    produce(broker, topics.events, events, [])
    port = free_port()
    preds_file = tmp_path / "preds.jsonl"
    proc = subprocess.Popen(
        metarec("run", *topics.flags(broker), "--metrics-port", str(port),
                "--predictions-out", str(preds_file)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        body = ""
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=2).read().decode()
            except OSError:
                body = ""
            # learning has begun: the partitions are merged by event time, so the
            # first records read may wait for a partition still to deliver
            if 'metarec_labelled_examples_total{label=' in body:
                break
            time.sleep(0.5)
        assert 'metarec_events_total{type="impression"}' in body
        assert "metarec_prequential_auc" in body
        assert 'metarec_dead_letters_total{reason="not_json"} 0.0' in body
        assert "metarec_microbatch_duration_seconds_bucket" in body
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop requested" in stderr and "published model version" in stderr
    learned = len(preds_file.read_text().splitlines())
    assert learned > 0
    # everything learned from is committed (pre-labelled: nothing is pending)
    assert sum(committed(broker, topics.group, topics.events, 3).values()) == learned
