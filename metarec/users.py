"""Per-user state as rows of preallocated arrays: fast weights φ_u, how many
labels the user has taught, static features, and a ring buffer of the user's
most recent labelled examples (the user's task, in time order).

No object per user: a million users are a million rows. The arrays double when
full, so appends are amortised O(1). A ring slot holds only what is particular
to the example (item id, context, label); an item's features live once per item
in :class:`ItemFeatures`, which keeps a user at about 1 KB with 50-example tasks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from metarec.kernels import ExampleIds, UserArrays
from metarec.model import Examples
from metarec.task_key import SEPARATOR


class UserTasks(NamedTuple):
    """Users' buffered examples as numpy, n x width leading (int64 ids, float32 labels)."""

    item: np.ndarray  # n x W, item bucket
    item_feats: np.ndarray  # n x W x item_slots
    user_feats: np.ndarray  # n x W x (user_slots + context_slots): the user's, then context
    y: np.ndarray  # n x W, label
    mask: np.ndarray  # n x W, 1 for an example, 0 for an empty slot
    segment: np.ndarray  # n, the user's segment (0: none), which picks their φ_0

    def ids(self) -> ExampleIds:
        return ExampleIds(self.item, self.item_feats, self.user_feats)

    def examples(self) -> Examples:
        """The ids as torch tensors (sharing the memory)."""
        return Examples(torch.from_numpy(self.item), torch.from_numpy(self.item_feats),
                        torch.from_numpy(self.user_feats))


class UserRows(NamedTuple):
    """Some users' rows of the store, in its order of fields."""

    phi: np.ndarray
    learned: np.ndarray
    features: np.ndarray
    ring_item: np.ndarray
    ring_context: np.ndarray
    ring_label: np.ndarray


class ItemFeatures:
    """The latest non-empty feature slots of every item bucket."""

    def __init__(self, buckets: int, slots: int):
        self.table = np.zeros((buckets, slots), dtype=np.int32)

    def update(self, items: np.ndarray, feats: np.ndarray) -> None:
        has = feats.any(axis=1)
        self.table[items[has]] = feats[has]


class UserStore:
    """Every user's row, by id; the rows double in place when full."""

    def __init__(self, phi_dim: int, ring: int, user_slots: int, context_slots: int,
                 items: ItemFeatures, *, capacity: int = 1024):
        self.ring = ring
        self.items = items
        self.rows: dict[str, int] = {}  # user id -> row, in order of arrival
        cap = capacity
        # numpy, not torch: the serving loop touches a few rows at a time, where
        # numpy's per-call cost is a fraction of torch's; torch.from_numpy shares it.
        self.phi = np.zeros((cap, phi_dim), dtype=np.float32)
        self.learned = np.zeros(cap, dtype=np.int64)
        # hashed ids fit in int32: half the memory of the int64 torch indexes with
        self.features = np.zeros((cap, user_slots), dtype=np.int32)
        self.ring_item = np.zeros((cap, ring), dtype=np.int32)
        self.ring_context = np.zeros((cap, ring, context_slots), dtype=np.int32)
        self.ring_label = np.zeros((cap, ring), dtype=np.int8)
        # the user's segment (0: none): it picked their start, and meta-updates learn
        # each segment's start from its users. Not in the state store's values: a
        # restored user's is known again from their next event with features.
        self.segment = np.zeros(cap, dtype=np.int64)
        # a user × context task's row: a residual on the user's weights, not weights
        # of its own (its key says so; meta-updates leave it out)
        self.residual = np.zeros(cap, dtype=np.bool_)

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        """Forget every user (the arrays keep their capacity)."""
        n = len(self.rows)
        self.rows.clear()
        for a in (*self._state(), self.segment, self.residual):
            a[:n] = 0

    def _state(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, name) for name in UserRows._fields)

    def export(self, rows: np.ndarray) -> UserRows:
        """Copies of some rows, for the state store."""
        return UserRows(*(a[rows] for a in self._state()))

    def load(self, user_ids: list[str], state: UserRows) -> None:
        """Set these users' rows (restored from the state store), new or not."""
        rows, _ = self._assign(user_ids)
        for target, values in zip(self._state(), state, strict=True):
            target[rows] = values

    def bytes_per_user(self) -> int:
        """Bytes of array state per user row (fast weights, counters, ring, features)."""
        return sum(a.nbytes // a.shape[0] for a in self._state())

    def arrays(self) -> UserArrays:
        """The rows the serving loop reads and writes (valid until the store grows)."""
        return UserArrays(self.phi, self.learned, self.ring_item, self.ring_context,
                          self.ring_label)

    def _grow(self, need: int) -> None:
        cap = self.phi.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in (*UserRows._fields, "segment", "residual"):
            arr = getattr(self, name)
            grown = np.zeros((new, *arr.shape[1:]), dtype=arr.dtype)
            grown[:cap] = arr
            setattr(self, name, grown)

    def rows_for(self, user_ids: list[str], start: np.ndarray) -> np.ndarray:
        """Row of each user; a user seen for the first time starts at ``start``: φ_0
        (d+1), or each user's own initialisation (a row per id)."""
        rows, fresh = self._assign(user_ids)
        if fresh and start.ndim == 1:
            self.phi[fresh] = start
        elif fresh:
            seen, first = np.unique(rows, return_index=True)
            self.phi[fresh] = start[first[np.searchsorted(seen, fresh)]]
        return rows

    def set_segments(self, rows: np.ndarray, segment: np.ndarray) -> None:
        """Latest known segment wins; an event without the feature keeps the old."""
        has = segment > 0
        self.segment[rows[has]] = segment[has]

    def _assign(self, user_ids: list[str]) -> tuple[np.ndarray, list[int]]:
        """Row of each user, new ones appended (the arrays grown to fit), and the
        new rows."""
        out = np.empty(len(user_ids), dtype=np.int64)
        fresh: list[int] = []
        residual: list[bool] = []
        for i, uid in enumerate(user_ids):
            row = self.rows.get(uid)
            if row is None:
                row = self.rows[uid] = len(self.rows)
                fresh.append(row)
                residual.append(SEPARATOR in uid)
            out[i] = row
        if fresh:
            self._grow(len(self.rows))
            self.residual[fresh] = residual
        return out, fresh

    def set_features(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Latest non-empty features win; an event without user features keeps the old."""
        has = features.any(axis=1)
        self.features[rows[has]] = features[has]

    def ring_view(self, rows: np.ndarray, width: int) -> UserTasks:
        """Each user's first ``width`` ring slots, not in time order (the serving loop
        dates them by ring slot)."""
        j = np.arange(width)
        mask = j[None, :] < np.minimum(self.learned[rows], self.ring)[:, None]
        return self._gather(rows, np.broadcast_to(j, (len(rows), width)), mask)

    def tasks(self, rows: np.ndarray) -> UserTasks:
        """Each user's buffered examples, oldest first (width: the ring)."""
        n_seen = self.learned[rows]
        length = np.minimum(n_seen, self.ring)
        # position j of the time-ordered task is ring slot (n_seen - length + j) % ring
        j = np.arange(self.ring)
        slot = (n_seen[:, None] - length[:, None] + j) % self.ring
        return self._gather(rows, slot, j[None, :] < length[:, None])

    def _gather(self, rows: np.ndarray, slot: np.ndarray, mask: np.ndarray) -> UserTasks:
        r = rows[:, None]
        user_feats = np.concatenate(
            [np.broadcast_to(self.features[rows][:, None, :],
                             (*slot.shape, self.features.shape[1])),
             self.ring_context[r, slot]], axis=-1,
        )
        item = self.ring_item[r, slot]
        return UserTasks(item.astype(np.int64), self.items.table[item].astype(np.int64),
                         user_feats.astype(np.int64),
                         self.ring_label[r, slot].astype(np.float32), mask.astype(np.float32),
                         self.segment[rows])
