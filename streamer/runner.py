"""``metarec run``: the long-lived consumer-group member.

Loop: poll a micro-batch -> pipeline (decode, join, predict, learn, meta-update)
-> dead letters out -> model version out when due -> commit offsets.

Delivery: at-least-once. Offsets are committed only after the records they
cover have been learned from and their dead letters acknowledged, and never past
an impression still waiting for its click. SIGTERM/SIGINT finish the current
micro-batch, publish the model, commit and exit 0.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from metarec import snapshot
from metarec.learner import OnlineLearner
from streamer import kafka_io
from streamer.config import Settings
from streamer.metrics import Metrics
from streamer.model_topic import Manifest, read_versions
from streamer.pipeline import (
    BatchResult,
    Pipeline,
    Record,
    drift_json,
    warm_up,
    write_predictions,
)
from streamer.publishing import Publisher, TopicSink

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
        self.version: int | None = None  # newest version on the model topic at start
        self._positions: dict[TopicPartition, int] = {}
        self._drift_logged: dict[tuple[str, str], float] = {}
        self._busy: tuple[float, float] | None = None  # first record, last batch done
        self._last_commit = -math.inf
        self._committed: dict[TopicPartition, OffsetAndMetadata] = {}

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        if not self.stopping:
            log.info("stop requested: finishing the current micro-batch")
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # -- start-up ------------------------------------------------------------------------

    def _learner(self) -> OnlineLearner:
        config = self.settings.learner_config()
        learner = OnlineLearner(config)
        newest = read_versions(self.bootstrap, self.settings.model_topic).newest
        if newest is None:
            log.info("no model version on %s: starting from a fresh initialisation",
                     self.settings.model_topic)
            return learner
        try:
            theta = snapshot.loads(newest.payload, like=learner.theta)
        except snapshot.SnapshotError as exc:
            log.error("model version %d does not fit this config, starting fresh: %s",
                      newest.manifest.version, exc)
            return learner
        self.version = newest.manifest.version
        self.metrics.model_version.set(self.version)
        log.info("loaded model version %d (%s, %d bytes) from %s", self.version,
                 newest.manifest.algorithm, newest.manifest.size, self.settings.model_topic)
        return OnlineLearner(config, theta=theta)

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> RunSummary:
        s = self.settings
        kafka_io.ensure_topics(self.bootstrap, s)
        pipeline = Pipeline(s, self._learner())
        warm_up(s)  # before joining the group: the first batch is then like the rest
        with ExitStack() as stack:
            prod = kafka_io.producer(self.bootstrap)
            stack.callback(prod.close)
            cons = kafka_io.consumer(self.bootstrap, s)
            stack.callback(cons.close)
            cons.subscribe([s.events_topic], listener=_Rebalance(self, pipeline))
            self.publisher = Publisher(TopicSink(prod, s.model_topic, s.model_chunk_bytes),
                                       s.publish_every, self.version,
                                       min_seconds=s.publish_min_seconds, background=True,
                                       on_published=self._published)
            out: IO[str] | None = None
            if s.predictions_out is not None:
                # appended: a restart must not erase what the last run logged
                out = stack.enter_context(Path(s.predictions_out).open("a"))
            self._loop(cons, prod, pipeline, out)
            # drained: the last drift alarms, publish what was learned since the last
            # version, then commit
            self._after_batch(cons, prod, pipeline, BatchResult(drift=pipeline.flush_drift()),
                              out)
            self.publisher.finish(pipeline.learner)
            prod.flush()
            self._commit(cons, pipeline)
        return RunSummary(
            records=pipeline.records,
            labelled=pipeline.learner.examples_learned,
            dead_letters=sum(pipeline.dead_letters.values()),
            versions_published=self.publisher.published,
            busy_seconds=self._busy[1] - self._busy[0] if self._busy else 0.0,
        )

    def _loop(self, cons: KafkaConsumer, prod: KafkaProducer, pipeline: Pipeline,
              out: IO[str] | None) -> None:
        s = self.settings
        last_record = last_log = time.monotonic()
        records_total = 0
        while not self.stopping:
            polled = cons.poll(timeout_ms=s.poll_timeout_ms, max_records=s.max_batch_records)
            now = time.monotonic()
            assigned = cons.assignment()
            pipeline.track([tp.partition for tp in assigned], now)
            records = self._records(polled)
            if not records and not pipeline.buffered_total():
                if not assigned:  # still joining the group: not idle yet
                    last_record = now
                elif s.idle_exit_seconds is not None and now - last_record > s.idle_exit_seconds:
                    log.info("no records for %.0f s: stopping", s.idle_exit_seconds)
                    break
                elif now - self._last_commit >= s.commit_interval_ms / 1000:
                    self._commit(cons, pipeline)  # a quiet stream still commits what it learned
                continue
            if records:
                last_record = now
            caught_up = _caught_up(cons, assigned)
            # micro-batches are whole, as in a replay, unless their first event has
            # waited max_batch_wait_ms (a live stream slower than a batch per wait)
            flush = pipeline.ready_seconds(now) * 1000 >= s.max_batch_wait_ms
            paused = {tp.partition for tp in cons.paused()}
            result = pipeline.process(records, caught_up, flush=flush, paused=paused)
            self._flow_control(cons, assigned, pipeline)
            self.metrics.observe_freshness(time.time(), records)
            records_total += len(records)
            self._after_batch(cons, prod, pipeline, result, out)
            self._busy = (self._busy[0] if self._busy else now, time.monotonic())
            if now - last_log >= s.log_every_seconds:
                self._log_progress(pipeline, records_total, cons)
                last_log = now
        self._log_progress(pipeline, records_total, cons)

    def _records(self, polled: dict[TopicPartition, list[Any]]) -> list[Record]:
        """Each partition's records in its order; the pipeline merges them by event
        time (a user's events all live in one partition)."""
        out: list[Record] = []
        for tp, msgs in polled.items():
            self._positions[tp] = msgs[-1].offset + 1
            out += [Record(m.value if m.value is not None else b"", m.key, m.topic,
                           m.partition, m.offset, m.timestamp) for m in msgs]
        return out

    def _flow_control(self, cons: KafkaConsumer, assigned: set[TopicPartition],
                      pipeline: Pipeline) -> None:
        """Pause a partition that holds many records for the event-time merge (it is
        ahead of the others) until it holds half as many: memory stays bounded
        while a slower partition catches up."""
        held = pipeline.buffered()
        limit = self.settings.max_buffered_records
        paused = cons.paused()
        for tp in assigned:
            n = held.get(tp.partition, 0)
            if n >= limit and tp not in paused:
                cons.pause(tp)
            elif n <= limit // 2 and tp in paused:
                cons.resume(tp)

    def _after_batch(self, cons: KafkaConsumer, prod: KafkaProducer, pipeline: Pipeline,
                     result: BatchResult, out: IO[str] | None) -> None:
        dead = kafka_io.send_dead_letters(prod, self.settings.dlq_topic, result.dead_letters)
        now = time.monotonic()
        for event in result.drift:
            # every alarm goes to the drift topic and the metrics; the log gets at most
            # one line per signal and segment per log interval (the progress line counts all)
            key = (event.signal, event.segment)
            if now - self._drift_logged.get(key, -math.inf) >= self.settings.log_every_seconds:
                self._drift_logged[key] = now
                log.info("drift: %s (%s) in %s at event time %.0f: %.4f -> %.4f", event.signal,
                         event.detector, event.segment, event.timestamp, event.before,
                         event.after)
            prod.send(self.settings.drift_topic, key=event.segment.encode(),
                      value=drift_json(event).encode())
        if out is not None:
            write_predictions(out, result.predictions)
        for _ in result.meta:
            self.metrics.meta_timestamp.set_to_current_time()
            self.publisher.after_meta_update(pipeline.learner)
        self.metrics.observe(result, pipeline)
        for fut in dead:
            # a refused dead letter must not be committed past: stop, and the
            # records are read again after the restart
            fut.get(timeout=30)
        if time.monotonic() - self._last_commit >= self.settings.commit_interval_ms / 1000:
            self._commit(cons, pipeline)

    def _published(self, manifest: Manifest) -> None:
        self.metrics.model_version.set(manifest.version)
        self.metrics.published.inc()
        self.metrics.published_timestamp.set(manifest.created_at)

    def _commit(self, cons: KafkaConsumer, pipeline: Pipeline) -> None:
        pending = pipeline.held_offsets()
        offsets = {}
        for tp, position in self._positions.items():
            offset = min(position, pending.get(tp.partition, position))
            offsets[tp] = OffsetAndMetadata(offset, "", -1)
        self._last_commit = time.monotonic()
        if not offsets or offsets == self._committed:
            return
        try:
            cons.commit(offsets)
            self._committed = offsets
        except KafkaError as exc:  # e.g. a rebalance in progress: the next commit covers it
            log.warning("offset commit failed, will retry with the next batch: %s", exc)

    def _lag(self, cons: KafkaConsumer) -> int | None:
        """Records behind the end of the assigned partitions (brokers may under-report
        the newest batch, so this can read a little low)."""
        tps = list(cons.assignment())
        if not tps:
            return None
        try:
            end = cons.end_offsets(tps)
        except KafkaError:
            return None
        return sum(max(0, end[tp] - cons.position(tp)) for tp in tps)

    def _log_progress(self, pipeline: Pipeline, records: int, cons: KafkaConsumer) -> None:
        lag = self._lag(cons)
        if lag is not None:
            self.metrics.lag.set(lag)
        loss, auc = pipeline.evaluation.windowed()
        log.info(
            "records %d | lag %s | labelled %d | dead letters %d | users %d | pending %d | "
            "meta-updates %d | model v%s | window logloss %.4f AUC %.4f | drift alarms %d",
            records, lag, pipeline.learner.examples_learned, sum(pipeline.dead_letters.values()),
            len(pipeline.learner.users), pipeline.joiner.pending,
            pipeline.learner.meta_updates, self.publisher.version or "-", loss, auc,
            len(pipeline.drift.events),
        )


def _caught_up(cons: KafkaConsumer, assigned: set[TopicPartition]) -> set[int]:
    """Partitions whose every record up to the broker's last reported high
    watermark has been handed to us (a broker may report the newest batch late:
    then a partition looks caught up a moment early, and its next records are
    merged as slightly late ones)."""
    out = set()
    for tp in assigned:
        high = cons.highwater(tp)
        # no high watermark yet: nothing fetched, so no position worth asking for
        position = cons.position(tp) if high is not None else None
        if high is not None and position is not None and position >= high:
            out.add(tp.partition)
    return out


class _Rebalance(ConsumerRebalanceListener):
    """Forget the positions of revoked partitions (committing them later would move
    another member's offsets), and what the pipeline holds of them unlearned.
    Nothing is committed here: kafka-python runs this callback inside the
    consumer's group protocol, where a blocking commit is refused, so what was
    processed since the last commit (at most ``commit_interval_ms``) is read again
    by the partition's next owner: at-least-once."""

    def __init__(self, runner: Runner, pipeline: Pipeline):
        self.runner = runner
        self.pipeline = pipeline

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.runner._positions.pop(tp, None)
        self.pipeline.revoke({tp.partition for tp in revoked})
        if revoked:
            log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:
            log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
