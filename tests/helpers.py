"""Shared builders for tests: settings, synthetic records; for the live-path tests,
the prediction log, AUC and producing a stream that closes every window."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from metarec.datasets.synthetic import SyntheticStream
from metarec.records import Record
from streamer.cluster import Cluster
from streamer.config import Settings


def small_settings(**changes: Any) -> Settings:
    base: dict[str, Any] = {"item_buckets": 4096, "feature_buckets": 1024, "dim": 8,
                            "meta_every": 500, "meta_users": 64, "max_batch_records": 200,
                            "metrics_port": 0}
    return Settings.of(**{**base, **changes})


def records(stream: SyntheticStream) -> list[Record]:
    return [Record(json.dumps(e).encode(), key=e["user_id"].encode())
            for e in stream.events()]


def as_record(event: dict[str, Any]) -> Record:
    return Record(json.dumps(event).encode(), key=str(event.get("user_id", "")).encode())


#: an impression as the prediction log names it: (user_id, item_id, timestamp)
ImpressionKey = tuple[str, str, float]


def impression_key(line: dict[str, Any]) -> ImpressionKey:
    """The key of an impression event or of a prediction-log line (the log writes an
    integral timestamp as an int; the key is the same)."""
    return str(line["user_id"]), str(line["item_id"]), float(line["timestamp"])


def write_events(path: Path, events: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The prediction log's lines, in file order (none if it was never written)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def auc(p: ArrayLike, y: ArrayLike) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U; tied scores count half)."""
    scores, labels = np.asarray(p, dtype=float), np.asarray(y, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    assert n_pos and n_neg, "AUC needs both classes"
    _, group, size = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(size) - (size - 1) / 2  # 1-based, the mean over each tie
    rank_sum = float(average_rank[group][labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def closing_impressions(events: Sequence[dict[str, Any]],
                        partitions: int) -> list[tuple[int, dict[str, Any]]]:
    """Unlabelled impressions on every partition, half an hour apart up to three hours
    past the last event (steps a stream can take: none is held aside as a jump
    from the future): once every partition has delivered them, the watermark is
    past the end of every earlier attribution window."""
    last = max(float(e["timestamp"]) for e in events)
    return [(p, {"type": "impression", "impression_id": f"closer-{p}-{step}",
                 "user_id": f"closer-{p}", "item_id": "closer",
                 "timestamp": last + 1800.0 * step})
            for step in range(1, 7) for p in range(partitions)]


def produce_with_closers(cluster: Cluster, topic: str, events: Sequence[dict[str, Any]],
                         partitions: int, *, speed: float | None = None) -> None:
    """Events keyed by user id (the default partitioner: a user's events share a
    partition, in stream order), as fast as possible or live at ``speed`` seconds of
    event time per second, then :func:`closing_impressions`, each sent to its own
    partition explicitly."""
    prod = cluster.producer(linger_ms=5)
    try:
        start, first = time.monotonic(), float(events[0]["timestamp"])
        for event in events:
            if speed is not None:
                due = start + (float(event["timestamp"]) - first) / speed
                time.sleep(max(0.0, due - time.monotonic()))
            prod.send(topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
        prod.flush()
        for partition, closer in closing_impressions(events, partitions):
            prod.send(topic, key=closer["user_id"].encode(), value=json.dumps(closer).encode(),
                      partition=partition)
        prod.flush()
    finally:
        prod.close()
