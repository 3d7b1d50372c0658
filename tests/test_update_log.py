"""The updates topic as a member reads it: every member's θ updates, applied once
each is complete and known committed, in order; whatever else is on the topic
(another client's records, damaged ones) is skipped and counted, never raised."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metarec.theta_state import Delta
from streamer.txn_log import TXN_HEADER, Tag
from streamer.updates import CONFIRMS_HEADER, UpdateLog, confirmation, messages

DELTA = Delta(3, {"theta/item_bias": np.array([1, 2])},
              {"theta/item_bias": np.ones((2, 1), dtype=np.float32)})


def feed(log: UpdateLog, msgs: list[tuple[bytes, bytes, list[tuple[str, bytes]]]],
         start: int = 0) -> int:
    for i, (key, value, headers) in enumerate(msgs):
        log.add(start + i, key, value, headers)
    return start + len(msgs)


def test_an_update_is_applied_once_its_transaction_is_known_committed() -> None:
    log = UpdateLog(own={"mine": 0})
    at = feed(log, messages(Tag("m", "x", 1), DELTA, {}))
    assert log.ready() == []  # the next transaction, or a confirmation, says so
    feed(log, [confirmation(Tag("m", "x", 1))], at)
    ((tag, delta),) = log.ready()
    assert (tag.incarnation, tag.seq, delta.examples if delta else None) == ("x", 1, 3)
    assert log.ready() == []  # once
    assert log.applied == {"x": 1}


def test_a_later_transaction_of_the_same_incarnation_confirms_the_one_before() -> None:
    log = UpdateLog(own={})
    at = feed(log, messages(Tag("m", "x", 1), DELTA, {}))
    feed(log, messages(Tag("m", "x", 2), None, {}), at)
    assert [t.seq for t, _ in log.ready()] == [1]


def test_an_own_update_is_told_apart_up_to_what_this_process_knows_committed() -> None:
    log = UpdateLog(own={"mine": 4})
    assert log.is_own(Tag("", "mine", 4))
    assert not log.is_own(Tag("", "mine", 5))  # its commit failed here: maybe not there
    assert not log.is_own(Tag("", "other", 1))


HOSTILE: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]] = [
    (None, None, None),
    (b"x/1/0/1", b"", None),
    (b"x/1/0/1", b"", [(TXN_HEADER, b"m|x|\xc2\xb2")]),  # a digit int() refuses
    (b"x/1/3/1", b"", [(TXN_HEADER, b"m|x|1")]),  # chunk 3 of 1
    (b"x/1/0/0", b"", [(TXN_HEADER, b"m|x|1")]),
    (b"x/1/\xc2\xb2/1", b"", [(TXN_HEADER, b"m|x|1")]),
    (b"x/2/0/1", b"junk", [(TXN_HEADER, b"m|x|2"), (CONFIRMS_HEADER, b'{"x": 1e999}')]),
    (b"x/3/0/1", b"junk", [(TXN_HEADER, b"m|x|3"), (CONFIRMS_HEADER, b"[1, 2]")]),
    (b"x/4/0/1", b"junk", [(TXN_HEADER, b"m|x|4"), (CONFIRMS_HEADER, b"\xff")]),
    (b"confirm/x/9", b"", [(CONFIRMS_HEADER, b'{"x": "9"}')]),
    (b"confirm/x/9", b"", [(CONFIRMS_HEADER, json.dumps({"x": 9}).encode())]),
]


@pytest.mark.parametrize("message", HOSTILE)
def test_foreign_and_damaged_messages_are_skipped_never_raised(
        message: tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]) -> None:
    log = UpdateLog(own={})
    log.add(0, *message)
    for _, delta in log.ready():  # a damaged payload is skipped and counted
        assert delta is None or delta.examples >= 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=30), st.binary(max_size=60),
                          st.lists(st.tuples(st.sampled_from([TXN_HEADER, CONFIRMS_HEADER, "x"]),
                                             st.binary(max_size=30)), max_size=3)),
                max_size=20))
def test_any_bytes_on_the_topic_leave_the_log_working(
        msgs: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    log = UpdateLog(own={})
    at = feed(log, msgs)
    log.ready()
    at = feed(log, messages(Tag("m", "good", 1), DELTA, {}), at)
    feed(log, [confirmation(Tag("m", "good", 1))], at)
    assert ("good", 1) in {(t.incarnation, t.seq) for t, _ in log.ready()}
