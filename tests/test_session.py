"""The stream session end to end in one process: unlabelled traffic, hostile
records, several partitions; nothing escapes, nothing valid is lost or relabelled."""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metarec.datasets.synthetic import SyntheticStream
from metarec.events import REJECT_REASONS
from metarec.records import Record
from metarec.session import StreamSession
from tests.helpers import small_settings

T0 = 1_700_000_000.0
STREAM = list(SyntheticStream(users=20, events_per_user=6, prelabelled=False, seed=5,
                              click_delay=(5.0, 600.0)).events())
CLICKED = {e["impression_id"] for e in STREAM if e["type"] == "click"}
IMPRESSIONS = {e["impression_id"]: e for e in STREAM if e["type"] == "impression"}


def fresh_session() -> StreamSession:
    s = small_settings(meta_every=100, meta_users=16)
    return StreamSession(s.session)


def partition_of(user: str) -> int:
    return zlib.crc32(user.encode()) % 3


def valid_records(events: list[dict[str, Any]] = STREAM, partitions: int = 3) -> list[Record]:
    return [Record(json.dumps(e).encode(), e["user_id"].encode(), "events",
                   partition_of(e["user_id"]) % partitions, n) for n, e in enumerate(events)]


def run(records: list[Record], batch: int) -> tuple[StreamSession, dict[str, int], list[Any]]:
    """Labels by impression id (from the learned predictions), and the dead letters."""
    session, labels, dead = fresh_session(), {}, []
    results = [session.process(records[i:i + batch]) for i in range(0, len(records), batch)]
    results.append(session.finish())
    for result in results:
        dead += result.dead_letters
        for user, ts, label in zip(result.predictions.user_id,
                                   result.predictions.timestamp.tolist(),
                                   result.predictions.label.tolist(), strict=True):
            labels[f"{user}@{ts}"] = int(label)
    return session, labels, dead


def truth(events: list[dict[str, Any]] = STREAM) -> dict[str, int]:
    clicked = {e["impression_id"] for e in events if e["type"] == "click"}
    return {f"{e['user_id']}@{e['timestamp']}": int(e["impression_id"] in clicked)
            for e in events if e["type"] == "impression"}


def test_micro_batches_of_unlabelled_impressions_are_scored_and_wait() -> None:
    session = fresh_session()
    imps = [json.dumps({"type": "impression", "impression_id": f"x{i}", "user_id": f"u{i % 3}",
                        "item_id": "i1", "timestamp": T0 + i}).encode() for i in range(6)]
    for raw in imps:  # one at a time, as a trickle: every batch has no label
        result = session.process([Record(raw)])
        assert len(result.predictions) == 0 and not result.dead_letters
    assert session.status().pending_impressions == 6
    assert len(session.finish().predictions) == 6


def test_every_impression_is_learned_once_with_its_joined_label() -> None:
    for batch in (1, 37, 500):
        _, labels, dead = run(valid_records(), batch)
        assert dead == []
        assert labels == truth()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


#: replacements that make a real event invalid, whatever else it holds
BREAKERS: list[tuple[str, Any]] = [
    ("user_id", None), ("user_id", ""), ("item_id", []), ("impression_id", {"a": 1}),
    ("timestamp", "soon"), ("timestamp", 1e15), ("timestamp", None), ("type", "purchase"),
    ("clicked", "yes"), ("clicked", 1), ("context", [1, 2]), ("item_features", "genre"),
]
IMPRESSION_ONLY = {"clicked", "context", "item_features"}


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "foreign_click", "resent"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=200))
    if kind == "json":
        return kind, json.dumps(draw(json_values)).encode()
    if kind == "mutated":
        key, value = draw(st.sampled_from(BREAKERS))
        # a click has no clicked, context or features: there those would be ignored
        kinds = ("impression",) if key in IMPRESSION_ONLY else ("impression", "click")
        event = dict(draw(st.sampled_from([e for e in STREAM if e["type"] in kinds])))
        return kind, json.dumps({**event, key: value}).encode()
    return kind, b""  # made where it is inserted: it depends on the stream there


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(0, 1), hostile()), min_size=1, max_size=40),
       st.sampled_from([7, 200]))
def test_hostile_records_change_no_valid_label_and_escape_nowhere(
        extra: list[tuple[float, tuple[str, bytes]]], batch: int) -> None:
    records = valid_records()
    kinds: dict[int, str] = {}
    for position, (kind, raw) in sorted(extra, key=lambda x: x[0]):
        at = max(1, int(position * len(records)))
        part = int(position * 1000) % 3
        earlier = [json.loads(r.value) for r in records[:at] if id(r) not in kinds]
        if kind == "resent":  # an impression sent again, as a retrying producer would
            imps = [e for e in earlier if e["type"] == "impression"]
            if not imps:
                continue
            again = imps[int(position * len(imps)) % len(imps)]
            raw, part = json.dumps(again).encode(), partition_of(again["user_id"])
        elif kind == "foreign_click":  # someone else's click on a real impression, now
            target = earlier[int(position * len(earlier)) % len(earlier)]
            raw = json.dumps({"type": "click", "impression_id": target["impression_id"],
                              "user_id": f"intruder-{len(kinds)}",
                              "item_id": target["item_id"],
                              "timestamp": earlier[-1]["timestamp"]}).encode()
        rec = Record(raw, b"k", "events", part, 10_000 + len(kinds))
        kinds[id(rec)] = kind
        records.insert(at, rec)
    session, labels, dead = run(records, batch)
    assert labels == truth()  # every valid impression once, with its own label
    by_record = {id(d.record): d for d in dead}
    assert all(d.reason in REJECT_REASONS and d.detail for d in dead)
    for rec in records:
        kind = kinds.get(id(rec))
        if kind is None:
            assert id(rec) not in by_record
        elif kind in ("bytes", "json", "mutated"):
            assert id(rec) in by_record, rec.value
    resent = sum(1 for k in kinds.values() if k == "resent")
    # within the dedup horizon a repeat is a duplicate; past it, too late to learn
    outcomes = Counter(session.status().join_outcomes)
    assert outcomes["duplicate_impression"] + outcomes["late_impression"] \
        == resent
    foreign = sum(1 for k in kinds.values() if k == "foreign_click")
    assert sum(1 for d in dead if d.reason == "join_mismatch") + \
        outcomes["late_click"] + outcomes["orphan_click_expired"] + \
        outcomes["click_outside_window"] >= foreign


def test_one_event_from_the_future_moves_no_window() -> None:
    """An impression 23 hours ahead, a third of the way into a near-live stream,
    on one partition or several: it is dead-lettered, and every real impression
    keeps its label."""
    live = list(SyntheticStream(users=40, events_per_user=8, prelabelled=False, seed=9,
                                click_delay=(5.0, 600.0), span_seconds=1800.0,
                                session_gap_seconds=600.0).events())
    for partitions in (1, 3):
        records = valid_records(live, partitions)
        at = len(records) // 3
        now = json.loads(records[at].value)["timestamp"]
        outlier = {"type": "impression", "impression_id": "from-the-future", "user_id": "u1",
                   "item_id": "i1", "timestamp": now + 23 * 3600}
        records.insert(at, Record(json.dumps(outlier).encode(), b"u1", "events",
                                  partition_of("u1") % partitions, 99_999))
        _, labels, dead = run(records, 50)
        assert labels == truth(live)
        assert [(d.reason, json.loads(d.record.value)["impression_id"]) for d in dead] == \
            [("ahead_of_stream", "from-the-future")]


def test_a_replay_does_not_depend_on_how_fast_its_records_come() -> None:
    """Without the wall clock no partition counts as idle: pauses between polls
    change nothing, even while partitions come one after another, as a consumer
    catching up hands them over."""
    s = small_settings(idle_partition_seconds=0.05)
    records = sorted(valid_records(), key=lambda r: r.partition)
    logs = []
    for pause in (0.0, 0.1):
        session = StreamSession(s.session, wall_clock=False)
        session.track(range(3), time.monotonic())
        seen = []
        for i in range(0, len(records), 40):
            result = session.process(records[i:i + 40], flush=False)
            seen += list(zip(result.predictions.user_id, result.predictions.p.tolist(),
                             strict=True))
            time.sleep(pause)
        result = session.finish()
        logs.append(seen + list(zip(result.predictions.user_id, result.predictions.p.tolist(),
                                    strict=True)))
    assert logs[0] == logs[1] and len(logs[0]) == len(IMPRESSIONS)
