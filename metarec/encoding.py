"""Validated events -> the arrays the learner runs on (the end of pydantic)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np

from metarec.events import FeatureValue, Impression
from metarec.features import (
    CONTEXT_CACHE_BYTES,
    SLOT_CACHE_BYTES,
    TOKEN_CACHE_BYTES,
    BoundedCache,
    FeatureSpec,
    Segments,
    SlotCache,
    TokenBuckets,
    context_bytes,
    slot_tuple,
)
from metarec.learner import Ops
from metarec.task_key import TaskKey

# a context as a cache key: its (field, value) pairs and the values' types
_ContextKey = tuple[tuple[tuple[str, FeatureValue], ...], tuple[type, ...]]


class Encoder:
    """Turns impressions into :class:`Ops`, remembering items', users' and contexts'
    slots in caches of at most the given bytes each (0: none), all hashing feature
    tokens through one token cache."""

    def __init__(self, spec: FeatureSpec, *, item_cache_bytes: int = SLOT_CACHE_BYTES,
                 user_cache_bytes: int = SLOT_CACHE_BYTES,
                 context_cache_bytes: int = CONTEXT_CACHE_BYTES,
                 token_cache_bytes: int = TOKEN_CACHE_BYTES,
                 task_key: TaskKey | None = None, segments: Segments | None = None):
        self.spec = spec
        self.task_key = task_key or TaskKey(None)
        self.segments = segments
        self.tokens = TokenBuckets(spec.feature_buckets, token_cache_bytes)
        self.items = SlotCache(spec.item_slots, spec, "item=", item_cache_bytes, self.tokens)
        self.users = SlotCache(spec.user_slots, spec, None, user_cache_bytes, self.tokens)
        self.contexts: BoundedCache[_ContextKey, tuple[int, ...]] = BoundedCache(
            context_cache_bytes)

    def _context(self, context: dict[str, FeatureValue]) -> tuple[int, ...]:
        """Context slots; contexts repeat (a platform, a page), so they are cached by
        value when hashable (with the values' types: True == 1, but not as tokens)."""
        try:
            key = (tuple(context.items()), tuple(map(type, context.values())))
            found = self.contexts.young.get(key)
        except TypeError:  # a list value
            return slot_tuple(context, self.spec.context_slots, self.tokens)
        if found is None:
            size = context_bytes(context)
            found = self.contexts.revive(key, lambda _: size)
            if found is None:
                found = slot_tuple(context, self.spec.context_slots, self.tokens)
                self.contexts.put(key, found, size)
        return found

    def encode(self, impressions: Sequence[Impression], kinds: Sequence[int],
               labels: Sequence[float]) -> Ops:
        """One op per impression: ``kinds[i]`` is PREDICT or LEARN (then ``labels[i]``
        counts). An impression is often both scored and learned in one batch: each
        distinct one is encoded once."""
        spec = self.spec
        index: dict[int, int] = {}
        distinct: list[Impression] = []
        src: list[int] = []
        for imp in impressions:
            j = index.setdefault(id(imp), len(distinct))
            if j == len(distinct):
                distinct.append(imp)
            src.append(j)
        items: list[int] = []
        item_feats: list[tuple[int, ...]] = []
        user_feats: list[tuple[int, ...]] = []
        context: list[tuple[int, ...]] = []
        no_user = (0,) * spec.user_slots
        no_context = (0,) * spec.context_slots
        item_slots, user_slots, context_slot = self.items.get, self.users.get, self._context
        for imp in distinct:
            bucket, feats = item_slots(imp.item_id, imp.item_features)
            items.append(bucket)
            item_feats.append(feats)
            user_feats.append(user_slots(imp.user_id, imp.user_features)[1]
                              if imp.user_features else no_user)
            context.append(context_slot(imp.context) if imp.context else no_context)
        at = np.array(src, dtype=np.int64)
        users = [imp.user_id for imp in impressions]
        segment = None
        if self.segments is not None:
            of = self.segments.of
            segment = np.array([of(imp.user_features) for imp in impressions], dtype=np.int64)
        prior = None
        if self.task_key.field is not None:
            key = self.task_key.of
            prior, users = users, [key(imp.user_id, imp.context) for imp in impressions]
        return Ops(
            user=users,
            prior=prior,
            segment=segment,
            kind=np.asarray(kinds, dtype=np.int64),
            item=np.array(items, dtype=np.int64)[at],
            item_feats=_matrix(item_feats, spec.item_slots)[at],
            user_feats=_matrix(user_feats, spec.user_slots)[at],
            context=_matrix(context, spec.context_slots)[at],
            label=np.asarray(labels, dtype=np.float32),
        )

    def candidates(self, user_id: str, user_features: Mapping[str, FeatureValue],
                   context: dict[str, FeatureValue],
                   items: Sequence[tuple[str, Mapping[str, FeatureValue]]]) -> Candidates:
        """One user's candidate items in one context, as :meth:`encode` would encode
        an impression of each (the user's and the context's slots once)."""
        spec = self.spec
        item_slots = self.items.get
        buckets: list[int] = []
        feats: list[tuple[int, ...]] = []
        for item_id, features in items:
            bucket, slots = item_slots(item_id, features)
            buckets.append(bucket)
            feats.append(slots)
        user = (self.users.get(user_id, user_features)[1] if user_features
                else (0,) * spec.user_slots)
        ctx = self._context(context) if context else (0,) * spec.context_slots
        return Candidates(np.array(buckets, dtype=np.int64), _matrix(feats, spec.item_slots),
                          np.array(user, dtype=np.int64), np.array(ctx, dtype=np.int64))


class Candidates(NamedTuple):
    """A user's candidates encoded: ``n`` item buckets and feature slots; the user's
    and the context's slots, shared by all."""

    item: np.ndarray  # n
    item_feats: np.ndarray  # n x item_slots
    user_feats: np.ndarray  # user_slots (all zero: none given)
    context: np.ndarray  # context_slots


def _matrix(rows: list[tuple[int, ...]], width: int) -> np.ndarray:
    """Equal-width tuples as an int64 matrix, built from one flat iterator rather than
    by ``np.array`` inspecting every tuple."""
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=len(rows) * width)
    return flat.reshape(len(rows), width)

