"""Metrics observed a micro-batch at a time read exactly like per-record ones."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streamer.metrics import BatchHistogram


def test_a_batch_histogram_exposes_what_prometheus_clients_histogram_would() -> None:
    buckets = (0.01, 0.1, 0.2, 1.0)
    values = np.array([0.0, 0.01, 0.05, 0.1, 0.15, 0.2, 0.7, 3.0, 42.0])
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("lag_seconds", "doc", buckets=buckets, registry=theirs)
    for v in values:
        reference.observe(v)
    batched = BatchHistogram("lag_seconds", "doc", buckets, ours)
    batched.observe_many(values[:4])  # across batches, too
    batched.observe_many(values[4:])

    def exposed(registry: CollectorRegistry) -> dict[str, float]:
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in generate_latest(registry).decode().splitlines()
                if line.startswith("lag_seconds_") and "created" not in line}

    # every bucket, the count and the sum (which may differ in the last bit: it is
    # added up in batches)
    assert exposed(ours) == pytest.approx(exposed(theirs), abs=1e-9)
    assert len(exposed(ours)) == len(buckets) + 3
