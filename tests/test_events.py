"""Bad input is data: every malformed record becomes a Rejected with a reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from metarec.events import (
    MAX_FEATURE_VALUES,
    MAX_FEATURES,
    MAX_TIMESTAMP,
    MIN_TIMESTAMP,
    Click,
    Event,
    Impression,
    Rejected,
    decode_event,
)

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
        (raw(user_id="x").replace(b'"x"', b'"\\u12"'), "not_json"),  # a broken escape
        (raw(type="purchase"), "unknown_type"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "type"}).encode(), "unknown_type"),
        (raw(timestamp=1_700_000_000_000), "bad_timestamp"),  # milliseconds: a unit mistake
        (raw(timestamp=-5), "bad_timestamp"),
        (raw(timestamp="yesterday"), "bad_timestamp"),
        (raw(user_id={"nested": 1}), "schema"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "item_id"}).encode(), "schema"),
        (raw(user_id=""), "schema"),
        # the separator of a user × context task's key: it could name another's task
        (raw(user_id="u1\x1fplatform=ios"), "schema"),
        (raw(type="click", user_id="u1\x1fplatform=ios"), "schema"),
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


@pytest.mark.parametrize("value", [True, False, None])
def test_clicked_is_a_json_boolean_or_null(value: bool | None) -> None:
    imp = decode_event(raw(clicked=value), max_bytes=1000)
    assert isinstance(imp, Impression) and imp.clicked is value


@pytest.mark.parametrize("value", ["yes", "on", "t", "true", 1, 0, 1.0, [True]])
def test_clicked_that_only_looks_boolean_is_rejected(value: object) -> None:
    out = decode_event(raw(clicked=value), max_bytes=1000)
    assert isinstance(out, Rejected)
    assert out.reason == "schema" and "clicked" in out.detail


@pytest.mark.parametrize(
    "changes",
    [
        {"user_id": "\ud800"},
        {"item_id": "a\udfffb"},
        {"impression_id": "x\ud83d"},  # the high half of a pair, alone
        {"context": {"\udc80": "web"}},
        {"user_features": {"name": "\ud800"}},
        {"item_features": {"genre": ["ok", "\udbff"]}},
    ],
)
def test_a_lone_surrogate_in_an_id_or_feature_is_a_schema_rejection(
        changes: dict[str, object]) -> None:
    """JSON may escape half of a UTF-16 pair; that is no Unicode text, and would
    fail wherever the string is encoded later (feature hashing, keys, logs)."""
    out = decode_event(raw(**changes), max_bytes=1000)
    assert isinstance(out, Rejected)
    assert out.reason == "schema" and "lone surrogate" in out.detail


def test_an_escaped_surrogate_pair_is_one_character() -> None:
    imp = decode_event(raw(user_id="\U0001f600"), max_bytes=1000)
    assert isinstance(imp, Impression) and imp.user_id == "\U0001f600"
    assert imp.user_id.encode() == b"\xf0\x9f\x98\x80"


def test_a_feature_list_longer_than_the_limit_is_rejected_saying_the_limit() -> None:
    at_limit = decode_event(raw(item_features={"genre": ["g"] * MAX_FEATURE_VALUES}),
                            max_bytes=1000)
    assert isinstance(at_limit, Impression)
    out = decode_event(raw(item_features={"genre": ["g"] * (MAX_FEATURE_VALUES + 1)}),
                       max_bytes=1000)
    assert isinstance(out, Rejected) and out.reason == "schema"
    assert out.detail == (f"impression.item_features.genre: List should have at most "
                          f"{MAX_FEATURE_VALUES} items after validation, not "
                          f"{MAX_FEATURE_VALUES + 1}")


@pytest.mark.parametrize("group", ["context", "user_features", "item_features"])
def test_a_feature_map_with_more_features_than_the_limit_is_rejected(group: str) -> None:
    at_limit = decode_event(raw(**{group: {f"f{n}": n for n in range(MAX_FEATURES)}}),
                            max_bytes=2000)
    assert isinstance(at_limit, Impression)
    out = decode_event(raw(**{group: {f"f{n}": n for n in range(MAX_FEATURES + 1)}}),
                       max_bytes=2000)
    assert isinstance(out, Rejected) and out.reason == "schema"
    assert f"{group}: Dictionary should have at most {MAX_FEATURES} items" in out.detail


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ({"nested": 1}, "impression.context.f: should be a string, a number, a boolean or a "
                        "list of strings"),
        (None, "impression.context.f: should be a string, a number, a boolean or a "
               "list of strings"),
        (["a", True], "impression.context.f.1: Input should be a valid string"),
    ],
)
def test_a_bad_feature_value_is_explained_once_not_once_per_type_it_could_have_been(
        value: object, detail: str) -> None:
    out = decode_event(raw(context={"f": value}), max_bytes=1000)
    assert isinstance(out, Rejected) and out.reason == "schema"
    assert out.detail == detail


# -- the two validators agree ------------------------------------------------------------

_EVENT_ADAPTER: TypeAdapter[Impression | Click] = TypeAdapter(Event)
_ids = st.one_of(st.text(max_size=4), st.text(min_size=255, max_size=258),
                 st.integers(), st.floats(), st.booleans(), st.none())
_scalars = st.one_of(st.text(max_size=3), st.integers(), st.floats(), st.booleans(),
                     st.none())
_feature_maps = st.one_of(
    st.dictionaries(st.text(max_size=3), st.one_of(_scalars, st.lists(_scalars, max_size=3)),
                    max_size=4),
    st.dictionaries(st.text(max_size=3), st.just("v"), min_size=MAX_FEATURES,
                    max_size=MAX_FEATURES + 1),
    st.just({"genre": ["g"] * (MAX_FEATURE_VALUES + 1)}), _scalars)
_fields = {
    "type": st.sampled_from(["impression", "click", "Click", ""]),
    "user_id": _ids, "item_id": _ids, "impression_id": _ids,
    "timestamp": st.one_of(st.floats(), st.integers(), st.text(max_size=3),
                           st.floats(MIN_TIMESTAMP - 10, MAX_TIMESTAMP + 10)),
    "clicked": st.one_of(st.booleans(), st.none(), st.integers(0, 1), st.text(max_size=2)),
    "context": _feature_maps, "user_features": _feature_maps, "item_features": _feature_maps,
    "extra": _scalars,
}


@st.composite
def near_events(draw: st.DrawFn) -> bytes:
    """Records close to the schema: an event's fields, each present or not, each
    drawn from valid values and the mistakes clients make; sometimes a byte changed."""
    good = {**GOOD, "clicked": True, "item_features": {"genre": ["a"]}}
    record = {name: draw(values) if name not in good or draw(st.integers(0, 3)) == 0
              else good[name]
              for name, values in _fields.items() if name in good or draw(st.booleans())}
    encoded = json.dumps(record, allow_nan=True).encode()
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(encoded) - 1))
        encoded = encoded[:at] + bytes([draw(st.integers(0, 255))]) + encoded[at + 1:]
    return encoded


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_events())
def test_what_the_fast_decoder_accepts_pydantic_accepts_as_the_same_event(raw: bytes) -> None:
    decoded = decode_event(raw, max_bytes=1 << 20)
    try:
        reference: Impression | Click | None = _EVENT_ADAPTER.validate_json(raw)
    except ValidationError:
        reference = None
    if reference is None:
        assert isinstance(decoded, Rejected)
    else:
        assert decoded == reference and type(decoded) is type(reference)
