"""Pausing Python's garbage collector around work that makes millions of small
objects that all live to its end (a restore): its passes over them found nothing
to free and took half the time."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
