"""One writer of model versions per group: the member that owns partition 0 of
the events topic (Kafka's group assignment chooses it).

It publishes right after its own commits, so a version holds exactly θ as of a
durable point, with the vector of every member's updates it holds. Each time it
becomes the writer it takes an epoch one above the highest on the model topic
and numbers its versions after the newest there; a deposed writer's later
versions carry a lower epoch, and loaders ignore them.
"""

from __future__ import annotations

import logging

from kafka import KafkaConsumer, TopicPartition

from metarec.session import StreamSession
from streamer.cluster import Cluster
from streamer.model_topic import Lineage, read_versions
from streamer.publishing import Publisher
from streamer.updates import UpdateLog

log = logging.getLogger("metarec.writer")


class ModelWriter:
    def __init__(self, cluster: Cluster, events_topic: str, model_topic: str,
                 publisher: Publisher, update_log: UpdateLog):
        self.cluster, self.model_topic = cluster, model_topic
        self.first = TopicPartition(events_topic, 0)
        self.publisher, self.update_log = publisher, update_log
        self.epoch: int | None = None  # None: not the writer

    def revoked(self) -> None:
        """A rebalance: whoever gets partition 0 next takes a new epoch (this member
        too, if it is again the one)."""
        self.epoch = None

    def due(self, consumer: KafkaConsumer) -> bool:
        return self.publisher.due and self.first in consumer.assignment()

    def after_commit(self, session: StreamSession, consumer: KafkaConsumer, *,
                     final: bool = False) -> None:
        if self.first not in consumer.assignment():
            if self.epoch is not None:
                log.info("no longer the model writer (epoch %d)", self.epoch)
            self.epoch = None
            return
        if self.epoch is None:
            found = read_versions(self.cluster, self.model_topic, settle=False)
            self.epoch = found.epoch + 1
            if found.newest is not None:
                self.publisher.number_after(found.newest.manifest.version)
            log.info("model writer of this group, epoch %d; the next version is %d",
                     self.epoch, (self.publisher.version or 0) + 1)
        lineage = Lineage(self.epoch, dict(self.update_log.applied),
                          self.update_log.low_water())
        if final:
            self.publisher.finish(session.snapshot(), lineage)
        elif self.publisher.due:
            self.publisher.publish(session.snapshot(), lineage)

    def finish(self) -> None:
        """Not the writer at the end: only wait for what is in flight."""
        self.publisher.finish_quietly()
