"""Injected drifts are detected soon after they start; a stationary stream of
the same length raises no alarm. Synthetic streams, seeded."""

from __future__ import annotations

import numpy as np
import pytest
from river import drift as river_drift

from metarec.datasets.synthetic import SyntheticStream
from metarec.drift import DriftConfig, DriftEvent, DriftMonitor, PageHinkley, psi
from metarec.session import StreamSession
from tests.helpers import records, small_settings
from tests.reference import drift_update


def alarms(drift: str | None) -> tuple[list[tuple[int, DriftEvent]], int]:
    """(event index, alarm) pairs over the stream, and the index where drift starts."""
    stream = SyntheticStream(users=600, events_per_user=30, seed=21, drift=drift,
                             drift_at=0.5)
    region = {e["user_id"]: e["context"]["region"] for e in stream.events()}
    settings = small_settings()
    session = StreamSession(settings.session)
    monitor = DriftMonitor(DriftConfig(segment_field="region"))
    recs = records(stream)
    out, n = [], 0
    for i in range(0, len(recs), 200):
        for p in session.process(recs[i:i + 200]).predictions:
            n += 1
            out += [(n, e) for e in drift_update(monitor, p.p, p.label, p.timestamp,
                                                 p.item_id, region[p.user_id])]
    return out, n // 2


def test_a_stationary_stream_raises_no_alarm() -> None:
    found, _ = alarms(None)
    assert found == []


@pytest.mark.parametrize(
    ("drift", "signal", "within"),
    [
        ("click_rate", "click_rate", 500),  # seen: 244 events
        ("cluster_flip", "logloss", 500),  # seen: 103 events (segment region=r0)
        ("new_items", "item_novelty_psi", 1000),  # seen: 465 events
    ],
)
def test_injected_drift_is_detected_soon_after_it_starts(drift: str, signal: str,
                                                         within: int) -> None:
    found, start = alarms(drift)
    assert [n for n, _ in found if n <= start] == []  # nothing before the change
    first = next((n, e) for n, e in found if e.signal == signal)
    assert first[0] - start <= within, first
    if signal == "logloss":
        assert first[1].after > first[1].before
    if drift == "cluster_flip":  # the flipped cluster's own segment fires too
        assert any(e.segment == "region=r0" and e.signal == "logloss" for _, e in found)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    edges = np.concatenate([[-np.inf], np.quantile(ref, np.linspace(0.1, 0.9, 9)), [np.inf]])
    assert psi(ref, ref, edges) == pytest.approx(0.0, abs=1e-9)
    small, large = psi(ref, ref + 0.1, edges), psi(ref, ref + 1.0, edges)
    assert 0 < small < 0.1 < 0.25 < large


def test_batched_page_hinkley_alarms_where_rivers_does() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.random(3000) < 0.3, rng.random(3000) < 0.6,
                        rng.random(3000) < 0.2]).astype(float)
    river_ph = river_drift.PageHinkley(threshold=30.0, delta=0.01)
    want = []
    for i, v in enumerate(x):
        river_ph.update(v)
        if river_ph.drift_detected:
            want.append(i)
    ours, got, start = PageHinkley(threshold=30.0, delta=0.01), [], 0
    for size in rng.integers(1, 700, 100):  # micro-batches of any size
        got += [start + j for j in ours.update_many(x[start:start + size])]
        start += int(size)
    assert len(want) >= 2
    assert got == want


def test_feeding_the_detectors_in_chunks_raises_the_alarms_of_one_at_a_time() -> None:
    stream = SyntheticStream(users=300, events_per_user=30, seed=4, drift="cluster_flip")
    region = {e["user_id"]: e["context"]["region"] for e in stream.events()}
    settings = small_settings()
    session = StreamSession(settings.session)
    recs = records(stream)
    preds = [p for i in range(0, len(recs), 200) for p in session.process(recs[i:i + 200])
             .predictions]
    # sensitive settings: many alarms of every kind to compare
    config = DriftConfig(segment_field="region", warmup=200, psi_window=200,
                         psi_threshold=0.05, ph_threshold=10, adwin_delta=0.5)
    one, chunked = DriftMonitor(config), DriftMonitor(config)
    singly = [e for p in preds
              for e in drift_update(one, p.p, p.label, p.timestamp, p.item_id,
                                    region[p.user_id])]
    rng = np.random.default_rng(0)
    in_chunks, start = [], 0
    while start < len(preds):
        part = preds[start:start + int(rng.integers(1, 1500))]
        start += len(part)
        in_chunks += chunked.update_batch(
            np.array([p.p for p in part]), np.array([float(p.label) for p in part]),
            np.array([p.timestamp for p in part]), [p.item_id for p in part],
            [region[p.user_id] for p in part])
    assert len({e.signal for e in singly}) >= 4 and len(singly) >= 20
    key = lambda e: (e.timestamp, e.signal, e.segment)  # noqa: E731
    assert sorted(in_chunks, key=key) == sorted(singly, key=key)
