"""Sparse-aware training of θ: gather the rows a batch touches as leaf tensors,
differentiate, and update only those rows with Adagrad.

A dense gradient of a 65k x 32 table per micro-batch would cost more than the
whole forward pass; a batch touches a few hundred rows.
"""

from __future__ import annotations

import torch

from metarec.model import DENSE, TABLES, Examples, Theta

ITEM_TABLES = ("item_emb", "item_bias")
FEATURE_TABLES = ("feat_emb", "feat_bias")


class Localized:
    """A view of θ holding only the rows some batches touch, as leaf tensors."""

    def __init__(self, theta: Theta, batches: list[Examples], dense: tuple[str, ...] = DENSE):
        items = torch.cat([b.item.reshape(-1) for b in batches])
        # Row 0 of the feature tables is padding; keeping it in the view at local
        # index 0 keeps "index > 0 means present" true after remapping.
        feats = torch.cat(
            [torch.zeros(1, dtype=torch.long)]
            + [t.reshape(-1) for b in batches for t in (b.item_feats, b.user_feats)]
        )
        self.item_rows = torch.unique(items)
        self.feat_rows = torch.unique(feats)
        self.theta: Theta = {}
        for name in ITEM_TABLES:
            self.theta[name] = theta[name][self.item_rows].requires_grad_()
        for name in FEATURE_TABLES:
            self.theta[name] = theta[name][self.feat_rows].requires_grad_()
        for name, value in theta.items():
            if name not in TABLES:  # learned ones as leaves, the rest as they are
                self.theta[name] = value.clone().requires_grad_() if name in dense else value
        self.batches = [
            Examples(
                torch.searchsorted(self.item_rows, b.item),
                torch.searchsorted(self.feat_rows, b.item_feats),
                torch.searchsorted(self.feat_rows, b.user_feats),
            )
            for b in batches
        ]

    def rows_of(self, name: str) -> torch.Tensor | None:
        if name in ITEM_TABLES:
            return self.item_rows
        if name in FEATURE_TABLES:
            return self.feat_rows
        return None

    def leaves(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.theta.items() if v.requires_grad}


class Adagrad:
    """Adagrad over θ, row-sparse for the tables. Adaptive per-coordinate rates are
    what online learners of sparse features (VW, FTRL) rely on: rare items keep a
    large step, frequent ones settle."""

    def __init__(self, theta: Theta, initial_accumulator: float = 1e-6, eps: float = 1e-10):
        self.acc = {k: torch.full_like(v, initial_accumulator) for k, v in theta.items()}
        self.eps = eps

    def step(
        self,
        theta: Theta,
        grads: dict[str, torch.Tensor],
        lr: float,
        view: Localized | None = None,
    ) -> None:
        with torch.no_grad():
            for name, grad in grads.items():
                rows = view.rows_of(name) if view is not None else None
                if rows is None:
                    self.acc[name] += grad * grad
                    theta[name] -= lr * grad / (self.acc[name].sqrt() + self.eps)
                else:
                    acc = self.acc[name][rows] + grad * grad
                    self.acc[name][rows] = acc
                    theta[name][rows] -= lr * grad / (acc.sqrt() + self.eps)
            if "feat_emb" in grads:  # padding row stays exactly zero
                theta["feat_emb"][0] = 0.0
                theta["feat_bias"][0] = 0.0


def gradients(loss: torch.Tensor, view: Localized) -> dict[str, torch.Tensor]:
    leaves = view.leaves()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {
        name: (g if g is not None else torch.zeros_like(leaf))
        for (name, leaf), g in zip(leaves.items(), grads, strict=True)
    }


__all__ = ["TABLES", "Adagrad", "Localized", "gradients"]
