"""``metarec drift report``: summarise a replay's (or a drift topic's) alarms and
draw them over event time."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def summary(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return ["no drift alarms"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["signal"], r["segment"])].append(r)
    lines = [f"{len(records)} drift alarms from {_when(records[0]['timestamp'])} to "
             f"{_when(records[-1]['timestamp'])} (event time, UTC)",
             f"{'signal':<18} {'segment':<22} {'alarms':>6}  {'first':<19}  largest change"]
    for (signal, segment), rs in sorted(groups.items()):
        big = max(rs, key=lambda r: abs(r["magnitude"]))
        lines.append(f"{signal:<18} {segment:<22} {len(rs):>6}  {_when(rs[0]['timestamp'])}  "
                     f"{big['before']:.4f} -> {big['after']:.4f}")
    return lines


def plot(records: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    signals = sorted({r["signal"] for r in records})
    segments = sorted({r["segment"] for r in records})
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * max(len(signals), 1)))
    for i, segment in enumerate(segments):
        rs = [r for r in records if r["segment"] == segment]
        when = mdates.date2num([datetime.fromtimestamp(r["timestamp"], UTC) for r in rs])
        ax.scatter(when,
                   [signals.index(r["signal"]) + (i - len(segments) / 2) * 0.08 for r in rs],
                   s=[20 + 200 * min(abs(r["magnitude"]), 1.0) for r in rs],
                   label=segment, alpha=0.7)
    ax.xaxis_date()
    ax.set_yticks(range(len(signals)), signals)
    ax.set_xlabel("event time (UTC)")
    ax.set_title("drift alarms (marker size: size of the change)")
    if segments:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
