"""The users' state store on Kafka: a compacted changelog topic, one value per
user (keyed by user id, partitioned like the events), written in the member's
transactions (:mod:`streamer.transactions`) and read back when a partition is
assigned.

A restore keeps, for each user, the newest value whose transaction is known to
have committed (:mod:`streamer.txn_log`). It then writes a *marker* into the
partition, ``\\x00metarec-txn\\x00<incarnation>`` -> the last committed
transaction of the member before it, so that the next restore can still tell
that member's committed values from aborted ones once the committed offsets
name someone else.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from kafka import TopicPartition

from streamer.cluster import Cluster
from streamer.gc_pause import gc_paused
from streamer.txn_log import Confirmed, Tag, read_to_end

log = logging.getLogger("metarec.changelog")

MARKER = b"\x00metarec-txn\x00"
STAMP = MARKER + b"stamp\x00"
CONFIRMED = MARKER + b"confirmed\x00"


def stamp_marker(tag: Tag, stamp: int) -> tuple[bytes, bytes]:
    """The key and value saying that transaction ``tag`` commits offset ``stamp``
    for this changelog partition."""
    return STAMP + tag.incarnation.encode(), f"{tag.seq}:{stamp}".encode()


def confirmed_marker(incarnation: str, seq: int) -> tuple[bytes, bytes]:
    """The key and value saying ``incarnation``'s transaction ``seq`` committed."""
    return CONFIRMED + incarnation.encode(), str(seq).encode()


@dataclass
class PartitionState:
    """What a restore found in one changelog partition."""

    values: list[tuple[str, bytes]] = field(default_factory=list)
    confirmed: Confirmed = field(default_factory=Confirmed)
    skipped: Counter[str] = field(default_factory=Counter)
    #: the transaction that committed the partition's offsets (None: none known)
    committed: Tag | None = None
    stamps: dict[int, Tag] = field(default_factory=dict)


def restore(cluster: Cluster, topic: str, partitions: list[int],
            committed: dict[int, int | None], *, stall_seconds: float,
            own_id: str) -> dict[int, PartitionState]:
    """Each partition's users, as of its committed offsets; ``committed``: the
    group's committed offset of each changelog partition (a transaction's stamp).
    The garbage collector is paused: a million users make several million small
    objects, all alive until the end, and its passes over them took half the time."""
    with gc_paused():
        return _restore(cluster, topic, partitions, committed,
                        stall_seconds=stall_seconds, own_id=own_id)


def _restore(cluster: Cluster, topic: str, partitions: list[int],
             committed: dict[int, int | None], *, stall_seconds: float,
             own_id: str) -> dict[int, PartitionState]:
    tps = [TopicPartition(topic, p) for p in partitions]
    found = {p: PartitionState() for p in partitions}
    # per user key, per incarnation, the last two values: the newest may be of an
    # aborted transaction, and then the one before it holds
    candidates: dict[int, dict[bytes, dict[str, list[tuple[int, Tag, bytes]]]]] = {
        p: {} for p in partitions}
    for msg in read_to_end(cluster, tps, start={}, stall_seconds=stall_seconds,
                           own_id=own_id):
        state = found[msg.partition]
        key, value = msg.key, msg.value
        if key is not None and key.startswith(MARKER):
            try:
                _marker(state, key, value or b"")
            except (ValueError, UnicodeDecodeError, OverflowError):
                state.skipped["bad_marker"] += 1
            continue
        tag = Tag.of(msg.headers)
        if tag is None or key is None or value is None:
            state.skipped["not_ours"] += 1
            continue
        state.confirmed.saw(tag)
        kept = candidates[msg.partition].setdefault(key, {}).setdefault(tag.incarnation, [])
        kept.append((msg.offset, tag, value))
        del kept[:-2]
    for p, state in found.items():
        stamp = committed.get(p)
        state.committed = state.stamps.get(stamp) if stamp is not None else None
        if state.committed is not None:
            state.confirmed.note(state.committed.incarnation, state.committed.seq)
        for key, by_incarnation in candidates[p].items():
            valid = [c for kept in by_incarnation.values() for c in kept
                     if state.confirmed.covers(c[1])]
            if not valid:
                state.skipped["uncommitted"] += 1
                continue
            try:
                user = key.decode()
            except UnicodeDecodeError:
                state.skipped["bad_key"] += 1
                continue
            state.values.append((user, max(valid, key=lambda c: c[0])[2]))
        foreign = {k: n for k, n in state.skipped.items() if k != "uncommitted"}
        if foreign:
            log.warning("changelog %s partition %d: skipped %s (not this program's, or "
                        "damaged)", topic, p, foreign)
        if state.skipped["uncommitted"]:  # values of a transaction a crash cut short
            log.info("changelog %s partition %d: %d value(s) of transactions that did not "
                     "commit", topic, p, state.skipped["uncommitted"])
    return found


def _marker(state: PartitionState, key: bytes, value: bytes) -> None:
    if key.startswith(STAMP):
        seq, stamp = value.decode().split(":")
        state.stamps[int(stamp)] = Tag("", key[len(STAMP):].decode(), int(seq))
    elif key.startswith(CONFIRMED):
        state.confirmed.note(key[len(CONFIRMED):].decode(), int(value))
    else:
        raise ValueError("unknown marker")
