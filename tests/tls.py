"""A TLS endpoint in front of the embedded broker, as a secured cluster has one:
Debian's stunnel terminates TLS (and checks client certificates) on one loopback
port and forwards to the broker's plaintext listener, which advertises the TLS
port. Certificates come from a throwaway CA (trustme)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

from streamer.cluster import Cluster
from streamer.config import SecuritySettings
from streamer.embedded import EmbeddedBroker, free_port

#: the client key's password: a secret the tests look for in every output
KEY_PASSWORD = "key-pass-7c1e0a59"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA that signed the broker's and the client's certificates
    other_ca: Path  # a CA that signed neither
    server: Path  # the broker's certificate and key (names localhost and 127.0.0.1)
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD


def make_files(where: Path) -> TlsFiles:
    ca, other = trustme.CA(), trustme.CA()
    files = TlsFiles(where / "ca.pem", where / "other-ca.pem", where / "server.pem",
                     where / "client.pem", where / "client.key")
    ca.cert_pem.write_to_path(files.ca)
    other.cert_pem.write_to_path(files.other_ca)
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        files.server)
    client = ca.issue_cert("metarec-client")
    client.cert_chain_pems[0].write_to_path(files.client_cert)
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    files.client_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(KEY_PASSWORD.encode())))
    return files


@dataclass(frozen=True)
class TlsBroker:
    broker: EmbeddedBroker  # its own listener stays plaintext
    bootstrap: str  # the TLS port
    files: TlsFiles

    def security(self, **changes: object) -> SecuritySettings:
        """What a client of the TLS port sets (mutual TLS with the encrypted key)."""
        base: dict[str, object] = {
            "security_protocol": "SSL", "ssl_cafile": self.files.ca,
            "ssl_certfile": self.files.client_cert, "ssl_keyfile": self.files.client_key,
            "ssl_key_password": KEY_PASSWORD}
        return SecuritySettings.model_validate(base | changes)

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.bootstrap, self.security())

    def flags(self) -> list[str]:
        """The same, as flags (the key's password goes in the environment: env())."""
        return ["--bootstrap-servers", self.bootstrap, "--security-protocol", "SSL",
                "--ssl-cafile", str(self.files.ca), "--ssl-certfile", str(self.files.client_cert),
                "--ssl-keyfile", str(self.files.client_key)]

    @staticmethod
    def env() -> dict[str, str]:
        return {"METAREC_SSL_KEY_PASSWORD": KEY_PASSWORD}


def stunnel_binary() -> str:
    found = shutil.which("stunnel4") or shutil.which("stunnel")
    if found is None:
        raise RuntimeError("the TLS tests need Debian's stunnel4 (./dev test installs it)")
    return found


@contextmanager
def tls_broker(where: Path) -> Iterator[TlsBroker]:
    files = make_files(where)
    tls_port = free_port()
    with EmbeddedBroker(advertised=f"127.0.0.1:{tls_port}") as broker:
        conf = where / "stunnel.conf"
        conf.write_text(f"""foreground = yes
pid =
debug = warning
output = {where / 'stunnel.log'}
[kafka]
accept = 127.0.0.1:{tls_port}
connect = {broker.bootstrap}
cert = {files.server}
CAfile = {files.ca}
verifyChain = yes
requireCert = yes
""")
        proc = subprocess.Popen([stunnel_binary(), str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            _wait_listening(tls_port, proc)
            yield TlsBroker(broker, f"127.0.0.1:{tls_port}", files)
        finally:
            proc.terminate()
            proc.wait(10)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stunnel did not listen on {port}") from None
            time.sleep(0.05)
