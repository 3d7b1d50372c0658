"""One micro-batch, whatever the source: decode and validate, join, predict then
learn, evaluate, meta-update when due. The Kafka consumer and the file replay
both drive this class, so they behave the same.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from metarec.datasets.synthetic import SyntheticStream
from metarec.drift import DriftConfig, DriftEvent, DriftMonitor
from metarec.encoding import Encoder
from metarec.evaluation import Prequential
from metarec.events import Click, Impression, Rejected, decode_event
from metarec.joiner import Joiner, Labelled, Scored
from metarec.learner import LEARN, PREDICT, MetaReport, OnlineLearner
from metarec.ordering import EventTimeOrder, Held
from streamer.config import Settings

#: labelled predictions (or seconds) between feeds of the drift detectors
DRIFT_EVERY_LABELS = 1000
DRIFT_EVERY_SECONDS = 1.0


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1.7 us per record
class Record:
    """A raw record and where it came from (partition/offset -1 for files);
    ``timestamp_ms`` is the Kafka record timestamp (-1: none). Read-only by convention."""

    value: bytes
    key: bytes | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp_ms: int = -1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Prediction:
    """One line of the prediction log: the score an impression got when it was seen."""

    user_id: str
    item_id: str
    timestamp: float
    k: int
    p: float
    label: int

    def to_json(self) -> str:
        ts: float | int = int(self.timestamp) if self.timestamp.is_integer() else self.timestamp
        return json.dumps({"user_id": self.user_id, "item_id": self.item_id, "timestamp": ts,
                           "k": self.k, "p": round(self.p, 6), "label": self.label})


@dataclass
class Predictions:
    """A batch's labelled predictions, as columns (one row per label)."""

    user_id: list[str] = field(default_factory=list)
    item_id: list[str] = field(default_factory=list)
    timestamp: np.ndarray = field(default_factory=lambda: np.zeros(0))
    k: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    p: np.ndarray = field(default_factory=lambda: np.zeros(0))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def of(cls, learned: list[Labelled]) -> Predictions:
        imps = [lab.impression for lab in learned]
        return cls([imp.user_id for imp in imps], [imp.item_id for imp in imps],
                   np.array([imp.timestamp for imp in imps]),
                   np.array([lab.scored.k for lab in learned], dtype=np.int64),
                   np.array([lab.scored.p for lab in learned]),
                   np.array([lab.label for lab in learned]))

    def __len__(self) -> int:
        return len(self.user_id)

    @classmethod
    def concat(cls, parts: list[Predictions]) -> Predictions:
        return cls([u for p in parts for u in p.user_id], [i for p in parts for i in p.item_id],
                   np.concatenate([p.timestamp for p in parts]),
                   np.concatenate([p.k for p in parts]), np.concatenate([p.p for p in parts]),
                   np.concatenate([p.label for p in parts]))

    def __iter__(self) -> Iterator[Prediction]:
        for user, item, ts, k, p, label in zip(self.user_id, self.item_id,
                                               self.timestamp.tolist(), self.k.tolist(),
                                               self.p.tolist(), self.label.tolist(), strict=True):
            yield Prediction(user, item, ts, k, p, int(label))


@dataclass
class BatchResult:
    records: int = 0
    events: Counter[str] = field(default_factory=Counter)
    predictions: Predictions = field(default_factory=Predictions)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    meta: list[MetaReport] = field(default_factory=list)
    drift: list[DriftEvent] = field(default_factory=list)
    seconds: float = 0.0


class Pipeline:
    def __init__(self, settings: Settings, learner: OnlineLearner, *, keep_all: bool = False,
                 wall_clock: bool = True):
        """``wall_clock`` False: no partition ever counts as idle, so the result
        depends on the records alone (a replay)."""
        self.settings = settings
        self.learner = learner
        self.joiner = Joiner(window=settings.attribution_window_seconds,
                             lateness=settings.allowed_lateness_seconds,
                             release=settings.click_release,
                             max_pending=settings.max_pending_impressions,
                             max_pending_bytes=settings.max_pending_bytes,
                             dedup_horizon=settings.dedup_horizon_seconds)
        self.order: EventTimeOrder[tuple[Record, Impression | Click]] = EventTimeOrder(
            max_ahead=settings.max_ahead_seconds, idle_after=settings.idle_partition_seconds)
        self._ready: list[Held[tuple[Record, Impression | Click]]] = []  # released, unlearned
        self._ready_at: list[float] = []  # when each was released
        self._wall_clock = wall_clock
        self.records = 0
        self.encoder = Encoder(learner.config.model.features,
                               item_cache_bytes=settings.item_cache_bytes,
                               user_cache_bytes=settings.user_cache_bytes,
                               context_cache_bytes=settings.context_cache_bytes,
                               token_cache_bytes=settings.token_cache_bytes)
        self.evaluation = Prequential(keep_all=keep_all)
        self.drift = DriftMonitor(DriftConfig(segment_field=settings.drift_segment_field,
                                              warmup=settings.drift_warmup))
        self.dead_letters: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        # The detectors are fed in chunks, not per micro-batch: their answers are the
        # same (they see the same sequence), and a chunk costs what a batch did.
        self._drift_pending: list[tuple[Predictions, list[str | None]]] = []
        self._drift_count = 0
        self._drift_at = time.monotonic()

    def process(self, records: Sequence[Record], caught_up: Collection[int] | None = None,
                *, flush: bool = True, paused: Collection[int] = ()) -> BatchResult:
        """Raw records, each partition's in its order. ``caught_up``: partitions
        known to be at the end of their log (they do not hold the others back; see
        :class:`metarec.ordering.EventTimeOrder`). Released events are learned in
        micro-batches of ``max_batch_records`` events; with ``flush`` False, fewer
        wait for more, so the micro-batches (and θ's steps between them) are the
        same however the records arrive: a backlog consumed from any number of
        partitions learns as a replay of the same events does. ``paused``: partitions
        the reader stopped fetching (silent, but not idle)."""
        t0 = time.perf_counter()
        result = BatchResult(records=len(records))
        self.records += len(records)
        now = time.monotonic()
        clock = now if self._wall_clock else None
        # Against the wall clock too: a unit mistake far in the future is garbage
        # whatever the stream's own progress says.
        wall = time.time()
        latest = wall + self.settings.max_future_skew_seconds
        lo, hi = self.settings.replay_from, self.settings.replay_to
        lo, hi = -math.inf if lo is None else lo, math.inf if hi is None else hi
        max_bytes, order, counts = self.settings.max_record_bytes, self.order, result.events
        dead = result.dead_letters
        for rec in records:
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

    def _learn(self, result: BatchResult, *, flush: bool,
               closed: Sequence[Labelled] = ()) -> None:
        """Join, predict and learn the released events (then ``closed``), in
        micro-batches of ``max_batch_records`` events (the last one shorter only
        with ``flush``): one poll may release thousands that waited for a slower
        partition, and θ takes its online step (and a meta-update falls due)
        between micro-batches, as in a replay of the same events."""
        size = self.settings.max_batch_records
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
              batch: _OpsBuilder, result: BatchResult) -> None:
        joiner = self.joiner
        for held in released:
            rec, event = held.item
            closed = joiner.advance(event.timestamp)
            if closed:
                batch.learn_all(closed)
            if isinstance(event, Impression):
                scored = Scored()
                batch.predict(event, scored)
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
                          f"{self.settings.max_ahead_seconds:.0f} s ahead of all that "
                          f"partition {rec.partition} had given, and the records after it "
                          "went on far behind it")

    def finish(self) -> BatchResult:
        """End of a finite log: release what every partition still holds, then
        every window is over: label what is still pending."""
        result = BatchResult()
        released, rejected = self.order.finish()
        result.dead_letters += [self._ahead(held) for held in rejected]
        self._ready += released
        self._ready_at += [time.monotonic()] * len(released)
        self._learn(result, flush=True)
        closed = BatchResult()
        self._learn(closed, flush=True, closed=self.joiner.close_all())
        result.predictions = Predictions.concat([result.predictions, closed.predictions])
        result.meta += closed.meta
        result.drift += closed.drift + self.flush_drift()
        return result

    def track(self, partitions: Iterable[int], now: float) -> None:
        """Partitions assigned to this reader (they hold the release back until
        they deliver, catch up or fall idle)."""
        self.order.track(partitions, now)

    def revoke(self, partitions: Collection[int]) -> None:
        """Partitions given to another reader: drop what of them is not yet learned
        (the new owner reads it again from the last commit, which never passed it)."""
        self.order.revoke(partitions)
        kept = [i for i, h in enumerate(self._ready) if h.partition not in partitions]
        self._ready = [self._ready[i] for i in kept]
        self._ready_at = [self._ready_at[i] for i in kept]
        self.joiner.revoke(partitions)

    def held_offsets(self) -> dict[int, int]:
        """The lowest offset per partition not yet fully learned from (buffered for
        ordering, or an impression waiting for its label): commit no further."""
        held = self.order.held_offsets()
        for h in self._ready:
            if h.offset >= 0:
                held[h.partition] = min(h.offset, held.get(h.partition, h.offset))
        for p, offset in self.joiner.oldest_offsets().items():
            held[p] = min(offset, held.get(p, offset))
        return held

    def buffered(self) -> dict[int, int]:
        """Events held for ordering, by partition (not those released and waiting
        to fill a micro-batch)."""
        return self.order.buffered()

    def buffered_total(self) -> int:
        """Events held for ordering or waiting to fill a micro-batch."""
        return sum(self.order.buffered().values()) + len(self._ready)

    def ready_seconds(self, now: float) -> float:
        """How long released events have waited to fill a micro-batch (0: none)."""
        return now - self._ready_at[0] if self._ready_at else 0.0

    def flush_drift(self) -> list[DriftEvent]:
        """Feed the drift detectors every labelled prediction held back so far."""
        pending, self._drift_pending = self._drift_pending, []
        self._drift_count, self._drift_at = 0, time.monotonic()
        if not pending:
            return []
        return self.drift.update_batch(
            np.concatenate([preds.p for preds, _ in pending]),
            np.concatenate([preds.label for preds, _ in pending]),
            np.concatenate([preds.timestamp for preds, _ in pending]),
            [item for preds, _ in pending for item in preds.item_id],
            [seg for _, segments in pending for seg in segments])

    def _step(self, batch: _OpsBuilder, learned: list[Labelled], result: BatchResult) -> None:
        """One micro-batch through the learner, then a meta-update if one is due."""
        if batch.ops:
            ops = self.encoder.encode(*zip(*batch.ops, strict=True))
            scores = self.learner.process(ops)
            for i, scored in batch.scored:
                scored.p, scored.k = float(scores.p[i]), int(scores.k[i])
        learned += batch.learned
        if self.learner.meta_due:
            report = self.learner.meta_update()
            if report is not None:
                result.meta.append(report)

    def _account(self, learned: list[Labelled], result: BatchResult) -> None:
        """Evaluation, drift and counters of what a call learned."""
        if learned:
            preds = result.predictions = Predictions.of(learned)
            self.evaluation.update(preds.p, preds.label, preds.k)
            field_name = self.drift.config.segment_field
            segments = [lab.impression.context.get(field_name) for lab in learned]
            self._drift_pending.append(
                (preds, [None if seg is None else str(seg) for seg in segments]))
            self._drift_count += len(preds)
        if self._drift_count >= DRIFT_EVERY_LABELS or (
                self._drift_count and time.monotonic() - self._drift_at >= DRIFT_EVERY_SECONDS):
            result.drift = self.flush_drift()
        for dead in result.dead_letters:
            self.dead_letters[dead.reason] += 1
        self.events.update(result.events)


class _OpsBuilder:
    """Ops in stream order, with what is needed to map scores back."""

    def __init__(self) -> None:
        self.ops: list[tuple[Impression, int, float]] = []
        self.scored: list[tuple[int, Scored]] = []
        self.learned: list[Labelled] = []

    def predict(self, imp: Impression, scored: Scored) -> None:
        self.scored.append((len(self.ops), scored))
        self.ops.append((imp, PREDICT, 0.0))

    def learn_all(self, labelled: list[Labelled]) -> None:
        self.learned += labelled
        self.ops += [(lab.impression, LEARN, lab.label) for lab in labelled]


def warm_up(settings: Settings) -> None:
    """Get the process ready before the first record: run a small synthetic stream
    through a throwaway pipeline of the same configuration (this loads or
    compiles the serving kernels, as the first micro-batch would have), then move
    everything alive (imported modules, compiled kernels: some 300,000 objects)
    out of the garbage collector's reach. Each full collection walked them all,
    every few seconds, for 150-250 ms: the largest stall in the event-to-update
    latency."""
    small = settings.model_copy(update={"item_buckets": 256, "feature_buckets": 256,
                                        "meta_every": 50, "meta_users": 8,
                                        "replay_from": None, "replay_to": None})
    pipeline = Pipeline(small, OnlineLearner(small.learner_config()))
    events = SyntheticStream(users=8, items=20, events_per_user=20).events()
    records = [Record(json.dumps(e).encode()) for e in events]
    for start in range(0, len(records), 50):
        pipeline.process(records[start:start + 50])
    pipeline.finish()
    gc.collect()
    gc.freeze()


def drift_json(event: DriftEvent) -> str:
    """A drift record: what drifted, where, when (event time) and by how much."""
    return json.dumps({"signal": event.signal, "detector": event.detector,
                       "segment": event.segment, "timestamp": event.timestamp,
                       "examples": event.examples, "before": event.before,
                       "after": event.after, "magnitude": event.magnitude})


def write_predictions(out: IO[str], predictions: Predictions) -> None:
    if len(predictions):
        out.write("\n".join(p.to_json() for p in predictions) + "\n")
