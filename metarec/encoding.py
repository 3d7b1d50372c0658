"""Validated events -> the arrays the learner runs on (the end of pydantic)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metarec.events import Impression
from metarec.features import FeatureSpec, item_bucket, slots
from metarec.learner import Ops


def encode(impressions: Sequence[Impression], kinds: Sequence[int], labels: Sequence[float],
           spec: FeatureSpec) -> Ops:
    """One op per impression: ``kinds[i]`` is PREDICT or LEARN (then ``labels[i]`` counts)."""
    n = len(impressions)
    item = np.empty(n, dtype=np.int64)
    item_feats = np.zeros((n, spec.item_slots), dtype=np.int64)
    user_feats = np.zeros((n, spec.user_slots), dtype=np.int64)
    context = np.zeros((n, spec.context_slots), dtype=np.int64)
    for i, imp in enumerate(impressions):
        item[i] = item_bucket(imp.item_id, spec)
        if imp.item_features:
            item_feats[i] = slots(imp.item_features, spec.item_slots, spec)
        if imp.user_features:
            user_feats[i] = slots(imp.user_features, spec.user_slots, spec)
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
