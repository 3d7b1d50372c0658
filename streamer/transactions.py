"""The durable point of a group member: users' changed state, θ's delta and
the source offsets, in one Kafka transaction.

A commit writes the changed users' values to their changelog partitions, the
restore markers owed (:mod:`streamer.changelog`), one update with θ's delta to
the updates topic (:mod:`streamer.updates`), and sends the offsets with the
transaction's tag as their metadata. If any of it fails, the transaction is
aborted, the producer is made anew under a new incarnation, and the session goes
back to the last durable point: the records since are read again and learned
once.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from metarec.session import StreamSession
from streamer import changelog, updates
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

    def __init__(self, bootstrap: str, kafka: KafkaSettings, update_log: UpdateLog,
                 metrics: Metrics, incarnation: str, notifier: KafkaProducer):
        """``notifier``: a producer outside transactions, for the confirmations."""
        self.bootstrap, self.kafka, self.metrics = bootstrap, kafka, metrics
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

    def _open(self) -> None:
        """A producer of this member's transactional id: starting it aborts what an
        earlier one (a crashed run of this member) left open."""
        self.producer = KafkaProducer(
            bootstrap_servers=self.bootstrap, transactional_id=self.transactional_id,
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

    def commit(self, session: StreamSession, offsets: dict[TopicPartition, int],
               consumer: KafkaConsumer) -> bool:
        """Make the session's changes and ``offsets`` durable together; False: it
        failed, and the session is back at the last durable point."""
        checkpoint = session.checkpoint({tp.partition: o for tp, o in offsets.items()})
        tag = Tag(self.transactional_id, self.incarnation, self.seq + 1)
        header = [tag.header()]
        topic = self.kafka.changelog()
        # unique across members and restarts: microseconds, and never twice here
        self._stamp = max(self._stamp + 1, time.time_ns() // 1000)
        try:
            if self.producer is None:
                self._open()
            prod = self.producer
            assert prod is not None
            prod.begin_transaction()
            for p, values in checkpoint.users.items():
                for user, value in values:
                    prod.send(topic, key=user.encode(), value=value, partition=p,
                              headers=header)
            for p, confirmed in self.markers.items():
                for inc, seq in confirmed:
                    key, value = changelog.confirmed_marker(inc, seq)
                    prod.send(topic, key=key, value=value, partition=p, headers=header)
            stamped = {TopicPartition(topic, tp.partition): self._stamp for tp in offsets}
            for tp in stamped:
                key, value = changelog.stamp_marker(tag, self._stamp)
                prod.send(topic, key=key, value=value, partition=tp.partition, headers=header)
            for key, value, headers in updates.messages(tag, checkpoint.theta, self.confirms):
                prod.send(self.kafka.updates(), key=key, value=value, partition=0,
                          headers=headers)
            if offsets:
                committed = {tp: OffsetAndMetadata(o, tag.text(), -1)
                             for tp, o in {**offsets, **stamped}.items()}
                prod.send_offsets_to_transaction(committed, consumer.group_metadata())
            prod.commit_transaction()
        except KafkaError as exc:
            self._failed(exc)
            session.rollback()
            return False
        session.committed()
        self.seq = tag.seq
        self.update_log.own[self.incarnation] = tag.seq
        self.update_log.applied[self.incarnation] = tag.seq
        self.markers.clear()
        self.confirms.clear()
        self.metrics.producer_ok.set(1)
        log.debug("transaction %s committed: %d user value(s), θ rows %s, offsets %s",
                  tag.text(), sum(len(v) for v in checkpoint.users.values()),
                  {n: len(r) for n, r in checkpoint.theta.rows.items()}
                  if checkpoint.theta is not None else {},
                  {tp.partition: o for tp, o in offsets.items()})
        key, value, headers = updates.confirmation(tag)
        try:  # not waited for: the next transaction confirms it too
            self.notifier.send(self.kafka.updates(), key=key, value=value, partition=0,
                               headers=headers)
        except KafkaError as exc:
            log.debug("confirmation of %s not sent: %s", tag.text(), exc)
        return True

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
        if self.producer is not None:
            self.producer.close(timeout=timeout)
