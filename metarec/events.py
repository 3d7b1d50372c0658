"""Event schema: what crosses the edge of the system, validated once with pydantic.

Two event types arrive on the events topic, keyed by user id:

* ``impression``: an item (product or ad) was shown to a user. A log that is
  already joined may carry ``clicked``; otherwise a later ``click`` labels it.
* ``click``: the user clicked an impression.

Timestamps are event time in seconds since the Unix epoch (float); ``clicked`` is
a JSON boolean (or absent, or null); identifiers and features are Unicode text
(JSON's parser refuses a lone surrogate escape such as ``"\\ud800"``, so nothing
downstream meets one when it encodes them), and the feature maps are bounded
(:data:`MAX_FEATURES`, :data:`MAX_FEATURE_VALUES`). Anything that does not fit is
*data*, not an exception: :func:`decode_event` returns a :class:`Rejected` with a
reason from :data:`REJECT_REASONS`.

The schema is written once, below, and read by two validators: msgspec decodes a
record that fits it exactly (strict types, the bounds of :class:`msgspec.Meta`),
about three times cheaper than pydantic; anything else (a number for an id,
which pydantic's coercion takes, or a record to reject) goes to pydantic, whose
verdict and error messages are the reference. So msgspec only ever accepts what
pydantic accepts, as the same value (``tests/test_events.py`` checks this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec
from pydantic import AfterValidator, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

#: 1990-01-01 .. 2200-01-01: a timestamp outside is a unit mistake (ms, us) or garbage.
MIN_TIMESTAMP = 631_152_000.0
MAX_TIMESTAMP = 7_258_118_400.0

#: features per map, and values per list-valued feature, at most: the encoder keeps a
#: few tokens of each map, and a long list only costs validation time and memory
MAX_FEATURES = 64
MAX_FEATURE_VALUES = 64


def _bounded(*, max_length: int, min_length: int | None = None,
             pattern: str | None = None) -> tuple[object, object]:
    """The same bounds, for pydantic and for msgspec."""
    return (Field(min_length=min_length, max_length=max_length, pattern=pattern),
            msgspec.Meta(min_length=min_length, max_length=max_length, pattern=pattern))


FeatureValue = str | int | float | bool | Annotated[list[str],
                                                   *_bounded(max_length=MAX_FEATURE_VALUES)]
Features = Annotated[dict[str, FeatureValue], *_bounded(max_length=MAX_FEATURES)]
Identifier = Annotated[str, *_bounded(min_length=1, max_length=256)]
#: a user id never holds the separator of a user × context task's key
#: (:mod:`metarec.task_key`): one that did could write into another user's task
UserId = Annotated[str, *_bounded(min_length=1, max_length=256, pattern="^[^\x1f]+$")]

#: why a record is dead-lettered: the first five by :func:`decode_event`, the last two
#: by the stream (:mod:`metarec.ordering`, :mod:`metarec.joiner`)
REJECT_REASONS = ("oversized", "not_json", "unknown_type", "bad_timestamp", "schema",
                  "ahead_of_stream", "join_mismatch")


def _plausible_time(value: float) -> float:
    if not math.isfinite(value) or not MIN_TIMESTAMP <= value <= MAX_TIMESTAMP:
        raise ValueError(
            f"timestamp {value!r} is not seconds since the epoch between 1990 and 2200"
        )
    return value


Timestamp = Annotated[float, AfterValidator(_plausible_time)]

# The event types are plain frozen slots dataclasses that pydantic validates (the
# schema, the coercions and the error messages are pydantic's): every record on the
# hot path becomes one, and a slots dataclass is much cheaper to build than a BaseModel.
_CONFIG = ConfigDict(coerce_numbers_to_str=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Impression:
    """An item shown to a user; ``clicked`` is set only by logs that are already joined."""

    __pydantic_config__ = _CONFIG

    type: Literal["impression"]
    user_id: UserId
    item_id: Identifier
    impression_id: Identifier
    timestamp: Timestamp
    context: Features = field(default_factory=dict)
    user_features: Features = field(default_factory=dict)
    item_features: Features = field(default_factory=dict)
    # strict: a lax bool would take "yes", "on", "t" and 1 for true
    clicked: StrictBool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Click:
    """A click on an earlier impression (joined by ``impression_id``)."""

    __pydantic_config__ = _CONFIG

    type: Literal["click"]
    user_id: UserId
    item_id: Identifier
    impression_id: Identifier
    timestamp: Timestamp


Event = Annotated[Impression | Click, Field(discriminator="type")]
_EVENT: TypeAdapter[Impression | Click] = TypeAdapter(Event)
# msgspec takes no union of dataclasses: one decoder per type, the common one first
_STRICT = (msgspec.json.Decoder(Impression), msgspec.json.Decoder(Click))


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that could not become an event, and why."""

    reason: str
    detail: str


def decode_event(raw: bytes, *, max_bytes: int) -> Impression | Click | Rejected:
    """Parse and validate one raw record; never raises on bad input."""
    if len(raw) > max_bytes:
        return Rejected("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    event = _decode_strict(raw)
    if event is not None:
        return event
    try:
        return _EVENT.validate_json(raw)
    except ValidationError as exc:
        return Rejected(_reason(exc), _summary(exc))


def _decode_strict(raw: bytes) -> Impression | Click | None:
    """The event, if msgspec finds the record fits the schema exactly; else None."""
    for strict in _STRICT:
        try:
            event = strict.decode(raw)
        except msgspec.MsgspecError:
            continue
        # what msgspec does not check: the bytes of a field it skips (an unknown key,
        # a value it ignores) may be invalid UTF-8, which pydantic rejects; and the
        # timestamp's range (an AfterValidator)
        try:
            raw.decode()
        except UnicodeDecodeError:
            return None
        return event if MIN_TIMESTAMP <= event.timestamp <= MAX_TIMESTAMP else None
    return None


#: what pydantic's JSON parser says of a lone surrogate escape (``"\ud800"`` unpaired)
_SURROGATE_ERRORS = ("surrogate in hex escape", "end of hex escape")
#: the members of FeatureValue, as pydantic names them in an error's location
_FEATURE_MEMBERS = frozenset({"str", "int", "float", "bool", "list[str]"})


def _reason(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    kinds = {e["type"] for e in errors}
    if "json_invalid" in kinds:
        # well-formed JSON, but a string in it is no Unicode text: the schema's call
        return "schema" if _lone_surrogate(errors) else "not_json"
    if kinds & {"union_tag_invalid", "union_tag_not_found"}:
        return "unknown_type"
    if any(e["loc"] and e["loc"][-1] == "timestamp" for e in errors):
        return "bad_timestamp"
    return "schema"


def _lone_surrogate(errors: list[ErrorDetails]) -> bool:
    return any(e["type"] == "json_invalid" and any(s in e["msg"] for s in _SURROGATE_ERRORS)
               for e in errors)


def _summary(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    if _lone_surrogate(errors):
        where = errors[0]["msg"].rpartition(" at ")[2]
        return (f"a string holds a lone surrogate escape (\\ud800-\\udfff without its "
                f"pair), which is not Unicode text, at {where}")
    parts: list[str] = []
    for error in errors:
        part = _describe(error)
        if part is not None and part not in parts:
            parts.append(part)
    return "; ".join(parts)[:500]


def _describe(error: ErrorDetails) -> str | None:
    loc, msg = error["loc"], error["msg"]
    if len(loc) > 3 and loc[3] in _FEATURE_MEMBERS:
        # a feature value fails each member of FeatureValue: say why once, as the
        # members of its shape see it (a list: list[str]; anything else: the scalars)
        a_list = len(loc) > 4 or isinstance(error["input"], list)
        if a_list != (loc[3] == "list[str]"):
            return None
        if not a_list:
            msg = "should be a string, a number, a boolean or a list of strings"
        loc = loc[:3] + loc[4:]
    return f"{'.'.join(map(str, loc)) or '<root>'}: {msg}"
