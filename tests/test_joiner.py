"""Clicks join impressions in event time, within the attribution window."""

from __future__ import annotations

import numpy as np

from metarec.events import Click, Impression
from metarec.joiner import Joiner, Scored

T0 = 1_700_000_000.0


def imp(i: int, t: float, clicked: bool | None = None) -> Impression:
    return Impression(type="impression", impression_id=f"i{i}", user_id="u", item_id="a",
                      timestamp=T0 + t, clicked=clicked)


def click(i: int, t: float) -> Click:
    return Click(type="click", impression_id=f"i{i}", user_id="u", item_id="a", timestamp=T0 + t)


def test_prelabelled_impressions_are_labelled_at_once() -> None:
    j = Joiner()
    out = j.impression(imp(1, 0, clicked=True), Scored())
    assert [(o.impression.impression_id, o.label) for o in out] == [("i1", 1.0)]
    assert j.pending == 0


def test_click_within_window_labels_one_and_silence_labels_zero_after_watermark() -> None:
    j = Joiner(window=100, lateness=10)
    assert j.impression(imp(1, 0), Scored()) == []
    assert j.impression(imp(2, 5), Scored()) == []
    assert [o.label for o in j.click(click(1, 50))] == [1.0]
    # event time 110 -> watermark 100: i2's window (ends 105) is still open
    assert j.advance(T0 + 110) == []
    closed = j.advance(T0 + 116)
    assert [(o.impression.impression_id, o.label) for o in closed] == [("i2", 0.0)]
    assert j.stats["clicked"] == 1 and j.stats["no_click"] == 1


def test_click_for_a_closed_impression_never_becomes_a_label() -> None:
    j = Joiner(window=100, lateness=0)
    j.impression(imp(1, 0), Scored())
    assert [o.label for o in j.advance(T0 + 101)] == [0.0]
    # it may be a click whose impression is still to come, so it waits a window...
    assert j.click(click(1, 300)) == []
    assert j.advance(T0 + 401) == []
    assert j.stats["orphan_click_expired"] == 1
    # ...but a click already a window behind the watermark is late at once
    assert j.click(click(1, 200)) == []
    assert j.stats["late_click"] == 1


def test_click_before_its_impression_waits_for_it() -> None:
    j = Joiner(window=100, lateness=10)
    assert j.click(click(1, 3)) == []
    assert [o.label for o in j.impression(imp(1, 0), Scored())] == [1.0]


def test_memory_is_bounded_by_closing_the_earliest_window_first() -> None:
    j = Joiner(window=100, max_pending=2)
    j.impression(imp(1, 0), Scored())
    j.impression(imp(2, 1), Scored())
    out = j.impression(imp(3, 2), Scored())
    assert [(o.impression.impression_id, o.label) for o in out] == [("i1", 0.0)]
    assert j.pending == 2 and j.stats["evicted"] == 1


def test_oldest_pending_offset_per_partition_bounds_the_commit() -> None:
    j = Joiner(window=100)
    j.impression(imp(1, 0), Scored(), partition=0, offset=7)
    j.impression(imp(2, 1), Scored(), partition=0, offset=9)
    j.impression(imp(3, 1), Scored(), partition=1, offset=4)
    j.click(click(1, 2))
    assert j.oldest_offsets() == {0: 9, 1: 4}


def test_watermark_follows_the_slowest_active_partition() -> None:
    j = Joiner(window=100, lateness=0, idle_after=10)
    j.impression(imp(1, 0), Scored(), partition=1, offset=0)
    j.advance(T0 + 0, partition=1, now=0.0)
    # partition 0 was read far ahead; partition 1's impression must stay open
    assert j.advance(T0 + 500, partition=0, now=1.0) == []
    assert [o.label for o in j.click(click(1, 50))] == [1.0]
    # a partition silent for longer than idle_after no longer holds the watermark back
    j.impression(imp(2, 60), Scored(), partition=1, offset=1)
    j.advance(T0 + 60, partition=1, now=2.0)
    closed = j.advance(T0 + 600, partition=0, now=20.0)
    assert [o.impression.impression_id for o in closed] == ["i2"]


def test_an_assigned_partition_that_has_not_delivered_yet_holds_the_watermark() -> None:
    j = Joiner(window=100, lateness=0, idle_after=10)
    j.track([0, 1], now=0.0)
    assert j.advance(T0 + 500, partition=0, now=1.0) == []
    assert j.watermark == float("-inf")


def test_the_watermark_shortcuts_change_nothing() -> None:
    """Skipping the watermark when it cannot move (same wall time, no rise of the
    slowest partition) labels exactly what recomputing it at every event does."""
    rng = np.random.default_rng(3)
    fast, full = Joiner(window=50.0, lateness=5.0, idle_after=2.0), \
        Joiner(window=50.0, lateness=5.0, idle_after=2.0)
    now, labels = 0.0, {id(fast): [], id(full): []}
    for n in range(3000):
        if rng.random() < 0.05:
            now += rng.choice([0.5, 3.0])  # a new micro-batch; sometimes a partition idles
        partition = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        t = n * 0.3 + rng.normal(0, 5) + 40 * partition
        for j in (fast, full):
            if j is full:
                j._last_now = -1.0  # never the same: recompute every time
            out = j.advance(T0 + t, partition, now)
            out += j.impression(imp(n, t), Scored(), partition, n)
            labels[id(j)] += [(o.impression.impression_id, o.label) for o in out]
    assert labels[id(fast)] == labels[id(full)]
    assert len(labels[id(fast)]) > 2500  # most windows closed along the way
    assert fast.watermark == full.watermark
