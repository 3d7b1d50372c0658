"""Throughput, latency and memory of metarec, against the alternatives, in one run.

    .venv/bin/pip install -e ".[bench]"      # vowpalwabbit (bench-only)
    .venv/bin/python -m bench.throughput --repeats 3

Sections (``--only`` picks some):

- ``replay``: ``metarec replay movielens-100k`` end to end (default configuration)
  against Vowpal Wabbit, a per-event Adagrad matrix factorisation in torch and
  river, each a predict-then-learn loop over the same events, timed at its best:
  its input (VW's example strings, the MF's row numbers) built before the clock
  starts, and VW parsing each example once.
  Every learner predicts each event before learning from it, so AUCs compare.
- ``kafka``: ``metarec run`` draining a topic that holds the same events on the
  embedded broker, with its durable state (the default) and without it, against
  a bare kafka-python consumer that only polls and decodes the JSON of the same
  topic (the ceiling of the Kafka path).
- ``users``: a synthetic stream over 1,000,000 users through the learner:
  resident memory, and bytes of per-user state.
- ``latency``: ``metarec run`` fed 5,000 events/s for 60 s; from each record's
  broker append time to the end of the micro-batch that learned from it (the
  ``metarec_event_to_update_seconds`` histogram, quantiles as Prometheus'
  ``histogram_quantile`` computes them).
- ``meta``: one meta-update over 256 users' tasks, per algorithm.

Speeds are medians over the repeats (min-max); ratios are to a baseline measured
in the same run. ``BENCH_VERBOSE=1`` also prints the consumer's log and histograms
in the latency section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import torch
from kafka.partitioner.default import murmur2

from bench import baselines
from metarec.datasets import movielens
from metarec.datasets.synthetic import SyntheticStream
from metarec.evaluation import auc
from metarec.learner import LEARN, PREDICT, OnlineLearner, Ops
from metarec.meta import Algorithm
from metarec.session import StreamSession
from streamer import kafka_io
from streamer.cluster import Cluster
from streamer.config import Settings
from streamer.embedded import EmbeddedBroker, free_port
from streamer.metrics import FRESHNESS_BUCKETS
from streamer.replay import replay
from streamer.runner import Runner
from streamer.sources import read_source

Event = dict[str, Any]


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))} - " \
           f"{fmt.format(max(values))})"


# -- replay ------------------------------------------------------------------------------


def metarec_replay(batch_records: int | None = None) -> Callable[[list[Event]],
                                                                  tuple[float, float]]:
    """End to end: JSON records, validation, joining, learning (default config, or
    micro-batches of ``batch_records``)."""
    overrides = {} if batch_records is None else {"max_batch_records": batch_records}

    def run(_: list[Event]) -> tuple[float, float]:
        summary = replay(Settings.of(metrics_port=0, **overrides), "movielens-100k",
                         progress=False)
        return summary.events_per_second, float(summary.quality["auc"])
    return run


def timed(prepare: Callable[[list[Event]], Any],
          learn: Callable[[Any], np.ndarray]) -> Callable[[list[Event]], tuple[float, float]]:
    """A baseline at its best: ``prepare`` (its input format, built off the clock),
    then the clock runs over ``learn`` alone."""
    def run(events: list[Event]) -> tuple[float, float]:
        prepared = prepare(events)
        t0 = time.perf_counter()
        p = learn(prepared)
        return len(events) / (time.perf_counter() - t0), auc(p, baselines.labels(events))
    return run


def mf_input(events: list[Event]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (*baselines.mf_indices(events), baselines.labels(events))


def bench_replay(events: list[Event], repeats: int) -> list[str]:
    # the baselines' knobs as bench/quality.py tuned them on the first half
    vw_name = "Vowpal Wabbit (-q ui, logistic, -l 1): parse once, predict, learn, finish"
    default_batch = Settings().session.max_batch_records
    runs = {f"metarec replay (default config: micro-batches of {default_batch})":
                metarec_replay(),
            "metarec replay, micro-batches of 1,000": metarec_replay(1000),
            vw_name: timed(baselines.vw_lines,
                           lambda lines: baselines.vowpal_wabbit_lines(lines, lr=1.0)),
            "torch Adagrad MF (dim 8, lr 0.1), per event":
                timed(mf_input, lambda arrays: baselines.torch_adagrad_mf(*arrays)),
            "river LogisticRegression (SGD 0.2)":
                timed(lambda events: events,
                      lambda events: baselines.river_logistic(events, lr=0.2))}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
        for name, fn in runs.items():
            results[name].append(fn(events))
    vw = statistics.median(r[0] for r in results[vw_name])
    lines = [f"### File replay: MovieLens-100K, {len(events):,} events", "",
             "| learner | events/s, median (min - max) | vs VW | prequential AUC |",
             "|---|---:|---:|---:|"]
    for name, rs in results.items():
        rates = [r[0] for r in rs]
        lines.append(f"| {name} | {spread(rates)} | {statistics.median(rates) / vw:.2f}x | "
                     f"{statistics.median(r[1] for r in rs):.4f} |")
    return lines


# -- Kafka path --------------------------------------------------------------------------


def bare_consumer(bootstrap: str, topic: str, total: int) -> float:
    """Poll and decode every record of ``topic`` from the beginning; events/s. It
    decodes with msgspec, the fastest JSON decoder here (json.loads is slower)."""
    from kafka import KafkaConsumer, TopicPartition

    cons = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                         enable_auto_commit=False, max_partition_fetch_bytes=4 << 20)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(cons.partitions_for_topic(topic))]
        cons.assign(parts)
        cons.seek_to_beginning(*parts)
        seen, t0, decode = 0, None, msgspec.json.decode
        while seen < total:
            for msgs in cons.poll(timeout_ms=500, max_records=1000).values():
                t0 = t0 or time.perf_counter()
                for m in msgs:
                    decode(m.value)
                seen += len(msgs)
        assert t0 is not None
        return total / (time.perf_counter() - t0)
    finally:
        cons.close()


def metarec_run(bootstrap: str, topic: str, repeat: int, durable: bool = True,
                batch_records: int | None = None) -> tuple[float, float, int]:
    """``metarec run`` (a fresh consumer group) drains the topic: events/s while busy
    (first record to last micro-batch), seconds of the whole run (start-up, restore,
    the idle wait and shutdown included) and records learned from. ``durable``: the
    users' changelog and θ's updates written in one transaction with the offsets at
    each commit (the default); off: state in memory, plain commits. ``batch_records``:
    micro-batches of that many events instead of the default."""
    name = f"bench-{'durable' if durable else 'memory'}-{batch_records}-{repeat}"
    overrides = {} if batch_records is None else {"max_batch_records": batch_records}
    settings = Settings.of(bootstrap_servers=bootstrap, events_topic=topic, metrics_port=0,
                           group_id=name, model_topic=f"bench.model.{name}",
                           dlq_topic="bench.dlq", drift_topic="bench.drift",
                           idle_exit_seconds=3.0, demo_source=None, durable_state=durable,
                           **overrides)
    t0 = time.perf_counter()
    summary = Runner(settings, Cluster(bootstrap)).run()
    wall = time.perf_counter() - t0
    return summary.records / summary.busy_seconds, wall, summary.records


def bench_kafka(repeats: int) -> list[str]:
    topic = "bench.events"
    with EmbeddedBroker() as broker:
        settings = Settings.of(bootstrap_servers=broker.bootstrap, events_topic=topic,
                               durable_state=False)
        kafka_io.ensure_topics(broker.cluster, settings.kafka)
        prod = kafka_io.producer(broker.cluster)
        total = kafka_io.produce_records(prod, topic, read_source("movielens-100k"))
        prod.close()
        bare: list[float] = []
        # (durable, micro-batch records): the default, without durable state, and
        # the default with micro-batches of 1,000
        variants: list[tuple[bool, int | None]] = [(True, None), (False, None), (True, 1000)]
        runs: dict[tuple[bool, int | None], list[tuple[float, float, int]]] = {
            v: [] for v in variants}
        for r in range(repeats):  # interleaved, the variants' order rotating
            bare.append(bare_consumer(broker.bootstrap, topic, total))
            for durable, batch in variants[r % 3:] + variants[:r % 3]:
                runs[durable, batch].append(
                    metarec_run(broker.bootstrap, topic, r, durable, batch))
    ceiling = statistics.median(bare)
    names = {(True, None): "`metarec run`, durable state (changelog, updates, "
                           "transactional commits)",
             (False, None): "`metarec run --no-durable-state` (state in memory, "
                            "plain commits)",
             (True, 1000): "`metarec run`, durable state, micro-batches of 1,000"}
    lines = [f"### Kafka path: the same {total:,} events on a 4-partition topic of the "
             "embedded broker", "",
             "| reader | events/s, median (min - max) | vs bare consumer | whole run, s |",
             "|---|---:|---:|---:|",
             f"| bare kafka-python consumer: poll + JSON decode | {spread(bare)} | 1.00x | |"]
    for variant, what in names.items():
        rates = [run[0] for run in runs[variant]]
        lines.append(f"| {what} | {spread(rates)} | {statistics.median(rates) / ceiling:.2f}x"
                     f" | {spread([run[1] for run in runs[variant]], '{:.1f}')} |")
    on, off = ([run[0] for run in runs[d, None]] for d in (True, False))
    paired = [a / b for a, b in zip(on, off, strict=True)]
    ratio = statistics.median(on) / statistics.median(off)
    lines += ["", f"Durable state costs {1 - ratio:.1%} of `metarec run`'s throughput while "
              f"busy (ratio of medians {ratio:.3f}; per repeat {spread(paired, '{:.3f}')}). "
              "Each run is a fresh consumer group: its restore finds an empty changelog. "
              "The whole run includes start-up, the 3 s idle wait before it exits, and "
              "shutdown."]
    odd = [f"{names[v]} run {i} learned from {run[2]:,} records"
           for v in variants for i, run in enumerate(runs[v]) if run[2] != total]
    if odd:  # a rollback (a failed transaction, a rebalance) reads records again
        lines += ["", f"Not {total:,} records: " + "; ".join(odd) + "."]
    return lines


# -- users at scale ----------------------------------------------------------------------


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def features(rng: np.random.Generator, n: int, slots: int) -> np.ndarray:
    """Three hashed feature tokens per row, the other slots empty."""
    out = np.zeros((n, slots), dtype=np.int64)
    out[:, :3] = rng.integers(1, 1 << 15, (n, 3))
    return out


def bench_users(n_users: int, events_per_user: int, batch_users: int) -> list[str]:
    """Every user arrives, is scored and learns ``events_per_user`` labels: ops built as
    arrays (the learner's input), so this measures the learner's state alone."""
    learner = OnlineLearner(Settings().session.learner)
    spec = learner.config.model.features
    rng = np.random.default_rng(0)
    before = resident_bytes()
    t0 = time.perf_counter()
    for start in range(0, n_users, batch_users):
        ids = [f"user-{u}" for u in range(start, min(start + batch_users, n_users))]
        for _ in range(events_per_user):
            n = len(ids)
            kind = np.repeat(np.array([[PREDICT, LEARN]]), n, 0).ravel()
            item = np.repeat(rng.integers(1, 50_000, n), 2)
            ops = Ops(user=[u for u in ids for _ in (0, 1)], kind=kind, item=item,
                      item_feats=np.repeat(features(rng, n, spec.item_slots), 2, 0),
                      user_feats=np.repeat(features(rng, n, spec.user_slots), 2, 0),
                      context=np.zeros((2 * n, spec.context_slots), dtype=np.int64),
                      label=np.repeat(rng.random(n) < 0.3, 2).astype(np.float32))
            learner.process(ops)
    seconds = time.perf_counter() - t0
    after = resident_bytes()
    users = learner.users
    assert len(users) == n_users
    phi_bytes = users.phi.shape[1] * users.phi.itemsize
    return [f"### {n_users:,} users, {events_per_user} labelled events each "
            f"({n_users * events_per_user:,} events in {seconds:.0f} s)", "",
            "| measure | value |", "|---|---:|",
            f"| resident memory of the process at the end | {after / 2**30:.2f} GiB |",
            f"| resident memory added by the stream | {(after - before) / 2**30:.2f} GiB |",
            f"| fast weights per user (φ_u, float32) | {phi_bytes} bytes |",
            f"| all per-user arrays per user (φ_u, ring of {users.ring} examples, "
            f"counters, features) | {users.bytes_per_user()} bytes |"]


# -- latency -----------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def buckets(metrics: dict[str, float], name: str) -> list[tuple[float, float]]:
    prefix = f'{name}_bucket{{le="'
    found = [(float(k[len(prefix):-2]), v) for k, v in metrics.items() if k.startswith(prefix)]
    return sorted(found)


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear within the bucket holding rank q."""
    total = cumulative[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in cumulative:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return float("nan")


def bare_latency_consumer(bootstrap: str, topic: str, skip: int, total: int,
                          ready: str) -> None:
    """A consumer-group member that only polls and decodes (msgspec), as ``metarec run`` polls
    (same consumer settings); prints the cumulative histogram of each record's
    latency (now minus its Kafka timestamp) over the records after the first
    ``skip``, on ``FRESHNESS_BUCKETS``, as JSON. Touches ``ready`` once it has seen
    ``skip`` records."""
    settings = Settings.of(bootstrap_servers=bootstrap, events_topic=topic, group_id="bare")
    cons = kafka_io.group_consumer(Cluster(bootstrap), settings.kafka,
                                   settings.session.max_batch_records)
    cons.subscribe([topic])
    latencies: list[float] = []
    seen, decode = 0, msgspec.json.decode
    try:
        while seen < total:
            polled = cons.poll(timeout_ms=100, max_records=settings.session.max_batch_records)
            for msgs in polled.values():
                now = time.time()
                for m in msgs:
                    decode(m.value)
                    if seen >= skip:
                        latencies.append(now - m.timestamp / 1000)
                    seen += 1
                    if seen == skip:
                        open(ready, "w").close()
    finally:
        cons.close()
    counts = np.searchsorted(FRESHNESS_BUCKETS, np.maximum(latencies, 0.0))
    cumulative = np.cumsum(np.bincount(counts, minlength=len(FRESHNESS_BUCKETS) + 1)).tolist()
    print(json.dumps(cumulative))


def drive(broker: EmbeddedBroker, topic: str, events: list[tuple[bytes, bytes, int]],
          rate: int, seconds: int, ready: Callable[[], bool]) -> tuple[int, float]:
    """Send 200 events, wait until ``ready()``, then ``rate`` events/s for ``seconds``
    (100 ticks a second); (events sent after the warm-up, rate achieved)."""
    prod = kafka_io.producer(broker.cluster)
    try:
        for key, value, partition in events[:200]:
            prod.send(topic, key=key, value=value, partition=partition)
        prod.flush()
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        per_tick = rate // 100
        t0 = time.perf_counter()
        for n in range(seconds * 100):
            for key, value, partition in events[200 + n * per_tick:200 + (n + 1) * per_tick]:
                prod.send(topic, key=key, value=value, partition=partition)
            ahead = t0 + (n + 1) * 0.01 - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        prod.flush()
        return seconds * 100 * per_tick, seconds * 100 * per_tick / (time.perf_counter() - t0)
    finally:
        prod.close()


def bench_latency(rate: int, seconds: int) -> list[str]:
    name = "metarec_event_to_update_seconds"
    stream = SyntheticStream(users=20_000, items=2_000, events_per_user=rate * seconds // 20_000
                             + 5, seed=5)
    # serialised and partitioned up front (murmur2 of the key, as kafka-python's
    # default partitioner would), so that the producer spends little CPU per record
    partitions = Settings().kafka.partitions
    events = [(key, json.dumps(e).encode(), (murmur2(key) & 0x7FFFFFFF) % partitions)
              for e in stream.events() for key in [e["user_id"].encode()]]
    total = 200 + rate * seconds
    bare_topic, run_topic, port = "latency.bare", "latency.events", free_port()
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp, \
            open(os.path.join(tmp, "run.log"), "w+b") as log_file:
        for topic in (bare_topic, run_topic):
            kafka_io.ensure_topics(broker.cluster, Settings.of(events_topic=topic).kafka)
        # Both consumers start before the load generator lowers its own priority below:
        # children would inherit it, and only privilege could raise it back.
        # The floor: a consumer that only polls and decodes, on its own topic.
        ready = os.path.join(tmp, "ready")
        bare = subprocess.Popen(
            [sys.executable, "-c", "import sys; from bench.throughput import "
             "bare_latency_consumer as c; c(sys.argv[1], sys.argv[2], 200, int(sys.argv[3]), "
             "sys.argv[4])", broker.bootstrap, bare_topic, str(total), ready],
            stdout=subprocess.PIPE, text=True)
        env = {**os.environ, "METAREC_BOOTSTRAP_SERVERS": broker.bootstrap,
               "METAREC_EVENTS_TOPIC": run_topic, "METAREC_METRICS_PORT": str(port),
               "METAREC_GROUP_ID": "latency", "METAREC_IDLE_EXIT_SECONDS": "600"}
        # the consumer's log goes to a file: a session nobody reads would block it when full
        proc = subprocess.Popen([sys.executable, "-m", "streamer.cli", "run"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log_file)
        # The load generator shares the 2 cores with the broker and the consumers it
        # measures; in production it would be elsewhere. It yields to them (the rate
        # it achieved is reported).
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, niceness + 10)
        try:
            sent, produced = drive(broker, bare_topic, events, rate, seconds,
                                   lambda: os.path.exists(ready))
            out, _ = bare.communicate(timeout=300)
            floor = list(zip([*FRESHNESS_BUCKETS, math.inf], json.loads(out), strict=True))
            rows = [("bare kafka-python consumer: poll + JSON decode", sent, produced, floor)]

            def learned(at_least: int) -> bool:
                with contextlib.suppress(OSError):
                    return scrape(port).get("metarec_records_total", 0) >= at_least
                return False

            # warm up until the consumer has joined and learned: its join is not latency
            start: list[tuple[float, float]] = []

            def ready_run() -> bool:
                if not learned(200):
                    return False
                start[:] = buckets(scrape(port), name)
                return True

            sent, produced = drive(broker, run_topic, events, rate, seconds, ready_run)
            while not learned(total):
                time.sleep(0.2)
            final = scrape(port)
            if os.environ.get("BENCH_VERBOSE"):
                for key in ("metarec_microbatch_duration_seconds", name):
                    print(key, buckets(final, key), file=sys.stderr)
        finally:
            with contextlib.suppress(PermissionError):  # raising it back needs privilege
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
            bare.kill()
            proc.terminate()
            proc.wait(60)
            if os.environ.get("BENCH_VERBOSE"):
                log_file.seek(0)
                print(log_file.read().decode(), file=sys.stderr)
        window = [(le, count - before)
                  for (le, count), (_, before) in zip(buckets(final, name), start, strict=True)]
        rows.append(("`metarec run` (default config)", sent, produced, window))
    out_rows = [f"| {who} | {n:,} ({rate_:,.0f}/s) | {quantile(0.5, hist) * 1000:.0f} ms | "
                f"{quantile(0.99, hist) * 1000:.0f} ms |" for who, n, rate_, hist in rows]
    return [f"### Event-to-update latency at {rate:,} events/s for {seconds} s (synthetic, "
            "20,000 users)", "",
            "From each record's broker timestamp to the end of the micro-batch that learned "
            "from it (for the bare consumer: to its decoding). Quantiles as Prometheus' "
            "`histogram_quantile` computes them, on the same buckets.", "",
            "| consumer | events produced (rate achieved) | p50 | p99 |", "|---|---:|---:|---:|",
            *out_rows]


# -- meta-update -------------------------------------------------------------------------


def bench_meta(repeats: int) -> list[str]:
    """A learner warmed on MovieLens (943 users), then meta-updates over 256 of them."""
    settings = Settings.of(metrics_port=0)
    session = StreamSession(settings.session)
    records = list(read_source("movielens-100k"))
    for i in range(0, len(records), 1000):
        session.process(records[i:i + 1000])
    warmed = session.learner
    users = settings.session.learner.meta.users_per_update
    lines = [f"### One meta-update over {users} users' tasks "
             f"({settings.session.learner.task_size} examples each), {repeats * 5} repeats", "",
             "| algorithm | ms, median (min - max) |", "|---|---:|"]
    for algorithm in Algorithm:
        config = warmed.config.model_copy(deep=True)
        config.meta.algorithm = algorithm
        learner = OnlineLearner(config, theta={k: v.clone() for k, v in warmed.theta.items()})
        learner.users = warmed.users
        ms = []
        for _ in range(repeats * 5):
            report = learner.meta_update()
            assert report is not None and report.users == users
            ms.append(report.seconds * 1000)
        lines.append(f"| {algorithm.value} | {spread(ms, '{:.1f}')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=["replay", "kafka", "users", "latency",
                                                       "meta"])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections: dict[str, Callable[[], list[str]]] = {
        "replay": lambda: bench_replay(list(movielens.events()), args.repeats),
        "kafka": lambda: bench_kafka(args.repeats),
        "users": lambda: bench_users(args.users, 2, 10_000),
        "latency": lambda: bench_latency(args.rate, args.seconds),
        "meta": lambda: bench_meta(args.repeats),
    }
    print(f"{os.cpu_count()} CPUs, 1 torch thread, `python -m bench.throughput "
          f"{' '.join(sys.argv[1:])}`\n")
    for name in args.only:
        print("\n".join(sections[name]()) + "\n", flush=True)


if __name__ == "__main__":
    main()
