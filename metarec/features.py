"""Feature hashing: raw ids and feature values -> fixed-width integer slots.

Every token is ``field=value``, hashed into a bucket of a fixed table, so the
model never needs a vocabulary and new items or feature values cost nothing to
admit. Bucket 0 is reserved as padding (an empty slot).

The caches of hashed slots are bounded in bytes, not entries: a record may hold
up to ``max_record_bytes`` of feature values, so a bound by count would let a
stream of such records with new ids hold gigabytes. An entry's size is estimated once,
when it is stored, from the lengths of the strings it keeps alive plus a fixed
overhead per object (:func:`mapping_bytes`).
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping
from operator import itemgetter
from typing import Generic, TypeVar

from pydantic import BaseModel, Field

from metarec.events import FeatureValue

#: Longer tokens are hashed every time they occur, never cached: they are mostly
#: one-offs (a description, a query), and crc32 of one costs less than keeping it.
MAX_CACHED_TOKEN = 256

# Bytes of CPython objects (64-bit), as tracemalloc counts them, for the estimates;
# tests/test_features.py checks them against it. A str is 49 bytes plus its
# characters; with the pointer to it and the allocator's rounding, about 56.
_OBJECT = 56
_FIELD = 2 * _OBJECT + 40  # a mapping's key, its value's object and the dict's slot
_DICT = 120  # a dict object and the spare room of its tables
_PAIR = 64  # a (field, value) tuple of a context key, and its type
_TOKEN = _OBJECT + 72  # a cached token: its str, its bucket's int, the cache's slot
_ENTRY = 240  # a slot cache entry: the key's str, the entry tuple, the cache's slot

#: Default byte budgets of the caches (a deployment sets its own, see
#: :class:`metarec.encoding.Encoder`). An item's or a user's entry keeps its whole
#: feature map alive, so those caches get the most room; tokens and contexts are
#: short and repeat, and a quarter of that holds their working set.
SLOT_CACHE_BYTES = 64 << 20
TOKEN_CACHE_BYTES = 16 << 20
CONTEXT_CACHE_BYTES = 16 << 20


class FeatureSpec(BaseModel):
    """Sizes of the hashed tables and of the per-example slot arrays."""

    item_buckets: int = Field(
        1 << 16, ge=2, description="rows of the item-id embedding table that item ids are "
        "hashed into (bucket 0 is padding); more rows, fewer items sharing one")
    feature_buckets: int = Field(
        1 << 15, ge=2, description="rows of the feature embedding table that 'field=value' "
        "tokens are hashed into (bucket 0 is padding); more rows, fewer tokens sharing one")
    item_slots: int = Field(
        8, ge=1, description="feature tokens of an item the model sees, the first ones in "
        "the item's feature map; the rest are dropped")
    user_slots: int = Field(
        4, ge=1, description="feature tokens of a user the model sees, the first ones in "
        "the user's feature map; the rest are dropped")
    context_slots: int = Field(
        3, ge=1, description="context tokens of an impression the model sees, the first "
        "ones in its context map; the rest are dropped")


def bucket(token: str, buckets: int) -> int:
    """The bucket of a token in a table of ``buckets`` (1 .. buckets - 1)."""
    # crc32 is stable across processes and runs (unlike hash()), and cheap.
    return zlib.crc32(token.encode()) % (buckets - 1) + 1


class Segments:
    """Users' segments by the value of one of their features: ``field=value`` hashed
    into rows 1 .. buckets - 1 of a table; 0 for no such feature (``field`` None: 0
    for everyone)."""

    def __init__(self, field: str | None, buckets: int):
        self.field = field
        self.buckets = buckets

    def of(self, features: Mapping[str, FeatureValue]) -> int:
        value = None if self.field is None else features.get(self.field)
        return 0 if value is None else bucket(f"{self.field}={value}", self.buckets)


def tokens(features: Mapping[str, FeatureValue], width: int = sys.maxsize) -> list[str]:
    """The ``field=value`` tokens of a mapping, in order (one per element of a list
    value), the first ``width`` of them at most: the rest would be dropped anyway,
    and a record may hold thousands."""
    out: list[str] = []
    for field, value in features.items():
        room = width - len(out)
        if room <= 0:
            break
        if isinstance(value, list):
            out.extend([f"{field}={v}" for v in value[:room]])
        else:
            out.append(f"{field}={value}")
    return out


def slot_tuple(features: Mapping[str, FeatureValue], width: int,
               bucket_of: Callable[[str], int]) -> tuple[int, ...]:
    """The buckets of the first ``width`` tokens, 0-padded to ``width``."""
    found = tuple(map(bucket_of, tokens(features, width)))
    return found + (0,) * (width - len(found))


def _chars(text: str) -> int:
    # CPython stores a str in 1, 2 or 4 bytes a character; isascii() is O(1)
    return len(text) if text.isascii() else 4 * len(text)


def _all_chars(strings: Iterable[str]) -> int:
    # one join in C, not a call per string: a record's lists hold thousands
    return _chars("".join(strings))


def mapping_bytes(features: Mapping[str, FeatureValue]) -> int:
    """Estimated bytes a feature mapping keeps alive: its strings' characters and a
    fixed overhead per object."""
    size = _DICT + _FIELD * len(features) + _all_chars(features)
    for value in features.values():
        if isinstance(value, str):
            size += len(value) if value.isascii() else 4 * len(value)
        elif isinstance(value, list):
            size += _OBJECT * (len(value) + 1) + _all_chars(value)
        elif isinstance(value, int):  # an int of many digits (a bool adds 0)
            size += value.bit_length() >> 3
    return size


def context_bytes(context: Mapping[str, FeatureValue]) -> int:
    """Estimated bytes of a context kept as a tuple of (field, value) pairs."""
    return mapping_bytes(context) + _PAIR * len(context)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A cache whose entries' estimated sizes add up to at most ``max_bytes``, in two
    generations: entries are stored in the young one; when that would pass half the
    budget it becomes the old one (the previous old one is dropped) and a new young
    one starts. A lookup that misses the young generation tries the old one and
    moves a hit back (:meth:`revive`).

    Not a true LRU: that moves an entry on every hit, work on every event. Here a hit
    is one lookup in a plain dict, and entries in use survive a turnover, which they
    would not if the whole cache were cleared when full. An entry larger than half
    the budget is not stored (a budget of 0: no caching)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self.young: dict[K, V] = {}
        self.old: dict[K, V] = {}
        self._young_bytes = 0
        self._old_bytes = 0

    @property
    def nbytes(self) -> int:
        """Estimated bytes of the entries held (both generations)."""
        return self._young_bytes + self._old_bytes

    def __len__(self) -> int:
        return len(self.young) + len(self.old)

    def revive(self, key: K, size_of: Callable[[V], int]) -> V | None:
        """The old generation's entry for ``key``, moved to the young one (or None)."""
        value = self.old.pop(key, None)
        if value is not None:
            size = size_of(value)
            self._old_bytes -= size
            self.put(key, value, size)
        return value

    def put(self, key: K, value: V, size: int, replaces: int = 0) -> None:
        """Store ``value`` of ``size`` bytes; ``replaces``: the size of the young
        entry for ``key`` it takes the place of, if there is one."""
        self._young_bytes -= replaces
        half = self.max_bytes >> 1
        if size > half:
            if replaces:
                del self.young[key]
            return
        self._young_bytes += size
        if self._young_bytes > half:
            if replaces:  # the entry replaced must not stay behind in the old generation
                del self.young[key]
            self.old, self._old_bytes = self.young, self._young_bytes - size
            self.young, self._young_bytes = {}, size
        self.young[key] = value


class TokenBuckets(BoundedCache[str, int]):
    """Tokens' buckets in a table of ``buckets``, cached up to ``max_bytes``; tokens
    longer than :data:`MAX_CACHED_TOKEN` characters bypass the cache."""

    def __init__(self, buckets: int, max_bytes: int = TOKEN_CACHE_BYTES):
        super().__init__(max_bytes)
        self.buckets = buckets

    def __call__(self, token: str) -> int:
        if len(token) > MAX_CACHED_TOKEN:
            return bucket(token, self.buckets)
        found = self.young.get(token)
        if found is None:
            size = _TOKEN + _chars(token)
            found = self.revive(token, lambda _: size)
            if found is None:
                found = bucket(token, self.buckets)
                self.put(token, found, size)
        return found


# a slot cache entry: (features, the key's bucket, the features' slots, estimated bytes)
_Entry = tuple[Mapping[str, FeatureValue], int, tuple[int, ...], int]
_entry_bytes: Callable[[_Entry], int] = itemgetter(3)


class SlotCache(BoundedCache[str, _Entry]):
    """The slots of the features last seen for each key (an item or a user id), as a
    tuple, and the key's own bucket in the item table when ``prefix`` is given.
    Events repeat their item's and user's features, so each mapping is hashed once
    while it stays the same; a changed mapping is hashed anew. Holds about ``max_bytes``
    of keys, mappings and slots at most; tokens are hashed through
    ``token_buckets`` (by default a token cache of its own)."""

    def __init__(self, width: int, spec: FeatureSpec, prefix: str | None = None,
                 max_bytes: int = SLOT_CACHE_BYTES, token_buckets: TokenBuckets | None = None):
        super().__init__(max_bytes)
        self.width, self.spec, self.prefix = width, spec, prefix
        self.token_buckets = (TokenBuckets(spec.feature_buckets) if token_buckets is None
                              else token_buckets)

    def get(self, key: str, features: Mapping[str, FeatureValue]) -> tuple[int, tuple[int, ...]]:
        """(bucket of the key, slots of its features)."""
        hit = self.young.get(key)
        if hit is not None and hit[0] == features:
            return hit[1], hit[2]
        entry = self._miss(key, features, 0 if hit is None else hit[3])
        return entry[1], entry[2]

    def _miss(self, key: str, features: Mapping[str, FeatureValue], replaces: int) -> _Entry:
        if not replaces:
            old = self.revive(key, _entry_bytes)
            if old is not None:
                if old[0] == features:
                    return old
                replaces = old[3]
        found = slot_tuple(features, self.width, self.token_buckets)
        # the key's bucket is kept with its entry here, not among the tokens
        key_bucket = 0 if self.prefix is None else bucket(self.prefix + key,
                                                           self.spec.item_buckets)
        entry = (features, key_bucket, found, _ENTRY + _chars(key) + mapping_bytes(features))
        self.put(key, entry, entry[3], replaces)
        return entry
