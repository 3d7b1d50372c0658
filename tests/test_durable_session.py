"""A session's durable state without Kafka: what a checkpoint holds is what a
restore gives back, a session restored at a commit and fed the records after it
ends as the uninterrupted one does, and damaged state is refused, never loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metarec.datasets.synthetic import SyntheticStream
from metarec.records import Record
from metarec.session import StreamSession
from metarec.theta_state import Delta, DeltaError
from tests.helpers import small_settings

EVENTS = list(SyntheticStream(users=200, events_per_user=12, prelabelled=False,
                              click_delay=(5.0, 600.0), seed=4).events())
#: one partition, offsets in stream order
RECORDS = [Record(json.dumps(e).encode(), partition=0, offset=i) for i, e in enumerate(EVENTS)]


def session(**changes: object) -> StreamSession:
    return StreamSession(small_settings(**changes).session, durable=True, wall_clock=False)


def learned(s: StreamSession) -> dict[str, int]:
    store = s.learner.users
    return {u: int(store.learned[row]) for u, row in store.rows.items()}


@pytest.mark.parametrize(("release", "task_context"), [
    ("window_end", None), ("on_arrival", None), ("window_end", "platform")])
def test_a_session_restored_at_a_commit_learns_the_rest_exactly_once(
        release: str, task_context: str | None) -> None:
    """Crash after a commit and after more learning: the restored session, fed the
    records again from the committed offset, ends with every user's labels learned
    once, as the uninterrupted session does, and θ counts the same labels. (Clicks
    learned on arrival are learned while older impressions wait, past the offset
    committed: the restored session skips them when they are read again.) With a
    task key, every (user, platform) task as well as every user."""
    whole = session(click_release=release, task_context=task_context)
    whole.process(RECORDS)
    whole.finish()
    if task_context is not None:
        assert sum("\x1f" in key for key in learned(whole)) > len(learned(whole)) / 2

    first = session(click_release=release, task_context=task_context)
    first.process(RECORDS[:2000])
    committed = first.held_offsets().get(0, 2000)
    checkpoint = first.checkpoint({0: committed})
    assert checkpoint.theta is not None
    first.committed()
    first.process(RECORDS[2000:2600])  # learned, never made durable: the crash

    restored = session(click_release=release, task_context=task_context)
    restored.apply_delta(Delta.loads(checkpoint.theta.dumps()))
    found = restored.restore(0, checkpoint.users[0], committed)
    assert found.refused == 0
    assert restored.learner.examples_learned == checkpoint.theta.examples
    out = restored.process(RECORDS[committed:])
    restored.finish()
    if release == "on_arrival":
        assert out.events["already_learned"] > 0
    assert learned(restored) == learned(whole)
    assert restored.learner.examples_learned == whole.learner.examples_learned


def test_a_rollback_returns_theta_and_users_to_the_last_durable_point() -> None:
    s = session()
    s.process(RECORDS[:1500])
    s.checkpoint({0: s.held_offsets().get(0, 1500)})
    s.committed()
    theta = {k: v.clone() for k, v in s.learner.theta.items()}
    examples = s.learner.examples_learned
    s.process(RECORDS[1500:2500])
    assert s.learner.examples_learned > examples
    s.rollback()
    assert s.learner.examples_learned == examples
    assert all(np.array_equal(theta[k].numpy(), v.numpy()) for k, v in s.learner.theta.items())
    assert len(s.learner.users) == 0  # restored from the changelog, not kept stale
    assert s.held_offsets() == {}


def test_another_members_delta_adds_to_theta_and_is_not_sent_back() -> None:
    a, b = session(), session()
    a.process(RECORDS[:1500])
    delta = a.checkpoint({0: 0}).theta
    assert delta is not None
    before = {k: v.clone() for k, v in b.learner.theta.items()}
    b.apply_delta(delta)
    changed = sum(int((v != before[k]).any()) for k, v in b.learner.theta.items())
    assert changed > 0
    assert b.learner.examples_learned == delta.examples
    assert b.checkpoint({}).theta is None  # applied to the base too: nothing of b's own


def test_learning_while_a_checkpoint_is_in_flight_stays_out_of_its_durable_point() -> None:
    """A commit goes to the broker while the session learns on: once it is
    durable, the base is θ as of the checkpoint, so a rollback drops the learning
    since, and the next checkpoint carries it."""
    s = session()
    s.process(RECORDS[:1500])
    at_checkpoint = {k: v.clone() for k, v in s.learner.theta.items()}
    examples = s.learner.examples_learned
    s.checkpoint({0: s.held_offsets().get(0, 1500)})
    s.process(RECORDS[1500:2500])  # while the transaction is in flight
    s.committed()
    following = s.checkpoint({0: 0}).theta
    assert following is not None
    assert following.examples == s.learner.examples_learned - examples > 0
    s.rollback()
    assert s.learner.examples_learned == examples
    assert all(np.array_equal(at_checkpoint[k].numpy(), v.numpy())
               for k, v in s.learner.theta.items())


def test_another_members_delta_applied_while_ours_is_in_flight_is_not_sent_back() -> None:
    """Both members learned the same items' rows; the other's delta arrives while
    our transaction is in flight: once ours is durable, nothing is left to send."""
    ours, other = session(), session()
    ours.process(RECORDS[:1500])
    other.process(RECORDS[:1500])
    ours.checkpoint({0: 0})
    delta = other.checkpoint({0: 0}).theta
    assert delta is not None
    ours.apply_delta(delta)
    ours.committed()
    assert ours.checkpoint({}).theta is None


@pytest.mark.parametrize("damage", [
    lambda v: v[:-3], lambda v: b"MRU1" + v[4:20], lambda v: b"", lambda v: b"\x00" * len(v),
    lambda v: v + b"x"])
def test_damaged_user_values_are_refused_and_the_rest_load(damage: object) -> None:
    s = session()
    s.process(RECORDS[:1500])
    values = s.checkpoint({0: 0}).users[0]
    bad = [(values[0][0], damage(values[0][1]))]  # type: ignore[operator]
    found = session().restore(0, bad + values[1:], 0)
    assert found.refused == 1
    assert len(found.users) == len(values) - 1


def test_user_values_of_another_layout_are_refused() -> None:
    s = session()
    s.process(RECORDS[:1500])
    values = s.checkpoint({0: 0}).users[0]
    other = StreamSession(small_settings(dim=16).session, durable=True)
    assert other.restore(0, values, 0).refused == len(values)


@pytest.mark.parametrize("payload", [b"", b"junk", b"x\x9c" + b"\x00" * 40])
def test_damaged_deltas_raise_a_delta_error(payload: bytes) -> None:
    with pytest.raises(DeltaError):
        Delta.loads(payload)


def test_a_delta_of_another_layout_is_refused_whole() -> None:
    a = session()
    a.process(RECORDS[:1500])
    delta = a.checkpoint({0: 0}).theta
    assert delta is not None
    other = StreamSession(small_settings(dim=16).session, durable=True)
    before = {k: v.clone() for k, v in other.learner.theta.items()}
    with pytest.raises(DeltaError):
        other.apply_delta(delta)
    assert all(np.array_equal(before[k].numpy(), v.numpy())
               for k, v in other.learner.theta.items())


def crash_and_restore(changelog: dict[str, bytes], theta: list[Delta], committed: int,
                      **settings: object) -> StreamSession:
    """A new session from what the changelog and the updates topic hold."""
    restored = session(**settings)
    for delta in theta:
        restored.apply_delta(Delta.loads(delta.dumps()))
    assert restored.restore(0, list(changelog.items()), committed).refused == 0
    return restored


def commit(s: StreamSession, changelog: dict[str, bytes], theta: list[Delta],
           position: int) -> int:
    committed = s.held_offsets().get(0, position)
    checkpoint = s.checkpoint({0: committed})
    changelog.update(checkpoint.users.get(0, []))  # compaction: the newest value wins
    if checkpoint.theta is not None:
        theta.append(checkpoint.theta)
    s.committed()
    return committed


@pytest.mark.parametrize("release", ["window_end", "on_arrival"])
def test_two_crashes_while_an_impression_holds_the_offset_still_learn_everything_once(
        release: str) -> None:
    """The committed offset stays behind an impression waiting for its click while
    the member crashes twice: what the first restore skipped is still skipped
    after the second (a restored user's value keeps what it had learned)."""
    whole = session(click_release=release)
    whole.process(RECORDS)
    whole.finish()
    changelog: dict[str, bytes] = {}
    theta: list[Delta] = []

    first = session(click_release=release)
    first.process(RECORDS[:2000])
    committed = commit(first, changelog, theta, 2000)
    second = crash_and_restore(changelog, theta, committed, click_release=release)
    second.process(RECORDS[committed:2005])
    committed = commit(second, changelog, theta, 2005)
    third = crash_and_restore(changelog, theta, committed, click_release=release)
    third.process(RECORDS[committed:])
    third.finish()
    assert learned(third) == learned(whole)
    assert third.learner.examples_learned == whole.learner.examples_learned


def test_a_repeat_of_an_impression_learned_before_the_crash_is_still_a_duplicate() -> None:
    """A producer re-sent an impression after the commit point: the original run
    drops the repeat as a duplicate, and so does a restored one, which skipped
    the original as already learned."""
    changelog: dict[str, bytes] = {}
    theta: list[Delta] = []
    first = session(click_release="on_arrival")
    first.process(RECORDS[:2600])
    committed = commit(first, changelog, theta, 2600)
    skipped = sorted(o for offsets in session(click_release="on_arrival").restore(
        0, list(changelog.items()), committed).done.values() for o in offsets)
    repeated = next(EVENTS[o] for o in skipped if EVENTS[o]["type"] == "impression")
    at = max(skipped) + 1  # soon after the original, in its window
    events = [*EVENTS[:at], repeated, *EVENTS[at:]]
    records = [Record(json.dumps(e).encode(), partition=0, offset=i)
               for i, e in enumerate(events)]

    whole = session(click_release="on_arrival")
    whole.process(records)
    whole.finish()
    restored = crash_and_restore(changelog, theta, committed, click_release="on_arrival")
    restored.process(records[committed:])
    restored.finish()
    assert restored.learner.examples_learned == whole.learner.examples_learned
