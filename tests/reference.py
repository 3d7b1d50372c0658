"""Reference implementations the tests check the library against: the plain,
one-at-a-time versions of what the library does in batches or through caches.
They live here, not in ``metarec``, because nothing but the tests runs them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from metarec.drift import DriftEvent, DriftMonitor
from metarec.encoding import Encoder
from metarec.events import FeatureValue, Impression
from metarec.features import FeatureSpec, bucket, slot_tuple
from metarec.learner import Ops


def encode(impressions: Sequence[Impression], kinds: Sequence[int], labels: Sequence[float],
           spec: FeatureSpec) -> Ops:
    """:meth:`metarec.encoding.Encoder.encode` without memory across calls."""
    return Encoder(spec).encode(impressions, kinds, labels)


def slots(features: Mapping[str, FeatureValue], width: int, spec: FeatureSpec) -> np.ndarray:
    """A feature mapping hashed into ``width`` slots (0-padded, extra tokens dropped)
    with no cache: what the encoder's caches must give."""
    buckets = spec.feature_buckets
    return np.array(slot_tuple(features, width, lambda token: bucket(token, buckets)),
                    dtype=np.int64)


def drift_update(monitor: DriftMonitor, p: float, label: float, timestamp: float,
                 item_id: str, segment: str | None, user_id: str) -> list[DriftEvent]:
    """One labelled prediction fed to ``monitor`` on its own; the episodes it opened
    or closed. :meth:`DriftMonitor.update_batch` must give the same, however it is
    chunked."""
    return monitor.update_batch(np.array([p]), np.array([label]), np.array([timestamp]),
                                [item_id], [segment], [user_id])
