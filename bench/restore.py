"""Restore time of the users' state store, per million users (goal: <= 10 s).

    .venv/bin/python -m bench.restore                     # 200,000 users, 4 partitions
    .venv/bin/python -m bench.restore --users 1000000 --profile

A durable :class:`~metarec.session.StreamSession` (small θ tables, the default
width and task size, so a user's value is the realistic ~1 KB) learns
``--events-per-user`` labelled impressions of every user; after each chunk of
``--txn-values`` users, :meth:`~metarec.session.StreamSession.checkpoint` gives
their values, which go to a changelog topic of the embedded broker keyed by user
id, partitioned as the events are, tagged as ``metarec run`` tags them, one
Kafka transaction per chunk, all from one transactional producer. Then, timed
separately:

- (a0) reading the changelog to its end only (:func:`streamer.txn_log.read_to_end`,
  read_committed): the Kafka client's share of (a);
- (a) :func:`streamer.changelog.restore`: reading, and picking each user's newest
  committed value (the committed offsets' tag given as ``committed``);
- (b) :meth:`StreamSession.restore` of every partition into a fresh durable
  session: decoding the values and loading the rows.

Restored rows are checked against the original ones. ``--profile`` runs (a) and
(b) once more under cProfile and prints where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2

from metarec.features import FeatureSpec
from metarec.learner import LearnerConfig
from metarec.model import ModelConfig
from metarec.records import Record
from metarec.session import SessionConfig, StreamSession
from streamer import changelog
from streamer.cluster import Cluster
from streamer.embedded import EmbeddedBroker
from streamer.kafka_io import MAX_MESSAGE_BYTES
from streamer.transactions import new_incarnation
from streamer.txn_log import Tag, read_to_end

T = TypeVar("T")

TOPIC = "bench.restore.state"
TRANSACTIONAL_ID = "bench.restore"
EVENTS_TOPIC = "bench.restore.events"  # named in the records only: never written
#: the changelog's partitions are marked with the committing transaction's stamp,
#: which the group commits as the changelog's offset (older code: the tag itself)
STAMPS = hasattr(changelog, "stamp_marker")


def rss(pid: int | str = "self", field: str = "VmRSS") -> int:
    """Resident (or, with VmHWM, peak resident) bytes of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def children() -> list[int]:
    out: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def config() -> SessionConfig:
    return SessionConfig(learner=LearnerConfig(model=ModelConfig(
        features=FeatureSpec(item_buckets=4096, feature_buckets=1024))))


def partition_of(user: str, partitions: int) -> int:
    """As kafka-python's default partitioner places a record keyed by user id."""
    return (murmur2(user.encode()) & 0x7FFFFFFF) % partitions


def records(users: range, events_per_user: int, partitions: int, offsets: list[int],
            t0: float, rng: np.random.Generator) -> list[Record]:
    """Labelled impressions of ``users``, ``events_per_user`` each, in time order
    (one round over the users per event), keyed and partitioned by user id."""
    out = []
    ids = [f"user-{u}" for u in users]
    parts = [partition_of(u, partitions) for u in ids]
    for e in range(events_per_user):
        items = rng.integers(0, 20_000, len(ids))
        clicked = rng.random(len(ids)) < 0.3
        for i, (uid, p) in enumerate(zip(ids, parts, strict=True)):
            event = {"type": "impression", "impression_id": f"{uid}-{e}", "user_id": uid,
                     "item_id": f"i{items[i]}", "timestamp": round(t0 + e + i * 1e-4, 4),
                     "context": {"platform": ("web", "ios", "android")[i % 3],
                                 "hour": str(i % 24)},
                     "user_features": {"age": str(18 + i % 50), "country": f"c{i % 40}"},
                     "item_features": {"category": f"cat{items[i] % 50}"},
                     "clicked": bool(clicked[i])}
            out.append(Record(json.dumps(event).encode(), uid.encode(), EVENTS_TOPIC, p,
                              offsets[p], int((t0 + e) * 1000)))
            offsets[p] += 1
    return out


def build(bootstrap: str, n_users: int, partitions: int, events_per_user: int,
          txn_values: int) -> tuple[dict[int, Any], dict[str, bytes], dict[str, Any]]:
    """Learn every user, write their values to the changelog; what the committed
    offsets say per partition (for ``changelog.restore``), a sample of the
    original rows (raw bytes), and figures."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(TOPIC, partitions, 1,
                                      topic_configs={"cleanup.policy": "compact"})])
    finally:
        admin.close()
    session = StreamSession(config(), durable=True)
    session.track(range(partitions), time.monotonic())
    prod = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=TRANSACTIONAL_ID,
                         acks="all", linger_ms=5, batch_size=256 * 1024,
                         max_request_size=2 * MAX_MESSAGE_BYTES)
    prod.init_transactions()
    incarnation, seq, stamp = new_incarnation(), 0, 0
    rng = np.random.default_rng(0)
    offsets = [0] * partitions
    t0 = time.time() - 30 * 86400
    learn_s = produce_s = 0.0
    written, value_bytes = 0, 0
    sizes: list[int] = []
    sample: dict[str, bytes] = {}
    sample_every = max(1, n_users // 50)
    try:
        for start in range(0, n_users, txn_values):
            chunk = range(start, min(start + txn_values, n_users))
            t = time.perf_counter()
            out = session.process(records(chunk, events_per_user, partitions, offsets,
                                          t0 + start, rng), range(partitions), flush=True)
            if out.dead_letters:
                raise RuntimeError(f"dead letters: {out.dead_letters[:3]}")
            # as `metarec run` commits: the positions past what was learned, so
            # the values keep no offsets (all of these events are labelled)
            checkpoint = session.checkpoint(dict(enumerate(offsets)))
            session.committed()
            learn_s += time.perf_counter() - t
            seq += 1
            header = [Tag(TRANSACTIONAL_ID, incarnation, seq).header()]
            t = time.perf_counter()
            prod.begin_transaction()
            n = 0
            for p, values in checkpoint.users.items():
                for user, value in values:
                    prod.send(TOPIC, key=user.encode(), value=value, partition=p,
                              headers=header)
                    n += 1
                    value_bytes += len(value)
                    if len(sizes) < 1000:
                        sizes.append(len(value))
            if STAMPS:  # as a commit of `metarec run` marks each partition it commits
                stamp = max(stamp + 1, time.time_ns() // 1000)
                for p in range(partitions):
                    key, value = changelog.stamp_marker(Tag(TRANSACTIONAL_ID, incarnation, seq),
                                                        stamp)
                    prod.send(TOPIC, key=key, value=value, partition=p, headers=header)
            prod.commit_transaction()
            produce_s += time.perf_counter() - t
            if n != len(chunk):
                raise RuntimeError(f"checkpoint gave {n} values for {len(chunk)} new users")
            written += n
            print(f"  built {written:,}/{n_users:,} users (learning {learn_s:.0f} s, "
                  f"producing {produce_s:.0f} s)", file=sys.stderr, flush=True)
    finally:
        prod.close()
    users = session.learner.users
    if len(users) != n_users:
        raise RuntimeError(f"{len(users)} users in the store, expected {n_users}")
    for u in range(0, n_users, sample_every):
        uid = f"user-{u}"
        row = np.array([users.rows[uid]])
        sample[uid] = b"".join(a.tobytes() for a in users.export(row))
    # what the group's committed offsets say of the changelog: the last stamp
    # (or, before stamps, the last transaction's tag)
    last: Tag | int = stamp if STAMPS else Tag(TRANSACTIONAL_ID, incarnation, seq)
    figures = {"learn_s": learn_s, "produce_s": produce_s, "value_bytes": value_bytes,
               "median_value": statistics.median(sizes), "txns": seq,
               "examples": session.learner.examples_learned,
               "offsets": offsets}
    del session, users
    gc.collect()
    return dict.fromkeys(range(partitions), last), sample, figures


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def read_only(bootstrap: str, partitions: int) -> int:
    """Users' values read (markers aside)."""
    n = 0
    tps = [TopicPartition(TOPIC, p) for p in range(partitions)]
    for msg in read_to_end(Cluster(bootstrap), tps, start={}, stall_seconds=10.0,
                           own_id="bench.restore.reader"):
        n += not (msg.key or b"").startswith(changelog.MARKER)
    return n


def restore_changelog(bootstrap: str, partitions: int,
                      committed: dict[int, Any]) -> dict[int, changelog.PartitionState]:
    return changelog.restore(Cluster(bootstrap), TOPIC, list(range(partitions)),
                             dict(committed), stall_seconds=10.0,
                             own_id="bench.restore.reader")


def restore_session(found: dict[int, changelog.PartitionState]) -> StreamSession:
    session = StreamSession(config(), durable=True)
    for p, state in sorted(found.items()):
        restored = session.restore(p, state.values, 0)
        if restored.refused:
            raise RuntimeError(f"partition {p}: {restored.refused} values refused")
    return session


def check(session: StreamSession, n_users: int, sample: dict[str, bytes]) -> None:
    users = session.learner.users
    if len(users) != n_users:
        raise RuntimeError(f"restored {len(users):,} users, expected {n_users:,}")
    for uid, raw in sample.items():
        got = b"".join(a.tobytes() for a in users.export(np.array([users.rows[uid]])))
        if got != raw:
            raise RuntimeError(f"user {uid}: restored row differs from the original")


def profile(fn: Callable[[], T], title: str, top: int) -> T:
    prof = cProfile.Profile()
    out = prof.runcall(fn)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    print(f"\n#### cProfile: {title}\n\n```\n{text.getvalue().strip()}\n```", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--events-per-user", type=int, default=3)
    parser.add_argument("--txn-values", type=int, default=50_000,
                        help="values per transaction (users per checkpoint)")
    parser.add_argument("--repeats", type=int, default=1, help="of each timed phase")
    parser.add_argument("--profile", action="store_true",
                        help="then (a) and (b) once more under cProfile")
    parser.add_argument("--top", type=int, default=25, help="functions per profile table")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    print(f"{os.cpu_count()} CPUs, `python -m bench.restore {' '.join(sys.argv[1:])}`\n",
          flush=True)
    n, parts = args.users, args.partitions
    with EmbeddedBroker() as broker:
        before = rss()
        committed, sample, fig = build(broker.bootstrap, n, parts, args.events_per_user,
                                       args.txn_values)
        after_build = rss()
        broker_rss = sum(rss(pid) for pid in children())
        reads, pick, load = [], [], []
        found: dict[int, changelog.PartitionState] = {}
        rss_a = rss_b = 0
        for _ in range(args.repeats):
            s, count = timed(lambda: read_only(broker.bootstrap, parts))
            if count != n:
                raise RuntimeError(f"read {count:,} records, expected {n:,}")
            reads.append(s)
            found = {}
            gc.collect()
            base = rss()
            s, found = timed(lambda: restore_changelog(broker.bootstrap, parts, committed))
            pick.append(s)
            rss_a = rss() - base
            got = sum(len(st.values) for st in found.values())
            skipped = {p: dict(st.skipped) for p, st in found.items() if st.skipped}
            if got != n or skipped:
                raise RuntimeError(f"changelog.restore found {got:,} values of {n:,}; "
                                   f"skipped {skipped}")
            base = rss()
            s, session = timed(functools.partial(restore_session, found))
            load.append(s)
            rss_b = rss() - base
            check(session, n, sample)
            del session
            gc.collect()
        if args.profile:
            found = {}
            gc.collect()
            found = profile(lambda: restore_changelog(broker.bootstrap, parts, committed),
                            "(a) changelog.restore", args.top)
            profile(functools.partial(restore_session, found), "(b) StreamSession.restore",
                    args.top)
        peak = rss(field="VmHWM")

    def row(name: str, secs: list[float]) -> str:
        m = statistics.median(secs)
        return (f"| {name} | {m:.2f} ({min(secs):.2f} - {max(secs):.2f}) | "
                f"{m / n * 1e6:.1f} |")

    total = [a + b for a, b in zip(pick, load, strict=True)]
    print(f"\n### Restore of {n:,} users from a {parts}-partition changelog "
          f"(embedded broker), {args.repeats} repeat(s)\n")
    print(f"{fig['txns']} transactions of <= {args.txn_values:,} values; values "
          f"{fig['median_value']:,.0f} bytes (median), {gib(fig['value_bytes'])} in all; "
          f"built by learning {fig['examples']:,} labelled events in {fig['learn_s']:.0f} s, "
          f"produced in {fig['produce_s']:.0f} s "
          f"({fig['value_bytes'] / 2**20 / max(fig['produce_s'], 1e-9):.0f} MiB/s).\n")
    print("| phase | seconds, median (min - max) | s per million users |")
    print("|---|---:|---:|")
    print(row("(a0) read the changelog to its end (kafka-python, read_committed)", reads))
    print(row("(a) `changelog.restore`: read + pick the committed values", pick))
    print(row("(b) `StreamSession.restore`: decode + load rows", load))
    print(row("(a) + (b): restore", total))
    print(f"\n| memory | value |\n|---|---:|\n"
          f"| this process after building (the building session freed) | {gib(after_build)} "
          f"(at start {gib(before)}) |\n"
          f"| resident growth during (a), holding the values | {gib(rss_a)} |\n"
          f"| resident growth during (b), the restored session | {gib(rss_b)} |\n"
          f"| peak resident memory of this process | {gib(peak)} |\n"
          f"| the embedded broker (memory storage) after building | {gib(broker_rss)} |")


if __name__ == "__main__":
    main()
