"""``metarec serve``: the HTTP API over the group's live state, until SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Iterator

import uvicorn

from streamer.cluster import Cluster
from streamer.config import ServeSettings, Settings
from streamer.errors import ConfigError
from streamer.http_api import create_app
from streamer.live_state import LiveState
from streamer.serving_metrics import ServingMetrics

log = logging.getLogger("metarec.serve")


class _Server(uvicorn.Server):
    """uvicorn's server, whose SIGTERM/SIGINT end it cleanly with exit code 0 (uvicorn
    raises the signal again once it has stopped, which kills the process with it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


#: the interpreter's thread switch interval while serving: the follower thread decodes
#: records in Python, and a request waiting for the GIL waits up to this long (the
#: default 5 ms was most of the p99)
SWITCH_INTERVAL_SECONDS = 0.0005


def check_tls(s: ServeSettings) -> None:
    """A certificate and key the HTTPS server can load, or a :class:`ConfigError`
    (before the server starts: uvicorn would fail with a traceback)."""
    if s.tls_certfile is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            s.tls_certfile, s.tls_keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot serve HTTPS with --serve-tls-certfile {s.tls_certfile} and "
                          f"--serve-tls-keyfile {s.tls_keyfile}: {exc}") from None


def serve(settings: Settings, cluster: Cluster) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    metrics = ServingMetrics()
    state = LiveState(cluster, settings, metrics)
    state.start()
    s = settings.serve
    app = create_app(state, metrics, s)
    server = _Server(uvicorn.Config(
        app, host=s.host, port=s.port, lifespan="off", access_log=False, log_level="warning",
        ssl_certfile=s.tls_certfile, ssl_keyfile=s.tls_keyfile))
    log.info("serving on %s://%s:%d (API schema at /docs, health at /health; %s)",
             "http" if s.tls_certfile is None else "https", s.host, s.port,
             "bearer token required on /v1" if s.token or s.token_file else "no token")
    try:
        server.run()
    finally:
        state.stop()
    log.info("server stopped")
    return 0
