"""The start-up check of a cluster connection: reached, TLS trusted, a Kafka
broker answering, authenticated, within a bounded time, and if not, one line
saying which.

kafka-python retries a refused handshake until its bootstrap timeout and then
reports only "Unable to bootstrap", so the transport is probed here first, with
the clients' own TLS context, on a plain socket: a certificate that is not
trusted, a TLS client at a plaintext listener and a plaintext client at a TLS
listener each get their own message. Authentication is then left to
kafka-python itself, which gives up on a refused SASL login at once.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time

from kafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailedError,
    UnsupportedSaslMechanismError,
)

from streamer.cluster import Cluster
from streamer.config import Settings
from streamer.errors import ClusterAccessError, ClusterUnreachableError, ConfigError

#: ApiVersions v0 (key 18), correlation id 1, client id "metarec-check": every
#: Kafka broker answers it, before any authentication
_API_VERSIONS = struct.pack(">hhih", 18, 0, 1, 13) + b"metarec-check"
_REQUEST = struct.pack(">i", len(_API_VERSIONS)) + _API_VERSIONS
#: a TLS record's first byte (handshake 0x16, alert 0x15) and major version 3
_TLS_RECORD = (b"\x15\x03", b"\x16\x03")
RETRY_SECONDS = 0.5
#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH = 62, 64
#: a TLS handshake takes round trips, not seconds
HANDSHAKE_SECONDS = 5.0

log = logging.getLogger(__name__)


def connect(settings: Settings) -> Cluster:
    """The cluster of ``--bootstrap-servers``, checked: see :func:`check`."""
    cluster = Cluster.of(settings)
    check(cluster)
    log.info("connected to the Kafka cluster at %s", cluster)
    return cluster


def check(cluster: Cluster) -> None:
    """Raise :class:`ClusterAccessError` if the cluster refuses this client (TLS
    trust, protocol, authentication: retrying will not help), or
    :class:`ClusterUnreachableError` if no bootstrap server was reached and answered
    within ``connect_timeout_seconds``."""
    timeout = cluster.security.connect_timeout_seconds
    deadline = time.monotonic() + timeout
    servers = _servers(cluster.bootstrap)
    problem = "no bootstrap server"
    hung_up: set[tuple[str, int]] = set()
    while True:
        for host, port in servers:
            try:
                _probe(cluster, host, port, deadline)
                _authenticate(cluster, deadline)
                return
            except _HungUp as exc:
                # a Kafka broker answers any request; twice cut off (not once: it may
                # have been stopping) is a listener that wants TLS
                if (host, port) in hung_up:
                    raise ClusterAccessError(
                        f"{host}:{port} {exc}: does it want TLS? (--security-protocol SSL "
                        "or SASL_SSL)") from None
                hung_up.add((host, port))
                problem = f"{host}:{port} {exc}"
            except (OSError, _Unanswered) as exc:  # down, or starting: retried
                problem = f"{host}:{port}: {exc}"
        if time.monotonic() + RETRY_SECONDS >= deadline:
            raise ClusterUnreachableError(f"cannot reach the Kafka cluster at {cluster.bootstrap} "
                                          f"within {timeout:g} s ({problem})")
        time.sleep(RETRY_SECONDS)


def answers(cluster: Cluster, timeout: float) -> None:
    """The first bootstrap server takes a connection (TLS if so set) and answers a
    Kafka request, before any login; else an OSError."""
    host, port = _servers(cluster.bootstrap)[0]
    try:
        _probe(cluster, host, port, time.monotonic() + timeout)
    except (_Unanswered, _HungUp) as exc:
        raise ConnectionError(str(exc)) from None


class _Unanswered(Exception):
    """A broker that took the connection but did not answer in time."""


class _HungUp(Exception):
    """A plaintext connection closed or reset on a Kafka request."""


def _servers(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--bootstrap-servers: {server.strip()!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return out


def _probe(cluster: Cluster, host: str, port: int, deadline: float) -> None:
    where = f"{host}:{port}"
    with socket.create_connection((host, port), timeout=_left(deadline)) as raw:
        if cluster.security.tls:
            context = cluster.ssl_context()
            # a plaintext listener reads the TLS hello as a request it waits to complete
            raw.settimeout(min(_left(deadline), HANDSHAKE_SECONDS))
            try:
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    _ask(tls, where)
            except _HungUp as exc:  # after the handshake: the broker behind it, restarting?
                raise _Unanswered(str(exc)) from None
            except ssl.SSLCertVerificationError as exc:
                raise ClusterAccessError(_untrusted(where, host, exc)) from None
            except ssl.SSLError as exc:
                raise ClusterAccessError(
                    f"{where} refused the TLS handshake ({exc.reason or exc}): is it a "
                    "PLAINTEXT listener (--security-protocol), or does it want a client "
                    "certificate (--ssl-certfile)?") from None
            except (TimeoutError, _Unanswered, ConnectionError):
                raise ClusterAccessError(
                    f"{where} completed no TLS handshake and Kafka request within "
                    f"{raw.gettimeout():.3g} s: is it a PLAINTEXT listener? "
                    "(--security-protocol)") from None
        else:
            try:
                _ask(raw, where)
            except _SpeaksTls:
                raise ClusterAccessError(
                    f"{where} answers with TLS: connect with --security-protocol SSL or "
                    "SASL_SSL") from None
            except ConnectionResetError:
                raise _HungUp("reset the connection on a Kafka request") from None


class _SpeaksTls(Exception):
    """A plaintext request answered with a TLS record."""


def _ask(sock: socket.socket, where: str) -> None:
    """Send ApiVersions and read the reply's header: a Kafka broker is there."""
    sock.sendall(_REQUEST)
    head = b""
    while len(head) < 8:
        chunk = sock.recv(8 - len(head))
        if not chunk:
            if head[:2] in _TLS_RECORD:
                raise _SpeaksTls
            raise _HungUp("closed the connection on a Kafka request")
        head += chunk
        if head[:2] in _TLS_RECORD:
            raise _SpeaksTls
    if struct.unpack(">i", head[4:8])[0] != 1:
        raise ClusterAccessError(f"{where} does not speak the Kafka protocol")


def _untrusted(where: str, host: str, exc: ssl.SSLCertVerificationError) -> str:
    if exc.verify_code in (HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH):
        return (f"{where}: the broker's TLS certificate does not name {host!r} "
                f"({exc.verify_message}): connect by a name it holds")
    return (f"{where}: the broker's TLS certificate is not trusted ({exc.verify_message}): "
            "give the CA that signed it with --ssl-cafile")


def _authenticate(cluster: Cluster, deadline: float) -> None:
    """Log in and read metadata as every client will, within the time left."""
    sec = cluster.security
    login = f"the SASL {sec.sasl_mechanism} login of {sec.sasl_username!r}"
    try:
        cluster.admin(bootstrap_timeout_ms=int(_left(deadline) * 1000)).close()
    except (SaslAuthenticationFailedError, UnsupportedSaslMechanismError,
            IllegalSaslStateError) as exc:
        raise ClusterAccessError(f"the Kafka cluster at {cluster.bootstrap} refused {login}: "
                                 f"{exc}") from None
    except KafkaError as exc:
        if sec.sasl:  # the broker answered before the login: the login is what failed
            raise ClusterAccessError(
                f"the Kafka cluster at {cluster.bootstrap} answered, but {login} did not "
                f"complete within {sec.connect_timeout_seconds:g} s: a wrong user or "
                "password, or a mechanism it does not enable?") from None
        raise _Unanswered(f"it answered a request but gave no metadata ({type(exc).__name__}: "
                          f"{exc}): does it want a SASL login (--security-protocol "
                          "SASL_SSL or SASL_PLAINTEXT)?") from None


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())
