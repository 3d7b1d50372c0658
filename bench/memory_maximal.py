"""Resident memory and speed of the session under maximal records.

    .venv/bin/python -m bench.memory_maximal                   # both modes, 20,000 records
    .venv/bin/python -m bench.memory_maximal --records 100000 --mode labelled

Every record is an impression just under ``max_record_bytes``, with a new item id,
a new user id and a new impression id (each near the 256-character limit), and
feature maps in ``item_features``, ``user_features`` and ``context`` as large as
the schema lets them be: 64 fields, lists of 64 strings, long strings. Every
string is particular to its record, so no cache ever hits, and most are short, so
the in-memory form of a record (Python objects) is several times its JSON. The
context holds scalars only, so the encoder may cache it (a list value makes a
context unhashable, hence uncached).

Records go through :class:`metarec.session.StreamSession` (decode, join, encode,
learn) in micro-batches of ``--batch``, without Kafka, after
:func:`streamer.warmup.warm_up` as a run does. Two modes, each in its own
process so that one does not inherit the other's heap:

- ``unlabelled``: impressions without ``clicked``; event time advances 10 ms per
  record, so no window closes: the joiner holds every impression (up to its
  bounds).
- ``labelled``: the same records with ``"clicked"`` (one in ten true): labelled at
  once, the joiner holds nothing, which isolates the rest of the session.

Settings are the defaults, changed by ``METAREC_*`` variables as for a run. The
table gives the resident set size (RSS) every ``--every`` records and events/s
over that interval, timing ``StreamSession.process`` only (not the generation of
records); then the RSS growth per 1,000 records after ``--warmup`` records, and
over the second half of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from metarec.records import Record
from metarec.session import StreamSession
from streamer.config import Settings
from streamer.warmup import warm_up

MODES = ("unlabelled", "labelled")
PAGE = os.sysconf("SC_PAGE_SIZE")
# the schema's bounds (metarec.events.MAX_FEATURES and MAX_FEATURE_VALUES; not imported,
# so that the bench also runs on code from before them)
FIELDS = 64
VALUES = 64
# the ends of list elements: list k of a map holds "<record>.<k><j>" for j < VALUES
_TAILS = [[f"{k:02x}{j:02x}" for j in range(VALUES)] for k in range(FIELDS)]
# text that record numbers are prefixed to: every long string is distinct per record
_TEXT = "".join(random.Random(7).choices("abcdefghijklmnopqrstuvwxyz0123456789 ", k=8192))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def text(n: int, tag: str, length: int) -> str:
    """A string of ``length`` characters particular to record ``n``."""
    head = f"{tag}{n}-"
    start = (n * 131) % (len(_TEXT) - length) if length < len(_TEXT) else 0
    body = (_TEXT * (length // len(_TEXT) + 1))[start:start + length - len(head)]
    return head + body


def maximal_event(n: int, start: float, max_bytes: int, label: bool | None) -> bytes:
    """Record ``n``: a JSON impression of ``max_bytes - 16`` to ``max_bytes`` bytes, its
    maps as large as the schema lets them be (:data:`FIELDS` fields, lists of
    :data:`VALUES` strings), mostly short strings: each costs some 60 bytes of memory
    for its 10 of JSON."""
    head = f"{n:05x}."

    def strings(tag: str, lists: int) -> dict[str, list[str]]:
        return {f"{tag}{k}": [head + tail for tail in _TAILS[k]] for k in range(lists)}

    def scalars(tag: str, count: int) -> dict[str, str]:
        return {f"{tag}{k}": f"{n}.{k}" for k in range(count)}

    item: dict[str, Any] = {
        "name": text(n, "name", 240),  # a token under the token cache's length bound
        "description": text(n, "desc", 2000),
        **strings("l", 40), **scalars("f", FIELDS - 43),  # and "pad", below
    }
    user: dict[str, Any] = {"segment": text(n, "seg", 200), "bio": text(n, "bio", 1000),
                            **strings("h", 20), **scalars("u", FIELDS - 22)}
    context: dict[str, Any] = {"page": text(n, "page", 200), "query": text(n, "query", 2000),
                               **scalars("c", FIELDS - 2)}
    event: dict[str, Any] = {
        "type": "impression", "timestamp": round(start + n * 0.01, 3),
        "user_id": text(n, "user", 250), "item_id": text(n, "item", 250),
        "impression_id": text(n, "imp", 250),
        "context": context, "user_features": user, "item_features": item,
    }
    if label is not None:
        event["clicked"] = label
    item["pad"] = ""
    unpadded = json.dumps(event, separators=(",", ":"))
    pad = max_bytes - 16 - len(unpadded)  # ASCII, no escapes: a character is a byte
    if pad < 0:
        raise SystemExit(f"the fixed part of a record is {len(unpadded)} bytes > "
                         f"{max_bytes}: raise METAREC_MAX_RECORD_BYTES")
    raw = unpadded.replace('"pad":""', f'"pad":"{text(n, "pad", pad)}"', 1).encode()
    assert max_bytes - 16 <= len(raw) <= max_bytes, len(raw)
    return raw


def run(mode: str, records: int, every: int, warmup: int, batch: int) -> None:
    torch.set_num_threads(1)
    settings = Settings.of(metrics_port=0)
    warm_up(settings.session)
    session = StreamSession(settings.session)
    rng = random.Random(0)
    start = time.time() - 86400.0  # event time well behind the wall clock
    print(f"### {mode}: {records:,} records of {settings.session.max_record_bytes - 16:,}-"
          f"{settings.session.max_record_bytes:,} bytes, micro-batches of {batch}\n", flush=True)
    print("| records | RSS MiB | events/s (interval) | pending impressions |")
    print("|---:|---:|---:|---:|")
    base = rss_bytes()
    print(f"| 0 | {base / 2**20:,.0f} | | 0 |", flush=True)
    done, busy, total_busy, dead = 0, 0.0, 0.0, 0
    samples: list[tuple[int, int]] = [(0, base)]  # (records done, RSS)
    while done < records:
        n = min(batch, records - done)
        chunk = [Record(maximal_event(done + i, start, settings.session.max_record_bytes,
                                      None if mode == "unlabelled" else rng.random() < 0.1))
                 for i in range(n)]
        t0 = time.perf_counter()
        result = session.process(chunk)
        busy += time.perf_counter() - t0
        dead += len(result.dead_letters)
        del chunk, result
        done += n
        if done % every == 0 or done == records:
            rss = rss_bytes()
            print(f"| {done:,} | {rss / 2**20:,.0f} | {(done - samples[-1][0]) / busy:,.0f} | "
                  f"{session.status().pending_impressions:,} |", flush=True)
            samples.append((done, rss))
            total_busy, busy = total_busy + busy, 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\n{done / total_busy:,.0f} events/s over the run; peak RSS {peak / 2**20:,.0f} MiB; "
          f"dead letters {dead}")
    # after the warm-up; and over the second half, once every bounded structure is full
    for since in (warmup, records // 2):
        first = next((s for s in samples if s[0] >= since), samples[-1])
        last = samples[-1]
        if last[0] > first[0]:
            growth = (last[1] - first[1]) / (last[0] - first[0]) * 1000
            print(f"RSS growth from {first[0]:,} to {last[0]:,} records: "
                  f"{growth / 2**20:,.1f} MiB per 1,000 records "
                  f"({growth / 1000 / 1024:,.1f} KiB per record)")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--every", type=int, default=1000, help="records between samples")
    parser.add_argument("--warmup", type=int, default=2000,
                        help="records before growth is measured")
    parser.add_argument("--batch", type=int, default=200, help="records per micro-batch")
    args = parser.parse_args()
    if args.mode != "both":
        run(args.mode, args.records, args.every, args.warmup, args.batch)
        return
    print(f"{os.cpu_count()} CPUs, 1 torch thread, `python -m bench.memory_maximal "
          f"{' '.join(sys.argv[1:])}`\n", flush=True)
    for mode in MODES:  # a fresh process each: RSS freed by one mode is not given back
        argv = [sys.executable, "-m", "bench.memory_maximal", "--mode", mode,
                "--records", str(args.records), "--every", str(args.every),
                "--warmup", str(args.warmup), "--batch", str(args.batch)]
        subprocess.run(argv, check=True)


if __name__ == "__main__":
    main()
