"""Feature hashing: which buckets a mapping's tokens land in, and the encoder's
caches, which are bounded in (estimated) bytes whatever the records hold."""

from __future__ import annotations

import gc
import tracemalloc
import zlib
from collections.abc import Mapping
from typing import Any, cast

import pytest

from metarec.encoding import Encoder
from metarec.events import FeatureValue, Impression
from metarec.features import (
    MAX_CACHED_TOKEN,
    FeatureSpec,
    SlotCache,
    TokenBuckets,
    mapping_bytes,
    tokens,
)
from metarec.learner import PREDICT
from tests.reference import slots

SPEC = FeatureSpec(item_buckets=4096, feature_buckets=1024)


def crc_bucket(token: str, buckets: int) -> int:
    """The hashing the model's tables were trained with: crc32 of the UTF-8 token."""
    return zlib.crc32(token.encode("utf-8")) % (buckets - 1) + 1


def large(n: int, chars: int = 20_000) -> dict[str, FeatureValue]:
    """A mapping particular to ``n`` of some ``chars`` characters: a long string,
    lists of short strings, many fields."""
    return {"title": f"{n}-" + "t" * (chars // 2),
            **{f"l{k}": [f"{n}.{k}.{j}" for j in range(64)] for k in range(chars // 2000)},
            **{f"f{k}": f"{n}.{k}" for k in range(40)}}


def impression(n: int, item_features: dict[str, FeatureValue],
               user_features: dict[str, FeatureValue],
               context: dict[str, FeatureValue]) -> Impression:
    return Impression(type="impression", user_id=f"user-{n}", item_id=f"item-{n}",
                      impression_id=f"imp-{n}", timestamp=1_700_000_000.0,
                      item_features=item_features, user_features=user_features,
                      context=context)


class Untouchable:
    """A feature value that fails the test if it is ever made into a token."""

    def __format__(self, spec: str) -> str:
        raise AssertionError("a token past the width was built")


# -- hashing -----------------------------------------------------------------------------


@pytest.mark.parametrize(("features", "expected_tokens"), [
    ({"genre": ["Comedy", "Drama"], "year": "1995"},
     ["genre=Comedy", "genre=Drama", "year=1995"]),
    ({"age": "25-34", "gender": "M", "occupation": "writer"},
     ["age=25-34", "gender=M", "occupation=writer"]),
    ({"n": 3, "x": 0.5, "flag": True, "empty": []}, ["n=3", "x=0.5", "flag=True"]),
    ({"city": "Zürich", "emoji": "😀"}, ["city=Zürich", "emoji=😀"]),
    ({}, []),
])
def test_slots_of_ordinary_mappings_are_crc32_of_field_equals_value(
        features: dict[str, FeatureValue], expected_tokens: list[str]) -> None:
    width = 4
    expected = [crc_bucket(t, SPEC.feature_buckets) for t in expected_tokens[:width]]
    expected += [0] * (width - len(expected))
    assert tokens(features) == expected_tokens
    assert slots(features, width, SPEC).tolist() == expected
    # and the same through the caches, on a miss and on a hit
    cache = SlotCache(width, SPEC, prefix="item=")
    for _ in range(2):
        key_bucket, found = cache.get("a1", features)
        assert list(found) == expected
        assert key_bucket == crc_bucket("item=a1", SPEC.item_buckets)


def test_tokens_past_the_width_are_dropped_without_being_built() -> None:
    features = cast(Mapping[str, FeatureValue],
                    {"tags": ["a", "b"], "year": "1995", "later": Untouchable()})
    assert tokens(features, 3) == ["tags=a", "tags=b", "year=1995"]
    many: dict[str, FeatureValue] = {"tags": [str(j) for j in range(100_000)],
                                     "later": cast(Any, Untouchable())}
    assert tokens(many, 8) == [f"tags={j}" for j in range(8)]
    assert slots(many, 8, SPEC).tolist() == [crc_bucket(f"tags={j}", SPEC.feature_buckets)
                                             for j in range(8)]


def test_the_encoder_gives_the_slots_of_an_uncached_hashing() -> None:
    spec = FeatureSpec(item_buckets=4096, feature_buckets=1024)
    imps = [impression(n % 7, item_features={"genre": ["Comedy", str(n % 3)], "year": "1995"},
                       user_features={"age": str(n % 5)},
                       context={"platform": ["web", "ios"][n % 2], "hour": n % 24})
            for n in range(200)]
    ops = Encoder(spec).encode(imps, [PREDICT] * len(imps), [0.0] * len(imps))
    for row, imp in enumerate(imps):
        assert ops.item[row] == crc_bucket("item=" + imp.item_id, spec.item_buckets)
        assert ops.item_feats[row].tolist() == slots(imp.item_features, spec.item_slots,
                                                     spec).tolist()
        assert ops.user_feats[row].tolist() == slots(imp.user_features, spec.user_slots,
                                                     spec).tolist()
        assert ops.context[row].tolist() == slots(imp.context, spec.context_slots,
                                                  spec).tolist()


# -- byte budgets ------------------------------------------------------------------------


def test_slot_cache_stays_under_its_budget_with_large_distinct_entries() -> None:
    budget = 1 << 20
    cache = SlotCache(SPEC.item_slots, SPEC, prefix="item=", max_bytes=budget)
    entry = mapping_bytes(large(0))
    assert 20_000 < entry < budget // 8  # so the loop below turns the budget over many times
    for n in range(400):
        features = large(n)
        assert cache.get(f"item-{n}", features)[1] == tuple(slots(features, SPEC.item_slots,
                                                                  SPEC).tolist())
        assert cache.nbytes <= budget
    assert len(cache) < budget // entry
    assert "item-399" in cache.young  # the newest entries are kept


def test_a_cache_holds_no_more_memory_than_its_budget() -> None:
    """The estimates are of what tracemalloc sees the entries keep alive: a cache full of
    distinct records' features, only the cache holding them, stays within its budget."""
    budget = 1 << 20
    gc.collect()
    tracemalloc.start()
    try:
        cache = SlotCache(SPEC.item_slots, SPEC, max_bytes=budget,
                          token_buckets=TokenBuckets(SPEC.feature_buckets, 0))
        before = tracemalloc.get_traced_memory()[0]
        for n in range(300):
            cache.get(f"item-{n}-" + "i" * 200, large(n, chars=8000))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert budget // 2 < cache.nbytes <= budget
    assert held <= budget


def test_a_changed_mapping_replaces_its_entry_in_the_accounting() -> None:
    cache = SlotCache(SPEC.user_slots, SPEC, max_bytes=1 << 20)
    for n in range(500):  # a user whose features change on every event
        cache.get("u1", large(n, chars=4000))
    assert len(cache) == 1
    assert cache.nbytes < 2 * mapping_bytes(large(0, chars=4000))


class CountingBuckets(TokenBuckets):
    """No token cache; counts the tokens hashed."""

    def __init__(self) -> None:
        super().__init__(SPEC.feature_buckets, max_bytes=0)
        self.hashed: list[str] = []

    def __call__(self, token: str) -> int:
        self.hashed.append(token)
        return super().__call__(token)


def test_entries_in_use_survive_the_turnover_of_generations() -> None:
    counting = CountingBuckets()
    cache = SlotCache(SPEC.item_slots, SPEC, max_bytes=1 << 20, token_buckets=counting)
    hot: dict[str, FeatureValue] = {"genre": ["Comedy"], "year": "1995"}
    for n in range(300):  # the budget turns over some 15 times
        cache.get(f"cold-{n}", large(n))
        cache.get("hot", hot)
    assert cache.nbytes <= 1 << 20
    assert len(cache) < 300
    assert counting.hashed.count("genre=Comedy") == 1  # hashed once, kept since


def test_a_zero_budget_caches_nothing_and_hashes_the_same() -> None:
    features: dict[str, FeatureValue] = {"genre": ["Comedy"], "year": "1995"}
    cache = SlotCache(SPEC.item_slots, SPEC, prefix="item=", max_bytes=0)
    assert cache.get("a1", features) == SlotCache(SPEC.item_slots, SPEC, "item=").get(
        "a1", features)
    assert len(cache) == 0 and cache.nbytes == 0


def test_token_cache_stays_under_its_budget_and_long_tokens_bypass_it() -> None:
    budget = 64 << 10
    buckets = TokenBuckets(SPEC.feature_buckets, max_bytes=budget)
    for n in range(5000):
        token = f"title={n}-" + "x" * 200
        assert buckets(token) == crc_bucket(token, SPEC.feature_buckets)
        assert buckets.nbytes <= budget
    assert 0 < len(buckets) < 5000
    long_token = "description=" + "y" * MAX_CACHED_TOKEN
    assert buckets(long_token) == crc_bucket(long_token, SPEC.feature_buckets)
    assert long_token not in buckets.young and long_token not in buckets.old


def test_encoder_caches_stay_under_their_budgets_with_maximal_records() -> None:
    budgets = {"item_cache_bytes": 2 << 20, "user_cache_bytes": 1 << 20,
               "context_cache_bytes": 1 << 20, "token_cache_bytes": 256 << 10}
    encoder = Encoder(SPEC, **budgets)
    for start in range(0, 600, 50):
        imps = [impression(n, item_features=large(n), user_features=large(n, chars=8000),
                           context={"query": f"{n}-" + "q" * 5000,
                                    **{f"c{k}": f"{n}.{k}" for k in range(60)}})
                for n in range(start, start + 50)]
        encoder.encode(imps, [PREDICT] * len(imps), [0.0] * len(imps))
        for name, cache in (("item", encoder.items), ("user", encoder.users),
                            ("context", encoder.contexts), ("token", encoder.tokens)):
            assert 0 < cache.nbytes <= budgets[f"{name}_cache_bytes"], name
