"""Durable state under kill -9 on MovieLens-100K: a member killed twice and
restarted against the same member uninterrupted.

    .venv/bin/python -m bench.durability                 # seeds 0-4, about 7-8 minutes
    .venv/bin/python -m bench.durability --seeds 0 1 2 --keep /tmp/durability

The 100,000 MovieLens-100K ratings (prelabelled impressions, ``metarec produce``'s
records: keyed by user id, the default partitioner) are written once into a
4-partition events topic of the embedded broker. Then, for each seed, in turns
(even seeds run the uninterrupted member first, odd ones the killed one):

- **uninterrupted**: one ``metarec run`` member (a fresh group, model, changelog
  and updates topics) consumes the whole topic with ``--predictions-out`` and
  exits on ``--idle-exit-seconds``;
- **killed**: the same in another fresh group; the member (fixed
  ``--instance-id``) is SIGKILLed once the group's committed offsets of the events
  topic pass each ``--kill-at`` fraction of the records (30% and 70%) plus a
  random delay of 0-1 s (drawn from the seed), and restarted under the same
  instance id; the last run exits on idle. Every run appends to one prediction
  log, and the AUC is over the *last* line of each impression (user, item,
  timestamp).

Both members use the default model settings (those of the README's MovieLens
figures). Reported per seed, with medians:

- AUC killed vs uninterrupted and the difference (goal: within 0.003);
- impressions with more than one line in the killed member's log (predicted again
  after a crash), impressions with none, and impressions whose final line's ``k``
  is not the uninterrupted run's (the user's learned count when it was scored);
- from the changelog as of the committed offsets (users) and the model topic plus
  the updates topic (θ): users whose learned count is not their number of events
  (goal: 0), and θ's examples_learned against the sum of users' learned counts;
- returning users after each restart (users with a committed event before the
  restart's committed offsets and events after them): AUC of their first 20
  events after the restart, in the killed member's final lines and in the
  uninterrupted run's lines for the same impressions (before durable state, the
  issue measured 0.741 against 0.779); and how many users the restart's log says
  it restored against how many had committed events;
- wall time of each member (all runs of the killed one, restarts included), and
  warnings, errors and tracebacks in the members' logs (metarec.* loggers).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from metarec.evaluation import auc
from metarec.session import StreamSession
from streamer import changelog, kafka_io, lineage
from streamer.cluster import Cluster
from streamer.config import LEAVES, Settings
from streamer.durability import group_theta
from streamer.embedded import EmbeddedBroker
from streamer.metrics import Metrics
from streamer.sources import read_source

PARTITIONS = 4
EVENTS_TOPIC = "bench.durability.events"
MEMBER = "member-a"
#: (user_id, item_id, timestamp): an impression, as the prediction log names it
Key = tuple[str, str, float]
#: a line of a member's log that a logger wrote at WARNING or above
LOUD = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")
#: the settings printed with the figures (all others are the defaults too)
SHOWN = ("algorithm", "dim", "item_buckets", "feature_buckets", "inner_lr", "inner_steps",
         "recency", "meta_every", "meta_users", "task_size", "online_lr", "seed",
         "max_batch_records", "max_batch_wait_ms", "commit_interval_ms", "publish_every",
         "publish_min_seconds", "durable_state")


def code_version() -> str:
    """The commit measured, and whether the work tree differs from it (the members
    import the tree as it is when each starts)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True,
                               check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" with changes to {', '.join(changed)}" if changed else " (clean)")


def shown_settings(settings: Settings) -> str:
    return ", ".join(f"{name}={functools.reduce(getattr, LEAVES[name].path, settings)}"
                     for name in SHOWN)


def blank_numbers(text: str) -> str:
    return re.sub(r"[0-9][0-9.]*", "N", text)[:160]


class LoudHandler(logging.Handler):
    """metarec.* warnings and errors of this process (reading the final state)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("metarec"):
            self.found[f"{record.levelname} {record.name}: "
                       f"{blank_numbers(record.getMessage())}"] += 1


def key_of(line: dict[str, Any]) -> Key:
    return str(line["user_id"]), str(line["item_id"]), float(line["timestamp"])


# -- the stream --------------------------------------------------------------------------


@dataclass
class Stream:
    """The events topic as written: each impression's place and label."""

    total: int
    place: dict[Key, tuple[int, int]]  # (partition, offset)
    #: each user's impressions in their partition's order
    by_user: dict[str, list[Key]]
    label: dict[Key, int]


def write_stream(bootstrap: str) -> Stream:
    """MovieLens-100K into the events topic, as ``metarec produce movielens-100k``
    writes it (and as ``./dev run``'s demo streams it), then read back for each
    impression's partition and offset."""
    settings = Settings.of(bootstrap_servers=bootstrap, events_topic=EVENTS_TOPIC,
                           partitions=PARTITIONS, durable_state=False)
    kafka_io.ensure_topics(Cluster(bootstrap), settings.kafka)
    prod = kafka_io.producer(Cluster(bootstrap))
    try:
        total = kafka_io.produce_records(prod, EVENTS_TOPIC, read_source("movielens-100k"))
    finally:
        prod.close()
    cons = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         max_partition_fetch_bytes=4 << 20)
    place: dict[Key, tuple[int, int]] = {}
    label: dict[Key, int] = {}
    try:
        tps = [TopicPartition(EVENTS_TOPIC, p) for p in range(PARTITIONS)]
        cons.assign(tps)
        cons.seek_to_beginning(*tps)
        deadline = time.monotonic() + 120
        while len(place) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"read back {len(place):,} of {total:,} records")
            for tp, msgs in cons.poll(timeout_ms=500, max_records=5000).items():
                for m in msgs:
                    event = json.loads(m.value)
                    key = key_of(event)
                    place[key] = (tp.partition, m.offset)
                    label[key] = int(event["clicked"])
    finally:
        cons.close()
    by_user: dict[str, list[Key]] = defaultdict(list)
    for key in sorted(place, key=place.__getitem__):
        by_user[key[0]].append(key)
    return Stream(total, place, dict(by_user), label)


# -- members -----------------------------------------------------------------------------


@dataclass
class Names:
    """One member's own group and topics (changelog and updates: the group's defaults)."""

    kind: str
    seed: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    @property
    def group(self) -> str:
        return f"bench.durability.{self.kind}-{self.seed}-{self.tag}"

    def settings(self, bootstrap: str) -> Settings:
        g = self.group
        return Settings.of(bootstrap_servers=bootstrap, events_topic=EVENTS_TOPIC,
                           group_id=g, model_topic=f"{g}.model", dlq_topic=f"{g}.dlq",
                           drift_topic=f"{g}.drift", partitions=PARTITIONS, metrics_port=0,
                           instance_id=MEMBER, demo_source=None)


def command(bootstrap: str, names: Names, predictions: Path, *extra: str) -> list[str]:
    g = names.group
    return [sys.executable, "-m", "streamer.cli", "run", "--bootstrap-servers", bootstrap,
            "--events-topic", EVENTS_TOPIC, "--group-id", g, "--model-topic", f"{g}.model",
            "--dlq-topic", f"{g}.dlq", "--drift-topic", f"{g}.drift",
            "--partitions", str(PARTITIONS), "--metrics-port", "0",
            "--instance-id", MEMBER, "--predictions-out", str(predictions), *extra]


class Group:
    """The group's committed offsets, read with one admin client."""

    def __init__(self, bootstrap: str):
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)

    def committed(self, group: str, topic: str) -> dict[int, int]:
        try:
            found = self.admin.list_group_offsets(group).get(group, {})
        except KafkaError:
            return {}
        return {tp.partition: o.offset for tp, o in found.items()
                if tp.topic == topic and o.offset is not None and o.offset >= 0}

    def close(self) -> None:
        self.admin.close()


@dataclass
class Member:
    """The runs of one member, each logging to its own file."""

    bootstrap: str
    names: Names
    work: Path
    runs: list[Path] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    @property
    def predictions(self) -> Path:
        return self.work / f"{self.names.kind}-{self.names.seed}.predictions.jsonl"

    def start(self, *extra: str) -> subprocess.Popen[str]:
        log = self.work / f"{self.names.kind}-{self.names.seed}.run{len(self.runs)}.log"
        self.runs.append(log)
        with log.open("w") as err:
            return subprocess.Popen(command(self.bootstrap, self.names, self.predictions,
                                            *extra),
                                    stdout=subprocess.DEVNULL, stderr=err, text=True)

    def tail(self) -> str:
        return self.runs[-1].read_text()[-3000:] if self.runs else ""


def wait_committed(group: Group, member: Member, proc: subprocess.Popen[str],
                   records: float, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(group.committed(member.names.group, EVENTS_TOPIC).values()) < records:
        if proc.poll() is not None:
            raise RuntimeError(f"member exited {proc.returncode} before committing "
                               f"{records:,.0f} records:\n{member.tail()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"not {records:,.0f} records committed in {timeout:.0f} s:\n"
                               f"{member.tail()}")
        time.sleep(0.1)


def finish(member: Member, proc: subprocess.Popen[str], timeout: float = 600.0) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"member did not exit in {timeout:.0f} s:\n{member.tail()}") from None
    member.codes.append(code)
    if code != 0:
        raise RuntimeError(f"member exited {code}:\n{member.tail()}")


# -- what the member left ----------------------------------------------------------------


def final_state(bootstrap: str, settings: Settings, group: Group) -> tuple[dict[str, int], int]:
    """Each user's learned count as the changelog holds it at the committed offsets,
    and θ's examples_learned (the newest version plus every later committed update)."""
    k = settings.kafka
    users = StreamSession(settings.session, durable=True)
    topic = k.changelog()
    stamps: dict[int, int | None] = dict(group.committed(k.group_id, topic))
    found = changelog.restore(Cluster(bootstrap), topic, list(range(PARTITIONS)), stamps,
                              stall_seconds=5, own_id="bench.durability")
    committed = group.committed(k.group_id, EVENTS_TOPIC)
    for p, state in found.items():
        users.restore(p, state.values, committed.get(p, 0))
    store = users.learner.users
    learned = {u: int(store.learned[row]) for u, row in store.rows.items()}
    start = lineage.newest(Cluster(bootstrap), k.model_topic, settings.session.learner)
    theta = StreamSession(settings.session, start.theta, durable=True,
                          examples_learned=start.examples_learned)
    group_theta(Cluster(bootstrap), k, theta, start.lineage, Metrics(), "bench.durability")
    return learned, int(theta.learner.examples_learned)


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loud_lines(logs: list[Path]) -> tuple[Counter[str], int]:
    """Warnings and errors of any logger (metarec.*, and kafka-python's errors: the
    members log kafka.* at ERROR and above) in the members' logs, numbers blanked;
    and tracebacks, each counted under its log's name and the exception's line."""
    found: Counter[str] = Counter()
    tracebacks = 0
    for log in logs:
        in_traceback = False
        for line in log.read_text().splitlines():
            if line.startswith("Traceback"):
                tracebacks += 1
                in_traceback = True
                continue
            if in_traceback and line and not line.startswith(" "):
                found[f"traceback in {log.name.split('.')[0]}: {blank_numbers(line)}"] += 1
                in_traceback = False
            m = LOUD.match(line)
            if m:
                found[f"{m.group(1)} {m.group(2)}: {blank_numbers(m.group(3))}"] += 1
    return found, tracebacks


def restored_users(log: Path) -> int:
    return sum(int(n) for n in re.findall(r"restored (\d+) user", log.read_text()))


@dataclass
class Outcome:
    kind: str
    seed: int
    wall: float
    lines: list[dict[str, Any]]
    learned: dict[str, int]
    theta_examples: int
    loud: Counter[str]
    tracebacks: int
    #: killed only: the committed offsets at each restart, the kill delays, and
    #: what each restart's log says it restored
    restarts: list[dict[int, int]] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)
    run_lines: list[int] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    def final(self) -> dict[Key, dict[str, Any]]:
        return {key_of(line): line for line in self.lines}


def uninterrupted(bootstrap: str, group: Group, seed: int, work: Path,
                  idle: float) -> Outcome:
    names = Names("uninterrupted", seed)
    member = Member(bootstrap, names, work)
    t0 = time.perf_counter()
    finish(member, member.start("--idle-exit-seconds", f"{idle:g}"))
    wall = time.perf_counter() - t0
    learned, theta = final_state(bootstrap, names.settings(bootstrap), group)
    loud, tracebacks = loud_lines(member.runs)
    return Outcome("uninterrupted", seed, wall, read_lines(member.predictions), learned, theta,
                   loud, tracebacks)


def killed(bootstrap: str, group: Group, stream: Stream, seed: int, work: Path,
           idle: float, kill_at: list[float]) -> Outcome:
    rng = np.random.default_rng(seed)
    names = Names("killed", seed)
    member = Member(bootstrap, names, work)
    restarts: list[dict[int, int]] = []
    delays: list[float] = []
    run_lines: list[int] = []
    t0 = time.perf_counter()
    for fraction in kill_at:
        proc = member.start()
        wait_committed(group, member, proc, fraction * stream.total)
        delay = float(rng.uniform(0.0, 1.0))
        delays.append(delay)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        member.codes.append(proc.wait(timeout=30))
        time.sleep(1.0)  # a commit the member sent before it died has been applied
        restarts.append(group.committed(names.group, EVENTS_TOPIC))
        run_lines.append(len(read_lines(member.predictions)) - sum(run_lines))
    finish(member, member.start("--idle-exit-seconds", f"{idle:g}"))
    wall = time.perf_counter() - t0
    lines = read_lines(member.predictions)
    run_lines.append(len(lines) - sum(run_lines))
    learned, theta = final_state(bootstrap, names.settings(bootstrap), group)
    loud, tracebacks = loud_lines(member.runs)
    return Outcome("killed", seed, wall, lines, learned, theta, loud, tracebacks,
                   restarts, delays, [restored_users(log) for log in member.runs[1:]],
                   run_lines, member.codes)


# -- the figures -------------------------------------------------------------------------


def auc_of(final: dict[Key, dict[str, Any]], keys: list[Key] | None = None) -> float:
    chosen = list(final.values()) if keys is None else [final[k] for k in keys if k in final]
    p = np.array([x["p"] for x in chosen], dtype=float)
    y = np.array([x["label"] for x in chosen], dtype=float)
    return auc(p, y)


def returning(stream: Stream, committed: dict[int, int], first: int
              ) -> tuple[list[Key], int]:
    """The first ``first`` impressions after the committed offsets of each user
    who had a committed one before them; and how many users had committed ones."""
    keys: list[Key] = []
    with_state = 0
    for events in stream.by_user.values():
        p = stream.place[events[0]][0]
        done = committed.get(p, 0)
        before = sum(1 for k in events if stream.place[k][1] < done)
        with_state += before > 0
        if 0 < before < len(events):
            keys += events[before:before + first]
    return keys, with_state


def figures(stream: Stream, u: Outcome, k: Outcome, first: int) -> dict[str, Any]:
    fu, fk = u.final(), k.final()
    events_per_user = Counter(key[0] for key in stream.place)
    counts = Counter(key_of(line) for line in k.lines)
    out: dict[str, Any] = {
        "seed": k.seed,
        "auc_uninterrupted": auc_of(fu),
        "auc_killed": auc_of(fk),
        "repredicted": sum(1 for n in counts.values() if n > 1),
        "extra_lines": len(k.lines) - len(counts),
        "missing_killed": sum(1 for key in stream.place if key not in fk),
        "missing_uninterrupted": sum(1 for key in stream.place if key not in fu),
        "dup_uninterrupted": len(u.lines) - len(fu),
        "k_differs": sum(1 for key, line in fk.items()
                         if key in fu and int(line["k"]) != int(fu[key]["k"])),
        "wall_uninterrupted": u.wall,
        "wall_killed": k.wall,
        "delays": k.delays,
        "run_lines": k.run_lines,
        "exit_codes": k.codes,
    }
    for name, o in (("uninterrupted", u), ("killed", k)):
        out[f"wrong_users_{name}"] = sum(1 for user, n in events_per_user.items()
                                         if o.learned.get(user) != n)
        out[f"unknown_users_{name}"] = sum(1 for user in o.learned if user not in events_per_user)
        out[f"theta_{name}"] = o.theta_examples
        out[f"learned_sum_{name}"] = sum(o.learned.values())
    per_restart = []
    pooled: list[Key] = []
    for n, committed in enumerate(k.restarts):
        keys, with_state = returning(stream, committed, first)
        pooled += keys
        per_restart.append({
            "committed": sum(committed.values()),
            "users": len({key[0] for key in keys}), "events": len(keys),
            "auc_killed": auc_of(fk, keys), "auc_uninterrupted": auc_of(fu, keys),
            "with_state": with_state,
            "restored_logged": k.restored[n] if n < len(k.restored) else None})
    out["restarts"] = per_restart
    out["returning_killed"] = auc_of(fk, pooled)
    out["returning_uninterrupted"] = auc_of(fu, pooled)
    out["returning_events"] = len(pooled)
    return out


def med(rows: list[dict[str, Any]], name: str) -> float:
    return float(statistics.median(r[name] for r in rows))


def report(rows: list[dict[str, Any]], cmd: str, settings: str, seconds: float,
           loud: Counter[str], own: Counter[str], tracebacks: int, first: int,
           kill_at: list[float], code: str) -> list[str]:
    kills = " and ".join(f"{f:.0%}" for f in kill_at)
    lines = [f"### Kill -9 at {kills} of the records committed (+0-1 s), MovieLens-100K, "
             f"{PARTITIONS} partitions, embedded broker", "",
             "| seed | AUC uninterrupted | AUC killed | killed - uninterrupted | "
             "impressions predicted again | users with a wrong count | θ examples / users' sum "
             f"(killed) | returning users' first {first}: killed / uninterrupted | "
             "wall s: uninterrupted / killed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['auc_uninterrupted']:.4f} | {r['auc_killed']:.4f} | "
            f"{r['auc_killed'] - r['auc_uninterrupted']:+.4f} | {r['repredicted']:,} | "
            f"{r['wrong_users_killed']} | {r['theta_killed']:,} / {r['learned_sum_killed']:,} | "
            f"{r['returning_killed']:.4f} / {r['returning_uninterrupted']:.4f} "
            f"({r['returning_events']:,} events) | "
            f"{r['wall_uninterrupted']:.0f} / {r['wall_killed']:.0f} |")
    diffs = [r["auc_killed"] - r["auc_uninterrupted"] for r in rows]
    lines.append(
        f"| **median** | {med(rows, 'auc_uninterrupted'):.4f} | {med(rows, 'auc_killed'):.4f} "
        f"| {statistics.median(diffs):+.4f} | {med(rows, 'repredicted'):,.0f} | "
        f"{med(rows, 'wrong_users_killed'):.0f} | | "
        f"{med(rows, 'returning_killed'):.4f} / {med(rows, 'returning_uninterrupted'):.4f} | "
        f"{med(rows, 'wall_uninterrupted'):.0f} / {med(rows, 'wall_killed'):.0f} |")
    within = sum(abs(d) <= 0.003 for d in diffs)
    lines += ["", f"|AUC difference| within 0.003 in {within} of {len(rows)} seeds "
              f"(largest {max(abs(d) for d in diffs):.4f}). The spread of the uninterrupted "
              f"runs' AUC over seeds: {min(r['auc_uninterrupted'] for r in rows):.4f} - "
              f"{max(r['auc_uninterrupted'] for r in rows):.4f}.", "",
              "Per restart (committed records at the kill; returning users and their events; "
              f"AUC of their first {first} events, killed / uninterrupted; users the restart "
              "logged restored / users with a committed event):", ""]
    for r in rows:
        parts = [f"{x['committed']:,}: {x['users']} users, {x['events']:,} events, "
                 f"{x['auc_killed']:.4f} / {x['auc_uninterrupted']:.4f}, restored "
                 f"{x['restored_logged']} / {x['with_state']}" for x in r["restarts"]]
        lines.append(f"- seed {r['seed']} (delays {', '.join(f'{d:.2f}' for d in r['delays'])}"
                     f" s; lines per run {', '.join(f'{n:,}' for n in r['run_lines'])}; "
                     f"exit codes {', '.join(str(c) for c in r['exit_codes'])}): "
                     + "; ".join(parts))
    lines += ["", "Checks (every seed; want 0 unless said):", ""]
    checks = [
        ("impressions with no line, killed / uninterrupted", "missing_killed",
         "missing_uninterrupted"),
        ("lines past one per impression, killed (extra lines) / uninterrupted",
         "extra_lines", "dup_uninterrupted"),
        ("impressions whose final k differs from the uninterrupted run's", "k_differs", None),
        ("users whose learned count is not their events, killed / uninterrupted",
         "wrong_users_killed", "wrong_users_uninterrupted"),
        ("learned users that are not in the stream, killed / uninterrupted",
         "unknown_users_killed", "unknown_users_uninterrupted"),
    ]
    for what, a, b in checks:
        vals = [f"{r[a]:,}" + (f" / {r[b]:,}" if b else "") for r in rows]
        lines.append(f"- {what}: " + ", ".join(vals))
    lines.append("- θ examples_learned - sum of users' learned counts (want 0), killed / "
                 "uninterrupted: " + ", ".join(
                     f"{r['theta_killed'] - r['learned_sum_killed']:+,} / "
                     f"{r['theta_uninterrupted'] - r['learned_sum_uninterrupted']:+,}"
                     for r in rows))
    lines += ["", f"Members' logs: {tracebacks} traceback(s); warnings and errors of "
              f"metarec.* (and kafka.* errors; tracebacks by their exception) "
              f"({sum(loud.values())}):" + ("" if loud else " none")]
    lines += [f"- {n} x {text}" for text, n in loud.most_common(20)]
    lines += [f"This process's reads of the final state: metarec.* warnings and errors "
              f"({sum(own.values())}):" + ("" if own else " none")]
    lines += [f"- {n} x {text}" for text, n in own.most_common(20)]
    env = sorted(k for k in os.environ if k.upper().startswith("METAREC_"))
    lines += ["", f"Member command (each run; the killed member's last run, and the "
              f"uninterrupted one, add `--idle-exit-seconds`): `{cmd}`", "",
              f"Settings (defaults, as the member sees them): {settings}; METAREC_ "
              f"variables set: {', '.join(env) or 'none'}.", "",
              f"Code: {code}.", "", f"Whole bench: {seconds:.0f} s."]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="seeds of the kill delays, one uninterrupted and one killed "
                        "member each (about 85 s a seed on 2 cores)")
    parser.add_argument("--kill-at", type=float, nargs="+", default=[0.3, 0.7],
                        help="kill when the committed records pass these fractions")
    parser.add_argument("--idle-exit-seconds", type=float, default=8.0)
    parser.add_argument("--first-events", type=int, default=20,
                        help="returning users' events after a restart to score")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the members' logs and prediction logs in this directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    own = LoudHandler()
    logging.getLogger().addHandler(own)
    t0 = time.perf_counter()
    code = code_version()
    work = Path(tempfile.mkdtemp(prefix="bench-durability-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    loud: Counter[str] = Counter()
    tracebacks = 0
    try:
        with EmbeddedBroker() as broker:
            bootstrap = broker.bootstrap
            stream = write_stream(bootstrap)
            print(f"{stream.total:,} events in {EVENTS_TOPIC} ({PARTITIONS} partitions), "
                  f"{len(stream.by_user)} users", file=sys.stderr, flush=True)
            group = Group(bootstrap)
            try:
                for n, seed in enumerate(args.seeds):
                    done: dict[str, Outcome] = {}
                    for kind in (("uninterrupted", "killed") if n % 2 == 0
                                 else ("killed", "uninterrupted")):
                        if kind == "uninterrupted":
                            done[kind] = uninterrupted(bootstrap, group, seed, work,
                                                       args.idle_exit_seconds)
                        else:
                            done[kind] = killed(bootstrap, group, stream, seed, work,
                                                args.idle_exit_seconds, args.kill_at)
                        print(f"seed {seed}: {kind} done in {done[kind].wall:.0f} s",
                              file=sys.stderr, flush=True)
                    for o in done.values():
                        loud.update(o.loud)
                        tracebacks += o.tracebacks
                    row = figures(stream, done["uninterrupted"], done["killed"],
                                  args.first_events)
                    rows.append(row)
                    print(f"seed {seed}: AUC killed {row['auc_killed']:.4f} vs uninterrupted "
                          f"{row['auc_uninterrupted']:.4f}", file=sys.stderr, flush=True)
            finally:
                group.close()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    cmd = shlex.join(["python", "-m", "streamer.cli", "run",
                      *command("<bootstrap>", Names("killed", 0, "<tag>"),
                               Path("<predictions.jsonl>"))[4:]])
    settings = shown_settings(Names("killed", 0).settings("<bootstrap>"))
    after = code_version()
    if after != code:
        code = f"{code} at the start, {after} at the end: the code changed during the bench"
    print("\n".join(report(rows, cmd, settings, time.perf_counter() - t0, loud, own.found,
                           tracebacks, args.first_events, args.kill_at, code)))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
