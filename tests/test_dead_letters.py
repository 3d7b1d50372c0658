"""A dead letter always fits in one Kafka message, whatever the record it carries.

If it did not, the producer (or the broker) would refuse it, the consumer would
stop before committing, read the same record after the restart and stop again:
one record would block the partition for good. So the key and the value are cut
to fit (each cut marked in a header with the original size), the detail text is
cut, and every header value is valid UTF-8 whatever text it came from.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer
from kafka.record.default_records import DefaultRecordBatchBuilder

from metarec.datasets.synthetic import SyntheticStream
from metarec.records import DeadLetter, Record
from streamer import kafka_io
from streamer.embedded import EmbeddedBroker
from streamer.model_topic import MAX_MESSAGE_BYTES
from tests.test_kafka_integration import Topics, metarec, read_all

KEY_TRUNCATED = "metarec.dlq.key_truncated"
VALUE_TRUNCATED = "metarec.dlq.truncated"


def message_bytes(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """What the record weighs by kafka-python's own estimate (the one its producer
    holds against max_request_size): key, value, headers and the batch framing."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


@pytest.mark.integration
def test_a_record_too_large_for_kafka_is_dead_lettered_cut_to_fit_and_marked(
        broker: EmbeddedBroker) -> None:
    topics = Topics()
    kafka_io.ensure_topics(broker.cluster, topics.settings(broker).kafka)
    key, value = b"k" * 1_500_000, b"v" * 2_000_000
    dead = DeadLetter(Record(value, key, topics.events, 2, 41), "oversized",
                      "2000000 bytes > limit 65536")
    prod = kafka_io.producer(broker.cluster)
    try:
        futures = kafka_io.send_dead_letters(prod, topics.dlq, [dead])
        prod.flush()
        for fut in futures:
            fut.get(timeout=30)
    finally:
        prod.close()

    [m] = read_all(broker, topics.dlq, 3)
    assert message_bytes(m.key, m.value, m.headers) <= MAX_MESSAGE_BYTES
    headers = {k: v.decode() for k, v in m.headers}
    assert headers[KEY_TRUNCATED] == "1500000" and headers[VALUE_TRUNCATED] == "2000000"
    # what is kept is the start of the original, as much of it as fits
    assert key.startswith(m.key) and value.startswith(m.value)
    assert len(m.value) > 0.9 * MAX_MESSAGE_BYTES
    assert headers["metarec.dlq.reason"] == "oversized"
    assert (headers["metarec.dlq.topic"], headers["metarec.dlq.partition"],
            headers["metarec.dlq.offset"]) == (topics.events, "2", "41")


@pytest.mark.integration
def test_detail_text_that_is_not_valid_unicode_still_makes_a_dead_letter(
        broker: EmbeddedBroker) -> None:
    topics = Topics()
    kafka_io.ensure_topics(broker.cluster, topics.settings(broker).kafka)
    # a lone surrogate (as surrogateescape decoding leaves them), then more text than
    # the detail header holds, in multi-byte characters
    detail = "bad byte \udcff then " + "é" * 5000
    dead = DeadLetter(Record(b"\xff\xfe", b"u1", topics.events, 0, 7), "not_json", detail)
    prod = kafka_io.producer(broker.cluster)
    try:
        for fut in kafka_io.send_dead_letters(prod, topics.dlq, [dead]):
            fut.get(timeout=30)
    finally:
        prod.close()

    [m] = read_all(broker, topics.dlq, 3)
    assert (m.key, m.value) == (b"u1", b"\xff\xfe")
    sent = dict(m.headers)["metarec.dlq.detail"].decode()  # valid UTF-8
    assert sent.startswith("bad byte \\udcff then éé") and len(sent.encode()) <= 2000
    assert KEY_TRUNCATED not in dict(m.headers) and VALUE_TRUNCATED not in dict(m.headers)


@settings(max_examples=60, deadline=None, database=None)
@given(key_size=st.one_of(st.none(), st.integers(0, 1_200_000)),
       value_size=st.integers(0, 2_500_000),
       reason=st.text(st.characters(exclude_categories=()), max_size=300),
       detail=st.text(st.characters(exclude_categories=()), max_size=3000),
       topic=st.text(st.characters(exclude_categories=()), max_size=300))
def test_every_dead_letter_fits_in_one_message_with_utf8_headers(
        key_size: int | None, value_size: int, reason: str, detail: str, topic: str) -> None:
    key = None if key_size is None else bytes(range(256)) * (key_size // 256) + b"k" * (
        key_size % 256)
    value = b"v" * value_size
    dead = DeadLetter(Record(value, key, topic, 3, 12345), reason, detail)
    out_key, out_value, headers = kafka_io.dead_letter(dead)

    assert message_bytes(out_key, out_value, headers) <= MAX_MESSAGE_BYTES
    for _, raw in headers:
        raw.decode("utf-8")  # never raises
    names = dict(headers)
    if key is None:
        assert out_key is None and KEY_TRUNCATED not in names
    else:
        assert out_key is not None and key.startswith(out_key)
        assert names.get(KEY_TRUNCATED) == (None if out_key == key else str(len(key)).encode())
    assert value.startswith(out_value)
    assert names.get(VALUE_TRUNCATED) == (None if out_value == value else str(len(value)).encode())
    # nothing is cut that would have fitted
    if len(key or b"") + len(value) <= MAX_MESSAGE_BYTES - 4096:
        assert (out_key, out_value) == (key, value)


@pytest.mark.integration
def test_run_dead_letters_records_with_huge_keys_and_learns_the_rest(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    topics = Topics()
    kafka_io.ensure_topics(broker.cluster, topics.settings(broker).kafka)
    events = list(SyntheticStream(users=30, events_per_user=10, seed=21).events())
    poison = {len(events) // 3: (b"K" * 1_500_000, b"not json"),  # over Apache Kafka's 1 MB
              2 * len(events) // 3: (b"Q" * 1_500_000, b"x" * 2_000_000)}  # both over 1 MB
    # the embedded broker takes messages far over 1 MB; kafka-python must be let send them
    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5,
                         max_request_size=8 * MAX_MESSAGE_BYTES)
    for n, event in enumerate(events):
        if n in poison:
            key, value = poison[n]
            prod.send(topics.events, key=key, value=value)
        prod.send(topics.events, key=event["user_id"].encode(), value=json.dumps(event).encode())
    prod.flush()
    prod.close()
    preds_file = tmp_path / "preds.jsonl"

    done = subprocess.run(
        metarec("run", *topics.flags(broker), "--idle-exit-seconds", "3", "--metrics-port", "0",
                "--predictions-out", str(preds_file)),
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    # every valid (pre-labelled) impression was learned from
    impressions = [e for e in events if e["type"] == "impression"]
    assert len(preds_file.read_text().splitlines()) == len(impressions)
    dead = read_all(broker, topics.dlq, 3)
    assert sorted(dict(m.headers)["metarec.dlq.reason"] for m in dead) == [b"not_json",
                                                                           b"oversized"]
    for m in dead:
        assert message_bytes(m.key, m.value, m.headers) <= MAX_MESSAGE_BYTES
        assert dict(m.headers)[KEY_TRUNCATED] == b"1500000"
