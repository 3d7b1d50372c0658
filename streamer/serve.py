"""``metarec serve``: the HTTP API over the group's live state, until SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator

import uvicorn

from streamer.config import Settings
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


def serve(settings: Settings, bootstrap: str) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    metrics = ServingMetrics()
    state = LiveState(bootstrap, settings, metrics)
    state.start()
    s = settings.serve
    app = create_app(state, metrics, s)
    server = _Server(uvicorn.Config(app, host=s.host, port=s.port, lifespan="off",
                                    access_log=False, log_level="warning"))
    log.info("serving on http://%s:%d (API schema at /docs, health at /health)", s.host, s.port)
    try:
        server.run()
    finally:
        state.stop()
    log.info("server stopped")
    return 0
