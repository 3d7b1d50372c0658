"""When and where model versions go: the model topic (run, or replay with
``--models-out kafka:TOPIC``) or a directory (replay ``--models-out DIR``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from kafka import KafkaProducer

from metarec import snapshot
from metarec.learner import OnlineLearner
from streamer.config import config_hash
from streamer.model_topic import CHUNK_BYTES, Manifest, messages, publish

log = logging.getLogger("metarec.publish")


class ModelSink(Protocol):
    def write(self, payload: bytes, *, version: int, parent: int | None, algorithm: str,
              config_hash: str, examples_learned: int) -> Manifest: ...


class TopicSink:
    def __init__(self, producer: KafkaProducer, topic: str, chunk_bytes: int = CHUNK_BYTES):
        self.producer, self.topic, self.chunk_bytes = producer, topic, chunk_bytes

    def write(self, payload: bytes, *, version: int, parent: int | None, algorithm: str,
              config_hash: str, examples_learned: int) -> Manifest:
        return publish(self.producer, self.topic, payload, version=version, parent=parent,
                       algorithm=algorithm, config_hash=config_hash,
                       examples_learned=examples_learned, chunk_bytes=self.chunk_bytes)


class DirectorySink:
    """``v000001.npz`` (the snapshot) and ``v000001.json`` (its manifest) per version."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, payload: bytes, *, version: int, parent: int | None, algorithm: str,
              config_hash: str, examples_learned: int) -> Manifest:
        manifest, _ = messages(payload, version=version, parent=parent, algorithm=algorithm,
                               config_hash=config_hash, examples_learned=examples_learned)
        (self.directory / f"v{version:06d}.npz").write_bytes(payload)
        (self.directory / f"v{version:06d}.json").write_text(
            json.dumps(json.loads(manifest.to_json()), indent=2))
        return manifest


class Publisher:
    """Publishes every ``every`` meta-updates, and at the end whatever was learned
    since the last version."""

    def __init__(self, sink: ModelSink, every: int, version: int | None = None):
        self.sink = sink
        self.every = every
        self.version = version
        self.published: list[int] = []
        self._metas = 0
        self._learned_at_publish = 0

    def after_meta_update(self, learner: OnlineLearner) -> Manifest | None:
        self._metas += 1
        return self.publish(learner) if self._metas >= self.every else None

    def finish(self, learner: OnlineLearner) -> Manifest | None:
        if learner.examples_learned > self._learned_at_publish:
            return self.publish(learner)
        return None

    def publish(self, learner: OnlineLearner) -> Manifest:
        version = (self.version or 0) + 1
        manifest = self.sink.write(
            snapshot.dumps(learner.theta), version=version, parent=self.version,
            algorithm=learner.config.meta.algorithm.value,
            config_hash=config_hash(learner.config), examples_learned=learner.examples_learned)
        self.version = version
        self.published.append(version)
        self._metas = 0
        self._learned_at_publish = learner.examples_learned
        log.info("published model version %d (%d bytes in %d chunk(s))", version,
                 manifest.size, len(manifest.chunks))
        return manifest
