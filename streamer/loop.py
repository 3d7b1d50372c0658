"""The one loop of ``run`` and ``replay``: source -> session -> sinks -> commit.

A source hands over records a poll at a time, with what it knows of its
partitions; the session turns them into outputs; every sink takes every
output; then the source may commit what the session no longer holds. At the end
a finite source (a file, a topic range) lets the session close every window; a
live one (a consumer-group member) leaves the rest for its next run.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from metarec.records import Record
from metarec.session import SessionOutput, StreamSession
from streamer.sinks import Sink


@dataclass(frozen=True, slots=True)
class Poll:
    """Records of one poll, each partition's in its order. ``caught_up``: the
    partitions at the end of their log (None: one partition, in its own order);
    ``paused``: those it stopped fetching; ``flush``: learn a micro-batch short of
    full now. A source of several partitions tells the session which exist
    (:meth:`StreamSession.track`) before they deliver."""

    records: Sequence[Record]
    caught_up: Collection[int] | None = None
    paused: Collection[int] = ()
    flush: bool = False


class Source(Protocol):
    #: a file or a topic range ends; a group member runs until stopped
    finite: bool

    def polls(self, session: StreamSession) -> Iterator[Poll]: ...

    def processed(self, session: StreamSession) -> None:
        """After every poll's outputs reached the sinks (a consumer commits here)."""

    def close(self, session: StreamSession) -> None:
        """After the sinks closed (a consumer's last commit)."""


def stream(session: StreamSession, source: Source, sinks: Sequence[Sink]) -> None:
    for poll in source.polls(session):
        out = session.process(poll.records, poll.caught_up, flush=poll.flush,
                              paused=poll.paused)
        for sink in sinks:
            sink.write(out, session)
        source.processed(session)
    last = session.finish() if source.finite else SessionOutput(drift=session.flush_drift())
    for sink in sinks:
        sink.write(last, session)
    for sink in sinks:
        sink.close(session)
    source.close(session)
