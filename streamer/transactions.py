"""The durable point of a group member: users' changed state, θ's delta and
the source offsets, in one Kafka transaction.

A commit writes the changed users' values to their changelog partitions, the
restore markers owed (:mod:`streamer.changelog`), one update with θ's delta to
the updates topic (:mod:`streamer.updates`), and sends the offsets with the
transaction's tag as their metadata. If any of it fails, the transaction is
aborted, the producer is made anew under a new incarnation, and the session goes
back to the last durable point: the records since are read again and learned
once. The checkpoint is taken on the loop's thread; the transaction goes to the
broker on a worker thread while the loop learns on, and its outcome is applied
on the loop's thread when it is known.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from metarec.session import Checkpoint, StreamSession
from streamer import changelog, updates
from streamer.cluster import Cluster
from streamer.config import KafkaSettings
from streamer.kafka_io import MAX_MESSAGE_BYTES
from streamer.metrics import Metrics
from streamer.txn_log import Tag
from streamer.updates import UpdateLog

log = logging.getLogger("metarec.transactions")


def new_incarnation() -> str:
    return uuid.uuid4().hex[:12]


class Committer:
    """One transactional producer, and the sequence of its transactions."""

    def __init__(self, cluster: Cluster, kafka: KafkaSettings, update_log: UpdateLog,
                 metrics: Metrics, incarnation: str, notifier: KafkaProducer):
        """``notifier``: a producer outside transactions, for the confirmations."""
        self.cluster, self.kafka, self.metrics = cluster, kafka, metrics
        self.transactional_id = kafka.transactional_id()
        self.update_log = update_log
        self.notifier = notifier
        self.incarnation, self.seq = incarnation, 0
        self._stamp = 0
        update_log.own.setdefault(incarnation, 0)
        # what the next transaction must confirm: restore markers by changelog
        # partition, and the same facts for the updates topic
        self.markers: dict[int, list[tuple[str, int]]] = {}
        self.confirms: dict[str, int] = {}
        self.producer: KafkaProducer | None = None
        self._open()
        # transactions go to the broker from one worker thread, one at a time
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="metarec-commit")
        self._flight: tuple[_Transaction, Future[None]] | None = None

    def _open(self) -> None:
        """A producer of this member's transactional id: starting it aborts what an
        earlier one (a crashed run of this member) left open."""
        self.producer = self.cluster.producer(transactional_id=self.transactional_id,
            acks="all", linger_ms=5, batch_size=256 * 1024,
            max_request_size=2 * MAX_MESSAGE_BYTES,
            transaction_timeout_ms=max(60_000, 4 * self.kafka.session_timeout_ms))
        self.producer.init_transactions()

    def ensure_open(self) -> None:
        """A producer, if the last attempt to make one failed (starting it aborts
        what this member left open)."""
        if self.producer is None:
            try:
                self._open()
            except KafkaError as exc:
                log.warning("transactional producer not available: %s", exc)
                self.producer = None

    def revoked(self) -> None:
        """The partitions went to others: owe their changelog no more markers."""
        self.markers.clear()

    def restored(self, partition: int, committed: Tag | None) -> None:
        """``partition`` was restored as of offsets that ``committed`` committed:
        say so in the next transaction, for the restores after this one."""
        if committed is not None:
            self.markers.setdefault(partition, []).append((committed.incarnation, committed.seq))
            self.confirms[committed.incarnation] = max(
                committed.seq, self.confirms.get(committed.incarnation, 0))

    @property
    def in_flight(self) -> bool:
        return self._flight is not None

    def begin(self, session: StreamSession, offsets: dict[TopicPartition, int],
              consumer: KafkaConsumer) -> None:
        """Take the checkpoint here, and send it with ``offsets`` in a transaction on
        the worker thread: the loop goes on learning meanwhile, and
        :meth:`resolve` later applies the outcome. One at a time: resolve the
        last one first."""
        if self._flight is not None:
            raise RuntimeError("a transaction is still in flight")
        checkpoint = session.checkpoint({tp.partition: o for tp, o in offsets.items()})
        tag = Tag(self.transactional_id, self.incarnation, self.seq + 1)
        # unique across members and restarts: microseconds, and never twice here
        self._stamp = max(self._stamp + 1, time.time_ns() // 1000)
        markers = {p: list(confirmed) for p, confirmed in self.markers.items()}
        job = _Transaction(checkpoint, tag, self._stamp, markers, dict(self.confirms),
                           offsets, consumer.group_metadata())
        self._flight = (job, self._worker.submit(self._send, job))

    def resolve(self, session: StreamSession, *, wait: bool) -> bool | None:
        """The outcome of the transaction in flight, once it is known (None: none
        in flight, or not finished and ``wait`` False): True, it is durable; False,
        it failed, and the session is back at the last durable point."""
        if self._flight is None or not (wait or self._flight[1].done()):
            return None
        (job, future), self._flight = self._flight, None
        exc = future.exception()
        if exc is not None:
            if not isinstance(exc, KafkaError):
                raise exc
            self._failed(exc)
            session.rollback()
            return False
        session.committed()
        tag = job.tag
        self.seq = tag.seq
        self.update_log.own[self.incarnation] = tag.seq
        self.update_log.applied[self.incarnation] = tag.seq
        for p, sent in job.markers.items():  # restores since then owe theirs still
            self.markers[p] = [m for m in self.markers.get(p, []) if m not in sent]
            if not self.markers[p]:
                del self.markers[p]
        for inc, seq in job.confirms.items():
            if self.confirms.get(inc) == seq:
                del self.confirms[inc]
        self.metrics.producer_ok.set(1)
        log.debug("transaction %s committed: %d user value(s), θ rows %s, offsets %s",
                  tag.text(), sum(len(v) for v in job.checkpoint.users.values()),
                  {n: len(r) for n, r in job.checkpoint.theta.rows.items()}
                  if job.checkpoint.theta is not None else {},
                  {tp.partition: o for tp, o in job.offsets.items()})
        key, value, headers = updates.confirmation(tag)
        try:  # not waited for: the next transaction confirms it too
            self.notifier.send(self.kafka.updates(), key=key, value=value, partition=0,
                               headers=headers)
        except KafkaError as exc:
            log.debug("confirmation of %s not sent: %s", tag.text(), exc)
        return True

    def _send(self, job: _Transaction) -> None:
        """On the worker thread: the transaction's records, offsets and commit."""
        if self.producer is None:
            self._open()
        prod = self.producer
        assert prod is not None
        header = [job.tag.header()]
        topic = self.kafka.changelog()
        prod.begin_transaction()
        for p, values in job.checkpoint.users.items():
            for user, value in values:
                prod.send(topic, key=user.encode(), value=value, partition=p, headers=header)
        for p, confirmed in job.markers.items():
            for inc, seq in confirmed:
                key, value = changelog.confirmed_marker(inc, seq)
                prod.send(topic, key=key, value=value, partition=p, headers=header)
        stamped = {TopicPartition(topic, tp.partition): job.stamp for tp in job.offsets}
        for tp in stamped:
            key, value = changelog.stamp_marker(job.tag, job.stamp)
            prod.send(topic, key=key, value=value, partition=tp.partition, headers=header)
        for key, value, headers in updates.messages(job.tag, job.checkpoint.theta,
                                                    job.confirms):
            prod.send(self.kafka.updates(), key=key, value=value, partition=0,
                      headers=headers)
        if job.offsets:
            committed = {tp: OffsetAndMetadata(o, job.tag.text(), -1)
                         for tp, o in {**job.offsets, **stamped}.items()}
            prod.send_offsets_to_transaction(committed, job.group)
        prod.commit_transaction()

    def confirm_last(self) -> None:
        """At a clean stop: one more (empty) update, so the last transaction is
        known committed without anyone restoring this member's partitions."""
        if self.seq == 0 or self.producer is None:
            return
        tag = Tag(self.transactional_id, self.incarnation, self.seq + 1)
        try:
            self.producer.begin_transaction()
            for key, value, headers in updates.messages(tag, None, self.confirms):
                self.producer.send(self.kafka.updates(), key=key, value=value, partition=0,
                                   headers=headers)
            self.producer.commit_transaction()
        except KafkaError as exc:
            log.warning("could not confirm the last transaction (a restore of this member's "
                        "partitions will): %s", exc)

    def _failed(self, exc: KafkaError) -> None:
        self.metrics.producer_ok.set(0)
        self.metrics.commits_ok.set(0)
        log.warning("transaction %d failed (%s: %s): back to the last durable point; the "
                    "records since are read again", self.seq + 1, type(exc).__name__, exc)
        prod, self.producer = self.producer, None
        if prod is not None:
            with contextlib.suppress(KafkaError):
                prod.abort_transaction()
            prod.close(timeout=self.kafka.session_timeout_ms / 1000)
        # after an abort the incarnation ends: of its transactions only the last may
        # have been aborted, which is what tells the others' committed ones apart
        self.incarnation, self.seq = new_incarnation(), 0
        self.update_log.own[self.incarnation] = 0
        self.ensure_open()

    def close(self, timeout: float) -> None:
        self._worker.shutdown(wait=True)
        if self.producer is not None:
            self.producer.close(timeout=timeout)


@dataclass(frozen=True)
class _Transaction:
    """What one transaction sends, all taken on the loop's thread."""

    checkpoint: Checkpoint
    tag: Tag
    stamp: int
    markers: dict[int, list[tuple[str, int]]]
    confirms: dict[str, int]
    offsets: dict[TopicPartition, int]
    group: Any
