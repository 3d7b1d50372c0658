"""θ's durable state as a stream of sparse deltas.

Everything the learner shares across users and would lose in a crash lives in a
few arrays: θ itself, θ's online Adagrad accumulators, the meta-update's
Adagrad accumulators and the item feature table. :class:`ThetaState` keeps a
copy of them as of the last durable point (the *base*) and gives the rows that
changed since as one delta: additive for θ and its accumulators (so deltas of
several group members add up, as their steps would), the new rows for the item
feature table (latest wins). A delta is made durable with the offsets it
reflects (:meth:`take` then :meth:`committed`), or dropped (:meth:`rollback`,
the learner back to the base); another member's delta is applied to both
(:meth:`apply`), so it is never sent again as this member's own.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from metarec.errors import MetarecError
from metarec.learner import OnlineLearner


class DeltaError(MetarecError, ValueError):
    """Bytes that are not a θ delta of this layout."""


@dataclass(frozen=True)
class Delta:
    """Rows of each array that changed, and how many labels the change learned."""

    examples: int
    rows: dict[str, np.ndarray]  # array name -> int64 row indexes
    values: dict[str, np.ndarray]  # array name -> those rows' change (or new value)

    def dumps(self) -> bytes:
        buf = io.BytesIO()
        arrays = {"examples": np.array([self.examples], dtype=np.int64)}
        for name, rows in self.rows.items():
            arrays[f"rows/{name}"] = rows
            arrays[f"values/{name}"] = self.values[name]
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return zlib.compress(buf.getvalue(), 1)

    @classmethod
    def loads(cls, payload: bytes) -> Delta:
        try:
            with np.load(io.BytesIO(zlib.decompress(payload)), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            examples = int(arrays.pop("examples")[0])
            names = [k.removeprefix("rows/") for k in arrays if k.startswith("rows/")]
            return cls(examples, {n: arrays[f"rows/{n}"] for n in names},
                       {n: arrays[f"values/{n}"] for n in names})
        except Exception as exc:  # whatever the bytes make zlib or numpy raise
            raise DeltaError(f"not a θ delta: {exc!r:.200}") from exc


#: arrays whose delta is a new value, not a change to add
LATEST_WINS = frozenset({"items/features"})


class ThetaState:
    """The learner's shared arrays, their base copy, and the deltas between."""

    def __init__(self, learner: OnlineLearner):
        self.learner = learner
        self.arrays = self._arrays(learner)
        self.base = {name: a.copy() for name, a in self.arrays.items()}
        self._examples_at_base = learner.examples_learned
        # the delta taken, and its rows' values then, until it is durable or not
        self._taken: tuple[Delta, dict[str, np.ndarray]] | None = None

    @staticmethod
    def _arrays(learner: OnlineLearner) -> dict[str, np.ndarray]:
        """Every array by name, as 2-D numpy views (rows first) written in place."""
        out: dict[str, np.ndarray] = {}
        for prefix, tensors in (("theta", learner.theta), ("online_acc", learner.online.opt.acc),
                                ("meta_acc", learner.meta.opt.acc)):
            out.update(row_views(prefix, tensors))
        out["items/features"] = learner.items.table
        return out

    def take(self) -> Delta | None:
        """What changed since the base (None: nothing). Held until :meth:`committed`
        or :meth:`rollback`; learning may go on meanwhile."""
        rows: dict[str, np.ndarray] = {}
        values: dict[str, np.ndarray] = {}
        taken: dict[str, np.ndarray] = {}
        for name, cur in self.arrays.items():
            base = self.base[name]
            changed = np.flatnonzero((cur != base).any(axis=1))
            if len(changed):
                rows[name] = changed
                taken[name] = cur[changed]
                values[name] = taken[name].copy() if name in LATEST_WINS else \
                    taken[name] - base[changed]
        examples = self.learner.examples_learned - self._examples_at_base
        delta = Delta(examples, rows, values) if rows or examples else None
        self._taken = None if delta is None else (delta, taken)
        return delta

    def committed(self) -> None:
        """The delta last taken is durable: the rows as they were when it was taken
        are now the base (what was learned since is not)."""
        taken, self._taken = self._taken, None
        if taken is None:
            return
        delta, values = taken
        for name, rows in delta.rows.items():
            self.base[name][rows] = values[name]
        self._examples_at_base += delta.examples

    def rollback(self) -> None:
        """Back to the base: what was learned since is dropped (its records are
        read again)."""
        self._taken = None
        for name, cur in self.arrays.items():
            cur[...] = self.base[name]
        self.learner.examples_learned = self._examples_at_base
        self.learner.online.resync_items()

    def apply(self, delta: Delta) -> None:
        """Another member's durable delta, into the learner and the base alike."""
        check(delta, self.arrays)
        in_flight = self._taken
        for name, rows in delta.rows.items():
            values = delta.values[name]
            add(self.arrays[name], rows, values, name)
            add(self.base[name], rows, values, name)
            if in_flight is not None and name in in_flight[1]:
                # a delta of ours in flight: its rows become the base as they were
                # when taken, plus what others changed since
                taken_rows = in_flight[0].rows[name]
                at = np.minimum(np.searchsorted(taken_rows, rows), len(taken_rows) - 1)
                hit = taken_rows[at] == rows
                add(in_flight[1][name], at[hit], values[hit], name)
        self.learner.examples_learned += delta.examples
        self._examples_at_base += delta.examples
        self.learner.online.resync_items()


def row_views(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``tensors`` as 2-D numpy views, rows first, named ``<prefix>/<name>``: the
    arrays a delta names."""
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        a = t.detach().numpy()
        out[f"{prefix}/{name}"] = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    return out


def check(delta: Delta, arrays: dict[str, np.ndarray], *,
          only: frozenset[str] | None = None) -> None:
    """Raise :class:`DeltaError` unless every array of ``delta`` (of those in
    ``only``, if given) fits ``arrays``: checked before any is applied."""
    for name, rows in delta.rows.items():
        if only is not None and name not in only:
            continue
        cur = arrays.get(name)
        values = delta.values[name]
        if (cur is None or rows.ndim != 1 or rows.dtype.kind not in "iu"
                or values.shape != (len(rows), *cur.shape[1:])
                or values.dtype != cur.dtype
                or (len(rows) and (rows.min() < 0 or rows.max() >= len(cur)))
                or (values.dtype.kind == "f" and not np.isfinite(values).all())):
            raise DeltaError(f"delta of {name} does not fit this layout")


def add(target: np.ndarray, rows: np.ndarray, values: np.ndarray, name: str) -> None:
    """One array's part of a delta, into ``target`` (named ``name``)."""
    if name in LATEST_WINS:
        target[rows] = values
    else:
        target[rows] += values


__all__ = ["Delta", "DeltaError", "ThetaState", "add", "check", "row_views"]
