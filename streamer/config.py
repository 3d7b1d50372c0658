"""All settings, each a command-line flag and an environment variable.

``--inner-steps 3`` and ``METAREC_INNER_STEPS=3`` set the same field; a flag wins
over the environment, which wins over the default.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from metarec.features import FeatureSpec
from metarec.joiner import ClickRelease
from metarec.learner import LearnerConfig
from metarec.meta import Algorithm, MetaConfig
from metarec.model import Adaptation, ModelConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METAREC_", extra="ignore")

    # Kafka
    bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers (host:port,...); none: start the embedded "
        "broker (run) or fail (produce, model pull)")
    events_topic: str = Field("metarec.events", description="topic of impression/click events")
    model_topic: str = Field("metarec.model", description="topic of published model versions")
    dlq_topic: str = Field("metarec.events.dlq", description="dead-letter topic for bad records")
    group_id: str = Field("metarec", description="consumer group id")
    partitions: int = Field(4, ge=1, description="partitions of the events topic if created")
    session_timeout_ms: int = Field(
        6000, ge=1000, description="consumer group session timeout; brokers finish a join in "
        "about half of it on first start")
    max_batch_records: int = Field(200, ge=1, description="records per micro-batch at most")
    max_batch_wait_ms: int = Field(
        1000, ge=0, description="run: learn a micro-batch short of max_batch_records once its "
        "first event has waited this long (micro-batch size moves θ's steps: whole ones "
        "learn as a replay does)")
    poll_timeout_ms: int = Field(200, ge=1, description="how long a poll waits for records")
    commit_interval_ms: int = Field(
        1000, ge=0, description="commit offsets after the first micro-batch this long after "
        "the last commit (0: after every one), and at shutdown; a crash or rebalance "
        "re-reads at most this much")
    max_record_bytes: int = Field(65536, ge=64, description="larger records are dead-lettered")
    # joining
    attribution_window_seconds: float = Field(
        3600.0, gt=0, description="a click counts if it comes this long after its impression")
    allowed_lateness_seconds: float = Field(
        60.0, ge=0, description="watermark = highest event time seen minus this")
    max_future_skew_seconds: float = Field(
        86400.0, gt=0, description="events this far ahead of the wall clock are dead-lettered")
    max_pending_impressions: int = Field(
        1_000_000, ge=1, description="unlabelled impressions held at most (then closed as 0)")
    click_release: ClickRelease = Field(
        ClickRelease.WINDOW_END, description="when a joined click is learned: window_end "
        "(with the no-clicks of its time, unbiased) or on_arrival (at once: faster, but "
        "positives come first while windows are open)")
    max_pending_bytes: int = Field(
        256 << 20, ge=1, description="bytes of unlabelled impressions' records held at most "
        "(then the earliest window is closed as 0)")
    max_ahead_seconds: float = Field(
        3600.0, gt=0, description="an event this far ahead of all its partition has given is "
        "held aside: taken if the next record is near it (a real jump), dead-lettered "
        "(ahead_of_stream) if the next two are far behind it")
    dedup_horizon_seconds: float = Field(
        86400.0, ge=0, description="an impression id seen again within this much event time "
        "is a duplicate: dropped and counted")
    idle_partition_seconds: float = Field(
        10.0, gt=0, description="a partition silent this long (wall time) no longer holds "
        "back the event-time merge of the others")
    max_buffered_records: int = Field(
        5000, ge=1, description="run: pause a partition holding this many records for the "
        "event-time merge, until it holds half as many")
    # memory
    item_cache_bytes: int = Field(
        64 << 20, ge=0, description="bytes of items' feature maps and hashed slots the "
        "encoder caches at most, by estimate (0: no cache)")
    user_cache_bytes: int = Field(
        64 << 20, ge=0, description="bytes of users' feature maps and hashed slots the "
        "encoder caches at most, by estimate (0: no cache)")
    context_cache_bytes: int = Field(
        16 << 20, ge=0, description="bytes of contexts and their hashed slots the encoder "
        "caches at most, by estimate (0: no cache)")
    token_cache_bytes: int = Field(
        16 << 20, ge=0, description="bytes of feature tokens and their hash buckets cached "
        "at most, by estimate (0: no cache); tokens over 256 characters are not cached")
    # learning
    algorithm: Algorithm = Field(Algorithm.REPTILE, description="meta-learning algorithm")
    dim: int = Field(32, ge=1, description="embedding and user-vector width")
    inner_steps: int = Field(1, ge=0, description="SGD steps on a user's task per label "
                             "(0: no per-user weights)")
    adaptation: Adaptation = Field(Adaptation.GRADIENT, description="per-user adaptation: "
                                   "inner SGD (gradient) or gradient-free (prototype)")
    recency: float = Field(0.85, gt=0, le=1, description="weight of a user's example per "
                           "label given after it, in the inner loss (1: all equal)")
    inner_lr: float = Field(0.5, gt=0, description="inner learning rate (initial, Meta-SGD)")
    inner_l2: float = Field(0.01, ge=0, description="pull of user weights towards the init")
    task_size: int = Field(50, ge=2, description="recent labelled examples kept per user")
    online_lr: float = Field(0.05, gt=0, description="learning rate of θ's online step")
    meta_every: int = Field(2000, ge=1, description="meta-update every N labelled examples")
    meta_every_seconds: float | None = Field(
        None, gt=0, description="also meta-update after this many seconds of wall time "
        "with new labels (off by default: replays stay deterministic)")
    meta_users: int = Field(256, ge=1, description="users sampled per meta-update")
    meta_lr: float = Field(0.05, gt=0, description="learning rate of the meta-update")
    item_buckets: int = Field(1 << 16, ge=2, description="hash buckets for item ids")
    feature_buckets: int = Field(1 << 15, ge=2, description="hash buckets for feature tokens")
    seed: int = Field(0, description="random seed")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads (the tensors are "
                               "small; more threads mostly contend with the Kafka client)")
    # drift monitoring
    drift_segment_field: str = Field("platform", description="context field whose values are "
                                     "monitored as segments for drift")
    drift_warmup: int = Field(2000, ge=0, description="examples per segment before drift "
                              "alarms count")
    drift_topic: str = Field("metarec.drift", description="topic of drift alarm records (run)")
    # replay
    replay_from: float | None = Field(None, description="replay: first event time (seconds "
                                      "since the epoch); on a topic also where reading starts "
                                      "(by record timestamp)")
    replay_to: float | None = Field(None, description="replay: event time to stop before")
    replay_from_offset: int | None = Field(None, ge=0, description="replay of a topic: first "
                                           "offset, in every partition")
    replay_to_offset: int | None = Field(None, ge=0, description="replay of a topic: offset to "
                                         "stop before, in every partition")
    replay_speed: float | None = Field(None, gt=0, description="replay at N x event time "
                                       "(default: as fast as possible)")
    model_version: int | None = Field(None, ge=1, description="replay: start from this "
                                      "version on the model topic (default: fresh)")
    models_out: str | None = Field(None, description="replay: write model versions to a "
                                   "directory, or to kafka:TOPIC")
    drift_out: Path | None = Field(None, description="replay: write drift alarms (JSONL)")
    # publishing, outputs, operations
    publish_every: int = Field(5, ge=1, description="publish a model version every N "
                               "meta-updates (and at shutdown)")
    publish_min_seconds: float = Field(
        10.0, ge=0, description="run: at most one model version per this many seconds "
        "(a version is 12 MB of θ to compress and send; replays publish by count only)")
    model_chunk_bytes: int = Field(900_000, ge=1024, le=900_000,
                                   description="model-topic chunk size (Kafka's default "
                                   "message limit is 1 MB)")
    predictions_out: Path | None = Field(None, description="write the prediction log (JSONL)")
    metrics_port: int = Field(9108, ge=0, description="Prometheus /metrics port (0: off)")
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint binds")
    idle_exit_seconds: float | None = Field(
        None, gt=0, description="stop after this long without records (default: run forever; "
        "the embedded demo stops after 10 s)")
    demo_source: str | None = Field(
        "movielens-100k", description="with the embedded broker, stream this source into the "
        "events topic (empty: none)")
    log_every_seconds: float = Field(5.0, gt=0, description="progress log interval")

    def learner_config(self) -> LearnerConfig:
        return LearnerConfig(
            model=ModelConfig(
                dim=self.dim, inner_steps=self.inner_steps, inner_lr=self.inner_lr,
                inner_l2=self.inner_l2, adaptation=self.adaptation, recency=self.recency,
                features=FeatureSpec(item_buckets=self.item_buckets,
                                     feature_buckets=self.feature_buckets),
            ),
            meta=MetaConfig(algorithm=self.algorithm, users_per_update=self.meta_users,
                            lr=self.meta_lr, every_examples=self.meta_every,
                            every_seconds=self.meta_every_seconds),
            task_size=self.task_size,
            online_lr=self.online_lr,
            seed=self.seed,
        )


def config_hash(config: LearnerConfig) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
