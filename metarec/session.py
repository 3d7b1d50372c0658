"""The stream session: raw records in; predictions, dead letters, meta-updates,
drift alarms, model snapshots and a status out.

It decodes and validates each record, merges partitions by event time, joins
clicks to impressions, predicts then learns in micro-batches, evaluates, feeds
the drift detectors and meta-updates when due. It knows nothing of where records
come from or where its outputs go: the Kafka consumer and the file replay both
drive it, so they behave the same.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from metarec.drift import DriftConfig, DriftEvent, DriftMonitor
from metarec.drift import Features as DriftFeatures
from metarec.encoding import Encoder
from metarec.evaluation import Prequential
from metarec.events import Click, Impression, Rejected, decode_event
from metarec.features import (
    CONTEXT_CACHE_BYTES,
    MAX_CACHED_TOKEN,
    SLOT_CACHE_BYTES,
    TOKEN_CACHE_BYTES,
)
from metarec.joiner import JoinConfig, Joiner, Labelled, Scored
from metarec.learner import LEARN, PREDICT, LearnerConfig, MetaReport, OnlineLearner
from metarec.model import Theta, segments
from metarec.ordering import EventTimeOrder, Held, OrderConfig
from metarec.predictions import Predictions
from metarec.records import DeadLetter, Record
from metarec.snapshot import SCHEMA
from metarec.task_key import TaskKey
from metarec.theta_state import Delta, ThetaState
from metarec.user_state import Restored, UserChanges, UserCodec

#: labelled predictions (or seconds) between feeds of the drift detectors: they
#: see the same sequence either way, and one call per chunk costs less than one
#: per micro-batch
DRIFT_EVERY_LABELS = 1000
DRIFT_EVERY_SECONDS = 1.0


class CacheConfig(BaseModel):
    """The encoder's caches of hashed feature slots, bounded in bytes (by estimate;
    0: no cache)."""

    item_cache_bytes: int = Field(SLOT_CACHE_BYTES, ge=0, description="bytes of items' "
                                  "feature maps and hashed slots the encoder caches at most")
    user_cache_bytes: int = Field(SLOT_CACHE_BYTES, ge=0, description="bytes of users' "
                                  "feature maps and hashed slots the encoder caches at most")
    context_cache_bytes: int = Field(CONTEXT_CACHE_BYTES, ge=0, description="bytes of "
                                     "contexts and their hashed slots the encoder caches at "
                                     "most")
    token_cache_bytes: int = Field(
        TOKEN_CACHE_BYTES, ge=0, description="bytes of feature tokens and their hash buckets "
        f"cached at most; tokens over {MAX_CACHED_TOKEN} characters are not cached")


class SessionConfig(BaseModel):
    """Everything a stream session does with records, defined once."""

    max_record_bytes: int = Field(65536, ge=64, description="larger records are "
                                  "dead-lettered")
    max_future_skew_seconds: float = Field(
        86400.0, gt=0, description="events this far ahead of the wall clock are dead-lettered")
    max_batch_records: int = Field(200, ge=1, description="events per micro-batch at most "
                                   "(θ takes its online step between micro-batches)")
    join: JoinConfig = Field(default_factory=JoinConfig)
    order: OrderConfig = Field(default_factory=OrderConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)


@dataclass
class SessionOutput:
    """What one call of the session produced."""

    records: int = 0
    events: Counter[str] = field(default_factory=Counter)
    predictions: Predictions = field(default_factory=Predictions)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    meta: list[MetaReport] = field(default_factory=list)
    drift: list[DriftEvent] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class SessionStatus:
    """The session's state as figures, for logs, metrics and health."""

    records: int
    predictions: int
    users: int
    examples_learned: int
    meta_updates: int
    pending_impressions: int
    pending_bytes: int
    buffered_records: int
    watermark: float
    dead_letters: dict[str, int]
    join_outcomes: dict[str, int]
    psi: dict[tuple[str, str], float]
    drift_alarms: int  # drift episodes opened
    open_episodes: list[tuple[str, str]]  # (signal, segment) of those open now


@dataclass(frozen=True)
class Checkpoint:
    """What a durable point writes: changed users' values by partition, and θ's
    delta since the last one (None: unchanged)."""

    users: dict[int, list[tuple[str, bytes]]]
    theta: Delta | None


@dataclass(frozen=True)
class ModelSnapshot:
    """θ as of now (a copy: learning goes on), and what a manifest says of it."""

    theta: Theta
    algorithm: str
    config_hash: str
    examples_learned: int


def config_hash(config: LearnerConfig) -> str:
    """What fixes the layout of θ: its width and the sizes of its hashed tables.
    Two configurations of one hash load each other's snapshots; learning rates,
    schedules and slot counts are not in it, so retuning them continues a model."""
    f = config.model.features
    layout = (f"{SCHEMA}|dim={config.model.dim}|item_buckets={f.item_buckets}"
              f"|feature_buckets={f.feature_buckets}")
    if config.model.init_segment is not None:  # θ has the segments' offsets
        layout += (f"|init_segment={config.model.init_segment}"
                   f"|init_segment_buckets={config.model.init_segment_buckets}")
    return hashlib.sha256(layout.encode()).hexdigest()[:16]


class StreamSession:
    def __init__(self, config: SessionConfig, theta: Theta | None = None, *,
                 keep_all: bool = False, wall_clock: bool = True,
                 event_times: tuple[float, float] = (-math.inf, math.inf),
                 durable: bool = False, examples_learned: int = 0):
        """``theta``: a loaded model to start from (default: a fresh one).
        ``keep_all``: keep every prediction for :meth:`quality`. ``wall_clock``
        False: no partition ever counts as idle, so the result depends on the
        records alone (a replay). ``event_times``: events outside [from, to) are
        counted and skipped. ``durable``: keep track of what changed, for
        :meth:`checkpoint` (a state store's changelog). ``examples_learned``: what
        ``theta`` had learned already (manifests count from there)."""
        self.config = config
        #: the learner (public for tests and benchmarks that examine it; the streamer
        #: uses :meth:`status` and :meth:`snapshot`)
        self.learner = OnlineLearner(config.learner, theta=theta,
                                     examples_learned=examples_learned)
        self._joiner = Joiner.of(config.join)
        self._order: EventTimeOrder[tuple[Record, Impression | Click]] = EventTimeOrder.of(
            config.order)
        self._ready: list[Held[tuple[Record, Impression | Click]]] = []  # released, unlearned
        self._ready_at: list[float] = []  # when each was released
        self._wall_clock = wall_clock
        self._event_times = event_times
        self._records = 0
        c = config.cache
        self._encoder = Encoder(config.learner.model.features,
                               item_cache_bytes=c.item_cache_bytes,
                               user_cache_bytes=c.user_cache_bytes,
                               context_cache_bytes=c.context_cache_bytes,
                               token_cache_bytes=c.token_cache_bytes,
                               task_key=TaskKey(config.learner.task_context),
                               segments=segments(config.learner.model))
        self._evaluation = Prequential(keep_all=keep_all)
        self._drift = DriftMonitor(config.drift)
        self._dead_letters: Counter[str] = Counter()
        # labelled predictions for the drift monitor, with their impressions
        self._drift_pending: list[tuple[Predictions, list[Impression]]] = []
        self._drift_count = 0
        self._drift_at = time.monotonic()
        self._changes: UserChanges | None = UserChanges() if durable else None
        self._theta_state = ThetaState(self.learner) if durable else None
        self._codec = UserCodec(self.learner.users, config_hash(config.learner))
        # of partitions restored from the state store: offsets already learned from,
        # and the scores of impressions that wait for their label
        self._skip: dict[int, set[int]] = {}
        self._restored_scores: dict[tuple[int, int], tuple[float, int]] = {}

    # -- records in ----------------------------------------------------------------------

    def process(self, records: Sequence[Record], caught_up: Collection[int] | None = None,
                *, flush: bool = True, paused: Collection[int] = ()) -> SessionOutput:
        """Raw records, each partition's in its order. ``caught_up``: partitions
        known to be at the end of their log (they do not hold the others back; see
        :class:`metarec.ordering.EventTimeOrder`). Released events are learned in
        micro-batches of ``max_batch_records`` events; with ``flush`` False, fewer
        wait for more, so the micro-batches (and θ's steps between them) are the
        same however the records arrive: a backlog consumed from any number of
        partitions learns as a replay of the same events does. ``paused``: partitions
        the reader stopped fetching (silent, but not idle)."""
        t0 = time.perf_counter()
        result = SessionOutput(records=len(records))
        self._records += len(records)
        now = time.monotonic()
        clock = now if self._wall_clock else None
        # Against the wall clock too: a unit mistake far in the future is garbage
        # whatever the stream's own progress says.
        wall = time.time()
        latest = wall + self.config.max_future_skew_seconds
        lo, hi = self._event_times
        max_bytes, order, counts = self.config.max_record_bytes, self._order, result.events
        dead = result.dead_letters
        skip = self._skip
        for rec in records:
            if skip and rec.offset in skip.get(rec.partition, ()):
                # learned before the crash: not again, but its id is remembered,
                # so a later repeat of it is still a duplicate
                counts["already_learned"] += 1
                done = decode_event(rec.value, max_bytes=max_bytes)
                if isinstance(done, Impression):
                    self._joiner.remember(done)
                continue
            event = decode_event(rec.value, max_bytes=max_bytes)
            if not isinstance(event, Rejected) and event.timestamp > latest:
                event = Rejected("bad_timestamp",
                                 f"{event.timestamp - wall:.0f} s ahead of the wall clock")
            if isinstance(event, Rejected):
                dead.append(DeadLetter(rec, event.reason, event.detail))
                continue
            if not lo <= event.timestamp < hi:
                counts["outside_range"] += 1
                continue
            counts[event.type] += 1
            for held in order.add(event.timestamp, rec.partition, rec.offset, (rec, event), now):
                dead.append(self._ahead(held))
        released, rejected = order.release(caught_up, clock, paused)
        dead += [self._ahead(held) for held in rejected]
        self._ready += released
        self._ready_at += [now] * len(released)
        self._learn(result, flush=flush)
        result.seconds = time.perf_counter() - t0
        return result

    def finish(self) -> SessionOutput:
        """End of a finite log: release what every partition still holds, then
        every window is over: label what is still pending."""
        result = SessionOutput()
        released, rejected = self._order.finish()
        result.dead_letters += [self._ahead(held) for held in rejected]
        self._ready += released
        self._ready_at += [time.monotonic()] * len(released)
        self._learn(result, flush=True)
        closed = SessionOutput()
        self._learn(closed, flush=True, closed=self._joiner.close_all())
        result.predictions = Predictions.concat([result.predictions, closed.predictions])
        result.meta += closed.meta
        result.drift += closed.drift + self.flush_drift()
        return result

    # -- partitions ----------------------------------------------------------------------

    def track(self, partitions: Iterable[int], now: float) -> None:
        """Partitions assigned to this reader (they hold the release back until
        they deliver, catch up or fall idle)."""
        self._order.track(partitions, now)

    def revoke(self, partitions: Collection[int]) -> None:
        """Partitions given to another reader: drop what of them is not yet learned
        (the new owner reads it again from the last commit, which never passed it)."""
        self._order.revoke(partitions)
        kept = [i for i, h in enumerate(self._ready) if h.partition not in partitions]
        self._ready = [self._ready[i] for i in kept]
        self._ready_at = [self._ready_at[i] for i in kept]
        self._joiner.revoke(partitions)
        for p in partitions:
            self._skip.pop(p, None)
        self._restored_scores = {k: v for k, v in self._restored_scores.items()
                                 if k[0] not in partitions}

    # -- durable state -------------------------------------------------------------------

    def checkpoint(self, committed: dict[int, int]) -> Checkpoint:
        """What changed since the last durable point, as of the source offsets about
        to be ``committed`` (by partition); :meth:`committed` once it is durable, or
        :meth:`rollback` if it cannot be made so."""
        if self._changes is None or self._theta_state is None:
            raise ValueError("checkpoint of a session made without durable=True")
        users: dict[int, list[tuple[str, bytes]]] = {}
        for p, (ids, done, scores) in self._changes.take(committed).items():
            users[p] = list(zip(ids, self._codec.encode(ids, done, scores), strict=True))
        return Checkpoint(users, self._theta_state.take())

    def committed(self) -> None:
        """The last checkpoint is durable."""
        if self._theta_state is not None:
            self._theta_state.committed()

    def rollback(self) -> None:
        """Back to the last durable point: θ to its state then, every user and every
        partition forgotten (restore the assigned partitions, and read them again
        from their committed offsets)."""
        if self._theta_state is not None:
            self._theta_state.rollback()
        self.learner.users.clear()
        if self._changes is not None:
            self._changes.forget()
        self.revoke(set(self._order.buffered()) | set(self._skip)
                    | {h.partition for h in self._ready})
        self._joiner.reset()

    def restore(self, partition: int, values: Iterable[tuple[str, bytes]],
                since: int) -> Restored:
        """Users of ``partition`` from the state store, before its first record is
        read again from offset ``since``."""
        found = self._codec.decode(values, since=since)
        if self._changes is not None:
            self._changes.restored(partition, found)
        self._skip[partition] = {o for offsets in found.done.values() for o in offsets}
        self._restored_scores.update(((partition, o), s) for pending in found.scores.values()
                                     for o, s in pending.items())
        return found

    def apply_delta(self, delta: Delta) -> None:
        """Another member's durable change of θ."""
        if self._theta_state is None:
            raise ValueError("apply_delta on a session made without durable=True")
        self._theta_state.apply(delta)

    def held_offsets(self) -> dict[int, int]:
        """The lowest offset per partition not yet fully learned from (buffered for
        ordering, or an impression waiting for its label): commit no further."""
        held = self._order.held_offsets()
        for h in self._ready:
            if h.offset >= 0:
                held[h.partition] = min(h.offset, held.get(h.partition, h.offset))
        for p, offset in self._joiner.oldest_offsets().items():
            held[p] = min(offset, held.get(p, offset))
        return held

    def buffered(self) -> dict[int, int]:
        """Events held for ordering, by partition (not those released and waiting
        to fill a micro-batch)."""
        return self._order.buffered()

    def buffered_total(self) -> int:
        """Events held for ordering or waiting to fill a micro-batch."""
        return sum(self._order.buffered().values()) + len(self._ready)

    def ready_seconds(self, now: float) -> float:
        """How long released events have waited to fill a micro-batch (0: none)."""
        return now - self._ready_at[0] if self._ready_at else 0.0

    # -- outputs -------------------------------------------------------------------------

    def flush_drift(self) -> list[DriftEvent]:
        """Feed the drift detectors every labelled prediction held back so far."""
        pending, self._drift_pending = self._drift_pending, []
        self._drift_count, self._drift_at = 0, time.monotonic()
        if not pending:
            return []
        imps = [imp for _, impressions in pending for imp in impressions]
        field_name = self._drift.config.segment_field
        segments = [imp.context.get(field_name) for imp in imps]
        return self._drift.update_batch(
            np.concatenate([preds.p for preds, _ in pending]),
            np.concatenate([preds.label for preds, _ in pending]),
            np.concatenate([preds.timestamp for preds, _ in pending]),
            [item for preds, _ in pending for item in preds.item_id],
            [None if seg is None else str(seg) for seg in segments],
            [user for preds, _ in pending for user in preds.user_id],
            DriftFeatures([imp.context for imp in imps], [imp.user_features for imp in imps],
                          [imp.item_features for imp in imps]))

    def snapshot(self) -> ModelSnapshot:
        learner = self.learner
        return ModelSnapshot({k: v.detach().clone() for k, v in learner.theta.items()},
                             learner.config.meta.algorithm.value, config_hash(learner.config),
                             learner.examples_learned)

    def status(self) -> SessionStatus:
        learner, joiner = self.learner, self._joiner
        return SessionStatus(
            records=self._records, predictions=self._evaluation.count, users=len(learner.users),
            examples_learned=learner.examples_learned, meta_updates=learner.meta_updates,
            pending_impressions=joiner.pending, pending_bytes=joiner.pending_bytes,
            buffered_records=self.buffered_total(), watermark=joiner.watermark,
            dead_letters=dict(self._dead_letters), join_outcomes=dict(joiner.stats),
            psi=dict(self._drift.latest_psi),
            drift_alarms=sum(e.state == "open" for e in self._drift.events),
            open_episodes=self._drift.open_episodes())

    def event_time(self) -> float:
        """The newest event time the joiner's clock has reached (-inf: none yet)."""
        return self._joiner.watermark + self._joiner.lateness

    def windowed_quality(self) -> tuple[float, float]:
        """Logloss and AUC over the latest labelled predictions (NaN: too few)."""
        return self._evaluation.windowed()

    def quality(self) -> dict[str, object]:
        """The whole-run prequential summary (with ``keep_all``)."""
        return self._evaluation.summary()

    def drift_events(self) -> list[DriftEvent]:
        return list(self._drift.events)

    # -- learning ------------------------------------------------------------------------

    def _learn(self, result: SessionOutput, *, flush: bool,
               closed: Sequence[Labelled] = ()) -> None:
        """Join, predict and learn the released events (then ``closed``), in
        micro-batches of ``max_batch_records`` events (the last one shorter only
        with ``flush``): one poll may release thousands that waited for a slower
        partition, and θ takes its online step (and a meta-update falls due)
        between micro-batches, as in a replay of the same events."""
        size = self.config.max_batch_records
        cut = len(self._ready) if flush else len(self._ready) // size * size
        released, self._ready = self._ready[:cut], self._ready[cut:]
        del self._ready_at[:cut]
        learned: list[Labelled] = []
        for start in range(0, len(released), size):
            batch = _OpsBuilder()
            self._join(released[start:start + size], batch, result)
            self._step(batch, learned, result)
        for start in range(0, len(closed), size):
            batch = _OpsBuilder()
            batch.learn_all(list(closed[start:start + size]))
            self._step(batch, learned, result)
        self._account(learned, result)

    def _join(self, released: list[Held[tuple[Record, Impression | Click]]],
              batch: _OpsBuilder, result: SessionOutput) -> None:
        joiner = self._joiner
        for held in released:
            rec, event = held.item
            closed = joiner.advance(event.timestamp)
            if closed:
                batch.learn_all(closed)
            if isinstance(event, Impression):
                restored = self._restored_scores.pop((rec.partition, rec.offset), None) \
                    if self._restored_scores else None
                if restored is None:
                    scored = Scored()
                    batch.predict(event, scored, rec.partition, rec.offset)
                else:
                    scored = Scored(*restored)
                    if self._changes is not None:
                        self._changes.scored(event.user_id, rec.partition, rec.offset,
                                             *restored)
                batch.learn_all(joiner.impression(event, scored, rec.partition, rec.offset,
                                                  len(rec.value)))
                continue
            joined = joiner.click(event, rec.partition, rec.offset)
            if isinstance(joined, Rejected):
                result.dead_letters.append(DeadLetter(rec, joined.reason, joined.detail))
            else:
                batch.learn_all(joined)

    def _ahead(self, held: Held[tuple[Record, Impression | Click]]) -> DeadLetter:
        rec, event = held.item
        return DeadLetter(rec, "ahead_of_stream",
                          f"event time {event.timestamp:.0f} is more than "
                          f"{self.config.order.max_ahead_seconds:.0f} s ahead of all that "
                          f"partition {rec.partition} had given, and the records after it "
                          "went on far behind it")

    def _step(self, batch: _OpsBuilder, learned: list[Labelled],
              result: SessionOutput) -> None:
        """One micro-batch through the learner, then a meta-update if one is due."""
        if batch.ops:
            ops = self._encoder.encode(*zip(*batch.ops, strict=True))
            scores = self.learner.process(ops)
            changes = self._changes
            for (i, scored), (partition, offset) in zip(batch.scored, batch.origins,
                                                        strict=True):
                scored.p, scored.k = float(scores.p[i]), int(scores.k[i])
                if changes is not None:
                    changes.scored(batch.ops[i][0].user_id, partition, offset, scored.p,
                                   scored.k)
        learned += batch.learned
        if self.learner.meta_due:
            report = self.learner.meta_update()
            if report is not None:
                result.meta.append(report)

    def _account(self, learned: list[Labelled], result: SessionOutput) -> None:
        """Evaluation, drift and counters of what a call learned."""
        if learned and self._changes is not None:
            changes = self._changes
            task_key = self._encoder.task_key
            for lab in learned:
                imp = lab.impression
                changes.learned(imp.user_id, lab.partition, (lab.offset, lab.click_offset))
                if task_key.field is not None:
                    changes.touched(task_key.of(imp.user_id, imp.context), lab.partition)
        if learned:
            preds = result.predictions = Predictions.of(learned)
            self._evaluation.update(preds.p, preds.label, preds.k)
            self._drift_pending.append((preds, [lab.impression for lab in learned]))
            self._drift_count += len(preds)
        if self._drift_count >= DRIFT_EVERY_LABELS or (
                self._drift_count and time.monotonic() - self._drift_at >= DRIFT_EVERY_SECONDS):
            result.drift = self.flush_drift()
        for dead in result.dead_letters:
            self._dead_letters[dead.reason] += 1


class _OpsBuilder:
    """Ops in stream order, with what is needed to map scores back."""

    def __init__(self) -> None:
        self.ops: list[tuple[Impression, int, float]] = []
        self.scored: list[tuple[int, Scored]] = []
        self.origins: list[tuple[int, int]] = []  # (partition, offset) of each scored
        self.learned: list[Labelled] = []

    def predict(self, imp: Impression, scored: Scored, partition: int, offset: int) -> None:
        self.scored.append((len(self.ops), scored))
        self.origins.append((partition, offset))
        self.ops.append((imp, PREDICT, 0.0))

    def learn_all(self, labelled: list[Labelled]) -> None:
        self.learned += labelled
        self.ops += [(lab.impression, LEARN, lab.label) for lab in labelled]


__all__ = ["CacheConfig", "Checkpoint", "ModelSnapshot", "SessionConfig", "SessionOutput",
           "SessionStatus", "StreamSession", "config_hash"]
