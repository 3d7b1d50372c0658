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
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from metarec import snapshot
from metarec.evaluation import K_BUCKETS, bucket_label
from metarec.learner import OnlineLearner
from streamer import kafka_io
from streamer.config import Settings
from streamer.model_topic import read_versions
from streamer.pipeline import Pipeline, Record, drift_json, warm_up, write_predictions
from streamer.publishing import DirectorySink, ModelSink, Publisher, TopicSink
from streamer.sources import (
    SourceError,
    TopicRange,
    batched,
    read_source,
    read_topic_batches,
)

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


def _learner(settings: Settings) -> tuple[OnlineLearner, int | None]:
    learner = OnlineLearner(settings.learner_config())
    if settings.model_version is None:
        return learner, None
    if settings.bootstrap_servers is None:
        raise SourceError("--model-version needs --bootstrap-servers (the model topic)")
    found = read_versions(settings.bootstrap_servers, settings.model_topic,
                          want=settings.model_version).newest
    if found is None:
        raise SourceError(f"model version {settings.model_version} is not on "
                          f"{settings.model_topic} (complete and intact)")
    theta = snapshot.loads(found.payload, like=learner.theta)
    return OnlineLearner(learner.config, theta=theta), found.manifest.version


def _sink(settings: Settings, stack: ExitStack) -> ModelSink | None:
    target = settings.models_out
    if target is None:
        return None
    if not target.startswith("kafka:"):
        return DirectorySink(Path(target))
    if settings.bootstrap_servers is None:
        raise SourceError("--models-out kafka:TOPIC needs --bootstrap-servers")
    topic = target.removeprefix("kafka:")
    kafka_io.ensure_topics(settings.bootstrap_servers,
                           settings.model_copy(update={"model_topic": topic}))
    prod = kafka_io.producer(settings.bootstrap_servers)
    stack.callback(prod.close)
    return TopicSink(prod, topic, settings.model_chunk_bytes)


class _Progress:
    """A progress line on a terminal (rate, ETA), plain log lines elsewhere."""

    def __init__(self, total: int | None, every: float, enabled: bool):
        self.total, self.every, self.enabled = total, every, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, pipeline: Pipeline) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < (0.2 if self.tty else self.every):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        loss, auc = pipeline.evaluation.windowed()
        eta = ""
        if self.total:
            eta = f" {100 * done / self.total:5.1f}% ETA {max(self.total - done, 0) / rate:4.0f} s"
        text = f"records {done}{eta} | {rate:,.0f} events/s | window logloss {loss:.4f} " \
               f"AUC {auc:.4f}"
        if self.tty:
            sys.stderr.write("\r" + text + " " * 4)
            sys.stderr.flush()
        else:
            log.info(text)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


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
    topic_range = TopicRange(
        from_ms=None if s.replay_from is None else int(s.replay_from * 1000),
        from_offset=s.replay_from_offset, to_offset=s.replay_to_offset)
    batches = _batches(source, s, topic_range)
    with ExitStack() as stack:
        learner, version = _learner(s)
        # no wall clock: the same records give the same log, however fast they come
        pipeline = Pipeline(s, learner, keep_all=True, wall_clock=False)
        sink = _sink(s, stack)
        publisher = Publisher(sink, s.publish_every, version) if sink is not None else None
        out: IO[str] | None = None
        if s.predictions_out is not None:
            out = stack.enter_context(Path(s.predictions_out).open("w"))
        drift_out: IO[str] | None = None
        if s.drift_out is not None:
            drift_out = stack.enter_context(Path(s.drift_out).open("w"))
        warm_up(s)
        bar = _Progress(_total(source), s.log_every_seconds, progress)
        done, first_ts = 0, math.nan
        t0 = time.perf_counter()
        for batch, caught_up, partitions in batches:
            # every partition holds the merge back from the start, not from its first record
            pipeline.track(partitions, time.monotonic())
            result = pipeline.process(batch, caught_up, flush=False)
            done += len(batch)
            if out is not None:
                write_predictions(out, result.predictions)
            if drift_out is not None:
                drift_out.writelines(drift_json(e) + "\n" for e in result.drift)
            if publisher is not None:
                for _ in result.meta:
                    publisher.after_meta_update(learner)
            if s.replay_speed is not None:
                first_ts = _pace(pipeline, s.replay_speed, t0, first_ts)
            bar.update(done, pipeline)
        final = pipeline.finish()
        bar.close()
        if out is not None:
            write_predictions(out, final.predictions)
        if drift_out is not None:
            drift_out.writelines(drift_json(e) + "\n" for e in final.drift)
        if publisher is not None:
            publisher.finish(learner)
    return ReplaySummary(
        records=done,
        predictions=pipeline.evaluation.count,
        dead_letters=dict(pipeline.dead_letters),
        seconds=time.perf_counter() - t0,
        quality=pipeline.evaluation.summary(),
        meta_updates=learner.meta_updates,
        drift_alarms=dict(Counter(e.signal for e in pipeline.drift.events)),
        versions=publisher.published if publisher is not None else [],
    )


def _batches(source: str, s: Settings, topic_range: TopicRange
             ) -> Iterator[tuple[list[Record], frozenset[int] | None, frozenset[int]]]:
    """Micro-batches of the source, each with the partitions read to their end
    (None: a file or dataset, one partition in its own order) and all partitions."""
    if not source.startswith("kafka:"):
        records = read_source(source, bootstrap=s.bootstrap_servers, topic_range=topic_range)
        yield from ((batch, None, frozenset()) for batch in batched(records,
                                                                    s.max_batch_records))
        return
    if s.bootstrap_servers is None:
        raise SourceError("a kafka: source needs --bootstrap-servers")
    none: frozenset[int] = frozenset()
    topic = source.removeprefix("kafka:")
    for poll in read_topic_batches(s.bootstrap_servers, topic, topic_range):
        chunks = list(batched(poll.records, s.max_batch_records)) or [[]]
        # a partition is at its end only once its last records are in
        for i, chunk in enumerate(chunks):
            yield chunk, poll.at_end if i == len(chunks) - 1 else none, poll.partitions


def _pace(pipeline: Pipeline, speed: float, t0: float, first_ts: float) -> float:
    """Sleep until wall time catches up with event time / speed."""
    newest = pipeline.joiner.watermark + pipeline.joiner.lateness
    if not math.isfinite(newest):
        return first_ts
    if math.isnan(first_ts):
        return newest
    ahead = (newest - first_ts) / speed - (time.perf_counter() - t0)
    if ahead > 0:
        time.sleep(ahead)
    return first_ts
