"""Where a session's outputs go: the prediction log, dead letters, drift alarms,
model versions, metrics and progress lines. Each sink takes every output of the
session (:meth:`Sink.write`) and is closed once at the end of the stream."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import IO, Protocol

from kafka import KafkaProducer

from metarec.drift import DriftEvent
from metarec.session import SessionOutput, StreamSession
from streamer import kafka_io
from streamer.metrics import Metrics
from streamer.publishing import Publisher

log = logging.getLogger("metarec.sinks")


class Sink(Protocol):
    def write(self, out: SessionOutput, session: StreamSession) -> None:
        """Take one output. What must not be committed past (dead letters) is
        acknowledged before this returns."""

    def close(self, session: StreamSession) -> None:
        """The end of the stream: make all it wrote durable (flush, wait for the
        broker); the source's last commit comes after every sink closed."""


class PredictionLog:
    """The prediction log (JSONL) into an open file (its opener closes it); with
    ``live``, flushed after every micro-batch, for whoever follows it."""

    def __init__(self, file: IO[str], *, live: bool = False):
        self.file, self.live = file, live

    def write(self, out: SessionOutput, session: StreamSession) -> None:
        if len(out.predictions):
            self.file.write(out.predictions.jsonl())
            if self.live:
                self.file.flush()

    def close(self, session: StreamSession) -> None:
        self.file.flush()


def drift_json(event: DriftEvent) -> str:
    """A drift record: an episode opening or closing; what drifted, where, when
    (event time) and by how much."""
    return json.dumps({"state": event.state, "signal": event.signal,
                       "detector": event.detector, "segment": event.segment,
                       "timestamp": event.timestamp, "examples": event.examples,
                       "before": event.before, "after": event.after,
                       "magnitude": event.magnitude,
                       "relative": event.relative if math.isfinite(event.relative) else None,
                       "statistic": event.statistic, "reason": event.reason})


class DriftFile:
    """Drift alarms (JSONL) into an open file (its opener closes it)."""

    def __init__(self, file: IO[str]):
        self.file = file

    def write(self, out: SessionOutput, session: StreamSession) -> None:
        self.file.writelines(drift_json(e) + "\n" for e in out.drift)

    def close(self, session: StreamSession) -> None:
        self.file.flush()


class DriftTopic:
    """Every alarm to the drift topic; the log gets at most one line per signal
    and segment per ``log_every`` seconds (the progress line counts them all)."""

    def __init__(self, producer: KafkaProducer, topic: str, log_every: float):
        self.producer, self.topic, self.log_every = producer, topic, log_every
        self._logged: dict[tuple[str, str], float] = {}

    def write(self, out: SessionOutput, session: StreamSession) -> None:
        now = time.monotonic()
        for event in out.drift:
            key = (event.signal, event.segment)
            if now - self._logged.get(key, -math.inf) >= self.log_every:
                self._logged[key] = now
                log.info("drift episode %s: %s (%s) in %s at event time %.0f: %.4f -> %.4f%s",
                         "opened" if event.state == "open" else "closed", event.signal,
                         event.detector, event.segment, event.timestamp, event.before,
                         event.after, f" ({event.reason})" if event.reason else "")
            self.producer.send(self.topic, key=event.segment.encode(),
                               value=drift_json(event).encode())

    def close(self, session: StreamSession) -> None:
        self.producer.flush()


class DeadLetterTopic:
    """Dead letters to their topic, acknowledged before :meth:`write` returns: an
    offset must never be committed past a dead letter the broker refused (the
    records are read again after the restart)."""

    def __init__(self, producer: KafkaProducer, topic: str):
        self.producer, self.topic = producer, topic

    def write(self, out: SessionOutput, session: StreamSession) -> None:
        for fut in kafka_io.send_dead_letters(self.producer, self.topic, out.dead_letters):
            fut.get(timeout=30)

    def close(self, session: StreamSession) -> None:
        self.producer.flush()


class ModelVersions:
    """Model versions after meta-updates, as the publisher's schedule says, and
    the last one at the end. Without ``publish`` it only counts the meta-updates:
    a durable run publishes after its commits (:mod:`streamer.writer`)."""

    def __init__(self, publisher: Publisher, on_meta: Callable[[], None] | None = None, *,
                 publish: bool = True):
        self.publisher, self.on_meta, self.publish = publisher, on_meta, publish

    def write(self, out: SessionOutput, session: StreamSession) -> None:
        for _ in out.meta:
            if self.on_meta is not None:
                self.on_meta()
            if self.publish:
                self.publisher.after_meta_update(session.snapshot)
            else:
                self.publisher.note_meta()

    def close(self, session: StreamSession) -> None:
        if self.publish:
            self.publisher.finish(session.snapshot())


class MetricsSink:
    """Prometheus metrics of every output; the windowed AUC (over 10,000 scores)
    at most once a second."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._quality_at = -math.inf

    def write(self, out: SessionOutput, session: StreamSession) -> None:
        now = time.monotonic()
        quality = None
        if now - self._quality_at >= 1.0:
            self._quality_at = now
            quality = session.windowed_quality()
        self.metrics.observe(out, session.status(), quality)

    def close(self, session: StreamSession) -> None:
        pass


class ProgressLine:
    """A progress line every ``every`` seconds: on a terminal one line rewritten
    in place (with an ETA when ``total`` records are known), elsewhere log lines;
    ``extra`` adds what the source knows (a consumer's lag). The rate is over the
    whole stream: a live run, which waits for records, leaves it out (``rate``)."""

    def __init__(self, every: float, logger: logging.Logger, *, total: int | None = None,
                 tty: bool | None = None, extra: Callable[[], str] | None = None,
                 rate: bool = True):
        self.every, self.log, self.total, self.extra = every, logger, total, extra
        self.rate = rate
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def write(self, out: SessionOutput, session: StreamSession) -> None:
        self.done += out.records
        now = time.perf_counter()
        if now - self.last >= (0.2 if self.tty else self.every):
            self.last = now
            self._show(session, now)

    def _show(self, session: StreamSession, now: float) -> None:
        s = session.status()
        rate = self.done / max(now - self.t0, 1e-9)
        loss, auc = session.windowed_quality()
        eta = ""
        if self.total:
            left = max(self.total - self.done, 0) / max(rate, 1e-9)
            eta = f" {100 * self.done / self.total:5.1f}% ETA {left:4.0f} s"
        speed = f" | {rate:,.0f} events/s" if self.rate else ""
        text = (f"records {self.done}{eta}{speed} | labelled "
                f"{s.examples_learned} | dead letters {sum(s.dead_letters.values())} | users "
                f"{s.users} | pending {s.pending_impressions} | meta-updates {s.meta_updates} | "
                f"window logloss {loss:.4f} AUC {auc:.4f} | drift alarms {s.drift_alarms}")
        if self.extra is not None:
            text += " | " + self.extra()
        if self.tty:
            sys.stderr.write("\r" + text + " " * 4)
            sys.stderr.flush()
        else:
            self.log.info(text)

    def close(self, session: StreamSession) -> None:
        self._show(session, time.perf_counter())
        if self.tty:
            sys.stderr.write("\n")
