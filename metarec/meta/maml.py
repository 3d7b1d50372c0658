"""MAML (Finn et al. 2017): the query loss after adapting on the support set,
differentiated through the inner steps (second order)."""

from __future__ import annotations

from metarec.meta.objective import QueryLoss


class MAML(QueryLoss):
    """Learns φ_0, the global bias and the tables; the inner rates stay fixed."""
