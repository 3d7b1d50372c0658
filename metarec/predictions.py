"""The prediction log: the score each impression got when it was seen, and its label."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from metarec.joiner import Labelled


@dataclass(frozen=True, slots=True)
class Prediction:
    """One line of the prediction log."""

    user_id: str
    item_id: str
    timestamp: float
    k: int
    p: float
    label: int

    def to_json(self) -> str:
        ts: float | int = int(self.timestamp) if self.timestamp.is_integer() else self.timestamp
        return json.dumps({"user_id": self.user_id, "item_id": self.item_id, "timestamp": ts,
                           "k": self.k, "p": round(self.p, 6), "label": self.label})


@dataclass
class Predictions:
    """Labelled predictions as columns, one row per label, in the order learned."""

    user_id: list[str] = field(default_factory=list)
    item_id: list[str] = field(default_factory=list)
    timestamp: np.ndarray = field(default_factory=lambda: np.zeros(0))
    k: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    p: np.ndarray = field(default_factory=lambda: np.zeros(0))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def of(cls, learned: list[Labelled]) -> Predictions:
        imps = [lab.impression for lab in learned]
        return cls([imp.user_id for imp in imps], [imp.item_id for imp in imps],
                   np.array([imp.timestamp for imp in imps]),
                   np.array([lab.scored.k for lab in learned], dtype=np.int64),
                   np.array([lab.scored.p for lab in learned]),
                   np.array([lab.label for lab in learned]))

    @classmethod
    def concat(cls, parts: list[Predictions]) -> Predictions:
        return cls([u for p in parts for u in p.user_id], [i for p in parts for i in p.item_id],
                   np.concatenate([p.timestamp for p in parts]),
                   np.concatenate([p.k for p in parts]), np.concatenate([p.p for p in parts]),
                   np.concatenate([p.label for p in parts]))

    def __len__(self) -> int:
        return len(self.user_id)

    def __iter__(self) -> Iterator[Prediction]:
        for user, item, ts, k, p, label in zip(self.user_id, self.item_id,
                                               self.timestamp.tolist(), self.k.tolist(),
                                               self.p.tolist(), self.label.tolist(), strict=True):
            yield Prediction(user, item, ts, k, p, int(label))

    def jsonl(self) -> str:
        """The log lines of these predictions ('' for none)."""
        return "".join(p.to_json() + "\n" for p in self)
