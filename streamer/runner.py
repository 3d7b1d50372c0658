"""``metarec run``: the long-lived consumer-group member.

The loop (:mod:`streamer.loop`) over a :class:`~streamer.group_source.GroupSource`:
poll -> session (decode, merge, join, predict, learn, meta-update) -> dead
letters, drift alarms, predictions, model versions, metrics -> commit.
SIGTERM/SIGINT finish the current micro-batch, publish the model, commit and
exit 0; if that cannot finish within ``shutdown_timeout_seconds`` (Kafka
unreachable), the process exits with :data:`EXIT_KAFKA` and nothing more is
committed, so the records since the last commit are read again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType

from metarec.session import StreamSession
from streamer import kafka_io, lineage
from streamer.cluster import Cluster
from streamer.config import Settings
from streamer.durability import DurableState, group_theta
from streamer.group_source import GroupSource
from streamer.loop import stream
from streamer.metrics import Metrics
from streamer.model_topic import Manifest
from streamer.publishing import Publisher, TopicSink
from streamer.sinks import (
    DeadLetterTopic,
    DriftTopic,
    MetricsSink,
    ModelVersions,
    PredictionLog,
    ProgressLine,
    Sink,
)
from streamer.transactions import new_incarnation
from streamer.updates import UpdateLog
from streamer.warmup import warm_up
from streamer.writer import ModelWriter

log = logging.getLogger("metarec.run")

#: exit code of a run that Kafka stopped: unreachable, refusing, or a shutdown
#: that could not make its last state durable in time (2 is for bad settings
#: and input)
EXIT_KAFKA = 3


@dataclass
class RunSummary:
    records: int
    labelled: int
    dead_letters: int
    versions_published: list[int]
    busy_seconds: float  # from the first record received to the end of the last micro-batch


class Runner:
    def __init__(self, settings: Settings, cluster: Cluster, metrics: Metrics | None = None):
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics or Metrics()
        self.stopping = False
        self._source: GroupSource | None = None
        self._watchdog: threading.Timer | None = None

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        """The first signal starts a bounded shutdown; a second one leaves at once."""
        if self.stopping:
            _leave("a second stop signal: leaving now")
        timeout = self.settings.ops.shutdown_timeout_seconds
        log.info("stop requested: finishing the current micro-batch (at most %.0f s)", timeout)
        self._watchdog = threading.Timer(timeout, _leave, (
            f"shutdown did not finish within {timeout:.0f} s (is Kafka reachable?)",))
        self._watchdog.daemon = True
        self._watchdog.start()
        self.stopping = True
        if self._source is not None:
            self._source.request_stop()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> RunSummary:
        s, k = self.settings, self.settings.kafka
        kafka_io.ensure_topics(self.cluster, k)
        start = lineage.newest(self.cluster, k.model_topic, s.session.learner)
        if start.parent is not None:
            self.metrics.model_version.set(start.parent)
        session = StreamSession(s.session, start.theta, event_times=s.replay.event_times(),
                                durable=k.durable_state,
                                examples_learned=start.examples_learned)
        update_log, incarnation = None, new_incarnation()
        if k.durable_state:
            update_log = group_theta(self.cluster, k, session, start.lineage, self.metrics,
                                     incarnation)
            log.info("θ: model version %s and the group's later updates (%d examples)",
                     start.parent or "none (fresh)", session.learner.examples_learned)
        warm_up(s.session)  # before joining the group: the first batch is then like the rest
        try:
            source, publisher = self._consume(session, start, update_log, incarnation)
        finally:
            if self._watchdog is not None:  # the shutdown finished (or failed) in time
                self._watchdog.cancel()
        status = session.status()
        first, last = source.first_record_at, source.last_batch_at
        return RunSummary(
            records=status.records,
            labelled=status.examples_learned,
            dead_letters=sum(status.dead_letters.values()),
            versions_published=publisher.published,
            busy_seconds=last - first if first is not None and last is not None else 0.0,
        )

    def _consume(self, session: StreamSession, start: lineage.Start,
                 update_log: UpdateLog | None, incarnation: str
                 ) -> tuple[GroupSource, Publisher]:
        """The group member's loop, its clients closed at the end."""
        s, k = self.settings, self.settings.kafka
        with ExitStack() as stack:
            prod = kafka_io.producer(self.cluster)
            stack.callback(prod.close, timeout=s.ops.shutdown_timeout_seconds)
            cons = kafka_io.group_consumer(self.cluster, k, k.max_poll_records)
            stack.callback(cons.close)
            publisher = Publisher(TopicSink(prod, k.model_topic, s.publish.model_chunk_bytes),
                                  s.publish.publish_every, last_version=start.last_version,
                                  parent=start.parent, min_seconds=s.publish.publish_min_seconds,
                                  background=True, on_published=self._published)
            durable = None
            if update_log is not None:
                writer = ModelWriter(self.cluster, k.events_topic, k.model_topic, publisher,
                                     update_log)
                durable = DurableState(self.cluster, k, update_log, self.metrics, incarnation,
                                       writer, prod)
            source = self._source = GroupSource(
                cons, k, max_records=k.max_poll_records,
                idle_exit_seconds=s.ops.idle_exit_seconds, metrics=self.metrics,
                durable=durable)
            if self.stopping:
                source.request_stop()

            def lag() -> str:
                return f"lag {source.lag()} | model v{publisher.parent or '-'}"

            sinks: list[Sink] = [
                DeadLetterTopic(prod, k.dlq_topic),
                DriftTopic(prod, k.drift_topic, s.ops.log_every_seconds),
                ModelVersions(publisher, self.metrics.meta_timestamp.set_to_current_time,
                              publish=durable is None),
                MetricsSink(self.metrics),
                ProgressLine(s.ops.log_every_seconds, log, tty=False, extra=lag, rate=False),
            ]
            if s.ops.predictions_out is not None:
                # appended: a restart must not erase what the last run logged
                sinks.append(PredictionLog(stack.enter_context(s.ops.predictions_out.open("a")),
                                           live=True))
            stream(session, source, sinks)
        return source, publisher

    def _published(self, manifest: Manifest) -> None:
        self.metrics.model_version.set(manifest.version)
        self.metrics.published.inc()
        self.metrics.published_timestamp.set(manifest.created_at)


def _leave(why: str) -> None:
    """Exit now with :data:`EXIT_KAFKA`, committing nothing more (the records since
    the last commit are read again): the shutdown is stuck on Kafka (a flush, a
    publish or a commit), or the operator insists. Written straight to stderr: a
    logging lock held by a stuck thread must not keep the process alive."""
    os.write(2, f"metarec: {why}: exiting with code {EXIT_KAFKA} without the last commit; "
                "the records since the last commit will be read again\n".encode())
    os._exit(EXIT_KAFKA)
