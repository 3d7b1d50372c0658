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

WHEEL = "recbole==1.2.1"
PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


class DatasetUnavailable(RuntimeError):
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


def _ratings(path: Path | None) -> Iterator[tuple[int, str, str, float, bool, dict[str, Any],
                                                   dict[str, Any]]]:
    """(n, user, item, timestamp, clicked, user features, item features), oldest first;
    the feature dicts are shared by every rating of the same user or item."""
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
    no_features: dict[str, Any] = {}
    for n, (user, item, rating, ts) in enumerate(ratings):
        yield (n, user, item, float(ts), float(rating) >= 4.0, users.get(user, no_features),
               items.get(item, no_features))


def events(path: Path | None = None) -> Iterator[dict[str, Any]]:
    """The 100,000 ratings as impression events (JSON-ready dicts), oldest first."""
    for n, user, item, ts, clicked, user_features, item_features in _ratings(path):
        yield {
            "type": "impression",
            "impression_id": f"ml-{n}",
            "user_id": user,
            "item_id": item,
            "timestamp": ts,
            "user_features": user_features,
            "item_features": item_features,
            "clicked": clicked,
        }


def json_events(path: Path | None = None) -> Iterator[tuple[str, bytes]]:
    """:func:`events` as (user id, JSON bytes). Each user's and item's part is
    serialised once: dumping whole events cost more than the learner spent on them."""
    parts: dict[tuple[str, str], str] = {}

    def part(key: str, value: str, features: dict[str, Any]) -> str:
        found = parts.get((key, value))
        if found is None:
            found = parts[(key, value)] = (f'"{key}_id": {json.dumps(value)}, '
                                           f'"{key}_features": {json.dumps(features)}')
        return found

    for n, user, item, ts, clicked, user_features, item_features in _ratings(path):
        text = (f'{{"type": "impression", "impression_id": "ml-{n}", '
                f'{part("user", user, user_features)}, {part("item", item, item_features)}, '
                f'"timestamp": {ts!r}, "clicked": {"true" if clicked else "false"}}}')
        yield user, text.encode()
