"""Bad input is data: every malformed record becomes a Rejected with a reason."""

from __future__ import annotations

import json

import pytest

from metarec.events import Click, Impression, Rejected, decode_event

GOOD = {"type": "impression", "impression_id": "i1", "user_id": "u1", "item_id": "a1",
        "timestamp": 1_700_000_000.5}


def raw(**changes: object) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def test_valid_impression_and_click_decode_with_ids_as_strings() -> None:
    imp = decode_event(raw(user_id=42, item_features={"genre": ["a", "b"], "year": 1995}),
                       max_bytes=1000)
    assert isinstance(imp, Impression)
    assert imp.user_id == "42" and imp.clicked is None
    click = decode_event(raw(type="click"), max_bytes=1000)
    assert isinstance(click, Click)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"not json at all", "not_json"),
        (b"\xff\xfe\x00", "not_json"),
        (raw(type="purchase"), "unknown_type"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "type"}).encode(), "unknown_type"),
        (raw(timestamp=1_700_000_000_000), "bad_timestamp"),  # milliseconds: a unit mistake
        (raw(timestamp=-5), "bad_timestamp"),
        (raw(timestamp="yesterday"), "bad_timestamp"),
        (raw(user_id={"nested": 1}), "schema"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "item_id"}).encode(), "schema"),
        (raw(user_id=""), "schema"),
        (b"[1, 2, 3]", "schema"),
        (raw(item_features={"x": "y" * 2000}), "oversized"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(record: bytes, reason: str) -> None:
    out = decode_event(record, max_bytes=1000)
    assert isinstance(out, Rejected)
    assert out.reason == reason
    assert out.detail


def test_unknown_fields_are_ignored_and_a_decoded_event_is_immutable() -> None:
    imp = decode_event(raw(campaign="c9", item_features={"year": 1995}), max_bytes=1000)
    assert isinstance(imp, Impression)
    assert not hasattr(imp, "campaign")
    assert imp.item_features == {"year": 1995} and imp.context == {}
    with pytest.raises(AttributeError):
        imp.user_id = "someone else"  # type: ignore[misc]
