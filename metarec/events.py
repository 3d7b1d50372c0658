"""Event schema: what crosses the edge of the system, validated once with pydantic.

Two event types arrive on the events topic, keyed by user id:

* ``impression``: an item (product or ad) was shown to a user. A log that is
  already joined may carry ``clicked``; otherwise a later ``click`` labels it.
* ``click``: the user clicked an impression.

Timestamps are event time in seconds since the Unix epoch (float). Anything that
does not fit is *data*, not an exception: :func:`decode_event` returns a
:class:`Rejected` with a reason from :data:`REJECT_REASONS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError

#: 1990-01-01 .. 2200-01-01: a timestamp outside is a unit mistake (ms, us) or garbage.
MIN_TIMESTAMP = 631_152_000.0
MAX_TIMESTAMP = 7_258_118_400.0

FeatureValue = str | int | float | bool | list[str]
Identifier = Annotated[str, Field(min_length=1, max_length=256)]

REJECT_REASONS = ("oversized", "not_json", "unknown_type", "bad_timestamp", "schema")


def _plausible_time(value: float) -> float:
    if not math.isfinite(value) or not MIN_TIMESTAMP <= value <= MAX_TIMESTAMP:
        raise ValueError(
            f"timestamp {value!r} is not seconds since the epoch between 1990 and 2200"
        )
    return value


Timestamp = Annotated[float, AfterValidator(_plausible_time)]

# The event types are plain frozen slots dataclasses that pydantic validates (the
# schema, the coercions and the error messages are pydantic's): validating a record
# into one costs about half of what it did into a BaseModel, on the hot path.
_CONFIG = ConfigDict(coerce_numbers_to_str=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Impression:
    """An item shown to a user; ``clicked`` is set only by logs that are already joined."""

    __pydantic_config__ = _CONFIG

    type: Literal["impression"]
    user_id: Identifier
    item_id: Identifier
    impression_id: Identifier
    timestamp: Timestamp
    context: dict[str, FeatureValue] = field(default_factory=dict)
    user_features: dict[str, FeatureValue] = field(default_factory=dict)
    item_features: dict[str, FeatureValue] = field(default_factory=dict)
    clicked: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Click:
    """A click on an earlier impression (joined by ``impression_id``)."""

    __pydantic_config__ = _CONFIG

    type: Literal["click"]
    user_id: Identifier
    item_id: Identifier
    impression_id: Identifier
    timestamp: Timestamp


Event = Annotated[Impression | Click, Field(discriminator="type")]
_EVENT: TypeAdapter[Impression | Click] = TypeAdapter(Event)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that could not become an event, and why."""

    reason: str
    detail: str


def decode_event(raw: bytes, *, max_bytes: int) -> Impression | Click | Rejected:
    """Parse and validate one raw record; never raises on bad input."""
    if len(raw) > max_bytes:
        return Rejected("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        return _EVENT.validate_json(raw)
    except ValidationError as exc:
        return Rejected(_reason(exc), _summary(exc))


def _reason(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    kinds = {e["type"] for e in errors}
    if "json_invalid" in kinds:
        return "not_json"
    if kinds & {"union_tag_invalid", "union_tag_not_found"}:
        return "unknown_type"
    if any(e["loc"] and e["loc"][-1] == "timestamp" for e in errors):
        return "bad_timestamp"
    return "schema"


def _summary(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()]
    return "; ".join(parts)[:500]
