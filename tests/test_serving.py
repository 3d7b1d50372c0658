"""``metarec serve`` against a running ``metarec run`` on the embedded broker,
through a real HTTP client: a served score is the prediction the consumer logs
for the same state; new users and unknown items are scored; bad requests get a
4xx that says why, never a 500; the server survives the consumer's kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaProducer

from metarec.datasets.synthetic import SyntheticStream
from streamer.embedded import EmbeddedBroker, free_port
from tests.helpers import impression_key, read_predictions
from tests.test_kafka_integration import Topics, metarec
from tests.test_live_path import MODEL, create_topics, run_flags, wait_for_log

pytestmark = pytest.mark.integration

PARTITIONS = 3
WINDOW = 900.0
FLAGS = [*MODEL, "--attribution-window-seconds", str(WINDOW)]
CONTEXT = {"platform": "ios", "region": "r1"}


def history() -> list[dict[str, Any]]:
    """Unlabelled impressions and later clicks; every third user tells their age."""
    events = list(SyntheticStream(users=60, events_per_user=8, prelabelled=False,
                                  click_delay=(5.0, 600.0), span_seconds=6 * 3600.0,
                                  session_gap_seconds=1800.0, seed=11).events())
    for e in events:
        if e["type"] == "impression" and int(e["user_id"][1:]) % 3 == 0:
            e["user_features"] = {"age": f"a{int(e['user_id'][1:]) % 4}"}
    return events


#: the watermark is moved past every open window in steps a stream can take (a larger
#: jump is held aside as possibly from the future), as many as a partition's progress
#: (a median of its recent event times) needs (tests.helpers.closing_impressions)
STEPS = [1800.0 * n for n in range(1, 7)]


def move_watermark(prod: KafkaProducer, topic: str, since: float, tag: str) -> float:
    """Unlabelled impressions on every partition, up to ``STEPS[-1]`` past ``since``:
    every window open before ``since`` closes. The time they end at."""
    for step in STEPS:
        for p in range(PARTITIONS):
            event = {"type": "impression", "impression_id": f"{tag}-{p}-{step}",
                     "user_id": f"{tag}-{p}", "item_id": "filler", "timestamp": since + step}
            prod.send(topic, value=json.dumps(event).encode(), partition=p)
    prod.flush()
    return since + STEPS[-1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]
    log: Path

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(self.url + "/health", timeout=5).json()
        return body

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=10, **kw)

    def wait(self, ready: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
        """Until ``ready(health)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                h = self.health()
                if ready(h):
                    return h
            except httpx.HTTPError:
                h = {}
            assert time.monotonic() < deadline, f"{what}: health {h}"
            time.sleep(0.2)


@pytest.fixture
def serving(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[tuple[Topics, Server]]:
    topics = Topics()
    create_topics(broker, topics, PARTITIONS)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            metarec("serve", *run_flags(broker, topics, PARTITIONS, tmp_path / "unused"),
                    *FLAGS, "--serve-port", str(port)),
            stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        server.wait(lambda h: h["status"] == "ready", "the server never became ready")
        yield topics, server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]


def start_run(broker: EmbeddedBroker, topics: Topics, tmp_path: Path, name: str,
              predictions: Path) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / f"{name}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            metarec("run", *run_flags(broker, topics, PARTITIONS, predictions), *FLAGS,
                    "--idle-exit-seconds", "600", "--instance-id", "member"),
            stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    wait_for_log(log, "partitions assigned", proc)
    return proc, log


def stop(proc: subprocess.Popen[str], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]


def learned(predictions: Path, impressions: list[dict[str, Any]]) -> int:
    """Until every one of ``impressions`` is in the prediction log (labelled) and the
    log has stopped growing (the fillers' windows close too); how many distinct
    impressions it holds then."""
    want = {impression_key(e) for e in impressions}
    deadline = time.monotonic() + 60
    seen, since = -1, time.monotonic()
    while True:
        logged = {impression_key(p) for p in read_predictions(predictions)}
        if len(logged) != seen:
            seen, since = len(logged), time.monotonic()
        elif want <= logged and time.monotonic() - since > 2.0:
            return seen
        assert time.monotonic() < deadline, (f"{len(want - logged)} impressions never "
                                             f"labelled: {sorted(want - logged)[:5]}")
        time.sleep(0.2)


def caught_up(server: Server, labels: int) -> dict[str, Any]:
    """Until the server holds ``labels`` labels learned and has read every topic to
    its end twice over (the users' values of a transaction come with its θ update)."""
    def done(h: dict[str, Any]) -> bool:
        return h["examples_learned"] == labels and all(
            n == 0 for n in h["lag_records"].values())
    server.wait(done, f"the server never held {labels} labels")
    time.sleep(0.5)
    return server.wait(done, "the server fell behind again")


def produce_history(broker: EmbeddedBroker, topics: Topics, events: list[dict[str, Any]], *,
                    close: bool = True) -> float:
    """Events keyed by user; with ``close``, then the watermark past all of their
    windows, so that all of it is learned and nothing more is until it moves
    again. The event time it is left at."""
    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    try:
        for e in events:
            prod.send(topics.events, key=e["user_id"].encode(), value=json.dumps(e).encode())
        prod.flush()
        last = max(float(e["timestamp"]) for e in events)
        return move_watermark(prod, topics.events, last, "quiet") if close else last
    finally:
        prod.close()


def assert_served_as_logged(broker: EmbeddedBroker, topics: Topics, server: Server,
                            predictions: Path, quiet: float) -> None:
    """Known and new users' scores from the server, then the same impressions to
    the consumer at the ``quiet`` time (it learns nothing before it scores them),
    closed: the consumer logs the served scores and label counts."""
    users = ["u0", "u3", "u7", "u12", "u30", "u45", "newcomer-1", "newcomer-2"]
    items = [(f"i{n}", {"category": f"c{n % 4}"}) for n in (1, 5, 17, 42, 77)]
    served = {}
    for user in users:
        resp = server.post("/v1/score", {"user_id": user, "context": CONTEXT, "items": [
            {"item_id": i, "item_features": f} for i, f in items]})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["known"] == (not user.startswith("newcomer"))
        for s in body["scores"]:
            served[(user, s["item_id"])] = (s["p"], body["labels"])
    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    try:
        for user in users:
            for n, (item, feats) in enumerate(items):
                e = {"type": "impression", "impression_id": f"probe-{user}-{n}",
                     "user_id": user, "item_id": item, "timestamp": quiet,
                     "context": CONTEXT, "item_features": feats}
                prod.send(topics.events, key=user.encode(), value=json.dumps(e).encode())
        move_watermark(prod, topics.events, quiet, "closer")
    finally:
        prod.close()
    probes = {(u, i, quiet) for u in users for i, _ in items}
    deadline = time.monotonic() + 60
    while True:
        logged = {impression_key(p): p for p in read_predictions(predictions)
                  if impression_key(p) in probes}
        if len(logged) == len(probes) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(logged) == len(probes), f"{len(logged)} of {len(probes)} probes logged"
    personal = 0
    for (user, item, _), line in logged.items():
        p, labels = served[(user, item)]
        assert line["k"] == labels
        assert abs(line["p"] - p) <= 1e-6, (user, item, line["p"], p)
        personal += labels > 0
    assert personal >= 5 * 6


def test_served_scores_are_the_predictions_the_consumer_logs(
        broker: EmbeddedBroker, serving: tuple[Topics, Server], tmp_path: Path) -> None:
    topics, server = serving
    predictions = tmp_path / "preds.jsonl"
    events = history()
    impressions = [e for e in events if e["type"] == "impression"]
    # a backlog: its partitions hold each other back in the event-time merge (a
    # burst into a live consumer would let one partition's watermark pass another's
    # impressions, which then come too late to be labelled)
    quiet = produce_history(broker, topics, events)
    proc, log = start_run(broker, topics, tmp_path, "run", predictions)
    try:
        labels = learned(predictions, impressions)
        assert labels == len(read_predictions(predictions))  # each learned once
        h = caught_up(server, labels)
        assert h["users"] >= len({e["user_id"] for e in impressions})
        assert_served_as_logged(broker, topics, server, predictions, quiet)
    finally:
        if proc.poll() is None:
            stop(proc, log)


def test_a_user_never_seen_and_an_item_never_seen_are_scored(
        serving: tuple[Topics, Server]) -> None:
    _, server = serving
    resp = server.post("/v1/rank", {"user_id": "someone", "user_features": {"age": "a2"},
                                    "items": [{"item_id": "brand-new",
                                               "item_features": {"category": "c1"}},
                                              {"item_id": "also-new"}], "top_n": 1})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body == {"user_id": "someone", "known": False, "labels": 0, "model_version": None,
                    "scores": [body["scores"][0]]}
    assert body["scores"][0]["item_id"] in {"brand-new", "also-new"}
    assert 0 < body["scores"][0]["p"] < 1


def test_rank_returns_the_best_of_the_scores_in_order(serving: tuple[Topics, Server]) -> None:
    _, server = serving
    items = [{"item_id": f"i{n}", "item_features": {"category": f"c{n % 4}"}}
             for n in range(30)]
    scores = server.post("/v1/score", {"user_id": "x", "items": items}).json()["scores"]
    ranked = server.post("/v1/rank", {"user_id": "x", "items": items, "top_n": 5}).json()
    best = sorted(scores, key=lambda s: -s["p"])[:5]
    assert ranked["scores"] == best


BAD_BODIES: list[tuple[Any, str]] = [
    ({"user_id": "u1", "items": []}, "Expected `array` of length >= 1 - at `$.items`"),
    ({"user_id": "", "items": [{"item_id": "a"}]}, "of length >= 1 - at `$.user_id`"),
    ({"items": [{"item_id": "a"}]}, "missing required field `user_id`"),
    # the separator of a user x context task's key: it would read another's task
    ({"user_id": "u1\x1fplatform=ios", "items": [{"item_id": "a"}]}, "at `$.user_id`"),
    ({"user_id": "u1", "items": [{"item_id": None}]}, "got `null` - at `$.items[0].item_id`"),
    ({"user_id": "u1", "items": [{"item_id": 7}]}, "got `int` - at `$.items[0].item_id`"),
    ({"user_id": "u1", "items": [{"item_id": "a", "price": 3}]}, "unknown field `price`"),
    ({"user_id": "u1", "items": [{"item_id": "a"}], "context": {"x": {"nested": 1}}},
     "got `object` - at `$.context[...]`"),
    ({"user_id": "u1", "items": [{"item_id": "a"}], "top_n": 0}, "at `$.top_n`"),
    ({"user_id": "u1", "items": [{"item_id": f"i{n}"} for n in range(1001)]}, "at most 1000"),
    ("not an object", "Expected `object`, got `str`"),
    ([1, 2, 3], "Expected `object`, got `array`"),
]


@pytest.mark.parametrize("path", ["/v1/score", "/v1/rank"])
def test_bad_requests_get_a_4xx_that_says_why(serving: tuple[Topics, Server], path: str) -> None:
    _, server = serving
    for body, why in BAD_BODIES:
        if path == "/v1/score" and "top_n" in str(body):
            why = "unknown field `top_n`"
        resp = server.post(path, body)
        assert resp.status_code == 422, (body, resp.status_code, resp.text)
        assert why in resp.text, (why, resp.text)
    for raw in (b"{not json", b"\xff\xfe\x00", b'{"user_id": "\\ud800", "items": []}'):
        resp = httpx.post(server.url + path, content=raw, timeout=5)
        assert resp.status_code == 422 and "JSON is malformed" in resp.text, resp.text
    huge = b'{"user_id": "u", "items": [' + b'{"item_id": "a"},' * 300_000 + b"]}"
    resp = httpx.post(server.url + path, content=huge, timeout=10)
    assert resp.status_code == 413 and "at most" in resp.text
    resp = httpx.post(server.url + path, content=iter([b'{"user_id": "u"}']), timeout=5)
    assert resp.status_code == 411
    assert httpx.get(server.url + path, timeout=5).status_code == 405
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert f'metarec_serve_requests_total{{code="422",endpoint="{path}"}}' in metrics
    assert 'code="500"' not in metrics


def test_health_metrics_and_schema(serving: tuple[Topics, Server]) -> None:
    _, server = serving
    h = server.health()
    assert h["status"] == "ready" and h["model_version"] is None
    assert set(h["lag_records"]) == {"model", "updates", "changelog"}
    assert h["staleness_seconds"] < 5
    schema = httpx.get(server.url + "/openapi.json", timeout=5).json()
    assert {"/v1/score", "/v1/rank", "/health"} <= set(schema["paths"])
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    for name in ("metarec_serve_staleness_seconds", "metarec_serve_lag_records",
                 "metarec_serve_request_duration_seconds_bucket", "metarec_serve_users"):
        assert name in metrics


def test_the_server_rides_out_a_consumer_killed_mid_transaction(
        broker: EmbeddedBroker, serving: tuple[Topics, Server], tmp_path: Path) -> None:
    """kill -9 of the only member, then its restart: the server keeps answering all
    along, and ends holding exactly what the restarted member committed."""
    topics, server = serving
    predictions = tmp_path / "preds.jsonl"
    events = history()
    impressions = [e for e in events if e["type"] == "impression"]
    half = len(events) // 2
    produce_history(broker, topics, events[:half], close=False)  # a backlog, as above
    proc, log = start_run(broker, topics, tmp_path, "first", predictions)
    probe = {"user_id": "u3", "items": [{"item_id": "i1"}]}
    try:
        server.wait(lambda h: h["users"] > 0 and h["examples_learned"] > 0,
                    "nothing reached the server", timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert server.post("/v1/score", probe).status_code == 200
        quiet = produce_history(broker, topics, events[half:])
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, log = start_run(broker, topics, tmp_path, "second", predictions)
    try:
        # what the first member learned but never committed is learned again: the
        # server holds each label once
        caught_up(server, learned(predictions, impressions))
        assert_served_as_logged(broker, topics, server, predictions, quiet)
    finally:
        stop(proc, log)


def test_the_embedded_demo_ends_with_users_top_items_beside_a_new_users_scores() -> None:
    """`./dev run`'s path: the embedded broker, a demo source, and at the end what
    the server would answer for a few users."""
    done = subprocess.run(metarec("run", "--demo-source", "synthetic", *MODEL),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "each user's top 5 of the 100 most shown items" in out, out
    tables = out.split("\n  user ")[1:]
    assert len(tables) == 3
    for table in tables:
        rows = [line.split() for line in table.splitlines()[2:] if line.strip()]
        assert len(rows) == 5
        personal = [float(r[-2]) for r in rows]
        fresh = [float(r[-1]) for r in rows]
        assert personal == sorted(personal, reverse=True)
        assert all(0 < p < 1 for p in personal + fresh)
        assert personal != fresh  # the personal weights move the scores
