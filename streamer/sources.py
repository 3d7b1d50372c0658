"""Where records come from when they do not come from the live consumer group:
a named dataset or a JSONL file of events (one JSON object per line)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from metarec.datasets import movielens
from metarec.datasets.synthetic import SyntheticStream
from streamer.pipeline import Record

DATASETS = ("movielens-100k", "synthetic")


class SourceError(ValueError):
    """The source named on the command line cannot be read."""


def read_source(name: str) -> Iterator[Record]:
    """Records of a dataset name or a JSONL path, in file order, keyed by user id
    where the line is JSON with a ``user_id`` (the key only decides partitions)."""
    if name in DATASETS:
        events = movielens.events() if name == "movielens-100k" else SyntheticStream().events()
        for event in events:
            yield Record(json.dumps(event).encode(), key=event["user_id"].encode())
        return
    path = Path(name)
    if not path.is_file():
        raise SourceError(f"{name!r} is neither a dataset ({', '.join(DATASETS)}) nor a file")
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


def batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
