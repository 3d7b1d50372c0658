"""Cold-start quality on MovieLens-100K: metarec's meta-learners side by side with
the fine-tune control and the online learners users would pick instead.

    .venv/bin/pip install -e ".[bench]"      # vowpalwabbit (bench-only)
    .venv/bin/python -m bench.quality --seeds 0 1 2 --out bench/results --readme README.md

Protocol: the 100,000 ratings as a time-ordered stream (stable sort, ties keep the
file order), label = rating >= 4, every model predicts each event before it learns
from it. Baselines' knobs are chosen on the first half of the stream only (the
best AUC there); metarec's defaults were chosen the same way (README). The
"first half" is the first 50,000 events; new users/items are those first seen in
the second half. Writes ``quality.md`` (tables) and ``quality_auc_by_k.png``, and
with ``--readme`` the README's block of tables (between its markers). The
baselines include a per-event Adagrad matrix factorisation with side features and
Vowpal Wabbit parsing each example once; every comparison is a paired bootstrap
over users, on all events and on new users' k 0-4, 5-9 and 10-19.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import baselines
from metarec.datasets import movielens
from metarec.evaluation import K_BUCKETS, auc, bucket_label, logloss

Event = dict[str, Any]
BOOTSTRAP = 1000
#: the new users' buckets every comparison is made in (besides all events)
COMPARED_BUCKETS = ((0, 4), (5, 9), (10, 19))

# metarec variants: Settings overrides on top of the defaults of `metarec replay`
OURS: dict[str, dict[str, Any]] = {
    "metarec Reptile": {"algorithm": "reptile"},
    "metarec Reptile, constant inner rate": {"algorithm": "reptile", "inner_rate_labels": 0},
    "metarec Reptile, before (recency 0.85, constant rate)": {
        "algorithm": "reptile", "inner_rate_labels": 0, "recency": 0.85},
    # initialisations by segment: φ_0 plus a meta-learned offset per value of a feature
    "metarec Reptile, φ₀ by occupation": {"algorithm": "reptile", "init_segment": "occupation"},
    "metarec Reptile, φ₀ by gender": {"algorithm": "reptile", "init_segment": "gender"},
    "metarec MAML (= ANIL, see README)": {"algorithm": "maml"},
    "metarec MAML, φ₀ by occupation": {"algorithm": "maml", "init_segment": "occupation"},
    "metarec first-order MAML": {"algorithm": "fomaml"},
    "metarec Meta-SGD": {"algorithm": "metasgd"},
    # the prototype averages the task: at its best with the task's older examples
    "metarec prototype (gradient-free)": {"adaptation": "prototype", "algorithm": "fomaml",
                                          "inner_lr": 1.0, "recency": 0.85,
                                          "inner_rate_labels": 0},
}
CONTROL = "fine-tune control"
CONTROLS: dict[str, dict[str, Any]] = {
    CONTROL: {"algorithm": "finetune"},
    "same network, no per-user weights": {"algorithm": "finetune", "inner_steps": 0},
}
# Item cold start: the default model with item features withheld from the model, so
# an unseen item's embedding is a plain new one rather than one made from features.
PLAIN_ITEMS = "metarec default, plain new item embeddings"
# and without user features: the initialisation is then φ_0 alone, not conditioned on
# the user's age, gender and occupation (whose embeddings add to every user's vector)
NO_USER_FEATURES = "metarec default, no user features"
#: the event fields each of those variants withholds
WITHHELD = {PLAIN_ITEMS: "item_features", NO_USER_FEATURES: "user_features"}

MF = "per-event matrix factorisation (Adagrad, side features)"
Knobs = dict[str, float | str]
GRIDS: dict[str, tuple[Callable[..., np.ndarray], list[Knobs]]] = {
    "per-user + per-item click rate": (
        baselines.click_rates,
        [{"prior": a, "decay": d} for a in (2.0, 5.0, 10.0) for d in (1.0, 0.95, 0.9)]),
    "river LogisticRegression (one-hot)": (
        baselines.river_logistic, [{"lr": lr} for lr in (0.01, 0.05, 0.2)]),
    # -q ui as the issue names it, and user x user pairs too (user id x age, ...),
    # which VW was found to gain from: the baseline at its best
    "Vowpal Wabbit (logistic, one parse per example)": (
        baselines.vowpal_wabbit,
        [{"lr": lr, "power_t": t, "quadratic": q} for lr in (0.25, 0.5, 1.0, 2.0)
         for t in (0.3, 0.5) for q in ("ui", "ui uu")]),
    MF: (baselines.side_feature_mf, [{"lr": lr} for lr in (0.05, 0.1, 0.2)]),
}
#: baselines whose initialisation is random: tuned with the first seed, then run on
#: every seed at the knob chosen
SEEDED = {MF}


@dataclass
class Stream:
    """Per-event facts every metric is computed from, in stream order."""

    y: np.ndarray
    user: np.ndarray  # user index
    k: np.ndarray  # the user's labels before this event
    item_k: np.ndarray  # the item's labels before this event
    first_half: np.ndarray
    new_user: np.ndarray  # user first seen in the second half
    new_item: np.ndarray  # item first seen in the second half

    @classmethod
    def of(cls, events: list[Event]) -> Stream:
        n = len(events)
        half = np.arange(n) < n // 2
        users, items = [e["user_id"] for e in events], [e["item_id"] for e in events]
        k, first_user = _prior_counts(users)
        item_k, first_item = _prior_counts(items)
        uid = {u: j for j, u in enumerate(dict.fromkeys(users))}
        return cls(baselines.labels(events), np.array([uid[u] for u in users]), k, item_k,
                   half, ~half[first_user], ~half[first_item])


def _prior_counts(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """For each event: how often its key came before, and where the key first came."""
    seen: dict[str, int] = {}
    first: dict[str, int] = {}
    count, at = np.empty(len(keys), dtype=np.int64), np.empty(len(keys), dtype=np.int64)
    for n, key in enumerate(keys):
        count[n] = seen.get(key, 0)
        seen[key] = count[n] + 1
        at[n] = first.setdefault(key, n)
    return count, at


def _in(k: np.ndarray, lo: int, hi: int | None) -> np.ndarray:
    return (k >= lo) & (k <= (hi if hi is not None else np.iinfo(np.int64).max))


def gauc(p: np.ndarray, s: Stream) -> float:
    """Per-user AUC, averaged over users who have both labels."""
    order = np.argsort(s.user, kind="stable")
    bounds = np.flatnonzero(np.diff(s.user[order])) + 1
    per_user = [auc(p[g], s.y[g]) for g in np.split(order, bounds)]
    return float(np.nanmean(per_user))


def metrics(p: np.ndarray, s: Stream) -> dict[str, float]:
    out = {"AUC": auc(p, s.y), "logloss": logloss(p, s.y), "GAUC": gauc(p, s),
           "AUC 1st half": auc(p[s.first_half], s.y[s.first_half]),
           "AUC 2nd half": auc(p[~s.first_half], s.y[~s.first_half]),
           "new items": auc(p[s.new_item], s.y[s.new_item])}
    for lo, hi in K_BUCKETS:
        b = _in(s.k, lo, hi)
        out[f"k {bucket_label(lo, hi)}"] = auc(p[b], s.y[b])
        out[f"new k {bucket_label(lo, hi)}"] = auc(p[b & s.new_user], s.y[b & s.new_user])
        b = _in(s.item_k, lo, hi)
        out[f"item k {bucket_label(lo, hi)}"] = auc(p[b], s.y[b])
    return out


# -- the runs (each in a worker process) -------------------------------------------------


def run_metarec(overrides: dict[str, Any], seed: int, withheld: str | None) -> np.ndarray:
    """Predictions of a replay with ``overrides``; ``withheld``: an event field left
    empty in every event."""
    import torch

    from streamer.config import Settings
    from streamer.replay import replay

    torch.set_num_threads(1)
    events = list(movielens.events())
    with tempfile.TemporaryDirectory() as tmp:
        source = "movielens-100k"
        if withheld is not None:
            source = os.path.join(tmp, "events.jsonl")
            with open(source, "w") as f:
                f.writelines(json.dumps({**e, withheld: {}}) + "\n" for e in events)
        log = Path(tmp, "predictions.jsonl")
        settings = Settings.of(metrics_port=0, predictions_out=log, seed=seed, **overrides)
        replay(settings, source, progress=False)
        # MovieLens has one rating per (user, item): the key of an event's prediction
        where = {(e["user_id"], e["item_id"]): n for n, e in enumerate(events)}
        p = np.full(len(events), np.nan)
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            p[where[(rec["user_id"], rec["item_id"])]] = rec["p"]
    if np.isnan(p).any():
        raise RuntimeError(f"{int(np.isnan(p).sum())} events got no prediction")
    return p


def run_baseline(name: str, params: Knobs, seed: int) -> np.ndarray:
    extra = {"seed": seed} if name in SEEDED else {}
    return GRIDS[name][0](list(movielens.events()), **params, **extra)


# -- paired bootstrap over users ---------------------------------------------------------


class WeightedAUC:
    """AUC of fixed scores under per-example weights: sort once, then O(n) per weighting."""

    def __init__(self, p: np.ndarray, y: np.ndarray):
        self.order = np.argsort(p, kind="mergesort")
        sp = p[self.order]
        self.group = np.concatenate([[0], np.cumsum(np.diff(sp) != 0)])
        self.y = y[self.order]

    def __call__(self, w: np.ndarray) -> float:
        w = w[self.order]
        neg = np.bincount(self.group, w * (1 - self.y))
        below = np.cumsum(neg) - neg
        pos_w = w * self.y
        num = float((pos_w * (below[self.group] + 0.5 * neg[self.group])).sum())
        return num / (pos_w.sum() * neg.sum())


def paired_bootstrap(ours: list[np.ndarray], theirs: list[np.ndarray], s: Stream,
                     sel: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """AUC(ours) - AUC(theirs) on the selected events (means over seeds), with a 95%
    interval from resampling users with replacement (both sides see the same users)."""
    y, users = s.y[sel], s.user[sel]
    uniq, local = np.unique(users, return_inverse=True)
    a = [WeightedAUC(p[sel], y) for p in ours]
    b = [WeightedAUC(p[sel], y) for p in theirs]
    ones = np.ones(len(y))

    def diff(w: np.ndarray) -> float:
        return float(np.mean([f(w) for f in a]) - np.mean([f(w) for f in b]))

    draws = []
    for _ in range(BOOTSTRAP):
        times = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))
        draws.append(diff(times[local].astype(float)))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return diff(ones), float(lo), float(hi)


# -- report ------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    runs: list[np.ndarray]
    figures: list[dict[str, float]] = field(default_factory=list)
    note: str = ""

    def mean(self, key: str) -> float:
        return float(np.mean([f[key] for f in self.figures]))

    def cell(self, key: str) -> str:
        values = [f[key] for f in self.figures]
        if len(values) == 1 or max(values) == min(values):
            return f"{values[0]:.4f}"
        return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def table(results: list[Result], keys: list[str], best: str) -> list[str]:
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for r in results:
        name = f"**{r.name}** (default)" if r.name == best else r.name
        if r.note:
            name += f" ({r.note})"
        lines.append(f"| {name} | " + " | ".join(r.cell(k) for k in keys) + " |")
    return lines


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [bucket_label(lo, hi) for lo, hi in K_BUCKETS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    for ax, prefix, title in ((axes[0], "k ", "all users"),
                              (axes[1], "new k ", "new users (first seen in 2nd half)")):
        for r in results:
            style = "-o" if r.name.startswith("metarec") else "--s"
            ax.plot(labels, [r.mean(prefix + lb) for lb in labels], style, label=r.name,
                    markersize=4)
        ax.set_title(f"Prequential AUC by prior labels k: {title}")
        ax.set_xlabel("labels the user gave before the prediction (k)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUC")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--readme", type=Path, default=None,
                        help="also rewrite this README's quality block (between its markers)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    events = list(movielens.events())
    stream = Stream.of(events)

    variants = {**OURS, **CONTROLS, **{name: {} for name in WITHHELD}}
    with ProcessPoolExecutor(args.workers) as pool:
        ours_f = {(name, seed): pool.submit(run_metarec, o, seed, WITHHELD.get(name))
                  for name, o in variants.items() for seed in args.seeds}
        first_seed = args.seeds[0]
        grid_f = {(name, j): pool.submit(run_baseline, name, params, first_seed)
                  for name, (_, grid) in GRIDS.items() for j, params in enumerate(grid)}
        ours = {name: Result(name, [ours_f[name, s].result() for s in args.seeds])
                for name in variants}
        results = list(ours.values())
        for name, (_, grid) in GRIDS.items():
            # tuned on the first half only: the best AUC there picks the knob
            first_half = [auc(grid_f[name, j].result()[stream.first_half],
                              stream.y[stream.first_half]) for j in range(len(grid))]
            j = int(np.nanargmax(first_half))
            knobs = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in grid[j].items())
            runs = [grid_f[name, j].result()]
            if name in SEEDED:
                runs += [f.result() for f in [pool.submit(run_baseline, name, grid[j], seed)
                                              for seed in args.seeds[1:]]]
            results.append(Result(name, runs, note=knobs))
    for r in results:
        r.figures = [metrics(p, stream) for p in r.runs]
    best = max(OURS, key=lambda name: ours[name].mean("AUC 1st half"))

    rng = np.random.default_rng(0)
    where = {"all events": np.ones(len(stream.y), dtype=bool)}
    where |= {f"new users, k {bucket_label(lo, hi)}": stream.new_user & _in(stream.k, lo, hi)
              for lo, hi in COMPARED_BUCKETS}
    others = [CONTROL] + [r.name for r in results[len(variants):]]
    comparisons = [(other, w, sel) for other in others for w, sel in where.items()]
    by_name = {r.name: r for r in results}
    boot = [(other, where, *paired_bootstrap(ours[best].runs, by_name[other].runs, stream,
                                              sel, rng))
            for other, where, sel in comparisons]

    k_keys = [f"k {bucket_label(lo, hi)}" for lo, hi in K_BUCKETS]
    lines = [
        f"MovieLens-100K, {len(events):,} events, seeds {args.seeds} (mean ± std where the "
        "seed matters), `python -m bench.quality --seeds "
        f"{' '.join(map(str, args.seeds))}`, {time.perf_counter() - t0:.0f} s.", "",
        f"Default (best first-half AUC among metarec's variants): **{best}**.", "",
        "### Overall", "",
        *table(results, ["AUC", "logloss", "GAUC", "AUC 1st half", "AUC 2nd half"], best), "",
        "### AUC by the user's prior labels k, all users", "",
        *table(results, k_keys, best), "",
        "### AUC by k, new users (first seen in the second half)", "",
        *table(results, ["new " + k for k in k_keys], best), "",
        "### Item cold start: AUC by the item's prior labels, and items new in the 2nd half",
        "", *table(results, ["item " + k for k in k_keys] + ["new items"], best), "",
        f"### Paired bootstrap over users ({BOOTSTRAP} resamples): AUC of {best} minus the "
        "other", "", "| other | events | difference | 95% interval |", "|---|---|---:|---|",
        *[f"| {o} | {w} | {d:+.4f} | [{lo:+.4f}, {hi:+.4f}] |" for o, w, d, lo, hi in boot],
    ]
    summary = readme_tables(results, best, boot, args.seeds, time.perf_counter() - t0)
    goals = targets(results, best, boot)
    lines += ["", "### Against the targets", "", *goals]
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    plot(results, args.out / "quality_auc_by_k.png")
    if args.readme is not None:
        write_readme(args.readme, [*summary, "", *goals])
    print("\n".join(lines))
    print(f"\nwrote {args.out / 'quality.md'} and {args.out / 'quality_auc_by_k.png'}"
          + ("" if args.readme is None else f", and its block in {args.readme}"))


Comparison = tuple[str, str, float, float, float]  # other, events, difference, 95% interval
NEW_BUCKETS = [f"new k {bucket_label(lo, hi)}" for lo, hi in K_BUCKETS]
#: issue 16's targets: overall AUC, then new users' k 0-4, 5-9, 10-19
TARGETS = {"AUC": 0.785, "new k 0-4": 0.70, "new k 5-9": 0.745, "new k 10-19": 0.755}
README_BEGIN = "<!-- bench/quality.py writes from here -->"
README_END = "<!-- to here -->"


def readme_tables(results: list[Result], best: str, boot: list[Comparison], seeds: list[int],
                  seconds: float) -> list[str]:
    """The README's quality tables: every model by bucket, and the paired intervals."""
    return [f"`python -m bench.quality --seeds {' '.join(map(str, seeds))} --readme README.md`"
             f" ({seconds:.0f} s; seeds {seeds}, mean ± std where the seed matters).", "",
             *table(results, ["AUC", "logloss", "AUC 1st half", *NEW_BUCKETS[:3]], best), "",
             f"Paired bootstrap over users ({BOOTSTRAP:,} resamples), AUC of {best} minus "
             "the other:", "", "| other | events | difference | 95% interval |",
             "|---|---|---:|---|",
             *[f"| {o} | {w} | {d:+.4f} | [{lo:+.4f}, {hi:+.4f}] |" for o, w, d, lo, hi in boot]]


def targets(results: list[Result], best: str, boot: list[Comparison]) -> list[str]:
    """Where issue 16's targets stand, as a table."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    ours = next(r for r in results if r.name == best)
    for key, goal in TARGETS.items():
        got = ours.mean(key)
        lines.append(f"| {key} ≥ {goal:.3f} | {got:.4f} | {'yes' if got >= goal else 'no'} |")
    behind = [f"{o} on {w} ({d:+.4f}, interval from {lo:+.4f})"
              for o, w, d, lo, _ in boot if o != CONTROL and lo <= 0]
    lines.append("| ahead of every baseline in every bucket, interval above zero | "
                 f"{'not ahead of ' + '; '.join(behind) if behind else 'ahead of all'} | "
                 f"{'no' if behind else 'yes'} |")
    gains = [f"{w}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for o, w, d, lo, hi in boot if o == CONTROL]
    lines.append(f"| meta-learning's gain over the fine-tune control, every bucket | "
                 f"{'; '.join(gains)} | reported |")
    return lines


def write_readme(path: Path, block: list[str]) -> None:
    """Replace what stands between the README's markers with ``block``."""
    text = path.read_text()
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    path.write_text(text[:start] + "\n" + "\n".join(block) + "\n" + text[end:])


if __name__ == "__main__":
    main()
