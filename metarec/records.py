"""What a stream session takes in and what it refuses: raw records and dead letters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)  # not frozen: records are made by the hundred thousand
class Record:
    """A raw record and where it came from (partition/offset -1 for files);
    ``timestamp_ms`` is the Kafka record timestamp (-1: none), ``headers`` its
    headers. Read-only by convention."""

    value: bytes
    key: bytes | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp_ms: int = -1
    headers: list[tuple[str, bytes]] | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record refused, with a reason from :data:`metarec.events.REJECT_REASONS`
    (or the session's own: ``ahead_of_stream``, ``join_mismatch``) and a detail."""

    record: Record
    reason: str
    detail: str
