"""A consumer-group member as a source of the loop.

Offsets are committed only after the records they cover have been learned from
and their dead letters acknowledged, and never past an event the session still
holds (buffered for the event-time merge, or an impression waiting for its
click). With durable state (:mod:`streamer.durability`) they are committed in
one transaction with the state that reflects them, and a record read again is
learned once; without it, delivery is at-least-once and the state in memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from metarec.records import Record
from metarec.session import StreamSession
from streamer.config import KafkaSettings
from streamer.durability import DurableState
from streamer.kafka_io import poll, record_of
from streamer.loop import Poll
from streamer.metrics import Metrics

log = logging.getLogger("metarec.run")


class GroupSource(ConsumerRebalanceListener):
    """Polls ``consumer`` (already created, not yet subscribed) until
    :meth:`request_stop` or ``idle_exit_seconds`` without records."""

    finite = False

    def __init__(self, consumer: KafkaConsumer, kafka: KafkaSettings, *, max_records: int,
                 idle_exit_seconds: float | None, metrics: Metrics,
                 durable: DurableState | None = None):
        self.consumer, self.kafka, self.max_records = consumer, kafka, max_records
        self.idle_exit_seconds = idle_exit_seconds
        self.metrics = metrics
        self.stopping = False
        self.first_record_at: float | None = None
        self.last_batch_at: float | None = None
        self._positions: dict[TopicPartition, int] = {}
        self._last_commit = -math.inf
        self._committed: dict[TopicPartition, OffsetAndMetadata] = {}
        self._session: StreamSession | None = None
        self._in_flight: list[Record] = []
        self._unsaved = 0  # records processed since the last commit
        self.durable = durable
        consumer.subscribe([kafka.events_topic], listener=self)

    def request_stop(self) -> None:
        self.stopping = True

    def polls(self, session: StreamSession) -> Iterator[Poll]:
        self._session = session
        cons, k = self.consumer, self.kafka
        last_record = time.monotonic()
        while not self.stopping:
            polled = poll(cons, k.poll_timeout_ms, self.max_records)
            if self.durable is not None and self.durable.after_poll(session, cons):
                self._positions.clear()  # back at the last commit: read again from there
                self._committed = {}
                polled = {}
            now = time.monotonic()
            assigned = cons.assignment()
            session.track([tp.partition for tp in assigned], now)
            records = self._records(polled)
            if not records and not session.buffered_total():
                if not assigned:  # still joining the group: not idle yet
                    last_record = now
                elif (self.idle_exit_seconds is not None
                      and now - last_record > self.idle_exit_seconds):
                    log.info("no records for %.0f s: stopping", self.idle_exit_seconds)
                    return
                elif self._commit_due(now):
                    self._commit(session)  # a quiet stream still commits what it learned
                continue
            if records:
                last_record = now
                self.first_record_at = self.first_record_at or now
            self._in_flight = records
            # micro-batches are whole, as in a replay, unless their first event has
            # waited max_batch_wait_ms (a live stream slower than a batch per wait)
            yield Poll(records, _caught_up(cons, assigned),
                       {tp.partition for tp in cons.paused()},
                       flush=session.ready_seconds(now) * 1000 >= k.max_batch_wait_ms)

    def processed(self, session: StreamSession) -> None:
        # from each record's append to the end of the micro-batch that took it in
        self.metrics.observe_freshness(time.time(), self._in_flight)
        self._unsaved += len(self._in_flight)
        self._in_flight = []
        self._flow_control(session)
        self.last_batch_at = time.monotonic()
        if self._commit_due(self.last_batch_at):
            self._commit(session)

    def close(self, session: StreamSession) -> None:
        try:
            self._commit(session, final=True)
        finally:  # the writer's last version is of θ as last committed either way
            if self.durable is not None:
                self.durable.close(session, self.consumer,
                                   self.kafka.session_timeout_ms / 1000)

    def lag(self) -> int | None:
        """Records behind the end of the assigned partitions (brokers may under-report
        the newest batch, so this can read a little low)."""
        tps = list(self.consumer.assignment())
        if not tps:
            return None
        try:
            end = self.consumer.end_offsets(tps)
        except KafkaError:
            return None
        lag = sum(max(0, end[tp] - self.consumer.position(tp)) for tp in tps)
        self.metrics.lag.set(lag)
        return lag

    # -- partitions --------------------------------------------------------------------

    def _records(self, polled: dict[TopicPartition, list[Any]]) -> list[Record]:
        """Each partition's records in its order; the session merges them by event
        time (a user's events all live in one partition)."""
        out: list[Record] = []
        for tp, msgs in polled.items():
            self._positions[tp] = msgs[-1].offset + 1
            out += [record_of(m) for m in msgs]
        return out

    def _flow_control(self, session: StreamSession) -> None:
        """Pause a partition that holds many records for the event-time merge (it is
        ahead of the others) until it holds half as many: memory stays bounded
        while a slower partition catches up."""
        held = session.buffered()
        limit = self.kafka.max_buffered_records
        paused = self.consumer.paused()
        for tp in self.consumer.assignment():
            n = held.get(tp.partition, 0)
            if n >= limit and tp not in paused:
                self.consumer.pause(tp)
            elif n <= limit // 2 and tp in paused:
                self.consumer.resume(tp)

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Forget the positions of revoked partitions (committing them later would
        move another member's offsets), and what the session holds of them
        unlearned. Nothing is committed here: kafka-python runs this callback
        inside the group protocol, where a blocking commit is refused, so what was
        processed since the last commit (at most ``commit_interval_ms``) is read
        again by the partition's next owner: at-least-once."""
        for tp in revoked:
            self._positions.pop(tp, None)
        if self.durable is not None:
            self.durable.revoked()
        elif self._session is not None:
            self._session.revoke({tp.partition for tp in revoked})
        if revoked:
            log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if self.durable is not None:
            self.durable.assigned(self.consumer, assigned)
        if assigned:
            log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))

    # -- commits -----------------------------------------------------------------------

    def _commit_due(self, now: float) -> bool:
        return now - self._last_commit >= self.kafka.commit_interval_ms / 1000 or (
            self.durable is not None and self.durable.wants_commit(self.consumer))

    def _commit(self, session: StreamSession, *, final: bool = False) -> None:
        """Commit what the session no longer holds; ``final``: a failure raises (the
        run then exits as a Kafka failure), else the next commit retries."""
        held = session.held_offsets()
        offsets = {tp: OffsetAndMetadata(min(position, held.get(tp.partition, position)), "", -1)
                   for tp, position in self._positions.items()}
        self._last_commit = time.monotonic()
        # with durable state, what was learned is saved even if the offsets stay
        # (an impression waiting for its click holds them)
        unsaved = self.durable is not None and self._unsaved > 0
        if not offsets or (offsets == self._committed and not unsaved):
            if not offsets:  # nothing owed (no partitions, or all revoked)
                self.metrics.commits_ok.set(1)
            return
        if self.durable is not None:
            if self.durable.commit(session, {tp: o.offset for tp, o in offsets.items()},
                                   self.consumer, wait=final):
                self._committed = offsets
                self._unsaved = 0
                self.metrics.commits_ok.set(1)
            else:
                self._positions.clear()
                self._committed = {}
                if final:
                    raise KafkaError("the last transaction could not be committed")
            return
        try:
            # bounded: with the broker gone, learning goes on (nothing is committed)
            self.consumer.commit(offsets, timeout_ms=self.kafka.session_timeout_ms)
            self._committed = offsets
            self.metrics.commits_ok.set(1)
        except KafkaError as exc:  # e.g. a rebalance in progress: the next commit covers it
            self.metrics.commits_ok.set(0)
            if final:
                raise
            log.warning("offset commit failed, will retry with the next batch: %s", exc)


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
