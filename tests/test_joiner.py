"""Clicks join impressions in event time, within the attribution window."""

from __future__ import annotations

from metarec.events import Click, Impression, Rejected
from metarec.joiner import ClickRelease, Joiner, Scored

T0 = 1_700_000_000.0


def imp(i: int, t: float, clicked: bool | None = None, user: str = "u") -> Impression:
    return Impression(type="impression", impression_id=f"i{i}", user_id=user, item_id="a",
                      timestamp=T0 + t, clicked=clicked)


def click(i: int, t: float, user: str = "u", item: str = "a") -> Click:
    return Click(type="click", impression_id=f"i{i}", user_id=user, item_id=item,
                 timestamp=T0 + t)


def advance(j: Joiner, *times: float) -> list[tuple[str, float]]:
    out = []
    for t in times:
        out += [(o.impression.impression_id, o.label) for o in j.advance(T0 + t)]
    return out


def test_prelabelled_impressions_are_labelled_at_once() -> None:
    j = Joiner()
    out = j.impression(imp(1, 0, clicked=True), Scored())
    assert [(o.impression.impression_id, o.label) for o in out] == [("i1", 1.0)]
    assert j.pending == 0


def test_click_within_window_labels_one_and_silence_labels_zero_after_watermark() -> None:
    j = Joiner(release=ClickRelease.ON_ARRIVAL, window=100, lateness=10)
    assert j.impression(imp(1, 0), Scored()) == []
    assert j.impression(imp(2, 5), Scored()) == []
    joined = j.click(click(1, 50))
    assert not isinstance(joined, Rejected) and [o.label for o in joined] == [1.0]
    # the clock is the lower median of the last five event times: at 110 the
    # watermark is 100, and i2's window (ends 105) is still open
    assert advance(j, 110, 110, 110) == []
    assert advance(j, 116, 116, 116) == [("i2", 0.0)]
    assert j.stats["clicked"] == 1 and j.stats["no_click"] == 1


def test_click_for_a_closed_impression_never_becomes_a_label() -> None:
    j = Joiner(window=100, lateness=0)
    j.impression(imp(1, 0), Scored())
    assert advance(j, 101, 101, 101) == [("i1", 0.0)]
    # a click for an impression already labelled is late, whenever it comes
    assert j.click(click(1, 102)) == []
    assert j.stats["late_click"] == 1
    # a click of an unknown impression may precede it, so it waits a window...
    assert j.click(click(2, 300)) == []
    assert advance(j, 401, 401, 401) == []
    assert j.stats["orphan_click_expired"] == 1
    # ...but a click already a window behind the watermark is late at once
    assert j.click(click(3, 200)) == []
    assert j.stats["late_click"] == 2


def test_by_default_a_click_is_learned_with_the_no_clicks_of_its_time() -> None:
    """Clicks are learned when their window closes, in impression order with the
    no-clicks: the learner never sees an hour of positives before their negatives."""
    j = Joiner(window=100, lateness=0)
    for i in range(3):
        j.impression(imp(i, i), Scored())
    assert j.click(click(2, 10)) == []  # known, but not learned yet
    assert j.click(click(0, 20)) == []
    assert j.click(click(0, 21)) == [] and j.stats["duplicate_click"] == 1
    assert advance(j, 150, 150, 150) == [("i0", 1.0), ("i1", 0.0), ("i2", 1.0)]
    j.impression(imp(9, 140), Scored())
    j.click(click(9, 145))
    assert [(o.impression.impression_id, o.label) for o in j.close_all()] == [("i9", 1.0)]
    assert j.stats["clicked"] == 3 and j.stats["no_click"] == 1


def test_click_before_its_impression_waits_for_it() -> None:
    j = Joiner(release=ClickRelease.ON_ARRIVAL, window=100, lateness=10)
    assert j.click(click(1, 3)) == []
    assert [o.label for o in j.impression(imp(1, 0), Scored())] == [1.0]


def test_a_click_joins_only_its_own_users_impression() -> None:
    j = Joiner(release=ClickRelease.ON_ARRIVAL, window=100, lateness=10)
    j.impression(imp(1, 0, user="alice"), Scored())
    foreign = j.click(click(1, 5, user="mallory"))
    assert isinstance(foreign, Rejected) and foreign.reason == "join_mismatch"
    assert "mallory" in foreign.detail and "alice" in foreign.detail
    other_item = j.click(click(1, 6, user="alice", item="b"))
    assert isinstance(other_item, Rejected) and other_item.reason == "join_mismatch"
    assert j.pending == 1  # the impression still waits for its own click
    own = j.click(click(1, 7, user="alice"))
    assert not isinstance(own, Rejected) and [o.label for o in own] == [1.0]
    assert j.stats["click_mismatch"] == 2
    # early clicks wait apart by user and item: a foreign one neither labels the
    # impression nor hides its own click
    j.click(click(2, 3, user="alice"))
    j.click(click(2, 4, user="mallory"))
    assert [o.label for o in j.impression(imp(2, 0, user="alice"), Scored())] == [1.0]
    j.click(click(3, 4, user="mallory"))
    assert j.impression(imp(3, 0, user="alice"), Scored()) == []


def test_an_impression_id_seen_again_within_the_horizon_is_dropped() -> None:
    j = Joiner(window=100, lateness=0, dedup_horizon=1000)
    j.impression(imp(1, 0), Scored())
    assert j.impression(imp(1, 1), Scored()) == []  # still pending
    assert advance(j, 200, 200, 200) == [("i1", 0.0)]
    assert j.impression(imp(1, 300), Scored()) == []  # already labelled
    assert [o.label for o in j.impression(imp(5, 300, clicked=True), Scored())] == [1.0]
    assert j.impression(imp(5, 301, clicked=False), Scored()) == []
    assert j.stats["duplicate_impression"] == 3
    # past the horizon the id is free again
    advance(j, 1500, 1500, 1500)
    assert j.impression(imp(1, 1500), Scored()) == []
    assert j.pending == 1


def test_one_outlier_moves_no_window() -> None:
    """An event a day ahead of the stream must not close every window."""
    j = Joiner(window=100, lateness=10)
    for t in range(0, 50, 10):
        j.advance(T0 + t)
        j.impression(imp(t, t), Scored())
    assert advance(j, 86_400) == []
    assert j.watermark < T0 + 50 and j.pending == 5
    # the stream goes on; its windows close in their own time
    assert [i for i, _ in advance(j, 111, 112, 113)] == ["i0"]


def test_the_end_of_a_finite_log_closes_every_window() -> None:
    j = Joiner(window=100)
    j.impression(imp(1, 0), Scored(), partition=0)
    j.impression(imp(2, 0), Scored(), partition=3)
    assert sorted(o.impression.impression_id for o in j.close_all()) == ["i1", "i2"]
    assert j.pending == 0


def test_pending_memory_is_bounded_in_bytes() -> None:
    j = Joiner(window=100, max_pending_bytes=150_000)
    closed = []
    for i in range(10):
        closed += j.impression(imp(i, i), Scored(), size=64_000)
    assert j.pending == 2 and j.pending_bytes == 128_000
    assert [o.impression.impression_id for o in closed] == [f"i{i}" for i in range(8)]
    assert j.stats["evicted"] == 8


def test_revoked_partitions_pending_impressions_are_forgotten() -> None:
    j = Joiner(window=100)
    j.impression(imp(1, 0), Scored(), partition=0, offset=3, size=10)
    j.impression(imp(2, 0), Scored(), partition=1, offset=4, size=10)
    j.revoke([0])
    assert j.pending == 1 and j.pending_bytes == 10 and j.oldest_offsets() == {1: 4}


def test_memory_is_bounded_by_closing_the_earliest_window_first() -> None:
    j = Joiner(window=100, max_pending=2)
    j.impression(imp(1, 0), Scored())
    j.impression(imp(2, 1), Scored())
    out = j.impression(imp(3, 2), Scored())
    assert [(o.impression.impression_id, o.label) for o in out] == [("i1", 0.0)]
    assert j.pending == 2 and j.stats["evicted"] == 1


def test_oldest_pending_offset_per_partition_bounds_the_commit() -> None:
    j = Joiner(release=ClickRelease.ON_ARRIVAL, window=100)
    j.impression(imp(1, 0), Scored(), partition=0, offset=7)
    j.impression(imp(2, 1), Scored(), partition=0, offset=9)
    j.impression(imp(3, 1), Scored(), partition=1, offset=4)
    j.click(click(1, 2))
    assert j.oldest_offsets() == {0: 9, 1: 4}




def test_a_click_waiting_for_its_impression_bounds_the_commit() -> None:
    """Committing past an early click would lose it in a crash: its impression
    would be read again, the click not."""
    j = Joiner(window=100)
    j.click(click(1, 5), partition=0, offset=3)
    j.impression(imp(2, 6), Scored(), partition=0, offset=4)
    assert j.oldest_offsets() == {0: 3}
    j.impression(imp(1, 0), Scored(), partition=0, offset=5)  # joined: no longer waits
    assert j.oldest_offsets() == {0: 4}
    j.click(click(3, 7), partition=1, offset=9)
    j.revoke([1])
    assert j.oldest_offsets() == {0: 4}
