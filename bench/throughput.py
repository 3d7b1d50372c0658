"""Throughput on MovieLens-100K: metarec's replay against the online learners
users would pick instead, on the same events, in one run.

    .venv/bin/pip install -e ".[bench]"      # vowpalwabbit (bench-only)
    .venv/bin/python bench/throughput.py --repeats 3

Each learner predicts every event before learning from it (test-then-train), so
its AUC is comparable. Reported: median events/s over the repeats (min-max), the
ratio to Vowpal Wabbit measured in the same run, and prequential AUC.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from metarec.datasets import movielens
from metarec.evaluation import auc
from streamer.config import Settings
from streamer.replay import replay


def metarec_replay(_: list[dict[str, Any]]) -> tuple[float, float]:
    """End to end: JSON records, validation, joining, learning (default config)."""
    summary = replay(Settings(metrics_port=0), "movielens-100k", progress=False)
    return summary.events_per_second, float(summary.quality["auc"])


def _tokens(event: dict[str, Any]) -> tuple[list[str], list[str]]:
    u = [f"user={event['user_id']}"] + [f"{k}={v}" for k, v in event["user_features"].items()]
    i = [f"item={event['item_id']}"]
    for k, v in event["item_features"].items():
        i += [f"{k}={x}" for x in v] if isinstance(v, list) else [f"{k}={v}"]
    return u, i


def vowpal_wabbit(events: list[dict[str, Any]]) -> tuple[float, float]:
    """Logistic loss, user x item interactions (-q ui), adaptive normalised SGD."""
    import vowpalwabbit

    vw = vowpalwabbit.Workspace("--loss_function logistic --link logistic -q ui -b 22 "
                                "-l 0.5 --quiet")
    p = np.empty(len(events))
    t0 = time.perf_counter()
    for n, e in enumerate(events):
        u, i = _tokens(e)
        features = f"|u {' '.join(u)} |i {' '.join(i)}"
        p[n] = vw.predict(features)
        vw.learn(f"{1 if e['clicked'] else -1} {features}")
    seconds = time.perf_counter() - t0
    vw.finish()
    y = np.array([e["clicked"] for e in events], dtype=float)
    return len(events) / seconds, auc(p, y)


def river_logistic(events: list[dict[str, Any]]) -> tuple[float, float]:
    """river LogisticRegression on one-hot features (no interactions)."""
    from river import linear_model, optim

    model = linear_model.LogisticRegression(optimizer=optim.SGD(0.05))
    p = np.empty(len(events))
    t0 = time.perf_counter()
    for n, e in enumerate(events):
        u, i = _tokens(e)
        x = dict.fromkeys(u + i, 1.0)
        p[n] = model.predict_proba_one(x).get(True, 0.5)
        model.learn_one(x, bool(e["clicked"]))
    seconds = time.perf_counter() - t0
    y = np.array([e["clicked"] for e in events], dtype=float)
    return len(events) / seconds, auc(p, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    events = list(movielens.events())
    runs: dict[str, Callable[[list[dict[str, Any]]], tuple[float, float]]] = {
        "metarec replay (default config)": metarec_replay,
        "Vowpal Wabbit (-q ui, logistic)": vowpal_wabbit,
        "river LogisticRegression": river_logistic,
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
        for name, fn in runs.items():
            results[name].append(fn(events))
    vw = statistics.median(r[0] for r in results["Vowpal Wabbit (-q ui, logistic)"])
    print(f"MovieLens-100K, {len(events)} events, {args.repeats} repeats, 1 torch thread\n")
    print("| learner | events/s (median) | min - max | vs VW | prequential AUC |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in results.items():
        rates = [r[0] for r in rs]
        med = statistics.median(rates)
        print(f"| {name} | {med:,.0f} | {min(rates):,.0f} - {max(rates):,.0f} | "
              f"{med / vw:.2f}x | {statistics.median(r[1] for r in rs):.4f} |")


if __name__ == "__main__":
    main()
