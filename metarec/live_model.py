"""A server's model: θ, and per user only what scoring needs (fast weights φ_u,
labels taught, features; no task ring: a server does not learn).

It is kept current from what the consumer makes durable: θ from a model version
plus the θ deltas after it (:mod:`metarec.theta_state`), users from their
state-store values (:mod:`metarec.user_state`). It scores as the consumer's
learner predicts: the same encoding, representation and kernel, so for the same
state a served score equals the prediction the consumer logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metarec import kernels
from metarec.encoding import Encoder
from metarec.events import FeatureValue
from metarec.kernels import ExampleIds
from metarec.model import SEGMENT_INIT, Theta, initial_phi, segments
from metarec.representation import theta_arrays
from metarec.session import SessionConfig, config_hash
from metarec.task_key import TaskKey
from metarec.theta_state import Delta, add, check, row_views
from metarec.user_state import UserCodec
from metarec.users import ItemFeatures, UserStore

#: the arrays of a θ delta that scoring reads (the optimisers' accumulators are not)
SERVED_ARRAYS = frozenset({"theta/item_emb", "theta/item_bias", "theta/feat_emb",
                           "theta/feat_bias", "theta/global_bias", "theta/phi0",
                           f"theta/{SEGMENT_INIT}",
                           "items/features"})

Features = Mapping[str, FeatureValue]


#: an item to score and its features (none: those the model last learned it with)
Candidate = tuple[str, Features]


@dataclass(frozen=True)
class DecodedUsers:
    """Users' values decoded: their rows of the state store (structured), their
    changelog positions, and how many values were refused (of another layout, or
    damaged)."""

    users: list[str]
    rows: np.ndarray
    stamps: np.ndarray
    refused: int


@dataclass(frozen=True)
class Scores:
    """Click probabilities of a request's candidates, in their order."""

    p: np.ndarray
    known: bool  # the user has state here (else: scored from the initialisation φ_0)
    k: int  # labels the user had taught


class LiveModel:
    def __init__(self, config: SessionConfig, theta: Theta, *, examples_learned: int = 0):
        m, c = config.learner.model, config.cache
        self.theta = theta
        self.examples_learned = examples_learned
        self.items = ItemFeatures(m.features.item_buckets, m.features.item_slots)
        self._arrays = {**row_views("theta", theta), "items/features": self.items.table}
        # views of θ, which deltas change in place: taken once, not per request
        self._theta = theta_arrays(theta)
        self._task_key = TaskKey(config.learner.task_context)
        self._segments = segments(m)
        # a one-row store only gives the codec the layout of a user's value
        layout = UserStore(m.phi_dim, config.learner.task_size, m.features.user_slots,
                           m.features.context_slots, self.items, capacity=1)
        self._codec = UserCodec(layout, config_hash(config.learner))
        self._encoder = Encoder(m.features, item_cache_bytes=c.item_cache_bytes,
                                user_cache_bytes=c.user_cache_bytes,
                                context_cache_bytes=c.context_cache_bytes,
                                token_cache_bytes=c.token_cache_bytes)
        self._rows: dict[str, int] = {}
        cap = 1024
        self._phi = np.zeros((cap, m.phi_dim), dtype=np.float32)
        self._learned = np.zeros(cap, dtype=np.int64)
        self._features = np.zeros((cap, m.features.user_slots), dtype=np.int32)
        # the changelog position of each user's value: an older one never replaces it
        self._stamp = np.full(cap, -1, dtype=np.int64)

    # -- state in ------------------------------------------------------------------------

    def apply_delta(self, delta: Delta) -> None:
        """A committed θ delta (its optimiser arrays are not needed here)."""
        check(delta, self._arrays, only=SERVED_ARRAYS)
        for name, rows in delta.rows.items():
            if name in SERVED_ARRAYS:
                add(self._arrays[name], rows, delta.values[name], name)
        self.examples_learned += delta.examples

    def decode_users(self, values: Sequence[tuple[str, bytes, int]]) -> DecodedUsers:
        """Committed users' values, each with its position in the changelog, decoded
        (the newest of each user) but not yet applied: a server decodes while it
        answers, and applies (:meth:`set_users`) between requests."""
        newest: dict[str, tuple[bytes, int]] = {}
        for user, value, stamp in values:
            if stamp > newest.get(user, (b"", -1))[1]:
                newest[user] = (value, stamp)
        users, packed, refused = self._codec.rows((u, v) for u, (v, _) in newest.items())
        stamps = np.array([newest[u][1] for u in users], dtype=np.int64)
        return DecodedUsers(users, packed, stamps, refused)

    def set_users(self, decoded: DecodedUsers) -> None:
        """Apply decoded values; one older than the value a user holds is ignored."""
        if not decoded.users:
            return
        rows = self._assign(decoded.users)
        newer = decoded.stamps > self._stamp[rows]
        rows, packed = rows[newer], decoded.rows[newer]
        self._phi[rows] = packed["phi"]
        self._learned[rows] = packed["learned"]
        self._features[rows] = packed["features"]
        self._stamp[rows] = decoded.stamps[newer]

    def _assign(self, users: list[str]) -> np.ndarray:
        out = np.empty(len(users), dtype=np.int64)
        for i, user in enumerate(users):
            out[i] = self._rows.setdefault(user, len(self._rows))
        need, cap = len(self._rows), len(self._stamp)
        if need > cap:
            new = max(need, 2 * cap)
            self._phi = _grown(self._phi, new, 0)
            self._learned = _grown(self._learned, new, 0)
            self._features = _grown(self._features, new, 0)
            self._stamp = _grown(self._stamp, new, -1)
        return out

    # -- scores out ----------------------------------------------------------------------

    def score(self, user_id: str, candidates: Sequence[Candidate], *,
              context: Features | None = None, user_features: Features | None = None) -> Scores:
        """Each candidate's click probability for this user in this context. A user
        without state is scored from φ_0; features given here win over the stored
        ones (as an event's do in the consumer)."""
        enc = self._encoder.candidates(user_id, user_features or {}, dict(context or {}),
                                       candidates)
        n = len(enc.item)
        item_feats = enc.item_feats
        unknown = ~item_feats.any(axis=1)
        item_feats[unknown] = self.items.table[enc.item[unknown]]
        row = self._rows.get(user_id)
        key = self._task_key.of(user_id, context or {})
        finer = self._rows.get(key) if key != user_id else None
        user = enc.user_feats
        if row is not None and not user_features:
            user = self._features[row].astype(np.int64)
        # one contiguous row per candidate: the kernels' compiled form for the consumer
        side = np.tile(np.concatenate([user, enc.context]), (n, 1))
        phi = self._phi[row] if row is not None else self._initial_phi(user_features or {})
        if finer is not None:  # the user's task in this context: a residual on theirs
            phi = phi + self._phi[finer]
        p = np.empty(n, dtype=np.float64)
        kernels.predict(ExampleIds(enc.item, item_feats, side), self._theta, phi, p)
        # labels of the task that scored, as the consumer counts them
        task = row if key == user_id else finer
        return Scores(p, row is not None, int(self._learned[task]) if task is not None else 0)

    def _initial_phi(self, user_features: Features) -> np.ndarray:
        """A new user's weights, as the consumer starts them."""
        segment = 0 if self._segments is None else self._segments.of(user_features)
        return initial_phi(self.theta, torch.tensor([segment]))[0].numpy()

    # -- figures -------------------------------------------------------------------------

    @property
    def users(self) -> int:
        return len(self._rows)

    def bytes_per_user(self) -> int:
        """Bytes of array state per user row (fast weights, count, features, stamp)."""
        return sum(a.nbytes // a.shape[0] for a in
                   (self._phi, self._learned, self._features, self._stamp))


def _grown(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    out = np.full((rows, *a.shape[1:]), fill, dtype=a.dtype)
    out[:len(a)] = a
    return out


__all__ = ["SERVED_ARRAYS", "Candidate", "DecodedUsers", "LiveModel", "Scores"]
