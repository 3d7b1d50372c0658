"""Per-user state as state-store records: one value per user, keyed by user id.

A value holds the user's row of the store (fast weights, labels taught,
features, the task ring) and what a re-read of the source after a crash needs to
be learned exactly once: the offsets of the user's impressions (and their
clicks) already learned that the committed offset did not pass, and the scores
of the user's impressions still waiting for a label. A restored session skips
the first and reuses the second, so a re-read record is neither learned twice
nor scored again with weights that have seen its future.

:class:`UserChanges` notes, event by event, which users changed and in which
partition, and turns the changed ones into values at each durable point.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from metarec.errors import MetarecError
from metarec.users import UserRows, UserStore

MAGIC = b"MRU1"
_COUNT = struct.Struct("<I")
#: offsets a user's value keeps at most, of each kind (about 500 KB: a value must
#: fit in one Kafka message); past it the oldest are dropped, and a crash would
#: learn those again
MAX_OFFSETS = 20_000


class UserStateError(MetarecError, ValueError):
    """Bytes that are not a user-state value of this layout."""


@dataclass(frozen=True)
class Restored:
    """Users restored from a partition's state, and what their values said of
    records to be read again."""

    users: list[str]
    done: dict[str, list[int]]  # by user, offsets whose effect the state already holds
    scores: dict[str, dict[int, tuple[float, int]]]  # by user, offset -> (p, k) pending
    refused: int  # values of another layout, or damaged


class UserCodec:
    """The byte layout of a user's value in one configuration."""

    def __init__(self, store: UserStore, layout: str):
        self.store = store
        fields = [(name, a.dtype, a.shape[1:]) for name, a in
                  zip(UserRows._fields, store.export(np.zeros(0, dtype=np.int64)),
                      strict=True)]
        self.row = np.dtype([(n, d, s) for n, d, s in fields])
        self.header = MAGIC + hashlib.sha256(
            f"{layout}|{self.row.descr}".encode()).digest()[:8]

    def encode(self, users: list[str], done: list[list[int]],
               scores: list[dict[int, tuple[float, int]]]) -> list[bytes]:
        rows = np.array([self.store.rows[u] for u in users], dtype=np.int64)
        packed = np.empty(len(users), dtype=self.row)
        for name, values in zip(UserRows._fields, self.store.export(rows), strict=True):
            packed[name] = values
        out = []
        for i in range(len(users)):
            offsets = np.array(sorted(scores[i]), dtype=np.int64)
            p = np.array([scores[i][o][0] for o in offsets], dtype=np.float32)
            k = np.array([scores[i][o][1] for o in offsets], dtype=np.int64)
            d = np.array(done[i], dtype=np.int64)
            out.append(b"".join((self.header, packed[i].tobytes(), _COUNT.pack(len(offsets)),
                                 offsets.tobytes(), p.tobytes(), k.tobytes(),
                                 _COUNT.pack(len(d)), d.tobytes())))
        return out

    def decode(self, values: Iterable[tuple[str, bytes]], *, since: int) -> Restored:
        """Load these users' values into the store; offsets below ``since`` (the
        committed offset) are not read again, so they are left out."""
        users, packed, done, scores, refused = self._split(values, since)
        self.store.load(users, UserRows(*(packed[n] for n in UserRows._fields)))
        return Restored(users, done, scores, refused)

    def rows(self, values: Iterable[tuple[str, bytes]]) -> tuple[list[str], np.ndarray, int]:
        """These users' rows as one structured array (fields: :class:`UserRows`'),
        nothing loaded; and how many values were refused."""
        users, packed, _, _, refused = self._split(values, None)
        return users, packed, refused

    def _split(self, values: Iterable[tuple[str, bytes]], since: int | None
               ) -> tuple[list[str], np.ndarray, dict[str, list[int]],
                          dict[str, dict[int, tuple[float, int]]], int]:
        """Users, their rows, and (``since`` not None) their offsets at or past it.
        A value with no offsets (most of them) is one row of a single array over
        all of them."""
        head, size = len(self.header), self.row.itemsize
        plain = head + size + 2 * _COUNT.size
        empty = self.header, _COUNT.pack(0) * 2
        users: list[str] = []
        rows: list[bytes] = []
        done: dict[str, list[int]] = {}
        scores: dict[str, dict[int, tuple[float, int]]] = {}
        refused = 0
        for user, value in values:
            if len(value) == plain and value.startswith(empty[0]) and value.endswith(empty[1]):
                users.append(user)
                rows.append(value)
                continue
            try:
                row, offsets, p, k, d = self._parse(value)
            except (UserStateError, struct.error, ValueError):
                refused += 1
                continue
            users.append(user)
            rows.append(value[:head] + row + empty[1])
            if since is None:
                continue
            pending = {int(o): (float(pp), int(kk))
                       for o, pp, kk in zip(offsets, p, k, strict=True) if o >= since}
            if pending:
                scores[user] = pending
            learned = [int(o) for o in d if o >= since]
            if learned:
                done[user] = learned
        packed = np.frombuffer(b"".join(rows), dtype=np.dtype(
            [("head", np.void, head), ("row", self.row), ("counts", np.void, 8)]))["row"]
        return users, packed, done, scores, refused

    def _parse(self, value: bytes) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray,
                                            np.ndarray]:
        """A value's row, and its pending offsets, scores, counts and done offsets."""
        head, size = len(self.header), self.row.itemsize
        if value[:head] != self.header:
            raise UserStateError("another layout")
        at = head + size
        row = value[head:at]
        n, at = _COUNT.unpack_from(value, at)[0], at + _COUNT.size
        offsets = np.frombuffer(value, np.int64, n, at)
        p = np.frombuffer(value, np.float32, n, at + 8 * n)
        k = np.frombuffer(value, np.int64, n, at + 12 * n)
        at += 20 * n
        m, at = _COUNT.unpack_from(value, at)[0], at + _COUNT.size
        d = np.frombuffer(value, np.int64, m, at)
        if at + 8 * m != len(value) or len(row) != size:
            raise UserStateError("wrong length")
        return row, offsets, p, k, d


@dataclass
class UserChanges:
    """Which users changed since the last durable point, by partition, and what
    of their records a re-read must not repeat."""

    partition: dict[str, int] = field(default_factory=dict)  # user -> its latest partition
    dirty: set[str] = field(default_factory=set)
    done: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, dict[int, tuple[float, int]]] = field(default_factory=dict)

    def scored(self, user: str, partition: int, offset: int, p: float, k: int) -> None:
        self.partition[user] = partition
        self.dirty.add(user)
        if offset >= 0:
            self.scores.setdefault(user, {})[offset] = (p, k)

    def touched(self, key: str, partition: int) -> None:
        """A row changed that holds no offsets (a user × context task's)."""
        self.partition[key] = partition
        self.dirty.add(key)

    def learned(self, user: str, partition: int, offsets: tuple[int, int]) -> None:
        """A label of ``user`` learned: its impression's (and click's) offsets."""
        self.partition[user] = partition
        self.dirty.add(user)
        waiting = self.scores.get(user)
        if waiting is not None:
            waiting.pop(offsets[0], None)
        self.done.setdefault(user, []).extend(o for o in offsets if o >= 0)

    def take(self, committed: dict[int, int]) -> dict[int, tuple[list[str], list[list[int]],
                                                                 list[dict[int, tuple[float,
                                                                                      int]]]]]:
        """The changed users by partition, each with its offsets still at or past
        the partition's ``committed`` offset (done ones, and pending scores)."""
        out: dict[int, tuple[list[str], list[list[int]], list[dict[int, tuple[float, int]]]]] = {}
        for user in self.dirty:
            p = self.partition[user]
            since = committed.get(p, 0)
            done = [o for o in self.done.get(user, ()) if o >= since][-MAX_OFFSETS:]
            if done:
                self.done[user] = done
            else:
                self.done.pop(user, None)
            scores = {o: s for o, s in self.scores.get(user, {}).items() if o >= since}
            if len(scores) > MAX_OFFSETS:
                scores = dict(sorted(scores.items())[-MAX_OFFSETS:])
            if scores:
                self.scores[user] = scores
            else:
                self.scores.pop(user, None)
            users, dones, pending = out.setdefault(p, ([], [], []))
            users.append(user)
            dones.append(done)
            pending.append(scores)
        self.dirty = set()
        return out

    def restored(self, partition: int, found: Restored) -> None:
        """Users restored from ``partition``'s store, with what their values still
        hold of records to be read again (kept in their next values)."""
        for user in found.users:
            self.partition[user] = partition
        for user, offsets in found.done.items():
            self.done[user] = offsets
        for user, pending in found.scores.items():
            self.scores[user] = dict(pending)

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        """Drop what is known of these partitions' users (None: of all)."""
        if partitions is None:
            self.partition.clear()
            self.dirty.clear()
            self.done.clear()
            self.scores.clear()
            return
        gone = set(partitions)
        for user in [u for u, p in self.partition.items() if p in gone]:
            del self.partition[user]
            self.dirty.discard(user)
            self.done.pop(user, None)
            self.scores.pop(user, None)


__all__ = ["Restored", "UserChanges", "UserCodec", "UserStateError"]
