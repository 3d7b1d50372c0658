"""The command's operational errors are one line and exit code 2, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys


def test_run_with_its_metrics_port_taken_says_so_and_exits_before_starting_anything() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # nothing listens on port 1: were Kafka tried first, this would hang or fail
        # differently, and the message would not be the first and only line
        done = subprocess.run(
            [sys.executable, "-m", "streamer.cli", "run", "--metrics-port", str(port),
             "--bootstrap-servers", "127.0.0.1:1"],
            capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"metarec: the metrics port 127.0.0.1:{port} is in use (another metarec run on this "
        "host?): pick another with --metrics-port, or 0 to turn metrics off"]
