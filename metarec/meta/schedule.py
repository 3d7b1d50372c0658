"""When a meta-update is due: every N labels, or (live) every T seconds of wall time."""

from __future__ import annotations

import time


class MetaSchedule:
    def __init__(self, every_examples: int, every_seconds: float | None):
        self.every_examples = every_examples
        self.every_seconds = every_seconds
        self.since = 0  # labels learned since the last meta-update
        self.last = time.monotonic()

    def count(self, labels: int) -> None:
        self.since += labels

    @property
    def due(self) -> bool:
        if self.since >= self.every_examples:
            return True
        return (self.every_seconds is not None and self.since > 0
                and time.monotonic() - self.last >= self.every_seconds)

    def restart(self) -> None:
        self.since = 0
        self.last = time.monotonic()
