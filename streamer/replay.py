"""``metarec replay``: the run's pipeline over a historical log.

Sources: a dataset, a JSONL/CSV/Parquet file, or ``kafka:TOPIC`` between two
timestamps or offsets (read without a consumer group: nothing is committed).
As fast as it goes, or at ``--speed`` N x event time. Starts from a fresh
initialisation or from ``--model-version``; writes the prediction log, model
versions (``--models-out``) and drift alarms (``--drift-out``). The same input,
configuration and seed give a byte-identical prediction log.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarec.evaluation import K_BUCKETS, bucket_label
from metarec.records import Record
from metarec.session import StreamSession
from streamer import kafka_io, lineage
from streamer.cluster import Cluster
from streamer.cluster_check import connect
from streamer.config import Settings
from streamer.errors import SourceError
from streamer.kafka_io import TopicPoll, TopicRange
from streamer.loop import Poll, Source, stream
from streamer.model_topic import read_versions
from streamer.publishing import DirectorySink, ModelSink, Publisher, TopicSink
from streamer.sinks import DriftFile, ModelVersions, PredictionLog, ProgressLine, Sink
from streamer.sources import batched, read_source, read_topic_batches
from streamer.warmup import warm_up

log = logging.getLogger("metarec.replay")


@dataclass
class ReplaySummary:
    records: int
    predictions: int
    dead_letters: dict[str, int]
    seconds: float
    quality: dict[str, Any]
    meta_updates: int
    drift_alarms: dict[str, int]
    versions: list[int]

    @property
    def events_per_second(self) -> float:
        return self.records / self.seconds if self.seconds else float("nan")

    def lines(self) -> list[str]:
        q = self.quality
        out = [
            f"records {self.records} in {self.seconds:.1f} s ({self.events_per_second:,.0f} "
            f"events/s), predictions {self.predictions}, meta-updates {self.meta_updates}, "
            f"dead letters {sum(self.dead_letters.values())} {dict(self.dead_letters)}",
            f"prequential AUC {q['auc']:.4f}  logloss {q['logloss']:.4f}  "
            f"(click rate {q['ctr']:.3f})",
            f"drift alarms by signal: {self.drift_alarms or 'none'}",
            "AUC by k (labels the user had given before the prediction):",
        ]
        for lo, hi in K_BUCKETS:
            a, n = q["auc_by_k"][bucket_label(lo, hi)]
            out.append(f"  k {bucket_label(lo, hi):>6}: AUC {a:.4f}  (n={n})")
        if self.versions:
            out.append(f"model versions written: {self.versions[0]}..{self.versions[-1]}")
        return out


def _start(settings: Settings) -> lineage.Start:
    version = settings.replay.model_version
    if version is None:
        return lineage.Start()
    return lineage.exact(_cluster(settings, "--model-version"), settings.kafka.model_topic,
                         version, settings.session.learner)


def _cluster(settings: Settings, what: str) -> Cluster:
    if settings.kafka.bootstrap_servers is None:
        raise SourceError(f"{what} needs --bootstrap-servers")
    return connect(settings)


def _model_sink(settings: Settings, stack: ExitStack) -> tuple[ModelSink, int | None] | None:
    """Where ``--models-out`` goes, and the newest version already there (the
    replay's versions are numbered after it, so none is shadowed or overwritten)."""
    target = settings.replay.models_out
    if target is None:
        return None
    if not target.startswith("kafka:"):
        sink = DirectorySink(Path(target))
        return sink, sink.newest()
    cluster = _cluster(settings, "--models-out kafka:TOPIC")
    topic = target.removeprefix("kafka:")
    kafka_io.ensure_topics(cluster, settings.kafka.model_copy(update={"model_topic": topic}))
    prod = kafka_io.producer(cluster)
    stack.callback(prod.close)
    newest = read_versions(cluster, topic).newest
    return (TopicSink(prod, topic, settings.publish.model_chunk_bytes),
            None if newest is None else newest.manifest.version)


class _FiniteSource:
    """A log with an end, read without a consumer group: nothing to commit."""

    finite = True

    def processed(self, session: StreamSession) -> None:
        pass

    def close(self, session: StreamSession) -> None:
        pass


class RecordSource(_FiniteSource):
    """A file or dataset: one partition, in its order, in micro-batches."""

    def __init__(self, records: Iterable[Record], batch: int):
        self.records, self.batch = records, batch

    def polls(self, session: StreamSession) -> Iterator[Poll]:
        return (Poll(chunk) for chunk in batched(self.records, self.batch))


class TopicRangeSource(_FiniteSource):
    """A topic range: every partition holds the merge back from the start, and one
    is at its end only once its last records are in."""

    def __init__(self, polls: Iterable[TopicPoll], batch: int):
        self.topic_polls, self.batch = polls, batch

    def polls(self, session: StreamSession) -> Iterator[Poll]:
        none: frozenset[int] = frozenset()
        for poll in self.topic_polls:
            session.track(poll.partitions, time.monotonic())
            chunks = list(batched(poll.records, self.batch)) or [[]]
            for i, chunk in enumerate(chunks):
                yield Poll(chunk, poll.at_end if i == len(chunks) - 1 else none)


class Paced:
    """A source slowed to ``speed`` x event time."""

    def __init__(self, source: Source, speed: float):
        self.source, self.speed = source, speed
        self.finite = source.finite

    def polls(self, session: StreamSession) -> Iterator[Poll]:
        t0, first = time.perf_counter(), math.nan
        for poll in self.source.polls(session):
            yield poll
            newest = session.event_time()
            if not math.isfinite(newest):
                continue
            if math.isnan(first):
                first = newest
            ahead = (newest - first) / self.speed - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)

    def processed(self, session: StreamSession) -> None:
        self.source.processed(session)

    def close(self, session: StreamSession) -> None:
        self.source.close(session)


def _source(source: str, s: Settings) -> Source:
    r = s.replay
    rng = TopicRange(from_ms=None if r.from_time is None else int(r.from_time * 1000),
                     from_offset=r.from_offset, to_offset=r.to_offset)
    batch = s.session.max_batch_records
    found: Source
    if source.startswith("kafka:"):
        found = TopicRangeSource(read_topic_batches(_cluster(s, "a kafka: source"),
                                                    source.removeprefix("kafka:"), rng), batch)
    else:
        found = RecordSource(read_source(source), batch)
    return found if r.speed is None else Paced(found, r.speed)


def _total(source: str) -> int | None:
    """Records in the source, for the progress line's ETA (None: unknown; a file
    that cannot be read is the reader's to report)."""
    if source == "movielens-100k":
        return 100_000
    path = Path(source)
    if not path.is_file():
        return None
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        lines = 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):  # a line may be endless: never read one whole
                lines += chunk.count(b"\n")
        return max(0, lines - (1 if path.suffix.lower() == ".csv" else 0))
    except (OSError, ValueError):  # pyarrow's errors are these too; only an estimate
        return None


def replay(settings: Settings, source: str, *, progress: bool = True) -> ReplaySummary:
    s = settings
    with ExitStack() as stack:
        start = _start(s)
        # no wall clock: the same records give the same log, however fast they come
        session = StreamSession(s.session, start.theta, keep_all=True, wall_clock=False,
                                event_times=s.replay.event_times())
        sinks: list[Sink] = []
        target = _model_sink(s, stack)
        publisher = None
        if target is not None:
            sink, there = target
            last = max((v for v in (start.last_version, there) if v is not None), default=None)
            publisher = Publisher(sink, s.publish.publish_every, last_version=last,
                                  parent=start.parent)
            sinks.append(ModelVersions(publisher))
        if s.ops.predictions_out is not None:
            sinks.append(PredictionLog(stack.enter_context(s.ops.predictions_out.open("w"))))
        if s.replay.drift_out is not None:
            sinks.append(DriftFile(stack.enter_context(s.replay.drift_out.open("w"))))
        records = _source(source, s)
        warm_up(s.session)
        if progress:
            sinks.append(ProgressLine(s.ops.log_every_seconds, log, total=_total(source)))
        t0 = time.perf_counter()
        stream(session, records, sinks)
        seconds = time.perf_counter() - t0
    status = session.status()
    return ReplaySummary(
        records=status.records,
        predictions=status.predictions,
        dead_letters=status.dead_letters,
        seconds=seconds,
        quality=session.quality(),
        meta_updates=status.meta_updates,
        drift_alarms=dict(Counter(e.signal for e in session.drift_events()
                                  if e.state == "open")),
        versions=publisher.published if publisher is not None else [],
    )
