"""``metarec replay``: the run's pipeline over a historical log, without Kafka,
as fast as it goes."""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from metarec.evaluation import K_BUCKETS, bucket_label
from metarec.learner import OnlineLearner
from streamer.config import Settings
from streamer.pipeline import Pipeline, write_predictions
from streamer.sources import batched, read_source

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
        return out


def replay(settings: Settings, source: str, *, progress: bool = True) -> ReplaySummary:
    pipeline = Pipeline(settings, OnlineLearner(settings.learner_config()), keep_all=True)
    records = 0
    t0 = last = time.perf_counter()
    with ExitStack() as stack:
        out: IO[str] | None = None
        if settings.predictions_out is not None:
            out = stack.enter_context(Path(settings.predictions_out).open("w"))
        for batch in batched(read_source(source), settings.max_batch_records):
            result = pipeline.process(batch)
            records += len(batch)
            if out is not None:
                write_predictions(out, result.predictions)
            now = time.perf_counter()
            if progress and now - last >= settings.log_every_seconds:
                loss, auc = pipeline.evaluation.windowed()
                log.info("records %d (%.0f/s) | window logloss %.4f AUC %.4f", records,
                         records / (now - t0), loss, auc)
                last = now
        final = pipeline.finish()
        if out is not None:
            write_predictions(out, final.predictions)
    return ReplaySummary(
        records=records,
        predictions=pipeline.evaluation.count,
        dead_letters=dict(pipeline.dead_letters),
        seconds=time.perf_counter() - t0,
        quality=pipeline.evaluation.summary(),
        meta_updates=pipeline.learner.meta_updates,
        drift_alarms=dict(Counter(e.signal for e in pipeline.drift.events)),
    )
