"""What ``metarec serve`` holds: the group's committed state, followed from the
topics into a :class:`~metarec.live_model.LiveModel`.

* θ: the newest model version of this layout (or the fresh initialisation the
  group starts from), then every committed update on the updates topic after
  the version's place among them, as a member's θ is built
  (:func:`streamer.durability.group_theta`).
* Users: every value on the changelog, applied once its transaction is known
  committed (:mod:`streamer.txn_log`: the updates topic says so within a moment
  of each commit). The topics are read uncommitted, so a member that died with
  a transaction open holds nothing back; its values are never confirmed, and
  are dropped after :data:`UNCONFIRMED_SECONDS`.
* The model version it reports: the newest whose updates it holds.

One thread polls; scoring and applying take turns on a lock, so a request sees
whole transactions only.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition

from metarec.live_model import Candidate, Features, LiveModel, Scores
from metarec.model import init_theta
from metarec.session import config_hash
from streamer import kafka_io, lineage
from streamer.changelog import CONFIRMED, MARKER
from streamer.cluster import Cluster
from streamer.config import Settings
from streamer.kafka_io import MAX_MESSAGE_BYTES
from streamer.model_topic import Lineage, VersionAssembler
from streamer.serving_metrics import ServingMetrics
from streamer.txn_log import Tag
from streamer.updates import UpdateLog

log = logging.getLogger("metarec.serve")

#: a transaction's values still unconfirmed after this long are of one that never
#: committed (its member died, or it was aborted): dropped
UNCONFIRMED_SECONDS = 300.0


@dataclass(frozen=True)
class Health:
    ready: bool  # caught up once with the topics as they were at the start
    model_version: int | None
    examples_learned: int
    users: int
    lag_records: dict[str, int]  # by topic: records not yet read (-1: not known yet)
    staleness_seconds: float  # since the server last held everything on the topics
    updates_applied: int


@dataclass
class _Transaction:
    seen: float  # when its first value was read (monotonic)
    written: float  # when its member wrote the first (the record's timestamp, epoch s)
    values: list[tuple[str, bytes, int]] = field(default_factory=list)


class LiveState:
    def __init__(self, cluster: Cluster, settings: Settings, metrics: ServingMetrics):
        self.cluster, self.settings, self.metrics = cluster, settings, metrics
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.model: LiveModel | None = None
        self._version: int | None = None
        self._versions: list[tuple[int, Lineage]] = []  # newer ones, not yet held
        self._assembler = VersionAssembler()
        self._updates = UpdateLog(own={})
        self._pending: dict[tuple[str, int], _Transaction] = {}
        self._ready = threading.Event()
        self._started_at = time.monotonic()
        self._caught_up_at: float | None = None
        self._updates_applied = 0
        self._consumer: KafkaConsumer | None = None
        self._tps: dict[str, list[TopicPartition]] = {}
        self._ends: dict[TopicPartition, int] = {}  # what "ready" waits for
        self._last_lag: dict[str, int] = {}
        # read when scraped: a follower that stopped shows as growing staleness
        metrics.staleness.set_function(lambda: self._staleness(time.monotonic()))

    # -- the follower --------------------------------------------------------------------

    def start(self) -> None:
        """Load θ and start following (the first catch-up happens on the thread)."""
        self._load()
        self._thread = threading.Thread(target=self._follow, name="state-follower",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        """Caught up once, and still following."""
        return self._ready.is_set() and self._thread is not None and self._thread.is_alive()

    def _load(self) -> None:
        s, k = self.settings, self.settings.kafka
        kafka_io.ensure_topics(self.cluster, k)
        cons = self.cluster.consumer(group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             isolation_level="read_uncommitted",
                             # fewer, fuller fetches: each costs the requests' thread
                             fetch_min_bytes=64 << 10, fetch_max_wait_ms=s.serve.poll_ms,
                             max_partition_fetch_bytes=2 * MAX_MESSAGE_BYTES)
        model_tp = TopicPartition(k.model_topic, 0)
        # versions published from here on are followed; the newest before is loaded
        model_end = cons.end_offsets([model_tp])[model_tp]
        start = lineage.newest(self.cluster, k.model_topic, s.session.learner)
        learner = s.session.learner
        theta = start.theta if start.theta is not None else init_theta(learner.model,
                                                                       learner.seed)
        self.model = LiveModel(s.session, theta, examples_learned=start.examples_learned)
        # compile the scoring kernels now, not in the first requests; then move what
        # is alive (modules, kernels) out of the collector's reach, or every full
        # collection walks it all and stalls the requests in flight
        self.model.score("warm-up", [("warm-up", {})], context={"warm": "up"},
                         user_features={"warm": "up"})
        gc.collect()
        gc.freeze()
        self._version = start.parent
        self._updates.applied.update(start.lineage.applied)
        self._updates.position = start.lineage.updates_offset
        changelog = [TopicPartition(k.changelog(), p)
                     for p in sorted(cons.partitions_for_topic(k.changelog()) or {0})]
        updates_tp = TopicPartition(k.updates(), 0)
        self._tps = {"model": [model_tp], "updates": [updates_tp], "changelog": changelog}
        cons.assign([model_tp, updates_tp, *changelog])
        cons.seek(model_tp, model_end)
        cons.seek(updates_tp, start.lineage.updates_offset)
        for tp in changelog:
            cons.seek_to_beginning(tp)
        self._ends = cons.end_offsets([updates_tp, *changelog])
        self._consumer = cons
        log.info("θ from model version %s (%d examples learned); following %s from offset "
                 "%d and %d changelog partition(s) of %s", start.parent or "none (fresh)",
                 start.examples_learned, k.updates(), start.lineage.updates_offset,
                 len(changelog), k.changelog())

    def _follow(self) -> None:
        assert self._consumer is not None
        try:
            while not self._stop.is_set():
                self.poll_once(self.settings.serve.poll_ms)
        except Exception:  # the server must say it is not following, not serve stale
            log.exception("following the topics failed; the server reports itself unready")
            self._ready.clear()
            raise
        finally:
            self._consumer.close()

    def poll_once(self, timeout_ms: int) -> None:
        cons = self._consumer
        assert cons is not None and self.model is not None
        polled = cons.poll(timeout_ms=timeout_ms, max_records=1000)
        k = self.settings.kafka
        now = time.time()
        for tp, msgs in polled.items():
            if tp.topic == k.model_topic:
                for m in msgs:
                    self._model_record(m.key, m.value, m.headers)
            elif tp.topic == k.updates():
                for m in msgs:
                    self._updates.add(m.offset, m.key, m.value, m.headers)
            else:
                for m in msgs:
                    self._changelog_record(m.key, m.value, m.headers, m.offset, m.timestamp)
        self._apply(now)
        self._watch(cons)

    def _model_record(self, key: bytes | None, value: bytes | None,
                      headers: list[tuple[str, bytes]] | None) -> None:
        before = self._assembler.newest
        self._assembler.add(key, value, headers)
        newest = self._assembler.newest
        if newest is not None and newest is not before:
            m = newest.manifest
            if m.config_hash == config_hash(self.settings.session.learner):
                self._versions.append((m.version, m.lineage))
            else:
                self._skip("other_layout_version")
                log.warning("model version %d is of another layout (config hash %s): not "
                            "followed; restart the server with that version's settings",
                            m.version, m.config_hash)

    def _changelog_record(self, key: bytes | None, value: bytes | None,
                          headers: list[tuple[str, bytes]] | None, offset: int,
                          timestamp_ms: int) -> None:
        if key is not None and key.startswith(MARKER):
            if key.startswith(CONFIRMED):
                try:
                    self._updates.confirmed.note(key[len(CONFIRMED):].decode(),
                                                 int(value or b""))
                except (ValueError, UnicodeDecodeError):
                    self._skip("bad_marker")
            return
        tag = Tag.of(headers)
        if tag is None or key is None or value is None:
            return self._skip("not_ours")
        try:
            user = key.decode()
        except UnicodeDecodeError:
            return self._skip("bad_key")
        self._updates.confirmed.saw(tag)
        pend = self._pending.setdefault((tag.incarnation, tag.seq),
                                        _Transaction(time.monotonic(), timestamp_ms / 1000))
        pend.values.append((user, value, offset))

    def _skip(self, reason: str, n: int = 1) -> None:
        self.metrics.skipped.labels(reason).inc(n)

    def _apply(self, now: float) -> None:
        """Everything known committed, under the lock: θ's updates, then users."""
        assert self.model is not None
        ready = self._updates.ready()
        confirmed = self._updates.confirmed
        done = [self._pending.pop(key) for key in list(self._pending)
                if key[1] <= confirmed.get(key[0], 0)]
        values = [v for t in done for v in t.values]
        stale = [key for key, t in self._pending.items()
                 if time.monotonic() - t.seen > UNCONFIRMED_SECONDS]
        for key in stale:
            n = len(self._pending.pop(key).values)
            self._skip("unconfirmed", n)
            log.warning("dropped %d user value(s) of transaction %s/%d, never confirmed "
                        "committed", n, *key)
        if not ready and not values:
            return
        values.sort(key=lambda v: v[2])
        decoded = self.model.decode_users(values)  # outside the lock: requests go on
        if decoded.refused:
            self._skip("bad_value", decoded.refused)
        with self._lock:
            for tag, delta in ready:
                if delta is None:
                    continue
                try:
                    self.model.apply_delta(delta)
                except ValueError as exc:
                    self._skip("other_layout_update")
                    log.warning("θ update %s/%d skipped: %s", tag.incarnation, tag.seq, exc)
                    continue
                self._updates_applied += 1
            self.model.set_users(decoded)
            self._hold_versions()
        self.metrics.updates_applied.inc(sum(d is not None for _, d in ready))
        self.metrics.user_values_applied.inc(len(values))
        for t in done:  # from the member's write to these values being served
            self.metrics.state_delay.observe(max(0.0, now - t.written))

    def _hold_versions(self) -> None:
        """The newest version whose updates θ holds is the one reported."""
        applied = self._updates.applied
        for version, lin in list(self._versions):
            if all(applied.get(inc, 0) >= seq for inc, seq in lin.applied.items()):
                self._version = max(self._version or 0, version)
                self._versions.remove((version, lin))

    def _watch(self, cons: KafkaConsumer) -> None:
        lag = self._last_lag = self._lag(cons)
        for topic, n in lag.items():
            self.metrics.lag.labels(topic).set(n)
        now = time.monotonic()
        if all(n == 0 for n in lag.values()):
            self._caught_up_at = now
        if not self._ready.is_set() and all(
                cons.position(tp) >= end for tp, end in self._ends.items()):
            self._ready.set()
            log.info("caught up in %.1f s: %d user(s), model version %s",
                     now - self._started_at, self.model.users if self.model else 0,
                     self._version)
        model = self.model
        assert model is not None
        self.metrics.users.set(model.users)
        self.metrics.model_version.set(self._version or 0)

    def _lag(self, cons: KafkaConsumer) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, tps in self._tps.items():
            total = 0
            for tp in tps:
                high, pos = cons.highwater(tp), cons.position(tp)
                if high is None or pos is None:
                    total = -1
                    break
                total += max(0, high - pos)
            out[name] = total
        return out

    def _staleness(self, now: float) -> float:
        since = self._caught_up_at if self._caught_up_at is not None else self._started_at
        return now - since

    # -- requests ------------------------------------------------------------------------

    def score(self, user_id: str, candidates: Sequence[Candidate], *,
              context: Features | None, user_features: Features | None
              ) -> tuple[Scores, int | None]:
        """Scores, and the model version they were made with."""
        model = self.model
        assert model is not None
        with self._lock:
            return model.score(user_id, candidates, context=context,
                               user_features=user_features), self._version

    def health(self) -> Health:
        model = self.model
        lag = {name: self._last_lag.get(name, -1) for name in self._tps}
        return Health(self.ready, self._version, model.examples_learned if model else 0,
                      model.users if model else 0, lag,
                      round(self._staleness(time.monotonic()), 3), self._updates_applied)


__all__ = ["UNCONFIRMED_SECONDS", "Health", "LiveState"]
