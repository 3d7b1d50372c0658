"""Replays are deterministic and source-agnostic: files in three formats and a
Kafka topic give the same prediction log; ranges, model versions and drift
reports come out as asked."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metarec import drift, kernels
from metarec.datasets.synthetic import SyntheticStream
from streamer import kafka_io
from streamer.cli import main
from streamer.config import Settings
from streamer.embedded import EmbeddedBroker
from streamer.model_topic import read_versions
from streamer.replay import replay as replay_fn
from streamer.warmup import warm_up
from tests.test_kafka_integration import Topics, committed, produce

EVENTS = list(SyntheticStream(users=60, events_per_user=12, seed=41).events())
SMALL = ["--item-buckets", "4096", "--feature-buckets", "1024", "--dim", "8",
         "--meta-every", "200", "--publish-every", "1", "--max-batch-records", "100",
         "--metrics-port", "0"]


def write_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    return path


def replay(tmp_path: Path, source: str, name: str, *extra: str) -> bytes:
    out = tmp_path / f"{name}.jsonl"
    assert main(["replay", source, "--predictions-out", str(out), *SMALL, *extra]) == 0
    return out.read_bytes()


def test_same_input_config_and_seed_give_a_byte_identical_log(tmp_path: Path) -> None:
    src = str(write_jsonl(tmp_path / "events.jsonl"))
    first, second = replay(tmp_path, src, "a"), replay(tmp_path, src, "b")
    assert first == second and first.count(b"\n") == len(EVENTS)
    assert replay(tmp_path, src, "c", "--seed", "1") != first


def test_jsonl_csv_and_parquet_give_the_same_predictions(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "events.jsonl")
    columns = ["type", "impression_id", "user_id", "item_id", "timestamp", "clicked",
               "context.platform", "context.region", "item_features.category"]
    with (tmp_path / "events.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for e in EVENTS:
            w.writerow([e["type"], e["impression_id"], e["user_id"], e["item_id"],
                        e["timestamp"], str(e["clicked"]).lower(), e["context"]["platform"],
                        e["context"]["region"], e["item_features"]["category"]])
    pq.write_table(pa.Table.from_pylist(EVENTS), tmp_path / "events.parquet")
    expected = replay(tmp_path, str(src), "jsonl")
    assert replay(tmp_path, str(tmp_path / "events.csv"), "csv") == expected
    assert replay(tmp_path, str(tmp_path / "events.parquet"), "parquet") == expected


def test_event_time_range_keeps_only_events_inside(tmp_path: Path) -> None:
    src = str(write_jsonl(tmp_path / "events.jsonl"))
    times = sorted(e["timestamp"] for e in EVENTS)
    lo, hi = times[len(times) // 4], times[len(times) // 2]
    log = replay(tmp_path, src, "range", "--from", str(lo), "--to", str(hi))
    stamps = [json.loads(line)["timestamp"] for line in log.splitlines()]
    assert stamps and all(lo <= t < hi for t in stamps)
    assert len(stamps) == sum(1 for t in times if lo <= t < hi)


@pytest.mark.integration
def test_a_topic_replays_like_the_file_and_commits_nothing(broker: EmbeddedBroker,
                                                           tmp_path: Path) -> None:
    topics = Topics()
    # one partition: the topic's order is the file's order
    kafka_io.ensure_topics(broker.cluster, Settings.of(bootstrap_servers=broker.bootstrap,
                                                      events_topic=topics.events,
                                                      model_topic=topics.model,
                                                      dlq_topic=topics.dlq, partitions=1).kafka)
    produce(broker, topics.events, EVENTS, [])
    src = str(write_jsonl(tmp_path / "events.jsonl"))
    boot = ["--bootstrap-servers", broker.bootstrap, "--group-id", topics.group]
    assert replay(tmp_path, f"kafka:{topics.events}", "topic", *boot) == \
        replay(tmp_path, src, "file")
    assert committed(broker, topics.group, topics.events, 1) == {}
    part = replay(tmp_path, f"kafka:{topics.events}", "part", *boot,
                  "--from-offset", "100", "--to-offset", "300")
    assert part.count(b"\n") == 200
    times = sorted(e["timestamp"] for e in EVENTS)
    window = ["--from", str(times[200]), "--to", str(times[500])]
    in_time = replay(tmp_path, f"kafka:{topics.events}", "topic-time", *boot, *window)
    assert in_time == replay(tmp_path, src, "file-time", *window)
    assert in_time.count(b"\n") == 300


@pytest.mark.integration
def test_model_versions_go_to_a_directory_or_a_topic_and_a_replay_can_start_from_one(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    src = str(write_jsonl(tmp_path / "events.jsonl"))
    replay(tmp_path, src, "dir", "--models-out", str(tmp_path / "models"))
    manifests = sorted((tmp_path / "models").glob("v*.json"))
    assert len(manifests) >= 2
    assert json.loads(manifests[1].read_text())["parent"] == 1
    assert (tmp_path / "models" / "v000001.npz").stat().st_size > 0

    topic = Topics().model
    boot = ["--bootstrap-servers", broker.bootstrap, "--model-topic", topic]
    replay(tmp_path, src, "pub", *boot, "--models-out", f"kafka:{topic}")
    newest = read_versions(broker.cluster, topic).newest
    assert newest is not None and newest.manifest.version == len(manifests)
    fresh = replay(tmp_path, src, "fresh")
    warm = replay(tmp_path, src, "warm", *boot, "--model-version", "1")
    assert warm != fresh  # started from version 1, not from a fresh initialisation
    # an absent version is a clear error (exit 2), not a crash
    assert main(["replay", src, *SMALL, *boot, "--model-version", "999"]) == 2


def test_drift_alarms_are_written_and_reported(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "drift.jsonl"
    stream = SyntheticStream(users=600, events_per_user=30, seed=21, drift="click_rate")
    events.write_text("".join(json.dumps(e) + "\n" for e in stream.events()))
    alarms = tmp_path / "alarms.jsonl"
    assert main(["replay", str(events), "--item-buckets", "4096", "--feature-buckets", "1024",
                 "--dim", "8", "--max-batch-records", "200", "--drift-out", str(alarms),
                 "--drift-segment-field", "region"]) == 0
    records = [json.loads(line) for line in alarms.read_text().splitlines()]
    assert any(r["signal"] == "click_rate" and r["segment"] == "all" for r in records)
    assert {"state", "signal", "detector", "segment", "timestamp", "before", "after",
            "magnitude", "relative", "statistic", "reason"} <= set(records[0])
    capsys.readouterr()
    png = tmp_path / "drift.png"
    assert main(["drift", "report", str(alarms), "--png", str(png)]) == 0
    assert "click_rate" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def paced_events(tmp_path: Path) -> Path:
    """200 labelled impressions spread over 20 s of event time."""
    path = tmp_path / "paced.jsonl"
    path.write_text("".join(json.dumps(
        {"type": "impression", "impression_id": f"p{i}", "user_id": f"u{i % 7}",
         "item_id": f"i{i % 13}", "timestamp": 1_700_000_000 + i * 0.1, "clicked": i % 3 == 0})
        + "\n" for i in range(200)))
    return path


def test_speed_paces_the_replay_by_event_time(tmp_path: Path) -> None:
    src = paced_events(tmp_path)
    settings = Settings.of(item_buckets=4096, feature_buckets=1024, dim=8, max_batch_records=50,
                        metrics_port=0)
    fast = replay_fn(settings, str(src), progress=False)
    # pacing starts after the first micro-batch (event time 4.9 s): 15 s at 10x is 1.5 s
    slow = replay_fn(settings.with_flat(replay_speed=10.0), str(src),
                     progress=False)
    assert fast.seconds < 1.0 <= 1.4 <= slow.seconds < 5.0
    assert slow.predictions == fast.predictions == 200


def test_progress_is_logged_when_not_on_a_terminal(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    src = paced_events(tmp_path)
    settings = Settings.of(item_buckets=4096, feature_buckets=1024, dim=8, max_batch_records=20,
                        metrics_port=0, log_every_seconds=1e-6)
    with caplog.at_level(logging.INFO, logger="metarec.replay"):
        replay_fn(settings, str(src))
    lines = [r.getMessage() for r in caplog.records if r.name == "metarec.replay"]
    assert any("events/s" in line and "ETA" in line for line in lines)


def test_after_the_warm_up_no_kernel_is_compiled_mid_stream() -> None:
    """The warm-up runs every compiled kernel with the argument types of real traffic,
    so the first real micro-batch does not stop to compile (or load) one."""
    settings = Settings.of(item_buckets=4096, feature_buckets=1024, dim=8, metrics_port=0,
                        replay_from=1.0e9, replay_to=1.1e9)  # a range must not matter
    warm_up(settings.session)
    compiled = [kernels.serve, kernels.represent, kernels.online_step, kernels.adapt_tasks,
                drift.summarise_window]
    before = [len(k.signatures) for k in compiled]
    assert all(before)
    replay_fn(settings.with_flat(replay_from=None, replay_to=None),
              "synthetic", progress=False)
    assert [len(k.signatures) for k in compiled] == before
