"""A restart continues the newest model of its own layout; a configuration of
another layout starts a fresh lineage numbered after every version on the topic,
so loaders (which keep the highest number) can never be shadowed by the old one."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from metarec import snapshot
from metarec.model import init_theta
from metarec.session import config_hash
from streamer import kafka_io, lineage
from streamer.config import Settings
from streamer.embedded import EmbeddedBroker
from streamer.errors import SourceError
from streamer.model_topic import publish, read_versions
from streamer.runner import Runner
from streamer.sources import read_source
from tests.helpers import small_settings


def model_topic(broker: EmbeddedBroker) -> str:
    name = f"lineage-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        admin.close()
    return name


def publish_versions(broker: EmbeddedBroker, topic: str, settings: Settings,
                     versions: range, hash_: str | None = None) -> None:
    config = settings.session.learner
    payload = snapshot.dumps(init_theta(config.model, config.seed))
    prod = kafka_io.producer(broker.cluster)
    try:
        for v in versions:
            publish(prod, topic, payload, version=v, parent=v - 1 or None, algorithm="reptile",
                    config_hash=hash_ or config_hash(config), examples_learned=100 * v)
        prod.flush()
    finally:
        prod.close()


def test_the_hash_covers_the_layout_of_theta_not_its_learning_rates() -> None:
    base = small_settings().session.learner
    assert config_hash(small_settings(inner_lr=0.1, meta_lr=0.2, algorithm="maml")
                       .session.learner) == config_hash(base)
    assert config_hash(small_settings(dim=16).session.learner) != config_hash(base)
    assert config_hash(small_settings(item_buckets=8192).session.learner) != config_hash(base)


def test_a_restart_of_the_same_layout_continues_the_newest_version(
        broker: EmbeddedBroker) -> None:
    topic = model_topic(broker)
    settings = small_settings()
    publish_versions(broker, topic, settings, range(1, 4))
    start = lineage.newest(broker.cluster, topic, settings.session.learner)
    assert start.theta is not None
    assert (start.last_version, start.parent) == (3, 3)


def test_another_layout_starts_a_fresh_lineage_after_the_newest_version(
        broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture) -> None:
    topic = model_topic(broker)
    publish_versions(broker, topic, small_settings(), range(1, 4))
    other = small_settings(dim=16).session.learner
    start = lineage.newest(broker.cluster, topic, other)
    assert start.theta is None
    assert (start.last_version, start.parent) == (3, None)
    assert "starting a fresh lineage, its first version 4" in caplog.text


def test_a_rolled_back_configuration_continues_its_own_newest_version(
        broker: EmbeddedBroker) -> None:
    topic = model_topic(broker)
    publish_versions(broker, topic, small_settings(), range(1, 4))
    publish_versions(broker, topic, small_settings(dim=16), range(4, 5))
    start = lineage.newest(broker.cluster, topic, small_settings().session.learner)
    assert start.theta is not None
    assert (start.last_version, start.parent) == (4, 3)


def test_a_version_from_before_layout_hashes_is_continued_if_its_shapes_fit(
        broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture) -> None:
    """Versions published before the hash named the layout carry a hash of the whole
    configuration: an upgrade must not throw the model away."""
    topic = model_topic(broker)
    publish_versions(broker, topic, small_settings(), range(1, 3), hash_="57a19e0f11223344")
    start = lineage.newest(broker.cluster, topic, small_settings().session.learner)
    assert start.theta is not None
    assert (start.last_version, start.parent) == (2, 2)
    assert "but its shapes fit" in caplog.text


def test_replay_from_a_version_of_another_layout_is_a_clear_error(
        broker: EmbeddedBroker) -> None:
    topic = model_topic(broker)
    publish_versions(broker, topic, small_settings(), range(1, 2))
    with pytest.raises(SourceError, match="config hash"):
        lineage.exact(broker.cluster, topic, 1, small_settings(dim=16).session.learner)


def test_runs_across_a_change_of_layout_publish_above_the_old_lineage(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    """The bug this guards against: the second configuration published "v1" again,
    under the old lineage's v1..vN, so no restart ever loaded its model."""
    topic = model_topic(broker)
    events = f"lineage-events-{uuid.uuid4().hex[:8]}"
    source = tmp_path / "events.jsonl"
    source.write_text("".join(
        json.dumps({"type": "impression", "impression_id": f"i{u}-{j}", "user_id": f"u{u}",
                    "item_id": f"m{(u * 7 + j) % 40}", "timestamp": 1_700_000_000 + 60 * j,
                    "clicked": (u + j) % 3 == 0}) + "\n"
        for u in range(30) for j in range(10)))

    def run(dim: int, group: str) -> list[int]:
        settings = small_settings(bootstrap_servers=broker.bootstrap, events_topic=events,
                                  model_topic=topic, group_id=group, dim=dim, partitions=2,
                                  meta_every=100, publish_every=1, publish_min_seconds=0,
                                  idle_exit_seconds=2)
        return Runner(settings, broker.cluster).run().versions_published

    kafka_io.ensure_topics(broker.cluster, small_settings(
        events_topic=events, model_topic=topic, partitions=2).kafka)
    prod = kafka_io.producer(broker.cluster)
    kafka_io.produce_records(prod, events, read_source(str(source)))
    prod.close()

    first = run(8, "lineage-a")
    second = run(16, "lineage-b")
    assert first and second and min(second) > max(first)
    newest = read_versions(broker.cluster, topic).newest
    assert newest is not None and newest.manifest.version == max(second)
    assert newest.manifest.parent == (second[-2] if len(second) > 1 else None)
    again = lineage.newest(broker.cluster, topic, small_settings(dim=16).session.learner)
    assert again.theta is not None and again.last_version == max(second)

