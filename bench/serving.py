"""``metarec serve`` under load, with the consumer running: latency and throughput of
score requests, and how soon a label reaches a user's served scores.

    .venv/bin/python -m bench.serving                     # about 7 minutes
    .venv/bin/python -m bench.serving --repeats 5 --seconds 20 --request-rates 100,1000

Set-up: the embedded broker; MovieLens-100K (100,000 prelabelled impressions)
produced into a 4-partition events topic and learned by one ``metarec run``
member (default model settings); then ``metarec serve`` follows the group's
topics. A feeder process keeps producing prelabelled synthetic impressions of
other users, timed by the wall clock, so the consumer is learning, committing
and publishing while requests are answered.

* **Freshness**, first: with the consumer fed ``--rate`` events/s, every
  ``--probe-every`` seconds a probe user (new, then known) gets one labelled
  impression; the time from its send to the first served response whose
  ``labels`` counts it (polled every 5 ms) is that label's delay. Goal: at most
  2 s at 5,000 events/s.
* **Latency**, then, with the consumer fed ``--latency-rate`` events/s (1,000:
  the embedded broker keeps everything in memory, and after about a million
  events and their changelog values it slows until the consumer stalls): score
  requests of ``--candidates`` MovieLens items (ids only: the server fills in the
  features it learned them with) for random MovieLens users, from a process of
  their own (raw HTTP/1.1 on asyncio, keep-alive), for ``--seconds`` each: open
  loop at each of ``--request-rates`` (latency counted from when each request
  was due), then closed loop with ``--clients`` connections (the throughput;
  it takes every core it can, and starves the consumer). The same load goes to a
  *floor* server: the same uvicorn and FastAPI, the same request decoding and
  JSON response, scores a constant, so the difference is what scoring with a
  live model costs. Runs alternate (ours, floor, ours, ...); medians of the
  repeats are reported, with the labels/s the consumer kept learning meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bench.durability import Group, code_version
from streamer import kafka_io
from streamer.config import Settings
from streamer.embedded import EmbeddedBroker, free_port
from streamer.http_api import ScoreRequest, decode
from streamer.sources import read_source

PARTITIONS = 4
#: a probe whose label is not served within this long counts as never (inf)
PROBE_TIMEOUT = 10.0
LENGTH = re.compile(rb"content-length:\s*(\d+)", re.I)


def metarec(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer.cli", *args]


def flags(broker: EmbeddedBroker, tag: str) -> list[str]:
    return ["--bootstrap-servers", broker.bootstrap, "--events-topic", f"bench-ev-{tag}",
            "--model-topic", f"bench-model-{tag}", "--dlq-topic", f"bench-dlq-{tag}",
            "--drift-topic", f"bench-drift-{tag}", "--group-id", f"bench-{tag}",
            "--partitions", str(PARTITIONS), "--metrics-port", "0"]


# -- the feeder --------------------------------------------------------------------------


def feed(bootstrap: str, topic: str, rate: Any, stop: Any) -> None:
    """Prelabelled impressions of users of its own, at ``rate.value`` events/s of
    wall time (event time = now; the rate may change as it runs), until ``stop``."""
    prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024)
    rng = random.Random(1)
    n = sent = 0
    t0, current = time.monotonic(), rate.value
    try:
        while not stop.is_set():
            if rate.value != current:  # a new rate from now on
                t0, sent, current = time.monotonic(), 0, rate.value
            due = int((time.monotonic() - t0) * current)
            for _ in range(due - sent):
                user = f"feed-{rng.randrange(200_000)}"
                item = rng.randrange(1, 1683)
                event = {"type": "impression", "impression_id": f"feed-{n}", "user_id": user,
                         "item_id": str(item), "timestamp": time.time(),
                         "item_features": {"decade": f"d{item % 8}"},
                         "clicked": rng.random() < 0.4}
                prod.send(topic, key=user.encode(), value=json.dumps(event).encode())
                n += 1
            sent = max(sent, due)
            time.sleep(0.002)
    finally:
        prod.close()


# -- load --------------------------------------------------------------------------------


def _request(body: bytes) -> bytes:
    return (b"POST /v1/score HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                    body: bytes) -> bool:
    """One request on a keep-alive connection; True if it got a 200."""
    reader, writer = conn
    writer.write(_request(body))
    head = await reader.readuntil(b"\r\n\r\n")
    found = LENGTH.search(head)
    assert found is not None, head
    await reader.readexactly(int(found.group(1)))
    return head.startswith(b"HTTP/1.1 200")


async def _closed(port: int, bodies: list[bytes], clients: int,
                  seconds: float) -> tuple[list[float], int]:
    """``clients`` connections, each sending its next request as soon as the last
    is answered: the server's throughput."""
    out: list[float] = []
    errors = 0

    async def client(seed: int) -> None:
        nonlocal errors
        conn = await asyncio.open_connection("127.0.0.1", port)
        rng = random.Random(seed)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            errors += not await _exchange(conn, bodies[rng.randrange(len(bodies))])
            out.append(time.perf_counter() - t0)
        conn[1].close()

    await asyncio.gather(*[client(n) for n in range(clients)])
    return out, errors


async def _open(port: int, bodies: list[bytes], rate: float, seconds: float,
                connections: int = 16) -> tuple[list[float], int]:
    """Requests sent at ``rate`` per second whatever the answers (open loop), over
    a pool of keep-alive connections; each latency counts from when its request
    was due, so a stall is not hidden by the requests it held back."""
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    out: list[float] = []
    errors = 0
    rng = random.Random(0)

    async def one(due: float, body: bytes) -> None:
        nonlocal errors
        conn = await pool.get()
        try:
            errors += not await _exchange(conn, body)
        finally:
            pool.put_nowait(conn)
        out.append(time.perf_counter() - due)

    start = time.perf_counter()
    tasks = []
    for i in range(int(rate * seconds)):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(due, bodies[rng.randrange(len(bodies))])))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait()[1].close()
    return out, errors


def _load(port: int, bodies: list[bytes], clients: int, rate: float, seconds: float,
          q: Any) -> None:
    if rate:
        q.put(asyncio.run(_open(port, bodies, rate, seconds)))
    else:
        q.put(asyncio.run(_closed(port, bodies, clients, seconds)))


def load(port: int, bodies: list[bytes], seconds: float, *, clients: int = 0,
         rate: float = 0.0) -> dict[str, float]:
    """Load from a process of its own, closed loop (``clients``) or open (``rate``
    requests/s): p50/p99 (ms) and requests/s answered."""
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    proc = ctx.Process(target=_load, args=(port, bodies, clients, rate, seconds, q))
    proc.start()
    latencies, errors = q.get(timeout=seconds + 120)
    proc.join()
    a = np.array(latencies) * 1000
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "rps": len(a) / seconds, "errors": errors}


def floor_app() -> Any:
    """The floor: the API's framework, request decoding and JSON response, no model."""
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        req = decode(ScoreRequest, await request.body())
        body = {"user_id": req.user_id, "known": True, "labels": 0, "model_version": 1,
                "scores": [{"item_id": it.item_id, "p": 0.5} for it in req.items]}
        return Response(msgspec.json.encode(body), media_type="application/json")

    return app


def start_floor(port: int) -> subprocess.Popen[str]:
    code = ("import uvicorn; from bench.serving import floor_app; "
            f"uvicorn.run(floor_app(), host='127.0.0.1', port={port}, access_log=False, "
            "log_level='warning', lifespan='off')")
    proc = subprocess.Popen([sys.executable, "-c", code], text=True)
    wait_http(f"http://127.0.0.1:{port}/docs", proc)
    return proc


def wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the server exited {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


# -- freshness ---------------------------------------------------------------------------


def freshness(bootstrap: str, topic: str, url: str, probes: int, every: float) -> list[float]:
    prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    client = httpx.Client(timeout=5)
    delays = []
    try:
        for n in range(probes):
            user = f"probe-{n % max(1, probes // 2)}"  # each twice: first new, then known
            before = client.post(url, json={"user_id": user, "items": [{"item_id": "50"}]}
                                 ).json()["labels"]
            event = {"type": "impression", "impression_id": f"probe-{uuid.uuid4().hex}",
                     "user_id": user, "item_id": "50", "timestamp": time.time(),
                     "clicked": True}
            t0 = time.perf_counter()
            prod.send(topic, key=user.encode(), value=json.dumps(event).encode())
            prod.flush()
            while True:
                got = client.post(url, json={"user_id": user, "items": [{"item_id": "50"}]}
                                  ).json()
                if got["labels"] > before:
                    delays.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > PROBE_TIMEOUT:
                    delays.append(float("inf"))
                    break
                time.sleep(0.005)
            time.sleep(every)
    finally:
        client.close()
        prod.close()
    return delays


# -- the run -----------------------------------------------------------------------------


def bodies(users: list[str], items: list[str], candidates: int, n: int = 200) -> list[bytes]:
    rng = random.Random(0)
    return [json.dumps({"user_id": rng.choice(users), "context": {},
                        "items": [{"item_id": i} for i in rng.sample(items, candidates)]}
                       ).encode() for _ in range(n)]


def status(url: str, bootstrap: str, topic: str, group: str) -> str:
    """The server's health, and how far the consumer group is behind the events."""
    h = httpx.get(url + "/health", timeout=5).json()
    offsets, cons = Group(bootstrap), KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        committed = offsets.committed(group, topic)
        ends = cons.end_offsets([TopicPartition(topic, p) for p in committed])
        behind = sum(ends[TopicPartition(topic, p)] - o for p, o in committed.items())
    finally:
        offsets.close()
        cons.close()
    return (f"server {h['users']:,} users, {h['examples_learned']:,} labels, model version "
            f"{h['model_version']}, lag {sum(h['lag_records'].values())} records, staleness "
            f"{h['staleness_seconds']:.2f} s; consumer group "
            + (f"{behind:,} events behind its topic" if behind > 0 else "caught up"))


def score_buckets(url: str) -> list[tuple[float, float]]:
    """The server's own request-duration histogram for /v1/score (cumulative)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    found = re.findall(r'metarec_serve_request_duration_seconds_bucket\{endpoint="/v1/score",'
                       r'le="([^"]+)"\} (\S+)', text)
    return [(float(le), float(n)) for le, n in found]


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]],
                    q: float) -> float:
    """The bucket bound (ms) under which ``q`` of the requests between two scrapes were
    answered, inside the server."""
    if not after:
        return float("nan")
    counts = [(le, n - dict(before).get(le, 0.0)) for le, n in after]
    total = counts[-1][1]
    return next(le for le, n in counts if n >= q * total) * 1000


def server_delay(url: str) -> str:
    """The server's part of a label's delay: from the member writing the users'
    values to their being served (its histogram's quantiles, by bucket bound)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    found = re.findall(r'metarec_serve_state_delay_seconds_bucket\{le="([^"]+)"\} (\S+)', text)
    bounds = [(float(le), float(n)) for le, n in found]
    total = bounds[-1][1]
    def q(p: float) -> str:
        return next(f"≤ {le:g} s" for le, n in bounds if n >= p * total)
    return f"p50 {q(0.5)}, p99 {q(0.99)}"


def wait_learned(url: str, proc: subprocess.Popen[str], at_least: int) -> None:
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None
        try:
            h = httpx.get(url + "/health", timeout=5).json()
            if h["examples_learned"] >= at_least:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the consumer never learned MovieLens"
        time.sleep(1)


def run(args: argparse.Namespace) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    serve_port, floor_port = free_port(), free_port()
    url = f"http://127.0.0.1:{serve_port}"
    lines = [f"2 CPUs, code {code_version()}, `python -m bench.serving "
             f"--repeats {args.repeats} --seconds {args.seconds:g} "
             f"--request-rates {','.join(f'{r:g}' for r in args.request_rates)} "
             f"--clients {','.join(map(str, args.clients))} "
             f"--candidates {args.candidates} --rate {args.rate} "
             f"--latency-rate {args.latency_rate}`", ""]
    with EmbeddedBroker() as broker:
        f = flags(broker, tag)
        settings = Settings.of(bootstrap_servers=broker.bootstrap, events_topic=f"bench-ev-{tag}",
                               model_topic=f"bench-model-{tag}", dlq_topic=f"bench-dlq-{tag}",
                               drift_topic=f"bench-drift-{tag}", group_id=f"bench-{tag}",
                               partitions=PARTITIONS)
        kafka_io.ensure_topics(broker.cluster, settings.kafka)
        prod = kafka_io.producer(broker.cluster)
        n = kafka_io.produce_records(prod, f"bench-ev-{tag}", read_source("movielens-100k"))
        prod.close()
        logs = Path(tempfile.mkdtemp(prefix="bench-serving-"))
        consumer = subprocess.Popen(metarec("run", *f), stderr=(logs / "run.log").open("w"),
                                    text=True)
        server = subprocess.Popen(metarec("serve", *f, "--serve-port", str(serve_port)),
                                  stderr=(logs / "serve.log").open("w"), text=True)
        stop = mp.get_context("spawn").Event()
        rate = mp.get_context("spawn").Value("i", args.rate)
        feeder = mp.get_context("spawn").Process(
            target=feed, args=(broker.bootstrap, f"bench-ev-{tag}", rate, stop))
        floor = None
        try:
            wait_http(url + "/health", server)
            wait_learned(url, server, n)
            def state() -> str:
                return status(url, broker.bootstrap, f"bench-ev-{tag}", f"bench-{tag}")

            lines.append(f"- MovieLens learned: {state()}")
            rss_start, users_start = rss_mib(server.pid), n_users(url)
            feeder.start()
            time.sleep(5)
            c0, t0 = cpu_seconds(server.pid), time.monotonic()
            time.sleep(5)
            following = (cpu_seconds(server.pid) - c0) / (time.monotonic() - t0)
            lines.append(f"- following the topics alone (no requests), the server used "
                         f"{following:.0%} of a core; the consumer "
                         f"{cpu_share(consumer.pid):.0%}")
            delays = freshness(broker.bootstrap, f"bench-ev-{tag}", url + "/v1/score",
                               args.probes, args.probe_every)
            lines.append(f"- after the probes: {state()}")
            lines += freshness_table(delays, args)
            lines.append(f"The server's part (member's write to served, "
                         f"`metarec_serve_state_delay_seconds`): {server_delay(url)}.")
            rate.value = args.latency_rate
            floor = start_floor(floor_port)
            time.sleep(5)  # the consumer settles at the new rate
            users = [str(u) for u in range(1, 944)]
            items = [str(i) for i in range(1, 1683)]
            reqs = bodies(users, items, args.candidates)
            levels = [("rate", r) for r in args.request_rates] + [
                ("clients", c) for c in args.clients]
            runs: dict[tuple[str, float], Runs] = {}
            kept: dict[tuple[str, float], list[float]] = {}
            for _ in range(args.repeats):  # interleaved: ours, floor, ours, ...
                for level in levels:
                    ours, base = runs.setdefault(level, ([], []))
                    kw = {level[0]: level[1]}
                    before, was = score_buckets(url), labels(url)
                    ours.append(load(serve_port, reqs, args.seconds, **kw))
                    after = score_buckets(url)
                    kept.setdefault(level, []).append((labels(url) - was) / args.seconds)
                    ours[-1]["inside_p99"] = bucket_quantile(before, after, 0.99)
                    base.append(load(floor_port, reqs, args.seconds, **kw))
            lines += latency_table(runs, kept, args)
            lines.append(f"- after them: {state()}")
            rss_end, users_end = rss_mib(server.pid), n_users(url)
            lines += ["", f"Server memory: {rss_start:.0f} MiB resident with "
                          f"{users_start:,} users, {rss_end:.0f} MiB with {users_end:,}: "
                          f"{(rss_end - rss_start) * 2**20 / max(1, users_end - users_start):,.0f}"
                          " bytes per user added."]
        finally:
            stop.set()
            if feeder.pid is not None:
                feeder.join(timeout=10)
            for proc in (floor, server, consumer):
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=60)
    return lines


def labels(url: str) -> int:
    """Labels the server holds learned (the consumer's committed ones)."""
    return int(httpx.get(url + "/health", timeout=5).json()["examples_learned"])


def n_users(url: str) -> int:
    return int(httpx.get(url + "/health", timeout=5).json()["users"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid: int, seconds: float = 2.0) -> float:
    c0 = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / seconds


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _span(runs: list[dict[str, float]], key: str, fmt: str) -> str:
    values = [r[key] for r in runs]
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))} - {fmt.format(max(values))})")


Runs = tuple[list[dict[str, float]], list[dict[str, float]]]


def latency_table(runs: dict[tuple[str, float], Runs], kept: dict[tuple[str, float], list[float]],
                  args: argparse.Namespace) -> list[str]:
    out = ["", f"### Score requests of {args.candidates} candidates, {args.seconds:g} s per "
               f"repeat, medians (min - max) of {args.repeats}; the consumer fed "
               f"{args.latency_rate:,} events/s meanwhile", "",
           "| load | server | p50, ms | p99, ms | answered/s | p99 inside the server, ms | "
           "consumer learned, labels/s | errors |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (kind, level), (ours, base) in runs.items():
        name = (f"{level:,.0f} requests/s (open loop)" if kind == "rate"
                else f"{level:.0f} clients (closed loop)")
        for server, r in (("`metarec serve`", ours), ("floor: same framework, no model", base)):
            inside = f"≤ {_median(r, 'inside_p99'):g}" if "inside_p99" in r[0] else ""
            learned = f"{statistics.median(kept[(kind, level)]):,.0f}" if r is ours else ""
            out.append(f"| {name} | {server} | {_span(r, 'p50', '{:.2f}')} | "
                       f"{_span(r, 'p99', '{:.2f}')} | {_span(r, 'rps', '{:,.0f}')} | {inside} "
                       f"| {learned} | {sum(x['errors'] for x in r):.0f} |")
    out += ["", "An open-loop latency counts from when the request was due. *Inside the "
                "server*: its own request histogram (by bucket bound), from the app's entry "
                "to its response. Closed loop, the load takes every core it can get, and "
                "the consumer learns what is left."]
    return out


def freshness_table(delays: list[float], args: argparse.Namespace) -> list[str]:
    a = np.array(delays)  # inf: not served within PROBE_TIMEOUT
    p50, p90 = (float(np.percentile(a, q, method="lower")) for q in (50, 90))
    return ["", f"### A label's delay to its user's served scores ({len(a)} probes, "
                f"{args.rate:,} events/s of other users meanwhile)", "",
            "| p50, s | p90, s | max, s | within 2 s |", "|---:|---:|---:|---:|",
            f"| {p50:.2f} | {p90:.2f} | {a.max():.2f} | "
            f"{int((a <= 2.0).sum())} of {len(a)} |"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--request-rates", type=lambda v: [float(c) for c in v.split(",")],
                        default=[200.0, 500.0], help="open-loop request rates (per second)")
    parser.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",")],
                        default=[4], help="closed-loop concurrent clients")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--rate", type=int, default=5000,
                        help="events/s fed to the consumer while the probes run")
    parser.add_argument("--latency-rate", type=int, default=1000,
                        help="events/s fed to the consumer while the latency runs go")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--probe-every", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("METAREC_LOG_LEVEL", "WARNING")
    lines = run(args)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
