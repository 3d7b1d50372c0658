"""Group and cross-platform personalisation on synthetic streams built for them:
task keys (a user's task split by platform) and initialisations by segment.

    .venv/bin/python -m bench.groups --seeds 0 1 2 --out bench/results

Every stream is a :class:`~metarec.datasets.synthetic.SyntheticStream` of 1,500
users (prelabelled), replayed through ``metarec replay`` with the default settings
but for the variant's.

**Task keys.** ``user_noise`` 0.3 (a user's taste mostly their cluster's, which
the region in the context tells) or 1 (as much their own), and ``platform_taste``
0 (one taste per user), 0.5 or 1 (a user's taste on each platform is theirs plus
that much of a direction of their own for the platform; each event's platform
drawn at random). Variants:

- **user alone**: the task key is the user (the default);
- **user x platform**: ``--task-context platform``: each (user, platform) is a
  task whose weights are the user's own (learned from all the user's labels) plus a
  residual learned from its own labels at 0.3 of the inner rate (the default);
- the same with the residual at the full inner rate (``--task-residual-rate 1``);
- **user x platform, no prior**: each (user, platform) as a user of its own (the
  events' user ids rewritten), so a user's first events on a platform start from
  φ_0.

Reported: AUC on all events, and on the first 5 events of a user on a platform
after at least 5 on the others ("new platform": where the prior is for).

**Initialisations by segment.** Six clusters of taste; the cluster is a user
feature and not in the context (no region). Variants: without the user feature,
with it (its embedding adds to every user's vector), and with it and
``--init-segment cluster`` (a new user starts at φ_0 plus their cluster's
meta-learned offset). Reported: AUC on all events and on users' first 5 labels.

Each figure is the mean ± std over the seeds; each difference is paired (same
stream), against the first variant of its table: mean over seeds and its range.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from metarec.datasets.synthetic import SyntheticStream
from metarec.evaluation import auc

Event = dict[str, Any]
#: (personal taste, platform taste) of the task-key streams
TASTES = ((0.3, 0.0), (0.3, 0.5), (0.3, 1.0), (1.0, 0.0), (1.0, 0.5))
Taste = tuple[float, float]
USER_ALONE = "user alone"
KEYED = "user x platform"
KEYED_FULL = "user x platform, residual at the full rate"
NO_PRIOR = "user x platform, no prior"
TASK_KEYS: dict[str, dict[str, Any]] = {
    USER_ALONE: {}, KEYED: {"task_context": "platform"},
    KEYED_FULL: {"task_context": "platform", "task_residual_rate": 1.0}, NO_PRIOR: {}}
NEW_PLATFORM_EVENTS = 5  # a user's first events on a platform that count as new there

NO_FEATURE = "no user feature"
FEATURE = "cluster as a user feature"
SEGMENTED = "cluster as a user feature, φ₀ by cluster"
SEGMENTS: dict[str, dict[str, Any]] = {
    NO_FEATURE: {}, FEATURE: {}, SEGMENTED: {"init_segment": "cluster"}}
FIRST_LABELS = 5


def platform_stream(taste: Taste, seed: int, variant: str) -> list[Event]:
    events = SyntheticStream(users=1500, items=300, events_per_user=40, user_noise=taste[0],
                             platform_taste=taste[1], seed=seed).events()
    if variant == NO_PRIOR:
        return [{**e, "user_id": f"{e['user_id']}@{e['context']['platform']}"}
                for e in events]
    return list(events)


def segment_stream(seed: int, variant: str) -> list[Event]:
    out = []
    for e in SyntheticStream(users=1500, items=300, events_per_user=30, clusters=6,
                             seed=seed).events():
        cluster = e["context"].pop("region")
        if variant != NO_FEATURE:
            e["user_features"] = {"cluster": cluster}
        out.append(e)
    return out


def replayed(events: list[Event], seed: int, overrides: dict[str, Any]) -> np.ndarray:
    """Every impression's prediction, in stream order."""
    import torch

    from streamer.config import Settings
    from streamer.replay import replay

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "events.jsonl")
        source.write_text("".join(json.dumps(e) + "\n" for e in events))
        log = Path(tmp, "predictions.jsonl")
        replay(Settings.of(metrics_port=0, predictions_out=log, seed=seed, **overrides),
               str(source), progress=False)
        where = {(e["user_id"], e["item_id"], e["timestamp"]): n for n, e in enumerate(events)}
        p = np.full(len(events), np.nan)
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            p[where[(rec["user_id"], rec["item_id"], rec["timestamp"])]] = rec["p"]
    if np.isnan(p).any():
        raise RuntimeError(f"{int(np.isnan(p).sum())} events got no prediction")
    return p


def task_key_run(variant: str, taste: Taste, seed: int) -> tuple[float, float]:
    """AUC on all events and on new platforms."""
    events = platform_stream(taste, seed, variant)
    p, y = replayed(events, seed, TASK_KEYS[variant]), labels(events)
    seen: dict[str, int] = {}
    on: dict[tuple[str, str], int] = {}
    new = np.zeros(len(events), dtype=bool)
    for n, e in enumerate(platform_stream(taste, seed, USER_ALONE)):
        key = (e["user_id"], e["context"]["platform"])
        here = on.get(key, 0)
        new[n] = (here < NEW_PLATFORM_EVENTS
                  and seen.get(e["user_id"], 0) - here >= NEW_PLATFORM_EVENTS)
        seen[e["user_id"]] = seen.get(e["user_id"], 0) + 1
        on[key] = here + 1
    return auc(p, y), auc(p[new], y[new])


def segment_run(variant: str, seed: int) -> tuple[float, float]:
    """AUC on all events and on users' first labels."""
    events = segment_stream(seed, variant)
    p, y = replayed(events, seed, SEGMENTS[variant]), labels(events)
    count: dict[str, int] = {}
    first = np.zeros(len(events), dtype=bool)
    for n, e in enumerate(events):
        first[n] = count.get(e["user_id"], 0) < FIRST_LABELS
        count[e["user_id"]] = count.get(e["user_id"], 0) + 1
    return auc(p, y), auc(p[first], y[first])


def labels(events: list[Event]) -> np.ndarray:
    return np.array([float(e["clicked"]) for e in events])


Runs = dict[tuple[str, ...], list[tuple[float, float]]]


def table(rows: Runs, head: list[str], columns: tuple[str, str], reference: str) -> list[str]:
    """Rows keyed by (stream..., variant), each a figure pair per seed; differences
    against the ``reference`` variant, the first of each stream."""
    lines = ["| " + " | ".join([*head, *columns, f"vs {reference}: {columns[0]}",
                                columns[1]]) + " |",
             "|" + "---:|" * (len(head) - 1) + "---|---:|---:|---:|---:|"]
    firsts: dict[tuple[str, ...], np.ndarray] = {}
    for key, runs in rows.items():
        f = np.array(runs)
        first = firsts.setdefault(key[:-1], f)
        d = f - first
        diff = (["-", "-"] if first is f else
                [f"{d[:, c].mean():+.4f} ({d[:, c].min():+.4f} to {d[:, c].max():+.4f})"
                 for c in (0, 1)])
        lines.append("| " + " | ".join([*key, f"{f[:, 0].mean():.4f} ± {f[:, 0].std():.4f}",
                                        f"{f[:, 1].mean():.4f} ± {f[:, 1].std():.4f}",
                                        *diff]) + " |")
    return lines


Pending = dict[tuple[str, ...], list[Future[tuple[float, float]]]]


def results(found: Pending) -> Runs:
    return {key: [f.result() for f in futures] for key, futures in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        keyed: Pending = {(f"{t[0]:g}", f"{t[1]:g}", v): [
            pool.submit(task_key_run, v, t, s) for s in args.seeds]
            for t in TASTES for v in TASK_KEYS}
        segmented: Pending = {(v,): [pool.submit(segment_run, v, s) for s in args.seeds]
                              for v in SEGMENTS}
        keyed_runs, segment_runs = results(keyed), results(segmented)
    lines = [f"`python -m bench.groups --seeds {' '.join(map(str, args.seeds))}` "
             f"({time.perf_counter() - t0:.0f} s; 1,500 users a stream; mean ± std over "
             f"seeds {args.seeds}).", "", "Task keys:", "",
             *table(keyed_runs, ["personal taste", "platform taste", "task key"],
                    ("AUC", "new platform AUC"), USER_ALONE),
             "", "Initialisations by segment:", "",
             *table(segment_runs, ["model"], ("AUC", f"first {FIRST_LABELS} labels AUC"),
                    NO_FEATURE)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "groups.md").write_text(text)


if __name__ == "__main__":
    main()
