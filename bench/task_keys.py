"""Task keys: a user's task split by platform, on synthetic streams whose users' taste
differs by platform, and on one whose does not.

    .venv/bin/python -m bench.task_keys --seeds 0 1 2 --out bench/results

Each stream is :class:`~metarec.datasets.synthetic.SyntheticStream` with
``user_noise`` 0.3 (a user's taste mostly their cluster's, which the region in the
context tells) or 1 (as much their own), and ``platform_taste`` 0 (one taste per
user), 0.5 or 1 (a user's taste on each platform is theirs plus that much of a
direction of their own for the platform; each event's platform drawn at random),
prelabelled, replayed through ``metarec replay`` with the default settings and:

- **user alone**: the task key is the user (the default);
- **user x platform**: ``--task-context platform``: each (user, platform) is a
  task whose weights are the user's own (learned from all the user's labels) plus a
  residual learned from its own labels at 0.3 of the inner rate (the default);
- the same with the residual at the full inner rate (``--task-residual-rate 1``);
- **user x platform, no prior**: each (user, platform) as a user of its own (the
  events' user ids rewritten), so a user's first events on a platform start from
  φ_0.

Reported: AUC on all events, and on the first 5 events of a user on a platform
after at least 5 on the others ("new platform": where the prior is for), mean ±
std over the seeds, and the paired difference of each variant against the user
alone (mean over seeds, and its range).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from metarec.datasets.synthetic import SyntheticStream
from metarec.evaluation import auc

#: (personal taste, platform taste) of the streams: a user's taste is their cluster's
#: plus this much of their own, plus on each platform that much of the platform's
TASTES = ((0.3, 0.0), (0.3, 0.5), (0.3, 1.0), (1.0, 0.0), (1.0, 0.5))
Taste = tuple[float, float]
USER_ALONE = "user alone"
KEYED = "user x platform"
KEYED_FULL = "user x platform, residual at the full rate"
NO_PRIOR = "user x platform, no prior"
VARIANTS = (USER_ALONE, KEYED, KEYED_FULL, NO_PRIOR)
NEW_PLATFORM_EVENTS = 5  # a user's first events on a platform that count as new there


def stream(taste: Taste, seed: int) -> SyntheticStream:
    return SyntheticStream(users=1500, items=300, events_per_user=40, user_noise=taste[0],
                           platform_taste=taste[1], seed=seed)


def run(variant: str, taste: Taste, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every impression's prediction and label, in stream order."""
    import torch

    from streamer.config import Settings
    from streamer.replay import replay

    torch.set_num_threads(1)
    events = list(stream(taste, seed).events())
    if variant == NO_PRIOR:
        events = [{**e, "user_id": f"{e['user_id']}@{e['context']['platform']}"}
                  for e in events]
    by_variant: dict[str, dict[str, Any]] = {
        KEYED: {"task_context": "platform"},
        KEYED_FULL: {"task_context": "platform", "task_residual_rate": 1.0}}
    overrides = by_variant.get(variant, {})
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
    return p, np.array([float(e["clicked"]) for e in events])


def new_platform(taste: Taste, seed: int) -> np.ndarray:
    """Events among a user's first few on a platform, after enough on the others."""
    seen: dict[str, int] = {}
    on: dict[tuple[str, str], int] = {}
    out = []
    for e in stream(taste, seed).events():
        key = (e["user_id"], e["context"]["platform"])
        here = on.get(key, 0)
        out.append(here < NEW_PLATFORM_EVENTS
                   and seen.get(e["user_id"], 0) - here >= NEW_PLATFORM_EVENTS)
        seen[e["user_id"]] = seen.get(e["user_id"], 0) + 1
        on[key] = here + 1
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {(v, t, s): pool.submit(run, v, t, s)
                   for t in TASTES for s in args.seeds for v in VARIANTS}
        runs = {key: f.result() for key, f in futures.items()}
    figures: dict[tuple[str, Taste, int], tuple[float, float]] = {}
    for (v, t, s), (p, y) in runs.items():
        new = new_platform(t, s)
        figures[v, t, s] = (auc(p, y), auc(p[new], y[new]))
    lines = [f"`python -m bench.task_keys --seeds {' '.join(map(str, args.seeds))}` "
             f"({time.perf_counter() - t0:.0f} s; 1,500 users, about 60,000 events a stream; "
             f"mean ± std over seeds {args.seeds}).", "",
             "| personal taste | platform taste | task key | AUC | new platform AUC "
             "| vs user alone: AUC | new platform |", "|---:|---:|---|---:|---:|---:|---:|"]
    for t in TASTES:
        for v in VARIANTS:
            f = np.array([figures[v, t, s] for s in args.seeds])
            d = f - np.array([figures[USER_ALONE, t, s] for s in args.seeds])
            diff = (["-", "-"] if v == USER_ALONE else
                    [f"{d[:, c].mean():+.4f} ({d[:, c].min():+.4f} to {d[:, c].max():+.4f})"
                     for c in (0, 1)])
            lines.append(f"| {t[0]:g} | {t[1]:g} | {v} | "
                         f"{f[:, 0].mean():.4f} ± {f[:, 0].std():.4f} | "
                         f"{f[:, 1].mean():.4f} ± {f[:, 1].std():.4f} | {diff[0]} | {diff[1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "task_keys.md").write_text(text)


if __name__ == "__main__":
    main()
