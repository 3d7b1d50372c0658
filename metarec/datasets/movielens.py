"""MovieLens-100K as a time-ordered impression stream.

The files ship inside the ``recbole==1.2.1`` wheel on PyPI. The wheel is fetched
once with ``pip download --no-deps`` into a cache directory and read in place
with :mod:`zipfile`; recbole itself is never installed, and nothing is committed.

Each rating becomes one already-labelled impression: clicked = rating >= 4.
Ratings are stably sorted by timestamp, so ties keep the file order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metarec.errors import MetarecError

WHEEL = "recbole==1.2.1"
PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


class DatasetUnavailable(MetarecError, RuntimeError):
    """The dataset could not be fetched or read."""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metarec"
    return Path(os.environ.get("METAREC_CACHE_DIR", default))


def wheel_path() -> Path:
    """Path of the cached recbole wheel, downloading it on first use."""
    target = cache_dir() / "wheels"
    found = sorted(target.glob("recbole-1.2.1-*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target),
           WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(target.glob("recbole-1.2.1-*.whl"))
    if done.returncode != 0 or not found:
        raise DatasetUnavailable(f"could not fetch {WHEEL}: {done.stderr.strip()[-500:]}")
    return found[0]


def _rows(archive: zipfile.ZipFile, suffix: str) -> list[list[str]]:
    text = archive.read(f"{PREFIX}.{suffix}").decode("latin-1")
    return [line.split("\t") for line in text.splitlines()[1:] if line]


def _age_band(age: str) -> str:
    return str(min(int(age) // 10 * 10, 60))


def _ratings(path: Path | None) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]],
                                         list[tuple[str, str, str, str]]]:
    """(user features by id, item features by id, (user, item, rating, timestamp)
    oldest first)."""
    with zipfile.ZipFile(path or wheel_path()) as archive:
        users = {
            r[0]: {"age": _age_band(r[1]), "gender": r[2], "occupation": r[3]}
            for r in _rows(archive, "user")
        }
        items: dict[str, dict[str, Any]] = {}
        for r in _rows(archive, "item"):
            feats: dict[str, Any] = {"genre": r[3].split()} if len(r) > 3 and r[3] else {}
            if len(r) > 2 and r[2].strip():
                feats["year"] = r[2].strip()
            items[r[0]] = feats
        # 100,000 lines of four tab-separated fields and no spaces: one split of the
        # whole text, not one per line
        fields = archive.read(f"{PREFIX}.inter").decode("latin-1").split()[4:]
    ratings = list(zip(*[iter(fields)] * 4, strict=True))
    ratings.sort(key=lambda r: float(r[3]))  # stable: ties keep the file order
    return users, items, ratings


def titles(path: Path | None = None) -> dict[str, str]:
    """Each movie's title, by item id."""
    with zipfile.ZipFile(path or wheel_path()) as archive:
        return {r[0]: r[1] for r in _rows(archive, "item") if len(r) > 1}


def events(path: Path | None = None) -> Iterator[dict[str, Any]]:
    """The 100,000 ratings as impression events (JSON-ready dicts), oldest first;
    the feature dicts are shared by every rating of the same user or item."""
    users, items, ratings = _ratings(path)
    for n, (user, item, rating, ts) in enumerate(ratings):
        yield {
            "type": "impression",
            "impression_id": f"ml-{n}",
            "user_id": user,
            "item_id": item,
            "timestamp": float(ts),
            "user_features": users.get(user, {}),
            "item_features": items.get(item, {}),
            "clicked": float(rating) >= 4.0,
        }


def json_events(path: Path | None = None) -> Iterator[tuple[bytes, bytes]]:
    """:func:`events` as (user id, JSON) bytes. Each user's and item's part is
    serialised once and reused by all their ratings, rather than dumping each
    whole event with the same features again."""
    users, items, ratings = _ratings(path)
    parts = {
        kind: {key: f'"{kind}_id": {json.dumps(key)}, "{kind}_features": {json.dumps(feats)}'
               for key, feats in table.items()}
        for kind, table in (("user", users), ("item", items))
    }
    user_parts, item_parts = parts["user"], parts["item"]
    keys: dict[str, bytes] = {}
    for n, (user, item, rating, ts) in enumerate(ratings):
        # a rating of an id missing from the user or item file has no features
        user_part = user_parts.get(user) or f'"user_id": {json.dumps(user)}, "user_features": {{}}'
        item_part = item_parts.get(item) or f'"item_id": {json.dumps(item)}, "item_features": {{}}'
        text = (f'{{"type": "impression", "impression_id": "ml-{n}", {user_part}, {item_part}, '
                f'"timestamp": {float(ts)!r}, '
                f'"clicked": {"true" if float(rating) >= 4.0 else "false"}}}')
        key = keys.get(user)
        if key is None:
            key = keys[user] = user.encode()
        yield key, text.encode()
