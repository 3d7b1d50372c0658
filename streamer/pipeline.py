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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from metarec.datasets.synthetic import SyntheticStream
from metarec.drift import DriftConfig, DriftEvent, DriftMonitor
from metarec.encoding import Encoder
from metarec.evaluation import Prequential
from metarec.events import Impression, Rejected, decode_event
from metarec.joiner import Joiner, Labelled, Scored
from metarec.learner import LEARN, PREDICT, MetaReport, OnlineLearner
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
    meta: MetaReport | None = None
    drift: list[DriftEvent] = field(default_factory=list)
    seconds: float = 0.0


class Pipeline:
    def __init__(self, settings: Settings, learner: OnlineLearner, *, keep_all: bool = False):
        self.settings = settings
        self.learner = learner
        self.joiner = Joiner(window=settings.attribution_window_seconds,
                             lateness=settings.allowed_lateness_seconds,
                             max_pending=settings.max_pending_impressions)
        self.encoder = Encoder(learner.config.model.features)
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

    def process(self, records: Sequence[Record]) -> BatchResult:
        t0 = time.perf_counter()
        result = BatchResult(records=len(records))
        batch = _OpsBuilder()
        now = time.monotonic()
        # Against the wall clock, not the watermark: a quiet day in the stream must
        # not make every later event look like it came from the future.
        wall = time.time()
        latest = wall + self.settings.max_future_skew_seconds
        lo, hi = self.settings.replay_from, self.settings.replay_to
        lo, hi = -math.inf if lo is None else lo, math.inf if hi is None else hi
        max_bytes, joiner, counts = self.settings.max_record_bytes, self.joiner, result.events
        for rec in records:
            event = decode_event(rec.value, max_bytes=max_bytes)
            if not isinstance(event, Rejected) and event.timestamp > latest:
                event = Rejected("bad_timestamp",
                                 f"{event.timestamp - wall:.0f} s ahead of the wall clock")
            if isinstance(event, Rejected):
                result.dead_letters.append(DeadLetter(rec, event.reason, event.detail))
                continue
            if not lo <= event.timestamp < hi:
                counts["outside_range"] += 1
                continue
            counts[event.type] += 1
            closed = joiner.advance(event.timestamp, rec.partition, now)
            if closed:
                batch.learn_all(closed)
            if isinstance(event, Impression):
                scored = Scored()
                batch.predict(event, scored)
                batch.learn_all(joiner.impression(event, scored, rec.partition, rec.offset))
            else:
                batch.learn_all(joiner.click(event))
        self._run(batch, result)
        result.seconds = time.perf_counter() - t0
        return result

    def finish(self) -> BatchResult:
        """End of a finite log: every window is over, label what is still pending."""
        result = BatchResult()
        batch = _OpsBuilder()
        batch.learn_all(self.joiner.advance(math.inf))
        self._run(batch, result)
        result.drift += self.flush_drift()
        return result

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

    def _run(self, batch: _OpsBuilder, result: BatchResult) -> None:
        if batch.ops:
            ops = self.encoder.encode(*zip(*batch.ops, strict=True))
            scores = self.learner.process(ops)
            for i, scored in batch.scored:
                scored.p, scored.k = float(scores.p[i]), int(scores.k[i])
        if batch.learned:
            preds = result.predictions = Predictions.of(batch.learned)
            self.evaluation.update(preds.p, preds.label, preds.k)
            field_name = self.drift.config.segment_field
            segments = [lab.impression.context.get(field_name) for lab in batch.learned]
            self._drift_pending.append(
                (preds, [None if seg is None else str(seg) for seg in segments]))
            self._drift_count += len(preds)
        if self._drift_count >= DRIFT_EVERY_LABELS or (
                self._drift_count and time.monotonic() - self._drift_at >= DRIFT_EVERY_SECONDS):
            result.drift = self.flush_drift()
        if self.learner.meta_due:
            result.meta = self.learner.meta_update()
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
