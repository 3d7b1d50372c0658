"""The consumer-group member reads every record of a backlog however often flow
control pauses and resumes its partitions."""

from __future__ import annotations

import uuid

from metarec.datasets.synthetic import SyntheticStream
from streamer import kafka_io
from streamer.embedded import EmbeddedBroker
from streamer.runner import Runner
from tests.helpers import records, small_settings


def test_a_backlog_larger_than_the_merge_buffer_is_read_to_its_end(
        broker: EmbeddedBroker) -> None:
    """Partitions far ahead in event time are paused while the others catch up.
    kafka-python 3.0.12 parks what a paused partition had fetched and could fail
    to read a resumed one ever again (see :func:`streamer.kafka_io.poll`): the
    run then ended thousands of records short, after stalling until partitions
    counted as idle."""
    tag = uuid.uuid4().hex[:8]
    settings = small_settings(bootstrap_servers=broker.bootstrap, events_topic=f"gs-{tag}",
                              model_topic=f"gs-model-{tag}", dlq_topic=f"gs-dlq-{tag}",
                              drift_topic=f"gs-drift-{tag}", group_id=f"gs-{tag}",
                              partitions=4, max_buffered_records=100, idle_exit_seconds=3,
                              publish_min_seconds=0)
    kafka_io.ensure_topics(broker.cluster, settings.kafka)
    backlog = records(SyntheticStream(users=300, events_per_user=20, seed=3))
    prod = kafka_io.producer(broker.cluster)
    kafka_io.produce_records(prod, settings.kafka.events_topic, backlog)
    prod.close()
    summary = Runner(settings, broker.cluster).run()
    assert summary.records == len(backlog)
    assert summary.labelled == len(backlog)
