"""``metarec drift report``: a replay's (or a drift topic's) drift episodes, each
explained (which signal, where, by how much, how it closed), drawn over event time."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def episodes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each episode: its opening record, with ``closed`` (the closing record, or None
    while it is still open)."""
    out: list[dict[str, Any]] = []
    open_: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        key = (r["signal"], r["segment"])
        if r.get("state", "open") == "open":
            open_[key] = {**r, "closed": None}
            out.append(open_[key])
        elif key in open_:
            open_.pop(key)["closed"] = r
    return out


def summary(records: list[dict[str, Any]]) -> list[str]:
    found = episodes(records)
    if not found:
        return ["no drift episodes"]
    lines = [f"{len(found)} drift episode(s) from {_when(found[0]['timestamp'])} to "
             f"{_when(found[-1]['timestamp'])} (event time, UTC)",
             f"{'signal':<17} {'segment':<20} {'opened':<19}  {'before -> after':<17} "
             f"{'change':>8} {'statistic':>9}  closed"]
    for ep in found:
        relative = ep.get("relative")
        change = f"{relative:+.1%}" if relative is not None else "new"
        closed = ep["closed"]
        how = "still open" if closed is None else \
            f"{_when(closed['timestamp'])} ({closed.get('reason', '')})"
        lines.append(f"{ep['signal']:<17} {ep['segment']:<20} {_when(ep['timestamp'])}  "
                     f"{ep['before']:.4f} -> {ep['after']:.4f} {change:>8} "
                     f"{ep.get('statistic', float('nan')):>9.2f}  {how}")
    return lines


def plot(records: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    found = episodes(records)
    signals = sorted({r["signal"] for r in found})
    segments = sorted({r["segment"] for r in found})
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * max(len(signals), 1)))
    for i, segment in enumerate(segments):
        rs = [r for r in found if r["segment"] == segment]
        when = mdates.date2num([datetime.fromtimestamp(r["timestamp"], UTC) for r in rs])
        rows = [signals.index(r["signal"]) + (i - len(segments) / 2) * 0.08 for r in rs]
        points = ax.scatter(when, rows, s=[20 + 200 * min(abs(r["magnitude"]), 1.0) for r in rs],
                            label=segment, alpha=0.7)
        for r, start, row in zip(rs, when, rows, strict=True):  # the episode's span
            if r["closed"] is not None:
                end = mdates.date2num(datetime.fromtimestamp(r["closed"]["timestamp"], UTC))
                ax.plot([start, end], [row, row], color=points.get_facecolor()[0], alpha=0.5)
    ax.xaxis_date()
    ax.set_yticks(range(len(signals)), signals)
    ax.set_xlabel("event time (UTC)")
    ax.set_title("drift episodes (marker: opened, its size the change; line: until closed)")
    if segments:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
