"""With the broker gone, a stop is still bounded: the run exits within its
shutdown timeout, with the exit code of a Kafka failure and one clear line, and
commits nothing more (what it had not committed is read again)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from streamer import kafka_io
from streamer.embedded import EmbeddedBroker
from streamer.runner import EXIT_KAFKA
from tests.helpers import as_record, small_settings

T0 = 1_700_000_000


def run_until_learned_then_lose_the_broker(tmp_path: Path) -> tuple[subprocess.Popen[bytes],
                                                                     Path]:
    """A run that has learned its 500 records, and whose broker is then gone."""
    broker = EmbeddedBroker()
    broker.start()
    log, predictions = tmp_path / "run.log", tmp_path / "predictions.jsonl"
    try:
        topic = f"outage-{uuid.uuid4().hex[:8]}"
        kafka_io.ensure_topics(broker.cluster, small_settings(
            events_topic=topic, model_topic=f"{topic}.model", partitions=2).kafka)
        prod = kafka_io.producer(broker.cluster)
        kafka_io.produce_records(prod, topic, (as_record(
            {"type": "impression", "impression_id": f"i{i}", "user_id": f"u{i % 20}",
             "item_id": f"m{i % 30}", "timestamp": T0 + i, "clicked": i % 3 == 0})
            for i in range(500)))
        prod.close()
        with log.open("w") as err:
            run = subprocess.Popen(
                [sys.executable, "-m", "streamer.cli", "run", "--bootstrap-servers",
                 broker.bootstrap, "--events-topic", topic, "--group-id", topic,
                 "--model-topic", f"{topic}.model", "--metrics-port", "0",
                 "--item-buckets", "4096", "--feature-buckets", "1024", "--dim", "8",
                 "--meta-every", "100", "--meta-users", "16", "--publish-min-seconds", "0",
                 "--shutdown-timeout-seconds", "5", "--predictions-out", str(predictions)],
                stderr=err)
            deadline = time.monotonic() + 120
            while run.poll() is None and (not predictions.exists()
                                          or len(predictions.read_text().splitlines()) < 500):
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.5)
    finally:
        broker.stop()
    return run, log


def test_sigterm_with_the_broker_down_exits_within_the_shutdown_timeout(
        tmp_path: Path) -> None:
    run, log = run_until_learned_then_lose_the_broker(tmp_path)
    run.send_signal(signal.SIGTERM)
    start = time.monotonic()
    code = run.wait(timeout=60)
    took = time.monotonic() - start
    text = log.read_text()
    assert code == EXIT_KAFKA, text[-2000:]
    assert took < 5 + 10, took  # the timeout, and the interpreter's own exit
    assert "shutdown did not finish within 5 s" in text or "metarec: Kafka failed" in text
    assert "Traceback" not in text


def test_a_second_signal_leaves_at_once(tmp_path: Path) -> None:
    run, log = run_until_learned_then_lose_the_broker(tmp_path)
    run.send_signal(signal.SIGINT)
    time.sleep(0.5)
    start = time.monotonic()
    run.send_signal(signal.SIGINT)
    code = run.wait(timeout=60)
    assert code == EXIT_KAFKA
    assert time.monotonic() - start < 3
    assert "a second stop signal" in log.read_text()
