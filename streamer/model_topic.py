"""Model versions on a Kafka topic: chunks, then a manifest, per version.

A version is a snapshot of θ split into chunks of at most 900 KB (Apache Kafka
refuses messages over 1 MB by default; some brokers do not, so the limit is kept
here). The manifest comes last and names the version, its parent, the
algorithm, the config hash, the schema, the chunk count and SHA-256 checksums of
every chunk and of the whole. A loader takes the newest version whose manifest
and chunks are all present and match, and ignores partial or corrupt ones.
The topic has one partition, so its order is the publication order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from metarec.snapshot import SCHEMA

CHUNK_BYTES = 900_000
MAX_MESSAGE_BYTES = 1_000_000
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Manifest:
    version: int
    parent: int | None
    algorithm: str
    config_hash: str
    schema: str
    size: int
    sha256: str
    chunks: list[str]  # sha256 of each chunk
    examples_learned: int
    created_at: float

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        return cls(**json.loads(raw))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(version: int, part: str) -> bytes:
    return f"v{version:010d}/{part}".encode()


Message = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


def messages(payload: bytes, *, version: int, parent: int | None, algorithm: str,
             config_hash: str, examples_learned: int,
             chunk_bytes: int = CHUNK_BYTES) -> tuple[Manifest, list[Message]]:
    """The messages of one version: its chunks, then its manifest."""
    size = min(chunk_bytes, CHUNK_BYTES)
    chunks = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
    manifest = Manifest(version, parent, algorithm, config_hash, SCHEMA, len(payload),
                        _sha(payload), [_sha(c) for c in chunks], examples_learned, time.time())
    out: list[Message] = [(_key(version, f"chunk/{i:05d}"), chunk, [("metarec-kind", b"chunk")])
                          for i, chunk in enumerate(chunks)]
    out.append((_key(version, "manifest"), manifest.to_json(), [("metarec-kind", b"manifest")]))
    for key, value, _ in out:
        _check_size(key, value)
    return manifest, out


def publish(producer: KafkaProducer, topic: str, payload: bytes, *, version: int,
            parent: int | None, algorithm: str, config_hash: str, examples_learned: int,
            chunk_bytes: int = CHUNK_BYTES) -> Manifest:
    """Send the chunks, then the manifest once the broker has every chunk."""
    manifest, msgs = messages(payload, version=version, parent=parent, algorithm=algorithm,
                              config_hash=config_hash, examples_learned=examples_learned,
                              chunk_bytes=chunk_bytes)
    *chunks, (mkey, mvalue, mheaders) = msgs
    for fut in [producer.send(topic, key=k, value=v, partition=0, headers=h)
                for k, v, h in chunks]:
        fut.get(timeout=60)
    producer.send(topic, key=mkey, value=mvalue, partition=0, headers=mheaders).get(timeout=60)
    return manifest


def _check_size(key: bytes, value: bytes) -> None:
    if len(key) + len(value) + 64 > MAX_MESSAGE_BYTES:
        raise ValueError(f"model message of {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}")


def _kind(headers: list[tuple[str, bytes]] | None) -> str:
    return next((v.decode() for k, v in headers or [] if k == "metarec-kind"), "")


def _version_of(key: bytes | None) -> int | None:
    try:
        return int(key.split(b"/", 1)[0][1:]) if key else None
    except ValueError:
        return None


@dataclass
class Loaded:
    manifest: Manifest
    payload: bytes


class VersionAssembler:
    """Feed it the model topic in order; it keeps the newest complete version
    (or only version ``want``)."""

    def __init__(self, want: int | None = None) -> None:
        self.want = want
        self.chunks: dict[int, dict[int, bytes]] = {}
        self.newest: Loaded | None = None
        self.rejected: dict[int, str] = {}

    def add(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        version = _version_of(key)
        if version is None or key is None or (self.want is not None and version != self.want):
            return
        kind = _kind(headers)
        if kind == "chunk":
            index = int(key.rsplit(b"/", 1)[1])
            self.chunks.setdefault(version, {})[index] = value
        elif kind == "manifest":
            self._complete(version, value)

    def _complete(self, version: int, raw: bytes) -> None:
        try:
            manifest = Manifest.from_json(raw)
        except (ValueError, TypeError) as exc:
            self.rejected[version] = f"unreadable manifest: {exc}"
            return
        parts = self.chunks.pop(version, {})
        if sorted(parts) != list(range(len(manifest.chunks))):
            self.rejected[version] = f"has {len(parts)} of {len(manifest.chunks)} chunks"
            return
        if any(_sha(parts[i]) != h for i, h in enumerate(manifest.chunks)):
            self.rejected[version] = "chunk checksum mismatch"
            return
        payload = b"".join(parts[i] for i in range(len(manifest.chunks)))
        if _sha(payload) != manifest.sha256 or manifest.schema != SCHEMA:
            self.rejected[version] = "payload checksum or schema mismatch"
            return
        if self.newest is None or manifest.version > self.newest.manifest.version:
            self.newest = Loaded(manifest, payload)
        for old in [v for v in self.chunks if v <= version]:
            del self.chunks[old]  # leftovers of abandoned versions


def read_versions(bootstrap_servers: str, topic: str, *, settle_ms: int = 1500,
                  want: int | None = None) -> VersionAssembler:
    """Read the whole model topic (no consumer group, nothing committed)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                             group_id=None, fetch_max_wait_ms=10,
                             max_partition_fetch_bytes=2 * MAX_MESSAGE_BYTES)
    assembler = VersionAssembler(want)
    try:
        tp = TopicPartition(topic, 0)
        if consumer.partitions_for_topic(topic) is None:
            return assembler
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        # End offsets can under-report the newest batch on some brokers: read past
        # them until the topic has been quiet for settle_ms.
        quiet_since = time.monotonic()
        while True:
            batch = consumer.poll(timeout_ms=100, max_records=500)
            msgs = batch.get(tp, [])
            for m in msgs:
                assembler.add(m.key, m.value, list(m.headers or []))
            if msgs:
                quiet_since = time.monotonic()
            elif consumer.position(tp) >= end and (
                    time.monotonic() - quiet_since) * 1000 >= settle_ms:
                break
    finally:
        consumer.close()
    for version, why in assembler.rejected.items():
        log.warning("model version %d ignored: %s", version, why)
    return assembler
