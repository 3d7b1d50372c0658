"""Prometheus metrics (conventional names: base units, ``_total`` counters, no
user ids in labels), served over HTTP by prometheus-client."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from metarec.events import REJECT_REASONS
from metarec.records import Record
from metarec.session import SessionOutput, SessionStatus

#: buckets of the event-to-update histogram (seconds)
FRESHNESS_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
                     5.0, 10.0, 30.0, 60.0)


class BatchHistogram:
    """A histogram observed a batch at a time: one numpy call per micro-batch, not a
    locked Python call per record, which costs the consumer dearly at high rates.
    Exposed exactly like prometheus-client's ``Histogram``."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = np.array(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: +Inf only
        self.sum = 0.0
        self._lock = threading.Lock()  # the HTTP server's thread reads while we write
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        # a value equal to a bound belongs to that bound's bucket (le)
        counts = np.bincount(np.searchsorted(self.bounds, values), minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.sum += float(values.sum())

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self.counts).tolist(), self.sum
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        yield HistogramMetricFamily(self.name, self.documentation,
                                    buckets=list(zip(les, cumulative, strict=True)),
                                    sum_value=total)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("metarec_events", "Valid events consumed, by type", ["type"],
                              registry=r)
        self.records = Counter("metarec_records", "Raw records consumed", registry=r)
        self.examples = Counter("metarec_labelled_examples", "Labelled examples learned from",
                                ["label"], registry=r)
        self.dead = Counter("metarec_dead_letters", "Records sent to the dead-letter topic",
                            ["reason"], registry=r)
        self.batch_seconds = Histogram(
            "metarec_microbatch_duration_seconds", "Time to process one micro-batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.freshness = BatchHistogram(
            "metarec_event_to_update_seconds", "From a record's Kafka timestamp (its append "
            "time on brokers that set it) to the end of the micro-batch that learned from it",
            buckets=FRESHNESS_BUCKETS, registry=r)
        self.meta_updates = Counter("metarec_meta_updates", "Meta-updates of the shared "
                                    "initialisation", registry=r)
        self.meta_seconds = Histogram("metarec_meta_update_duration_seconds",
                                      "Time of one meta-update", registry=r)
        self.model_version = Gauge("metarec_model_version", "Newest model version published "
                                   "or loaded", registry=r)
        self.published = Counter("metarec_model_versions_published", "Model versions "
                                 "published to the model topic", registry=r)
        self.logloss = Gauge("metarec_prequential_logloss", "Prequential logloss over the "
                             "recent window", registry=r)
        self.auc = Gauge("metarec_prequential_auc", "Prequential AUC over the recent window",
                         registry=r)
        self.users = Gauge("metarec_users", "Users with fast weights in memory (with "
                           "--task-context, user x context tasks too)", registry=r)
        self.pending = Gauge("metarec_pending_impressions", "Impressions waiting for a label",
                             registry=r)
        self.pending_bytes = Gauge("metarec_pending_impression_bytes", "Bytes of the records "
                                   "of impressions waiting for a label", registry=r)
        self.buffered = Gauge("metarec_merge_buffered_records", "Records held for the "
                              "event-time merge of partitions", registry=r)
        self.join = Counter("metarec_join_outcomes", "Join outcomes (clicked, no_click, "
                            "evicted, late_click, ...)", ["outcome"], registry=r)
        self.lag = Gauge("metarec_consumer_lag_records", "Records behind the end of the "
                         "assigned partitions", registry=r)
        self.published_timestamp = Gauge("metarec_model_published_timestamp_seconds",
                                         "Wall time of the newest published model version",
                                         registry=r)
        self.meta_timestamp = Gauge("metarec_meta_update_timestamp_seconds", "Wall time of the "
                                    "last meta-update", registry=r)
        self.watermark = Gauge("metarec_watermark_timestamp_seconds", "Event-time watermark",
                               registry=r)
        self.drift_alarms = Counter("metarec_drift_alarms", "Drift episodes opened, by signal "
                                    "(logloss, click_rate, score, score_psi, item_novelty_psi) "
                                    "and segment", ["signal", "segment"], registry=r)
        self.psi = Gauge("metarec_drift_psi", "Latest population stability index against the "
                         "reference window", ["signal", "segment"], registry=r)
        self.drift_open = Gauge("metarec_drift_episode_open", "1 while a drift episode of "
                                "the signal and segment is open", ["signal", "segment"],
                                registry=r)
        self.commits_ok = Gauge("metarec_kafka_commit_ok", "1 while this member's last "
                                "offset commit succeeded, 0 since one failed (broker "
                                "unreachable, or a rebalance in progress)", registry=r)
        self.commits_ok.set(1)  # no commit has failed yet
        self.producer_ok = Gauge("metarec_kafka_producer_ok", "1 while this member's "
                                 "transactional producer works, 0 from a failed transaction "
                                 "until one succeeds (broker unreachable, fenced, fatal)",
                                 registry=r)
        self.producer_ok.set(1)
        self.restored_users = Counter("metarec_state_restored_users", "Users restored from "
                                      "the changelog on partition assignment", registry=r)
        self.rollbacks = Counter("metarec_state_rollbacks", "Returns to the last durable "
                                 "point (a rebalance, or a transaction that failed)",
                                 registry=r)
        self.updates_applied = Counter("metarec_theta_updates_applied", "Other members' θ "
                                       "updates applied", registry=r)
        for reason in REJECT_REASONS:  # export zeros so rate() works from the start
            self.dead.labels(reason)
        self._join_seen: dict[str, int] = {}

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe_freshness(self, now: float, records: list[Record]) -> None:
        stamp = np.fromiter((rec.timestamp_ms for rec in records), np.float64, len(records))
        stamp = stamp[stamp >= 0]
        self.freshness.observe_many(np.maximum(now - stamp / 1000, 0.0))

    def observe(self, result: SessionOutput, status: SessionStatus,
                quality: tuple[float, float] | None = None) -> None:
        """A session call's output, the session's status after it, and (when given)
        its windowed logloss and AUC."""
        self.records.inc(result.records)
        for kind, n in result.events.items():
            self.events.labels(kind).inc(n)
        clicks = int(result.predictions.label.sum())
        for label, n in (("0", len(result.predictions) - clicks), ("1", clicks)):
            if n:
                self.examples.labels(label).inc(n)
        for dead in result.dead_letters:
            self.dead.labels(dead.reason).inc()
        self.batch_seconds.observe(result.seconds)
        for meta in result.meta:
            self.meta_updates.inc()
            self.meta_seconds.observe(meta.seconds)
        if quality is not None:
            loss, auc = quality
            if not math.isnan(loss):
                self.logloss.set(loss)
            if not math.isnan(auc):
                self.auc.set(auc)
        self.users.set(status.users)
        self.pending.set(status.pending_impressions)
        self.pending_bytes.set(status.pending_bytes)
        self.buffered.set(status.buffered_records)
        if math.isfinite(status.watermark):
            self.watermark.set(status.watermark)
        for event in result.drift:
            if event.state == "open":
                self.drift_alarms.labels(event.signal, event.segment).inc()
            self.drift_open.labels(event.signal, event.segment).set(event.state == "open")
        for (signal, segment), value in status.psi.items():
            self.psi.labels(signal, segment).set(value)
        for outcome, n in status.join_outcomes.items():
            delta = n - self._join_seen.get(outcome, 0)
            if delta:
                self.join.labels(outcome).inc(delta)
            self._join_seen[outcome] = n
