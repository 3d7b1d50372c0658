"""``metarec run``: the long-lived consumer-group member.

The loop (:mod:`streamer.loop`) over a :class:`~streamer.group_source.GroupSource`:
poll -> session (decode, merge, join, predict, learn, meta-update) -> dead
letters, drift alarms, predictions, model versions, metrics -> commit.
SIGTERM/SIGINT finish the current micro-batch, publish the model, commit and
exit 0.
"""

from __future__ import annotations

import logging
import signal
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType

from metarec.session import StreamSession
from streamer import kafka_io, lineage
from streamer.config import Settings
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
from streamer.warmup import warm_up

log = logging.getLogger("metarec.run")


@dataclass
class RunSummary:
    records: int
    labelled: int
    dead_letters: int
    versions_published: list[int]
    busy_seconds: float  # from the first record received to the end of the last micro-batch


class Runner:
    def __init__(self, settings: Settings, bootstrap: str, metrics: Metrics | None = None):
        self.settings = settings
        self.bootstrap = bootstrap
        self.metrics = metrics or Metrics()
        self.stopping = False
        self._source: GroupSource | None = None

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        if not self.stopping:
            log.info("stop requested: finishing the current micro-batch")
        self.stopping = True
        if self._source is not None:
            self._source.request_stop()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> RunSummary:
        s, k = self.settings, self.settings.kafka
        kafka_io.ensure_topics(self.bootstrap, k)
        start = lineage.newest(self.bootstrap, k.model_topic, s.session.learner)
        if start.parent is not None:
            self.metrics.model_version.set(start.parent)
        session = StreamSession(s.session, start.theta, event_times=s.replay.event_times())
        warm_up(s.session)  # before joining the group: the first batch is then like the rest
        with ExitStack() as stack:
            prod = kafka_io.producer(self.bootstrap)
            stack.callback(prod.close)
            cons = kafka_io.group_consumer(self.bootstrap, k, s.session.max_batch_records)
            stack.callback(cons.close)
            source = self._source = GroupSource(
                cons, k, max_records=s.session.max_batch_records,
                idle_exit_seconds=s.ops.idle_exit_seconds, metrics=self.metrics)
            if self.stopping:
                source.request_stop()
            publisher = Publisher(TopicSink(prod, k.model_topic, s.publish.model_chunk_bytes),
                                  s.publish.publish_every, last_version=start.last_version,
                                  parent=start.parent, min_seconds=s.publish.publish_min_seconds,
                                  background=True, on_published=self._published)

            def lag() -> str:
                return f"lag {source.lag()} | model v{publisher.parent or '-'}"

            sinks: list[Sink] = [
                DeadLetterTopic(prod, k.dlq_topic),
                DriftTopic(prod, k.drift_topic, s.ops.log_every_seconds),
                ModelVersions(publisher, self.metrics.meta_timestamp.set_to_current_time),
                MetricsSink(self.metrics),
                ProgressLine(s.ops.log_every_seconds, log, tty=False, extra=lag, rate=False),
            ]
            if s.ops.predictions_out is not None:
                # appended: a restart must not erase what the last run logged
                sinks.append(PredictionLog(stack.enter_context(s.ops.predictions_out.open("a"))))
            stream(session, source, sinks)
        status = session.status()
        first, last = source.first_record_at, source.last_batch_at
        return RunSummary(
            records=status.records,
            labelled=status.examples_learned,
            dead_letters=sum(status.dead_letters.values()),
            versions_published=publisher.published,
            busy_seconds=last - first if first is not None and last is not None else 0.0,
        )

    def _published(self, manifest: Manifest) -> None:
        self.metrics.model_version.set(manifest.version)
        self.metrics.published.inc()
        self.metrics.published_timestamp.set(manifest.created_at)

