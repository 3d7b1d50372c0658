"""Shared builders for tests: settings, synthetic records."""

from __future__ import annotations

import json
from typing import Any

from metarec.datasets.synthetic import SyntheticStream
from streamer.config import Settings
from streamer.pipeline import Record


def small_settings(**changes: Any) -> Settings:
    base: dict[str, Any] = {"item_buckets": 4096, "feature_buckets": 1024, "dim": 8,
                            "meta_every": 500, "meta_users": 64, "max_batch_records": 200,
                            "metrics_port": 0}
    return Settings(**{**base, **changes})


def records(stream: SyntheticStream) -> list[Record]:
    return [Record(json.dumps(e).encode(), key=e["user_id"].encode())
            for e in stream.events()]


def as_record(event: dict[str, Any]) -> Record:
    return Record(json.dumps(event).encode(), key=str(event.get("user_id", "")).encode())
