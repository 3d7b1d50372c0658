"""Partitions are merged by event time, whatever order a consumer hands them over in,
and one record from the future cannot move a partition's progress."""

from __future__ import annotations

import heapq
import math

import numpy as np

from metarec.ordering import EventTimeOrder, Held, RecentMedian


def released(order: EventTimeOrder[str], caught_up: set[int] | None, now: float | None,
             paused: tuple[int, ...] = ()) -> list[Held[str]]:
    out, rejected = order.release(caught_up, now, paused)
    assert rejected == []
    return out


def times(held: list[Held[str]]) -> list[float]:
    return [h.timestamp for h in held]


def feed(order: EventTimeOrder[str], partition: int, ts: list[float], now: float = 0.0,
         first_offset: int = 0) -> list[Held[str]]:
    rejected = []
    for i, t in enumerate(ts):
        rejected += order.add(t, partition, first_offset + i, f"p{partition}@{t}", now)
    return rejected


def test_a_partition_read_ahead_waits_for_the_others() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=1e9)
    order.track([0, 1], 0.0)
    feed(order, 0, [float(t) for t in range(0, 1000, 10)])  # a whole chunk of partition 0
    assert released(order, set(), 1.0) == []
    feed(order, 1, [5.0, 15.0, 25.0, 35.0, 45.0])
    out = released(order, set(), 1.0)
    # partition 1's progress is 25 (the lower median of its last five): up to there
    assert times(out) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    # once partition 1 is known to be at its end, it holds nobody back
    rest = released(order, {1}, 1.0)
    assert times(rest)[:4] == [30.0, 35.0, 40.0, 45.0] and len(rest) == 100 + 5 - 6


def test_a_live_trickle_is_released_at_once() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600)
    order.track([0, 1, 2], 0.0)
    feed(order, 2, [100.0])
    assert times(released(order, {0, 1, 2}, 0.1)) == [100.0]


def test_a_silent_partition_stops_holding_the_others_back() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600, idle_after=10)
    order.track([0, 1], 0.0)
    feed(order, 0, [1.0, 2.0], 5.0)
    assert released(order, set(), 5.0) == []
    assert times(released(order, set(), 10.5)) == [1.0, 2.0]


def test_one_partition_needs_no_merge() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600)
    feed(order, -1, [3.0, 1.0, 2.0])
    assert times(released(order, None, None)) == [3.0, 1.0, 2.0]


def test_the_merge_does_not_depend_on_how_the_partitions_arrive() -> None:
    """Chunks of random size, partitions in random order: the release is always
    the merge of the partitions by event time, each partition's order kept."""
    rng = np.random.default_rng(7)
    parts = {p: np.sort(rng.uniform(0, 10_000, 300)).round(1).tolist() for p in range(4)}
    expected = [(t, p) for t, p in heapq.merge(*([(t, p) for t in parts[p]] for p in range(4)))]
    for _ in range(5):
        order: EventTimeOrder[str] = EventTimeOrder(max_ahead=1e9)
        order.track(range(4), 0.0)
        cursor = dict.fromkeys(parts, 0)
        out: list[Held[str]] = []
        while any(cursor[p] < len(parts[p]) for p in parts):
            p = int(rng.integers(4))
            n = int(rng.integers(1, 120))
            chunk = parts[p][cursor[p]:cursor[p] + n]
            feed(order, p, chunk, first_offset=cursor[p])
            cursor[p] += len(chunk)
            done = {q for q in parts if cursor[q] == len(parts[q])}
            out += released(order, done, 0.0)
        rest, rejected = order.finish()
        out += rest
        assert rejected == []
        assert [(h.timestamp, h.partition) for h in out] == expected


def test_an_event_from_the_future_is_held_aside_then_rejected() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600)
    feed(order, 0, [0.0, 10.0, 20.0, 30.0])
    assert feed(order, 0, [23 * 3600.0], first_offset=4) == []
    assert order.held_offsets() == {0: 0}
    assert times(released(order, None, None)) == [0.0, 10.0, 20.0, 30.0]
    assert order.held_offsets() == {0: 4}  # not committed past while it is undecided
    # the stream goes on where it was: two records far behind it show it was an outlier
    assert feed(order, 0, [40.0], first_offset=5) == []
    rejected = feed(order, 0, [50.0], first_offset=6)
    assert times(rejected) == [23 * 3600.0] and rejected[0].offset == 4
    assert times(released(order, None, None)) == [40.0, 50.0]
    assert order.held_offsets() == {}


def test_late_records_after_a_real_jump_do_not_make_it_an_outlier() -> None:
    """A producer resends old records after the first of the morning: they are behind
    where the partition was, so they say nothing of the jump, however many come,
    and the next record of the morning confirms it."""
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600)
    feed(order, 0, [0.0, 10.0, 20.0, 30.0, 40.0])
    morning = 8 * 3600.0
    retries = [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]  # more than the recent median holds
    assert feed(order, 0, [morning, *retries, morning + 60], first_offset=5) == []
    assert times(released(order, None, None)) == [0.0, 10.0, 20.0, 30.0, 40.0, *retries,
                                                  morning, morning + 60]


def test_a_real_jump_in_a_sparse_stream_loses_nothing_and_keeps_its_order() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600)
    feed(order, 0, [0.0, 10.0, 20.0])
    day = 86_400.0
    assert feed(order, 0, [day, day + 5, day + 9, day + 20]) == []
    assert times(released(order, None, None)) == [0.0, 10.0, 20.0, day, day + 5, day + 9, day + 20]


def test_a_finite_log_ends_with_everything_released_or_rejected() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600)
    order.track([0, 1], 0.0)
    feed(order, 0, [1.0, 2.0, 3.0, 9e6, 4.0])  # an outlier, then one record against it
    feed(order, 1, [1.5, 7e6])  # a last record after a gap, with nothing against it
    released, rejected = order.finish()
    assert times(released) == [1.0, 1.5, 2.0, 3.0, 4.0, 7e6] and times(rejected) == [9e6]
    assert order.buffered() == {0: 0, 1: 0}


def test_a_silent_partition_s_last_jump_is_taken() -> None:
    """Live, after a quiet night: the first record of the morning is not held
    for ever waiting for a second one."""
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600, idle_after=10)
    feed(order, 0, [0.0, 10.0], 0.0)
    feed(order, 0, [8 * 3600.0], 1.0)
    assert times(released(order, {0}, 5.0)) == [0.0, 10.0]
    assert times(released(order, {0}, 11.5)) == [8 * 3600.0]


def test_revoked_partitions_are_forgotten() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600)
    order.track([0, 1], 0.0)
    feed(order, 0, [1.0, 2.0])
    order.revoke([0])
    assert order.buffered() == {1: 0} and order.held_offsets() == {}


def test_the_recent_median_ignores_two_outliers_and_needs_three_values() -> None:
    m = RecentMedian()
    assert m.add(1e9) == -math.inf and m.add(1.0) == -math.inf
    assert m.add(2.0) == 1.0  # three values: the smallest, so an outlier among them is out
    assert m.add(3.0) == 2.0
    assert m.add(2e9) == 3.0
    assert m.add(4.0) == 3.0


def test_a_paused_partition_is_silent_but_not_idle() -> None:
    """A partition paused because it is ahead still holds the others back: its
    unread records must not be overtaken."""
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600, idle_after=10)
    order.track([0, 1], 0.0)
    feed(order, 0, [100.0, 101.0, 102.0, 103.0, 104.0], 0.0)
    feed(order, 1, [float(t) for t in range(5, 300, 10)], 11.0)
    out = released(order, set(), 11.0, paused=(0,))
    assert max(h.timestamp for h in out if h.partition == 1) <= 102.0  # 0's progress
    assert times(released(order, set(), 11.0))[-1] == 295.0  # idle once it is not paused


def test_an_idle_partition_settles_what_it_held_aside() -> None:
    order: EventTimeOrder[str] = EventTimeOrder(max_ahead=3600, idle_after=10)
    feed(order, 0, [0.0, 1.0, 2.0, 100_000.0, 3.0], 0.0)  # one record against the outlier
    assert times(released(order, None, 5.0)) == [0.0, 1.0, 2.0, 3.0]
    out, rejected = order.release(None, 20.0)
    assert out == [] and times(rejected) == [100_000.0]
    assert order.buffered() == {0: 0} and order.held_offsets() == {}
