"""Where records come from when they do not come from the live consumer group:
a named dataset, a JSONL, CSV or Parquet file of events, or a range of a Kafka
topic (``kafka:TOPIC``, read without a consumer group, so nothing is committed).

CSV and Parquet rows become the same JSON events as the live stream: columns
``type, impression_id, user_id, item_id, timestamp, clicked`` and, for features,
``context.<name>``, ``user_features.<name>``, ``item_features.<name>`` (a CSV
list value is ``a|b|c``); Parquet may also hold them as struct columns.
"""

from __future__ import annotations

import csv
import heapq
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarec.datasets import movielens
from metarec.datasets.synthetic import SyntheticStream
from streamer.pipeline import Record

DATASETS = ("movielens-100k", "synthetic")
NESTED = ("context", "user_features", "item_features")


class SourceError(ValueError):
    """The source named on the command line cannot be read."""


@dataclass(frozen=True)
class TopicRange:
    """Which part of a topic a replay reads. ``from_ms`` seeks by record timestamp:
    a record is written no earlier than its event happened, so nothing in range
    is skipped. There is no ``to_ms``: an event inside the range may be written
    after its end, so the end is found by reading (the pipeline filters by event
    time) or given as an offset."""

    from_ms: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None


def read_source(name: str, *, bootstrap: str | None = None,
                topic_range: TopicRange | None = None) -> Iterator[Record]:
    """Records of a source, in its order, keyed by user id where one is known."""
    if name == "movielens-100k":
        yield from (Record(value, key) for key, value in movielens.json_events())
        return
    if name == "synthetic":
        yield from (_record(e) for e in SyntheticStream().events())
        return
    if name.startswith("kafka:"):
        if bootstrap is None:
            raise SourceError("a kafka: source needs --bootstrap-servers")
        yield from read_topic(bootstrap, name.removeprefix("kafka:"), topic_range or TopicRange())
        return
    path = Path(name)
    if not path.is_file():
        raise SourceError(f"{name!r} is neither a dataset ({', '.join(DATASETS)}), "
                          "a kafka:TOPIC, nor a file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _read_csv(path)
    elif suffix in (".parquet", ".pq"):
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def _record(event: dict[str, Any], offset: int = -1) -> Record:
    user = event.get("user_id")
    return Record(json.dumps(event).encode(), key=None if user is None else str(user).encode(),
                  offset=offset)


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as lines:
        for offset, line in enumerate(lines):
            value = line.rstrip(b"\r\n")
            if value.strip():
                yield Record(value, key=_user_key(value), offset=offset)


def _user_key(value: bytes) -> bytes | None:
    try:
        user = json.loads(value).get("user_id")
    except (ValueError, AttributeError):
        return None
    return None if user is None else str(user).encode()


def _nest(row: dict[str, Any], split_lists: bool) -> dict[str, Any]:
    """Flat ``group.name`` columns into nested feature maps; empty cells dropped."""
    event: dict[str, Any] = {}
    for column, value in row.items():
        if value is None or value == "":
            continue
        group, _, name = column.partition(".")
        if group in NESTED and name:
            if split_lists and isinstance(value, str) and "|" in value:
                value = value.split("|")
            event.setdefault(group, {})[name] = value
        else:
            event[column] = value
    return event


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open(newline="") as f:
        for offset, row in enumerate(csv.DictReader(f)):
            yield _record(_nest(row, split_lists=True), offset)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
        for row in batch.to_pylist():
            yield _record(_nest(row, split_lists=False), offset)
            offset += 1


def read_topic(bootstrap: str, topic: str, rng: TopicRange, *,
               settle_ms: int = 1000) -> Iterator[Record]:
    """A topic between two broker timestamps or offsets, partitions interleaved by
    record timestamp. No consumer group: a replay never moves a live group's offsets."""
    from kafka import KafkaConsumer, TopicPartition

    cons = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         fetch_max_wait_ms=10)
    try:
        parts = cons.partitions_for_topic(topic)
        if not parts:
            raise SourceError(f"topic {topic!r} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        cons.assign(tps)
        end = cons.end_offsets(tps)
        start = dict.fromkeys(tps, 0)
        if rng.from_offset is not None:
            start = dict.fromkeys(tps, rng.from_offset)
        elif rng.from_ms is not None:
            found = cons.offsets_for_times(dict.fromkeys(tps, rng.from_ms))
            start = {tp: (found[tp].offset if found[tp] else end[tp]) for tp in tps}
        # None: up to the end
        stop: dict[Any, int | None] = dict.fromkeys(tps, rng.to_offset)
        for tp in tps:
            cons.seek(tp, start[tp])
        quiet_since = time.monotonic()
        done: set[Any] = set()
        while len(done) < len(tps):
            polled = cons.poll(timeout_ms=100, max_records=2000)
            batches = []
            for tp, msgs in polled.items():
                limit = stop[tp]
                kept = [m for m in msgs if limit is None or m.offset < limit]
                if limit is not None and len(kept) < len(msgs):
                    done.add(tp)
                batches.append(kept)
            merged = list(heapq.merge(*batches, key=lambda m: m.timestamp))
            for m in merged:
                yield Record(m.value if m.value is not None else b"", m.key, m.topic,
                             m.partition, m.offset)
            now = time.monotonic()
            if merged:
                quiet_since = now
            for tp in tps:
                limit = stop[tp]
                position = cons.position(tp)
                if (limit is not None and position >= limit) or (
                        position >= end[tp] and (now - quiet_since) * 1000 >= settle_ms):
                    done.add(tp)
    finally:
        cons.close()


def batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
