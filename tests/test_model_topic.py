"""Model versions travel as checksummed chunks under Kafka's message limit; a
loader keeps the newest complete version and ignores partial or corrupt ones."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from metarec import snapshot
from metarec.features import FeatureSpec
from metarec.model import ModelConfig, init_theta
from streamer import kafka_io
from streamer.embedded import EmbeddedBroker
from streamer.model_topic import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    Message,
    VersionAssembler,
    messages,
    publish,
)


def version(v: int, payload: bytes):  # type: ignore[no-untyped-def]
    return messages(payload, version=v, parent=v - 1 or None, algorithm="maml",
                    config_hash="abc", examples_learned=10 * v)


def create_topic(broker: EmbeddedBroker, name: str) -> None:
    # one partition, as metarec creates it (the broker would auto-create several)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        admin.close()


def test_large_payload_is_split_into_chunks_under_the_limit_and_reassembled() -> None:
    payload = os.urandom(2 * CHUNK_BYTES + 12345)
    manifest, msgs = version(1, payload)
    assert len(manifest.chunks) == 3 and len(msgs) == 4
    assert all(len(k) + len(v) + sum(len(a) + len(b) for a, b in h) < MAX_MESSAGE_BYTES
               for k, v, h in msgs)
    asm = VersionAssembler()
    for key, value, headers in msgs:
        asm.add(key, value, headers)
    assert asm.newest is not None and asm.newest.payload == payload


def test_newest_complete_version_wins_and_broken_versions_are_ignored() -> None:
    asm = VersionAssembler()
    good = os.urandom(CHUNK_BYTES + 10)
    _, v1 = version(1, good)
    _, v2 = version(2, os.urandom(CHUNK_BYTES + 10))
    _, v3 = version(3, os.urandom(CHUNK_BYTES + 10))
    corrupt = [(k, (b"x" + v[1:]) if b"chunk/00001" in k else v, h) for k, v, h in v2]
    missing = [m for m in v3 if b"chunk/00000" not in m[0]]
    for key, value, headers in v1 + corrupt + missing:
        asm.add(key, value, headers)
    assert asm.newest is not None and asm.newest.manifest.version == 1
    assert asm.newest.payload == good
    assert "checksum" in asm.rejected[2] and "chunks" in asm.rejected[3]


def test_snapshot_round_trip_and_shape_check() -> None:
    theta = init_theta(ModelConfig(dim=4), seed=1)
    back = snapshot.loads(snapshot.dumps(theta), like=theta)
    for name, tensor in theta.items():
        torch.testing.assert_close(back[name], tensor)
    with pytest.raises(snapshot.SnapshotError):
        snapshot.loads(snapshot.dumps(theta), like=init_theta(ModelConfig(dim=5), seed=1))
    with pytest.raises(snapshot.SnapshotError):
        snapshot.loads(b"garbage")


# -- messages from elsewhere on the model topic ------------------------------------------
#
# Anything can be written to a topic. A reader that stopped on a message it cannot
# parse would stop `metarec model pull` and every start of `metarec run` until the
# topic were cleaned, so readers skip such messages, count them by reason and go on.

KIND = "metarec-kind"
GOOD_MANIFEST = json.loads(version(1, b"p")[0].to_json())


def small_version(v: int) -> tuple[bytes, list[Message]]:
    """A version in three chunks (most foreign messages go between them)."""
    payload = os.urandom(250)
    _, msgs = messages(payload, version=v, parent=None, algorithm="reptile",
                       config_hash="abc", examples_learned=5, chunk_bytes=100)
    return payload, msgs


def manifest_json(**changes: Any) -> bytes:
    return json.dumps({**GOOD_MANIFEST, **changes}).encode()


ForeignMessage = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]

FOREIGN: dict[str, tuple[ForeignMessage, str]] = {
    # name: (message, the reason it is counted under)
    "chunk index not a number": ((b"v0000000001/chunk/abcde", b"x", [(KIND, b"chunk")]),
                                 "bad_key"),
    "chunk index in non-ASCII digits": (("v0000000001/chunk/0000١".encode(), b"x",
                                         [(KIND, b"chunk")]), "bad_key"),
    "key not ASCII": (("v0000000001/маніфест".encode(), b"{}", [(KIND, b"manifest")]),
                      "bad_key"),
    "key int() would take": ((b"v+000000001/chunk/1_000", b"x", [(KIND, b"chunk")]),
                             "bad_key"),
    "no key": ((None, b"x", [(KIND, b"chunk")]), "no_key"),
    "kind header not UTF-8": ((b"v0000000001/chunk/00001", b"x", [(KIND, b"\xff\xfe")]),
                              "bad_kind"),
    "no kind header": ((b"v0000000001/chunk/00001", b"x", []), "bad_kind"),
    "kind not the key's": ((b"v0000000001/manifest", manifest_json(), [(KIND, b"chunk")]),
                           "bad_kind"),
    "chunk without a value": ((b"v0000000001/chunk/00001", None, [(KIND, b"chunk")]),
                              "no_value"),
    "manifest without a value": ((b"v0000000001/manifest", None, [(KIND, b"manifest")]),
                                 "no_value"),
    "manifest chunks not a list": ((b"v0000000001/manifest", manifest_json(chunks="abc"),
                                    [(KIND, b"manifest")]), "bad_manifest"),
    "manifest chunks a number": ((b"v0000000001/manifest", manifest_json(chunks=3),
                                  [(KIND, b"manifest")]), "bad_manifest"),
    "manifest version not a number": ((b"v0000000009/manifest", manifest_json(version="x"),
                                       [(KIND, b"manifest")]), "bad_manifest"),
    "manifest version a float": ((b"v0000000009/manifest", manifest_json(version=9.0),
                                  [(KIND, b"manifest")]), "bad_manifest"),
    "manifest field missing": ((b"v0000000001/manifest",
                                json.dumps({k: v for k, v in GOOD_MANIFEST.items()
                                            if k != "sha256"}).encode(),
                                [(KIND, b"manifest")]), "bad_manifest"),
    "manifest field extra": ((b"v0000000001/manifest", manifest_json(extra=1),
                              [(KIND, b"manifest")]), "bad_manifest"),
    "manifest a JSON list": ((b"v0000000001/manifest", b"[1, 2, 3]", [(KIND, b"manifest")]),
                             "bad_manifest"),
    "manifest not UTF-8": ((b"v0000000001/manifest", b"\xff{", [(KIND, b"manifest")]),
                           "bad_manifest"),
    "manifest of another version": ((b"v0000000001/manifest", manifest_json(version=9),
                                     [(KIND, b"manifest")]), "bad_manifest"),
}


@pytest.mark.parametrize("name", FOREIGN)
def test_a_foreign_message_is_skipped_and_counted_and_the_good_version_still_loads(
        name: str) -> None:
    foreign, reason = FOREIGN[name]
    payload, good = small_version(1)
    asm = VersionAssembler()
    # between the chunks, and again between the last chunk and the manifest
    for key, value, headers in [good[0], foreign, good[1], good[2], foreign, good[3]]:
        asm.add(key, value, headers)
    assert asm.newest is not None and asm.newest.payload == payload
    assert asm.skipped == Counter({reason: 2})
    assert asm.rejected == {}


def test_each_reason_is_logged_once_however_many_messages_have_it(
        caplog: pytest.LogCaptureFixture) -> None:
    asm = VersionAssembler()
    with caplog.at_level(logging.WARNING, logger="streamer.model_topic"):
        for _ in range(100):
            for foreign, _reason in FOREIGN.values():
                asm.add(*foreign)
    reasons = {reason for _, reason in FOREIGN.values()}
    assert len(caplog.records) == len(reasons)
    assert asm.skipped == Counter({r: 100 * sum(x == r for _, x in FOREIGN.values())
                                   for r in reasons})


def test_a_foreign_value_under_a_good_chunk_key_does_not_spoil_the_version() -> None:
    payload, good = small_version(1)
    asm = VersionAssembler()
    key, _, headers = good[1]
    for msg in [good[0], good[1], (key, b"someone else's bytes", headers), good[2], good[3]]:
        asm.add(*msg)
    assert asm.newest is not None and asm.newest.payload == payload


def test_foreign_messages_between_versions_leave_the_newest_good_one_on_top() -> None:
    _, v1 = small_version(1)
    payload2, v2 = small_version(2)
    foreign = [m for m, _ in FOREIGN.values()]
    asm = VersionAssembler()
    for msg in v1 + foreign + v2 + foreign:
        asm.add(*msg)
    assert asm.newest is not None
    assert (asm.newest.manifest.version, asm.newest.payload) == (2, payload2)


@pytest.mark.integration
def test_model_pull_skips_foreign_messages_on_the_topic(broker: EmbeddedBroker,
                                                        tmp_path: Path) -> None:
    topic = f"model-{uuid.uuid4().hex[:8]}"
    create_topic(broker, topic)
    payload = snapshot.dumps(init_theta(ModelConfig(dim=4), seed=3))
    prod = kafka_io.producer(broker.cluster)
    try:
        published = publish(prod, topic, payload, version=1, parent=None, algorithm="reptile",
                            config_hash="abc", examples_learned=7, chunk_bytes=1024)
        # then another producer's messages, every kind of them
        for key, value, headers in (m for m, _ in FOREIGN.values()):
            prod.send(topic, key=key, value=value, headers=headers, partition=0)
        prod.flush()
    finally:
        prod.close()

    out = tmp_path / "model.npz"
    pulled = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "model", "pull", "--bootstrap-servers",
         broker.bootstrap, "--model-topic", topic, "--out", str(out)],
        capture_output=True, text=True, timeout=60)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert json.loads(pulled.stdout) == published.__dict__
    assert out.read_bytes() == payload
    assert "skipped" in pulled.stderr and "bad_manifest" in pulled.stderr


# -- the wire format, read by another client ---------------------------------------------

KEY_FORM = re.compile(rb"v([0-9]{10})/(?:chunk/([0-9]{5})|manifest)")


def read_by_the_readme(bootstrap: str, topic: str) -> tuple[dict[str, Any], bytes] | None:
    """The newest complete version, found by librdkafka and the README's rules alone."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"readme-{topic}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    chunks: dict[int, dict[int, list[bytes]]] = {}
    newest: tuple[dict[str, Any], bytes] | None = None
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        while True:
            msg = consumer.poll(10)
            assert msg is not None, "no end of partition within 10 s"
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                break
            key, value = msg.key(), msg.value()
            form = KEY_FORM.fullmatch(key) if key is not None else None
            kind = dict(msg.headers() or []).get("metarec-kind")
            if form is None or value is None:
                continue
            v = int(form[1])
            if form[2] is not None and kind == b"chunk":
                chunks.setdefault(v, {}).setdefault(int(form[2]), []).append(value)
                continue
            if form[2] is not None or kind != b"manifest":
                continue
            try:
                manifest = json.loads(value)
            except ValueError:
                continue
            if not isinstance(manifest, dict) or manifest.get("version") != v:
                continue
            parts = chunks.get(v, {})
            picked = [next((c for c in parts.get(i, []) if hashlib.sha256(c).hexdigest() == h),
                           None) for i, h in enumerate(manifest["chunks"])]
            if any(c is None for c in picked):
                continue
            whole = b"".join(c for c in picked if c is not None)
            if (len(whole) == manifest["size"] and hashlib.sha256(whole).hexdigest()
                    == manifest["sha256"] and manifest["schema"] == "metarec.theta/1"
                    and (newest is None or v > newest[0]["version"])):
                newest = manifest, whole
    finally:
        consumer.close()
    return newest


@pytest.mark.integration
def test_a_published_version_can_be_read_back_by_another_client_from_the_readme(
        broker: EmbeddedBroker) -> None:
    topic = f"model-{uuid.uuid4().hex[:8]}"
    create_topic(broker, topic)
    config = ModelConfig(dim=4, features=FeatureSpec(item_buckets=512, feature_buckets=256))
    theta = init_theta(config, seed=9)
    theta["item_emb"] += torch.randn(theta["item_emb"].shape)  # incompressible: several chunks
    payload = snapshot.dumps(theta)
    prod = kafka_io.producer(broker.cluster)
    try:
        v1 = publish(prod, topic, snapshot.dumps(init_theta(config, seed=1)), version=1,
                     parent=None, algorithm="reptile", config_hash="h", examples_learned=1)
        v2 = publish(prod, topic, payload, version=2, parent=1, algorithm="reptile",
                     config_hash="h", examples_learned=2, chunk_bytes=2048)
        prod.flush()
    finally:
        prod.close()
    assert len(v2.chunks) >= 3 and v1.version == 1

    found = read_by_the_readme(broker.bootstrap, topic)
    assert found is not None
    manifest, whole = found
    assert manifest == v2.__dict__
    with np.load(io.BytesIO(whole), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    assert set(arrays) == set(theta)
    for name, tensor in theta.items():
        assert arrays[name].dtype == np.float32
        np.testing.assert_array_equal(arrays[name], tensor.numpy())
    assert arrays["item_emb"].shape == (512, 4) and arrays["phi0"].shape == (5,)
