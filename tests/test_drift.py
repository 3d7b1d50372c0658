"""Drift alarms an operator can trust: on streams where nothing changes they stay
within a false-alarm budget (bursty users, new users, a real catalogue re-timed),
injected changes still open an episode soon after they start, and an episode
opens once, carries its effect, and closes when the signal returns or settles."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import pytest

from metarec.datasets import movielens
from metarec.datasets.synthetic import SyntheticStream
from metarec.drift import DriftConfig, DriftEvent, DriftMonitor, chi2_quantile, psi
from metarec.records import Record
from metarec.session import SessionStatus, StreamSession
from streamer.config import Settings
from tests.reference import drift_update

#: false alarms allowed per this many labels on a stream where nothing changes
BUDGET_LABELS = 100_000


class Run(NamedTuple):
    events: list[DriftEvent]  # episodes opened and closed
    times: list[float]  # the labels' event times
    labels: int
    status: SessionStatus


def labelled(events: Iterable[dict[str, Any]], segment_field: str, chunk: int = 1000) -> Run:
    """Run the default session over ``events`` with its drift monitor on
    ``segment_field``."""
    settings = Settings.of(metrics_port=0, drift_segment_field=segment_field)
    session = StreamSession(settings.session)
    recs = [Record(json.dumps(e).encode(), partition=0, offset=i)
            for i, e in enumerate(events)]
    times: list[float] = []
    for i in range(0, len(recs), chunk):
        times += session.process(recs[i:i + chunk]).predictions.timestamp.tolist()
    times += session.finish().predictions.timestamp.tolist()
    return Run(session.drift_events(), times, len(times), session.status())


def retimed(events: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Every user's events moved as one to a random start within the stream's span,
    their order and gaps kept: a population whose mix changes only by chance."""
    rng = np.random.default_rng(seed)
    by_user: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_user.setdefault(e["user_id"], []).append(e)
    first, last = events[0]["timestamp"], events[-1]["timestamp"]
    out = []
    for evs in by_user.values():
        start, span = evs[0]["timestamp"], evs[-1]["timestamp"] - evs[0]["timestamp"]
        to = first + rng.uniform(0, max(last - first - span, 1.0))
        out += [{**e, "timestamp": e["timestamp"] - start + to} for e in evs]
    return sorted(out, key=lambda e: e["timestamp"])


def opened(events: list[DriftEvent]) -> list[DriftEvent]:
    return [e for e in events if e.state == "open"]


@pytest.mark.parametrize(("users", "seed"), [(1200, 1), (3000, 2), (1200, 3)])
def test_a_stationary_bursty_stream_stays_within_the_false_alarm_budget(users: int,
                                                                        seed: int) -> None:
    """Users arrive over the month and act in bursts (sessions of events a minute
    apart); the click model never changes."""
    stream = SyntheticStream(users=users, items=300, events_per_user=40, seed=seed)
    events, _, n, _ = labelled(stream.events(), "platform")
    assert n > 40_000
    assert len(opened(events)) <= n // BUDGET_LABELS, opened(events)


def test_movielens_with_its_users_retimed_stays_within_the_false_alarm_budget() -> None:
    """Real users' real bursts (some rate hundreds of films in minutes), each user's
    own order kept, the users' starts drawn at random: nothing real changes."""
    events, _, n, _ = labelled(retimed(list(movielens.events()), seed=0), "platform")
    assert n == 100_000
    assert len(opened(events)) <= n // BUDGET_LABELS, opened(events)


def test_a_movielens_replay_opens_few_episodes_and_watches_every_feature() -> None:
    events, _, _, status = labelled(movielens.events(), "platform")
    psi_of = {signal for signal, _ in status.psi}
    assert {"psi:user.age", "psi:user.gender", "psi:user.occupation", "psi:item.genre",
            "psi:item.year", "score_psi", "item_novelty_psi"} <= psi_of
    assert len(opened(events)) <= 10


@pytest.mark.parametrize(
    ("drift", "signal", "within"),
    [
        ("click_rate", "click_rate", 500),  # seen: 321 labels
        ("cluster_flip", "logloss", 500),  # seen: 321 labels
        ("new_items", "item_novelty_psi", 1000),  # seen: 121 labels
        # one context value's share doubles, clicks unchanged
        ("platform_shift", "psi:context.platform", 1000),  # seen: 621 labels
    ],
)
def test_injected_drift_opens_an_episode_soon_after_it_starts(drift: str, signal: str,
                                                              within: int) -> None:
    stream = SyntheticStream(users=1200, events_per_user=30, seed=21, drift=drift,
                             drift_at=0.5)
    events, times, n, _ = labelled(stream.events(), "region")
    start_time = times[n // 2]
    assert [e for e in opened(events) if e.timestamp < start_time] == []
    first = next(e for e in opened(events) if e.signal == signal)
    delay = int(np.searchsorted(times, first.timestamp)) - n // 2
    assert 0 <= delay <= within, first
    if signal == "logloss":
        assert first.after - first.before >= 0.02
    if signal == "click_rate":
        assert first.relative >= 0.2
    if drift == "platform_shift":  # the share of the value that moved: a third, then two
        assert first.before == pytest.approx(1 / 3, abs=0.05)
        assert first.after == pytest.approx(2 / 3, abs=0.07)
    # one episode per signal and segment while the change lasts: opened once, then
    # closed (the new level settled) before any other of the same
    same = [e for e in events if (e.signal, e.segment) == (first.signal, first.segment)]
    assert [e.state for e in same[:2]] == ["open", "closed"][:len(same[:2])]


def population(rng: np.random.Generator, n: int, rate: float, users: int = 400
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` labels of ``users`` users clicking at ``rate``, scored at the rate."""
    label = (rng.random(n) < rate).astype(float)
    p = np.clip(rate + rng.normal(0, 0.05, n), 0.01, 0.99)
    return p, label, [f"u{u}" for u in rng.integers(0, users, n)]


def feed(monitor: DriftMonitor, parts: list[tuple[np.ndarray, np.ndarray, list[str]]]
         ) -> list[DriftEvent]:
    p = np.concatenate([x[0] for x in parts])
    label = np.concatenate([x[1] for x in parts])
    users = [u for x in parts for u in x[2]]
    items = [f"i{j % 50}" for j in range(len(p))]
    ts = 1_700_000_000.0 + np.arange(len(p), dtype=float)
    return monitor.update_batch(p, label, ts, items, [None] * len(p), users)


def test_an_episode_opens_once_and_closes_with_hysteresis_when_the_signal_returns() -> None:
    rng = np.random.default_rng(5)
    monitor = DriftMonitor()
    events = feed(monitor, [population(rng, 8000, 0.3), population(rng, 1500, 0.6),
                            population(rng, 6000, 0.3)])
    clicks = [e for e in events if e.signal == "click_rate"]
    assert [e.state for e in clicks] == ["open", "closed"]
    up, down = clicks
    assert up.before == pytest.approx(0.3, abs=0.03) and up.after > 0.45
    assert up.examples > 8000 and down.reason == "returned"
    # closed only once well back: within half the minimum change of the level before
    assert abs(down.after - up.before) / up.before < 0.5 * monitor.config.min_relative_change
    assert monitor.open_episodes() == []


def test_one_users_burst_is_not_a_population_change() -> None:
    """A user clicks 400 times in a row amid a stationary stream: a block of 100
    labels is all theirs, yet it is one user among hundreds."""
    rng = np.random.default_rng(6)
    burst = (np.full(400, 0.95), np.ones(400), ["burster"] * 400)
    monitor = DriftMonitor()
    events = feed(monitor, [population(rng, 6000, 0.3), burst, population(rng, 4000, 0.3)])
    assert events == []


def test_feeding_the_detectors_in_chunks_opens_the_episodes_of_one_at_a_time() -> None:
    rng = np.random.default_rng(7)
    parts = [population(rng, 3000, 0.3), population(rng, 600, 0.7),
             population(rng, 1500, 0.3), population(rng, 600, 0.05)]
    p = np.concatenate([x[0] for x in parts])
    label = np.concatenate([x[1] for x in parts])
    users = [u for x in parts for u in x[2]]
    items = [f"i{j % 40 if j < 4000 else j}" for j in range(len(p))]  # then new items
    ts = 1_700_000_000.0 + np.arange(len(p), dtype=float)
    segments = [["a", "b", None][j % 3] for j in range(len(p))]
    config = DriftConfig(block_labels=50, reference_blocks=20, current_blocks=3)
    one, chunked = DriftMonitor(config), DriftMonitor(config)
    singly = [e for j in range(len(p))
              for e in drift_update(one, float(p[j]), float(label[j]), float(ts[j]), items[j],
                                    segments[j], users[j])]
    in_chunks, start = [], 0
    while start < len(p):
        end = start + int(rng.integers(1, 900))
        in_chunks += chunked.update_batch(p[start:end], label[start:end], ts[start:end],
                                          items[start:end], segments[start:end],
                                          users[start:end])
        start = end
    assert {e.signal for e in singly} >= {"click_rate", "score", "item_novelty_psi"}
    assert {e.state for e in singly} == {"open", "closed"}
    key = lambda e: (e.timestamp, e.signal, e.segment, e.state)  # noqa: E731
    assert sorted(in_chunks, key=key) == sorted(singly, key=key)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    edges = np.concatenate([[-np.inf], np.quantile(ref, np.linspace(0.1, 0.9, 9)), [np.inf]])
    assert psi(ref, ref, edges) == pytest.approx(0.0, abs=1e-9)
    small, large = psi(ref, ref + 0.1, edges), psi(ref, ref + 1.0, edges)
    assert 0 < small < 0.1 < 0.25 < large
    # weights count as that many copies
    twice = np.concatenate([ref[:100], ref[:100], ref[100:]])
    weights = np.concatenate([np.full(100, 2.0), np.ones(4900)])
    assert psi(twice, ref + 0.3, edges) == pytest.approx(
        psi(ref, ref + 0.3, edges, reference_weights=weights))


@pytest.mark.parametrize(("p", "dof", "table"), [(0.05, 9, 16.919), (0.001, 9, 27.877),
                                                 (1e-6, 9, 44.811), (0.01, 2, 9.210)])
def test_the_chi_square_quantile_is_within_three_percent_of_the_tables(
        p: float, dof: int, table: float) -> None:
    assert chi2_quantile(p, dof) == pytest.approx(table, rel=0.03)
