"""Model versions on a Kafka topic: chunks, then a manifest, per version.

A version is a snapshot of θ split into chunks of at most 900 KB (Apache Kafka
refuses messages over 1 MB by default; some brokers do not, so the limit is kept
here). The manifest comes last and names the version, its parent, the
algorithm, the config hash, the schema, the chunk count and SHA-256 checksums of
every chunk and of the whole. A loader takes the newest version whose manifest
and chunks are all present and match, and ignores partial or corrupt ones.
The topic has one partition, so its order is the publication order.

Readers skip, and count, any message they cannot parse (another producer's, or
a damaged one): a message that stopped the reader would stop every restart of
``metarec run`` and every ``metarec model pull`` until the topic were cleaned.
The README's "Model topic wire format" describes the format in full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated

from kafka import KafkaProducer, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metarec.snapshot import SCHEMA
from streamer.cluster import Cluster
from streamer.errors import ModelTopicError
from streamer.kafka_io import MAX_MESSAGE_BYTES, read_range
from streamer.txn_log import read_to_end

CHUNK_BYTES = 900_000
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lineage:
    """Where a version stands among a group's writers and its θ updates: the
    writer's ``epoch`` (a version of a lower epoch than one before it on the topic
    is a deposed writer's, and ignored), the last update of each member it holds
    (``applied``), and the updates-topic offset a loader reads on from."""

    epoch: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    updates_offset: int = 0


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
    epoch: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    updates_offset: int = 0

    @property
    def lineage(self) -> Lineage:
        return Lineage(self.epoch, dict(self.applied), self.updates_offset)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and check a manifest (raises ``pydantic.ValidationError``)."""
        return cls(**_ManifestFields.model_validate_json(raw).model_dump(by_alias=True))


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]


class _ManifestFields(BaseModel):
    """A manifest as it travels: exactly these JSON keys, each of exactly its type
    (strict: no "1" for 1, no 1.0 for 1, no true for 1)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    version: Count
    parent: Count | None
    algorithm: str
    config_hash: str
    schema_: str = Field(alias="schema")  # ``schema`` would shadow BaseModel's method
    size: Count
    sha256: Sha256
    chunks: Annotated[list[Sha256], Field(min_length=1)]
    examples_learned: Count
    created_at: float
    epoch: Count = 0
    applied: dict[str, Count] = Field(default_factory=dict)
    updates_offset: Count = 0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(version: int, part: str) -> bytes:
    return f"v{version:010d}/{part}".encode()


Message = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


def messages(payload: bytes, *, version: int, parent: int | None, algorithm: str,
             config_hash: str, examples_learned: int, chunk_bytes: int = CHUNK_BYTES,
             lineage: Lineage | None = None) -> tuple[Manifest, list[Message]]:
    """The messages of one version: its chunks, then its manifest."""
    size = min(chunk_bytes, CHUNK_BYTES)
    chunks = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
    lin = lineage or Lineage()
    manifest = Manifest(version, parent, algorithm, config_hash, SCHEMA, len(payload),
                        _sha(payload), [_sha(c) for c in chunks], examples_learned, time.time(),
                        lin.epoch, dict(lin.applied), lin.updates_offset)
    out: list[Message] = [(_key(version, f"chunk/{i:05d}"), chunk, [("metarec-kind", b"chunk")])
                          for i, chunk in enumerate(chunks)]
    out.append((_key(version, "manifest"), manifest.to_json(), [("metarec-kind", b"manifest")]))
    for key, value, _ in out:
        _check_size(key, value)
    return manifest, out


def publish(producer: KafkaProducer, topic: str, payload: bytes, *, version: int,
            parent: int | None, algorithm: str, config_hash: str, examples_learned: int,
            chunk_bytes: int = CHUNK_BYTES, lineage: Lineage | None = None) -> Manifest:
    """Send the chunks, then the manifest once the broker has every chunk."""
    manifest, msgs = messages(payload, version=version, parent=parent, algorithm=algorithm,
                              config_hash=config_hash, examples_learned=examples_learned,
                              chunk_bytes=chunk_bytes, lineage=lineage)
    *chunks, (mkey, mvalue, mheaders) = msgs
    for fut in [producer.send(topic, key=k, value=v, partition=0, headers=h)
                for k, v, h in chunks]:
        fut.get(timeout=60)
    producer.send(topic, key=mkey, value=mvalue, partition=0, headers=mheaders).get(timeout=60)
    return manifest


def _check_size(key: bytes, value: bytes) -> None:
    if len(key) + len(value) + 64 > MAX_MESSAGE_BYTES:
        raise ModelTopicError(f"model message of {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}")


KIND_HEADER = "metarec-kind"
_KEY = re.compile(rb"v([0-9]{10})/(?:chunk/([0-9]{5})|manifest)")


def _parse_key(key: bytes) -> tuple[int, int | None] | None:
    """``(version, chunk index)``, index None for the manifest; None if the key is
    not one of ours. Exactly the published form: ``int()`` alone would also take
    " 1", "+1" or "1_0"."""
    found = _KEY.fullmatch(key)
    if found is None:
        return None
    return int(found[1]), None if found[2] is None else int(found[2])


def _kind(headers: Iterable[tuple[str, bytes | None]] | None) -> bytes | None:
    """The ``metarec-kind`` header's value, compared as bytes (never decoded: a
    foreign value need not be text)."""
    return next((v for k, v in headers or [] if k == KIND_HEADER), None)


@dataclass
class Loaded:
    manifest: Manifest
    payload: bytes


@dataclass
class VersionAssembler:
    """Feed it the model topic in order; it keeps the newest complete version
    (or only version ``want``), and the newest of each config hash.

    ``rejected`` names the versions that were ours but broken (a chunk missing or
    corrupt); ``skipped`` counts, by reason, the messages that could not be parsed
    at all. Neither stops it: the good versions around them are still assembled."""

    want: int | None = None
    chunks: dict[int, dict[int, list[bytes]]] = field(default_factory=dict)
    newest: Loaded | None = None
    by_hash: dict[str, Loaded] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    epoch: int = 0  # the highest writer epoch of a complete version so far

    def add(self, key: bytes | None, value: bytes | None,
            headers: Iterable[tuple[str, bytes | None]] | None) -> None:
        if key is None:
            return self._skip("no_key", "a message without a key")
        parsed = _parse_key(key)
        if parsed is None:
            return self._skip("bad_key", f"key {key[:80]!r}")
        version, index = parsed
        kind = _kind(headers)
        if kind != (b"manifest" if index is None else b"chunk"):
            return self._skip("bad_kind", f"{KIND_HEADER} {kind!r:.80} on key {key!r}")
        if value is None:
            return self._skip("no_value", f"key {key!r} without a value")
        if self.want is not None and version != self.want:
            return
        if index is None:
            self._complete(version, value)
        else:
            # every value seen for a chunk is kept until its manifest says which is
            # right: a foreign message under a good key must not spoil the version
            self.chunks.setdefault(version, {}).setdefault(index, []).append(value)

    def _skip(self, reason: str, detail: str) -> None:
        if not self.skipped[reason]:  # once per reason, not once per message
            log.warning("model topic: skipping a message it cannot parse (%s: %s); "
                        "more of this kind are counted, not logged", reason, detail)
        self.skipped[reason] += 1

    def _complete(self, version: int, raw: bytes) -> None:
        try:
            manifest = Manifest.from_json(raw)
        except ValidationError as exc:
            # the chunks stay: this version's own manifest may still come
            return self._skip("bad_manifest", f"version {version}: "
                              f"{exc.error_count()} error(s), first: {exc.errors()[0]['msg']}")
        if manifest.version != version:
            return self._skip("bad_manifest", f"key of version {version} holds a manifest "
                              f"of version {manifest.version}")
        parts = self.chunks.pop(version, {})
        n = len(manifest.chunks)
        present = [i for i in range(n) if i in parts]
        if len(present) < n:
            self.rejected[version] = f"has {len(present)} of {n} chunks"
            return
        chosen = [next((c for c in parts[i] if _sha(c) == h), None)
                  for i, h in enumerate(manifest.chunks)]
        if any(c is None for c in chosen):
            self.rejected[version] = "chunk checksum mismatch"
            return
        payload = b"".join(c for c in chosen if c is not None)
        if (len(payload) != manifest.size or _sha(payload) != manifest.sha256
                or manifest.schema != SCHEMA):
            self.rejected[version] = "payload size, checksum or schema mismatch"
            return
        if manifest.epoch < self.epoch:
            self.rejected[version] = (f"fenced: writer epoch {manifest.epoch}, after a version "
                                      f"of epoch {self.epoch}")
            return
        self.epoch = manifest.epoch
        loaded = Loaded(manifest, payload)
        if self.newest is None or manifest.version > self.newest.manifest.version:
            self.newest = loaded
        same = self.by_hash.get(manifest.config_hash)
        if same is None or manifest.version > same.manifest.version:
            self.by_hash[manifest.config_hash] = loaded
        for old in [v for v in self.chunks if v <= version]:
            del self.chunks[old]  # leftovers of abandoned versions


def read_versions(cluster: Cluster, topic: str, *,
                  want: int | None = None, settle: bool = True) -> VersionAssembler:
    """Read the whole model topic (no consumer group, nothing committed). Without
    ``settle``, only to the end the broker reports now (no wait for a late batch:
    for a writer taking over, which must not stall its member)."""
    assembler = VersionAssembler(want)
    if not settle:
        tp = TopicPartition(topic, 0)
        for msg in read_to_end(cluster, [tp], start={}, stall_seconds=math.inf,
                               own_id=""):
            assembler.add(msg.key, msg.value, msg.headers)
        return assembler
    for poll in read_range(cluster, topic, max_records=500, missing_ok=True,
                           headers=True):
        for rec in poll.records:
            assembler.add(rec.key, rec.value, rec.headers)
    for version, why in assembler.rejected.items():
        log.warning("model version %d ignored: %s", version, why)
    if assembler.skipped:
        log.warning("model topic %s: skipped %d message(s) that are not model versions: %s",
                    topic, assembler.skipped.total(), dict(assembler.skipped))
    return assembler
