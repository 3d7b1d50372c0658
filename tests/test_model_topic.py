"""Model versions travel as checksummed chunks under Kafka's message limit; a
loader keeps the newest complete version and ignores partial or corrupt ones."""

from __future__ import annotations

import os

import pytest
import torch

from metarec import snapshot
from metarec.model import ModelConfig, init_theta
from streamer.model_topic import CHUNK_BYTES, MAX_MESSAGE_BYTES, VersionAssembler, messages


def version(v: int, payload: bytes):  # type: ignore[no-untyped-def]
    return messages(payload, version=v, parent=v - 1 or None, algorithm="maml",
                    config_hash="abc", examples_learned=10 * v)


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
