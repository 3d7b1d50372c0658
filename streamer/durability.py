"""A group member's durable state: restore on assignment, one transaction per
commit, back to the last durable point on a rebalance or a failed transaction,
and the other members' θ updates applied as they come.

kafka-python revokes every partition at a rebalance (the eager protocol), and
runs its callbacks inside the group protocol, where nothing may block; so the
callbacks only note what happened, and :meth:`DurableState.after_poll` does
the work in the loop: the session goes back to the last commit (nothing since
is durable, and the partitions' next owners read it again), and every assigned
partition is restored from the changelog, its records held back (paused) until
then.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from metarec.session import StreamSession
from metarec.theta_state import Delta, DeltaError
from streamer import changelog
from streamer.cluster import Cluster
from streamer.config import KafkaSettings
from streamer.gc_pause import gc_paused
from streamer.metrics import Metrics
from streamer.model_topic import Lineage
from streamer.transactions import Committer
from streamer.txn_log import Tag
from streamer.updates import UpdateFollower, UpdateLog, catch_up
from streamer.writer import ModelWriter

log = logging.getLogger("metarec.state")


class DurableState:
    def __init__(self, cluster: Cluster, kafka: KafkaSettings, update_log: UpdateLog,
                 metrics: Metrics, incarnation: str, writer: ModelWriter,
                 notifier: KafkaProducer):
        self.cluster, self.kafka, self.metrics = cluster, kafka, metrics
        self.writer = writer
        self.update_log = update_log
        self.committer = Committer(cluster, kafka, update_log, metrics, incarnation,
                                   notifier)
        self.follower = UpdateFollower(cluster, kafka.updates(), update_log,
                                       stall_seconds=kafka.stalled_transaction_seconds,
                                       own_id=self.committer.transactional_id)
        self._to_restore: set[TopicPartition] = set()
        self._rollback = False

    # -- group callbacks (they must not block) -------------------------------------------

    def assigned(self, consumer: KafkaConsumer, tps: list[TopicPartition]) -> None:
        consumer.pause(*tps)
        self._to_restore |= set(tps)

    def revoked(self) -> None:
        self._rollback = True
        self._to_restore.clear()
        self.committer.revoked()
        self.writer.revoked()

    def wants_commit(self, consumer: KafkaConsumer) -> bool:
        """A model version is due: commit now, and it follows."""
        return self.writer.due(consumer)

    # -- the loop ------------------------------------------------------------------------

    def after_poll(self, session: StreamSession, consumer: KafkaConsumer) -> bool:
        """Settle the transaction in flight, roll back, restore and follow as
        needed; True if the session went back to the last durable point (the caller
        forgets its positions)."""
        # a rollback or a restore must know whether the last transaction counted
        settled = self._settle(session, consumer,
                               wait=self._rollback or bool(self._to_restore))
        rolled = self._rollback or settled is False
        if self._rollback:  # the partitions assigned next are restored as they come
            self._rollback = False
            self.metrics.rollbacks.inc()
            session.rollback()
        if self._to_restore:
            self._restore(session, consumer)
        apply_updates(session, self.follower.poll(), self.update_log, self.metrics)
        return rolled

    def _settle(self, session: StreamSession, consumer: KafkaConsumer, *,
                wait: bool) -> bool | None:
        """The outcome of the transaction in flight, if known (see
        :meth:`Committer.resolve`); after a failure every assigned partition is
        restored, its records held back until then."""
        ok = self.committer.resolve(session, wait=wait)
        if ok is False:
            self.metrics.rollbacks.inc()
            self._to_restore |= consumer.assignment()
            for tp in consumer.assignment():
                consumer.pause(tp)
        return ok

    def _restore(self, session: StreamSession, consumer: KafkaConsumer) -> None:
        tps = sorted(self._to_restore & consumer.assignment(), key=lambda tp: tp.partition)
        self._to_restore.clear()
        if not tps:
            return
        t0 = time.perf_counter()
        # a transaction of this member left open (its commit failed, and so did the
        # new producer) would block the restore: a producer of its id aborts it
        self.committer.ensure_open()
        timeout = self.kafka.session_timeout_ms
        committed = {tp: consumer.committed(tp, timeout_ms=timeout) for tp in tps}
        topic = self.kafka.changelog()
        stamps = {tp.partition: consumer.committed(TopicPartition(topic, tp.partition),
                                                   timeout_ms=timeout) for tp in tps}
        found = changelog.restore(self.cluster, topic, [tp.partition for tp in tps], stamps,
                                  stall_seconds=self.kafka.stalled_transaction_seconds,
                                  own_id=self.committer.transactional_id)
        users = 0
        for tp in tps:
            c = committed[tp]
            since = c if c is not None and c >= 0 else 0
            with gc_paused():
                restored = session.restore(tp.partition, found[tp.partition].values, since)
            users += len(restored.users)
            if restored.refused:
                log.warning("partition %d: %d user value(s) of another layout or damaged, "
                            "those users start afresh", tp.partition, restored.refused)
            self.committer.restored(tp.partition, found[tp.partition].committed)
            if c is not None and c >= 0:
                consumer.seek(tp, c)
            else:
                consumer.seek_to_beginning(tp)
            # what the changelog knows committed holds for θ's updates too: the
            # last transaction of a member that died is applied before anything
            # is learned on top
            for inc, seq in found[tp.partition].confirmed.items():
                self.update_log.confirmed.note(inc, seq)
        apply_updates(session, self.follower.poll_now(), self.update_log, self.metrics)
        consumer.resume(*tps)
        self.metrics.restored_users.inc(users)
        log.info("restored %d user(s) of partition(s) %s in %.2f s", users,
                 [tp.partition for tp in tps], time.perf_counter() - t0)

    def commit(self, session: StreamSession, offsets: dict[TopicPartition, int],
               consumer: KafkaConsumer, *, wait: bool = False) -> bool:
        """Start a transaction of the session's changes and ``offsets``; the loop
        learns on while it goes to the broker (a broker round trip per commit
        would stall every record behind it). It waits for the outcome when asked
        (``wait``), and when a model version is due, so that the version holds θ
        exactly as of a durable point. False: the last transaction failed, and
        the session is back at the last durable point."""
        if self._rollback or self._to_restore:
            return False  # a rebalance happened since the last poll: nothing to commit
        if self._settle(session, consumer, wait=True) is False:
            return False
        self.committer.begin(session, offsets, consumer)
        if not (wait or self.writer.due(consumer)):
            return True
        ok = self._settle(session, consumer, wait=True)
        if ok:
            self.writer.after_commit(session, consumer)
        return bool(ok)

    def close(self, session: StreamSession, consumer: KafkaConsumer, timeout: float) -> None:
        """After the last commit: the last version (if this member is the writer)."""
        if self._settle(session, consumer, wait=True) is False:
            return  # back at the last durable point, whose version is out already
        self.writer.after_commit(session, consumer, final=True)
        self.writer.finish()
        self.committer.confirm_last()
        self.follower.close()
        self.committer.close(timeout)


def apply_updates(session: StreamSession, ready: list[tuple[Tag, Delta | None]],
                  update_log: UpdateLog, metrics: Metrics) -> int:
    """Other members' committed θ updates into the session; how many."""
    n = 0
    for tag, delta in ready:
        if delta is None or update_log.is_own(tag):
            continue
        try:
            session.apply_delta(delta)
        except DeltaError as exc:
            update_log.skipped["other_layout"] += 1
            log.warning("θ update %s/%d skipped: %s", tag.incarnation, tag.seq, exc)
            continue
        metrics.updates_applied.inc()
        n += 1
    return n


def group_theta(cluster: Cluster, kafka: KafkaSettings, session: StreamSession, lineage: Lineage,
                metrics: Metrics, incarnation: str) -> UpdateLog:
    """θ of the group into ``session`` (already holding the model version of
    ``lineage``): every committed update of every member that it does not hold.
    The returned log goes on from there, under ``incarnation`` of this process."""
    update_log = UpdateLog(own={incarnation: 0})
    update_log.applied.update(lineage.applied)
    catch_up(cluster, kafka.updates(), update_log, start=lineage.updates_offset,
             stall_seconds=kafka.stalled_transaction_seconds, own_id=kafka.transactional_id())
    apply_updates(session, update_log.ready(), update_log, metrics)
    return update_log
