"""Validated events -> the arrays the learner runs on (the end of pydantic)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metarec.events import FeatureValue, Impression
from metarec.features import FeatureSpec, SlotCache, slots
from metarec.learner import Ops


class Encoder:
    """Turns impressions into :class:`Ops`, remembering items' and users' slots."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.items = SlotCache(spec.item_slots, spec, "item=")
        self.users = SlotCache(spec.user_slots, spec)
        self._contexts: dict[tuple[tuple[tuple[str, FeatureValue], ...], tuple[type, ...]],
                             tuple[int, ...]] = {}

    def _context(self, context: dict[str, FeatureValue]) -> tuple[int, ...]:
        """Context slots; contexts repeat (a platform, a page), so they are cached by
        value when hashable (with the values' types: True == 1, but not as tokens)."""
        try:
            key = (tuple(context.items()), tuple(map(type, context.values())))
            found = self._contexts.get(key)
        except TypeError:  # a list value
            key, found = None, None
        if found is None:
            found = tuple(slots(context, self.spec.context_slots, self.spec).tolist())
            if key is not None:
                if len(self._contexts) >= 1 << 16:
                    self._contexts.clear()
                self._contexts[key] = found
        return found

    def encode(self, impressions: Sequence[Impression], kinds: Sequence[int],
               labels: Sequence[float]) -> Ops:
        """One op per impression: ``kinds[i]`` is PREDICT or LEARN (then ``labels[i]``
        counts). An impression is often both scored and learned in one batch: each
        distinct one is encoded once."""
        spec = self.spec
        index: dict[int, int] = {}
        src = np.empty(len(impressions), dtype=np.int64)
        items: list[int] = []
        item_feats: list[tuple[int, ...]] = []
        user_feats: list[tuple[int, ...]] = []
        context: list[tuple[int, ...]] = []
        no_user = (0,) * spec.user_slots
        no_context = (0,) * spec.context_slots
        for i, imp in enumerate(impressions):
            j = index.get(id(imp))
            if j is None:
                j = index[id(imp)] = len(items)
                bucket, feats = self.items.get(imp.item_id, imp.item_features)
                items.append(bucket)
                item_feats.append(feats)
                user_feats.append(self.users.get(imp.user_id, imp.user_features)[1]
                                  if imp.user_features else no_user)
                context.append(self._context(imp.context) if imp.context else no_context)
            src[i] = j
        return Ops(
            user=[imp.user_id for imp in impressions],
            kind=np.asarray(kinds, dtype=np.int64),
            item=np.array(items, dtype=np.int64)[src],
            item_feats=np.array(item_feats, dtype=np.int64).reshape(-1, spec.item_slots)[src],
            user_feats=np.array(user_feats, dtype=np.int64).reshape(-1, spec.user_slots)[src],
            context=np.array(context, dtype=np.int64).reshape(-1, spec.context_slots)[src],
            label=np.asarray(labels, dtype=np.float32),
        )


def encode(impressions: Sequence[Impression], kinds: Sequence[int], labels: Sequence[float],
           spec: FeatureSpec) -> Ops:
    """:meth:`Encoder.encode` without memory across calls."""
    return Encoder(spec).encode(impressions, kinds, labels)
