"""When and where model versions go: the model topic (run, or replay with
``--models-out kafka:TOPIC``) or a directory (replay ``--models-out DIR``)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
from kafka import KafkaProducer

from metarec import snapshot
from metarec.session import ModelSnapshot
from streamer.model_topic import CHUNK_BYTES, Lineage, Manifest, messages, publish

log = logging.getLogger("metarec.publish")


class ModelSink(Protocol):
    def write(self, payload: bytes, *, version: int, parent: int | None, algorithm: str,
              config_hash: str, examples_learned: int,
              lineage: Lineage | None = None) -> Manifest: ...


class TopicSink:
    def __init__(self, producer: KafkaProducer, topic: str, chunk_bytes: int = CHUNK_BYTES):
        self.producer, self.topic, self.chunk_bytes = producer, topic, chunk_bytes

    def write(self, payload: bytes, *, version: int, parent: int | None, algorithm: str,
              config_hash: str, examples_learned: int,
              lineage: Lineage | None = None) -> Manifest:
        return publish(self.producer, self.topic, payload, version=version, parent=parent,
                       algorithm=algorithm, config_hash=config_hash,
                       examples_learned=examples_learned, chunk_bytes=self.chunk_bytes,
                       lineage=lineage)


class DirectorySink:
    """``v000001.npz`` (the snapshot) and ``v000001.json`` (its manifest) per version."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def newest(self) -> int | None:
        """The highest version already in the directory (None: none)."""
        found = [int(p.stem[1:]) for p in self.directory.glob("v*.json") if p.stem[1:].isdigit()]
        return max(found, default=None)

    def write(self, payload: bytes, *, version: int, parent: int | None, algorithm: str,
              config_hash: str, examples_learned: int,
              lineage: Lineage | None = None) -> Manifest:
        manifest, _ = messages(payload, version=version, parent=parent, algorithm=algorithm,
                               config_hash=config_hash, examples_learned=examples_learned,
                               lineage=lineage)
        (self.directory / f"v{version:06d}.npz").write_bytes(payload)
        (self.directory / f"v{version:06d}.json").write_text(
            json.dumps(json.loads(manifest.to_json()), indent=2))
        return manifest


class Publisher:
    """Publishes every ``every`` meta-updates (at most one version per
    ``min_seconds``), and at the end whatever was learned since the last version.

    Versions are numbered after ``last_version``, the newest on the topic of any
    lineage, so a loader (which keeps the highest number) takes the newest model;
    ``parent`` is the version this model was loaded from (None: a fresh lineage).

    With ``background``, θ is copied in the caller's thread and compressed and sent
    in a worker thread (zlib releases the GIL), so a live consumer does not stall
    for ~100 ms per version; ``on_published`` then hears of each version, in order.
    """

    def __init__(self, sink: ModelSink, every: int, *, last_version: int | None = None,
                 parent: int | None = None, min_seconds: float = 0.0,
                 background: bool = False,
                 on_published: Callable[[Manifest], None] | None = None):
        self.sink = sink
        self.every = every
        self.min_seconds = min_seconds
        self._last = -math.inf
        self.version = last_version
        self.parent = parent
        self.published: list[int] = []
        self.on_published = on_published
        self._metas = 0
        self._learned_at_publish = 0
        self._worker = ThreadPoolExecutor(1, "metarec-publish") if background else None
        self._pending: Future[Manifest] | None = None

    def number_after(self, version: int) -> None:
        """The next version is numbered after ``version`` (another writer's newest)."""
        self.version = max(self.version or 0, version)

    def after_meta_update(self, snapshot: Callable[[], ModelSnapshot]) -> None:
        self.note_meta()
        if self.due:
            self.publish(snapshot())

    def note_meta(self) -> None:
        self._metas += 1

    @property
    def due(self) -> bool:
        """Enough meta-updates, and long enough, since the last version."""
        return self._metas >= self.every and time.monotonic() - self._last >= self.min_seconds

    def finish(self, snapshot: ModelSnapshot, lineage: Lineage | None = None) -> None:
        """Publish what was learned since the last version (if anything), and wait."""
        if snapshot.examples_learned > self._learned_at_publish:
            self.publish(snapshot, lineage)
        self.finish_quietly()

    def finish_quietly(self) -> None:
        """Wait for what is in flight, publish nothing more."""
        self._wait()
        if self._worker is not None:
            self._worker.shutdown()

    def publish(self, snapshot: ModelSnapshot, lineage: Lineage | None = None) -> None:
        version = (self.version or 0) + 1
        meta = {"version": version, "parent": self.parent, "algorithm": snapshot.algorithm,
                "config_hash": snapshot.config_hash,
                "examples_learned": snapshot.examples_learned, "lineage": lineage}
        self.version = self.parent = version
        self.published.append(version)
        self._metas = 0
        self._learned_at_publish = snapshot.examples_learned
        self._last = time.monotonic()
        if self._worker is None:
            self._write(snapshot.theta, meta)
            return
        self._wait()  # one version in flight at a time; a failure surfaces here
        self._pending = self._worker.submit(self._write, snapshot.theta, meta)

    def _write(self, theta: dict[str, torch.Tensor], meta: dict[str, Any]) -> Manifest:
        manifest = self.sink.write(snapshot.dumps(theta), **meta)
        log.info("published model version %d (%d bytes in %d chunk(s))", manifest.version,
                 manifest.size, len(manifest.chunks))
        if self.on_published is not None:
            self.on_published(manifest)
        return manifest

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
