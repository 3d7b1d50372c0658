"""Feature hashing: raw ids and feature values -> fixed-width integer slots.

Every token is ``field=value``, hashed into a bucket of a fixed table, so the
model never needs a vocabulary and new items or feature values cost nothing to
admit. Bucket 0 is reserved as padding (an empty slot).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, Field

from metarec.events import FeatureValue


class FeatureSpec(BaseModel):
    """Sizes of the hashed tables and of the per-example slot arrays."""

    item_buckets: int = Field(1 << 16, ge=2, description="hash buckets for item ids")
    feature_buckets: int = Field(1 << 15, ge=2, description="hash buckets for feature tokens")
    item_slots: int = Field(8, ge=1, description="feature tokens kept per item")
    user_slots: int = Field(4, ge=1, description="feature tokens kept per user")
    context_slots: int = Field(3, ge=1, description="context tokens kept per impression")


@lru_cache(maxsize=1 << 20)
def _bucket(token: str, buckets: int) -> int:
    # crc32 is stable across processes and runs (unlike hash()), and cheap.
    return zlib.crc32(token.encode()) % (buckets - 1) + 1


def tokens(features: Mapping[str, FeatureValue]) -> list[str]:
    out: list[str] = []
    for field, value in features.items():
        if isinstance(value, list):
            out.extend(f"{field}={v}" for v in value)
        else:
            out.append(f"{field}={value}")
    return out


def slots(features: Mapping[str, FeatureValue], width: int, spec: FeatureSpec) -> np.ndarray:
    """Hash a feature mapping into ``width`` slots (0-padded, extra tokens dropped)."""
    out = np.zeros(width, dtype=np.int64)
    for i, token in enumerate(tokens(features)[:width]):
        out[i] = _bucket(token, spec.feature_buckets)
    return out


class SlotCache:
    """The slots of the features last seen for each key (an item or a user id), as a
    tuple, and the key's own bucket in the item table when ``prefix`` is given.
    Events repeat their item's and user's features; hashing them again was a fifth
    of a replay's time. A changed mapping is hashed anew."""

    def __init__(self, width: int, spec: FeatureSpec, prefix: str | None = None,
                 max_keys: int = 1 << 20):
        self.width, self.spec, self.prefix, self.max_keys = width, spec, prefix, max_keys
        self._seen: dict[str, tuple[Mapping[str, FeatureValue], int, tuple[int, ...]]] = {}

    def get(self, key: str, features: Mapping[str, FeatureValue]) -> tuple[int, tuple[int, ...]]:
        """(bucket of the key, slots of its features)."""
        hit = self._seen.get(key)
        if hit is not None and hit[0] == features:
            return hit[1], hit[2]
        found = tuple(slots(features, self.width, self.spec).tolist())
        bucket = 0 if self.prefix is None else _bucket(self.prefix + key, self.spec.item_buckets)
        if len(self._seen) >= self.max_keys:
            self._seen.clear()
        self._seen[key] = (features, bucket, found)
        return bucket, found
