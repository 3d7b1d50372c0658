"""Prequential (test-then-train) evaluation: running logloss and AUC over a
window of recent predictions, plus whole-run figures by the user's prior count k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

K_BUCKETS: tuple[tuple[int, int | None], ...] = ((0, 4), (5, 9), (10, 19), (20, 49), (50, None))


def auc(p: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN if one class is missing."""
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_p)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(p)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(p) else float("nan")


def bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


def by_k(p: np.ndarray, y: np.ndarray, k: np.ndarray,
         buckets: Sequence[tuple[int, int | None]] = K_BUCKETS) -> dict[str, tuple[float, int]]:
    """AUC and count per bucket of k (labelled examples already learned from)."""
    out = {}
    for lo, hi in buckets:
        sel = (k >= lo) & (k <= (hi if hi is not None else np.iinfo(np.int64).max))
        out[bucket_label(lo, hi)] = (auc(p[sel], y[sel]), int(sel.sum()))
    return out


class Prequential:
    """Running figures over the last ``window`` labelled predictions; optionally
    keeps every prediction for the whole-run summary (replay)."""

    def __init__(self, window: int = 10_000, keep_all: bool = False):
        self.window = window
        self._p = np.zeros(window)
        self._y = np.zeros(window)
        self._n = 0
        self.keep_all = keep_all
        self.all_p: list[np.ndarray] = []
        self.all_y: list[np.ndarray] = []
        self.all_k: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return self._n

    def update(self, p: np.ndarray, y: np.ndarray, k: np.ndarray) -> None:
        if len(p) == 0:
            return
        idx = (self._n + np.arange(len(p))) % self.window
        self._p[idx[-self.window:]] = p[-self.window:]
        self._y[idx[-self.window:]] = y[-self.window:]
        self._n += len(p)
        if self.keep_all:
            self.all_p.append(p)
            self.all_y.append(y)
            self.all_k.append(k)

    def windowed(self) -> tuple[float, float]:
        """(logloss, AUC) over the most recent window."""
        m = min(self._n, self.window)
        if self._n <= self.window:
            p, y = self._p[:m], self._y[:m]
        else:
            p, y = self._p, self._y
        return logloss(p, y), auc(p, y)

    def summary(self) -> dict[str, object]:
        p = np.concatenate(self.all_p) if self.all_p else np.zeros(0)
        y = np.concatenate(self.all_y) if self.all_y else np.zeros(0)
        k = np.concatenate(self.all_k) if self.all_k else np.zeros(0, dtype=np.int64)
        return {"count": len(p), "auc": auc(p, y), "logloss": logloss(p, y),
                "ctr": float(y.mean()) if len(y) else float("nan"), "auc_by_k": by_k(p, y, k)}
