"""Validated events -> the arrays the learner runs on (the end of pydantic)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metarec.events import Impression
from metarec.features import FeatureSpec, SlotCache, item_bucket, slots
from metarec.learner import Ops


class Encoder:
    """Turns impressions into :class:`Ops`, remembering items' and users' slots."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.items = SlotCache(spec.item_slots, spec)
        self.users = SlotCache(spec.user_slots, spec)

    def encode(self, impressions: Sequence[Impression], kinds: Sequence[int],
               labels: Sequence[float]) -> Ops:
        """One op per impression: ``kinds[i]`` is PREDICT or LEARN (then ``labels[i]``
        counts)."""
        spec = self.spec
        n = len(impressions)
        item = np.empty(n, dtype=np.int64)
        item_feats = np.zeros((n, spec.item_slots), dtype=np.int64)
        user_feats = np.zeros((n, spec.user_slots), dtype=np.int64)
        context = np.zeros((n, spec.context_slots), dtype=np.int64)
        first: dict[int, int] = {}  # an impression is often both scored and learned
        for i, imp in enumerate(impressions):
            j = first.setdefault(id(imp), i)
            if j != i:
                item[i], item_feats[i], user_feats[i], context[i] = \
                    item[j], item_feats[j], user_feats[j], context[j]
                continue
            item[i] = item_bucket(imp.item_id, spec)
            if imp.item_features:
                item_feats[i] = self.items.slots(imp.item_id, imp.item_features)
            if imp.user_features:
                user_feats[i] = self.users.slots(imp.user_id, imp.user_features)
            if imp.context:
                context[i] = slots(imp.context, spec.context_slots, spec)
        return Ops(
            user=[imp.user_id for imp in impressions],
            kind=np.asarray(kinds, dtype=np.int64),
            item=item,
            item_feats=item_feats,
            user_feats=user_feats,
            context=context,
            label=np.asarray(labels, dtype=np.float32),
        )


def encode(impressions: Sequence[Impression], kinds: Sequence[int], labels: Sequence[float],
           spec: FeatureSpec) -> Ops:
    """:meth:`Encoder.encode` without memory across calls."""
    return Encoder(spec).encode(impressions, kinds, labels)
