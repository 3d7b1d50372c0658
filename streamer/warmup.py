"""Get a process ready before its first record."""

from __future__ import annotations

import gc
import json

from metarec import drift
from metarec.datasets.synthetic import SyntheticStream
from metarec.records import Record
from metarec.session import SessionConfig, StreamSession


def warm_up(config: SessionConfig) -> None:
    """Run a small synthetic stream through a throwaway session of the same
    configuration (this loads or compiles the serving kernels, as the first
    micro-batch would have), then move everything alive (imported modules,
    compiled kernels: some 300,000 objects) out of the garbage collector's reach:
    otherwise each full collection walks them all, every few seconds, and stalls
    the event-to-update latency."""
    small = config.model_dump()
    small["learner"]["model"]["features"].update(item_buckets=256, feature_buckets=256)
    small["learner"]["meta"].update(every_examples=50, users_per_update=8)
    session = StreamSession(SessionConfig.model_validate(small))
    events = SyntheticStream(users=8, items=20, events_per_user=20).events()
    records = [Record(json.dumps(e).encode()) for e in events]
    for start in range(0, len(records), 50):
        session.process(records[start:start + 50])
    session.finish()
    drift.warm_up()  # its first check comes thousands of labels in
    gc.collect()
    gc.freeze()
